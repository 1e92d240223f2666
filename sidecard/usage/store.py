"""Durable usage: every answered request, rolled up by the hour, in SQLite; and queries over the rollups.

A row of `usage_hourly` is one (hour, feature, user, prompt, version, model, route, outcome) with its sums:
requests, tokens (input, output, cache read, cache write), cost and cache savings in USD. Unknown parts are
"" (a request with no feature, no user key, no prompt). `user` is the salted pseudonym the log line uses
(`observe.redact.pseudonym`): the store refuses anything else, so no raw user id can reach the file.

Outcome classes: "ok" (answered by an upstream), "cached" (from the response cache, or sharing another
request's upstream call), "degraded" (a static or stale fallback answer), "error" (the client got an error).

Cache savings (`saved_usd`): what the cache kept off the bill, priced with the table in force when the request
was answered. A response-cache answer saves the whole cost of the answer it reuses; an upstream answer that
read the provider's prompt cache saves the difference between those tokens at the input price and at the
cache-read price (`cache_savings`).

Writes never touch the request path: `UsageWriter.submit` puts a record on a bounded channel (a full channel
drops it and counts it); the writer task sums what arrived over `flush_interval_s` into rollups and writes them
in one transaction in a worker thread. A crash loses at most that interval. The database is in WAL mode, so
`sidecardctl` can read while the daemon writes; its file is created 0600.
"""

from __future__ import annotations

import math
import os
import re
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Literal

import msgspec
import trio

from ..durable import check_regular
from ..pricing import PriceTable
from ..protocol import Usage

By = Literal["feature", "user", "prompt", "model", "route"]
Window = Literal["hour", "day", "month"]
Outcome = Literal["ok", "cached", "degraded", "error"]

SCHEMA_VERSION: Final = 1
FINAL_FLUSH_S: Final = 5.0
PRUNE_EVERY_S: Final = 3600.0
_PSEUDONYM: Final = re.compile(r"[0-9a-f]{16}")
_KEY_COLUMNS: Final = ("feature", "user", "prompt", "version", "model", "route", "outcome")
_SUM_COLUMNS: Final = ("requests", "input_tokens", "output_tokens", "cache_read_tokens", "cache_write_tokens", "cost_usd", "saved_usd")
_SCHEMA: Final = f"""
CREATE TABLE IF NOT EXISTS usage_hourly (
    hour INTEGER NOT NULL,
    {", ".join(f"{c} TEXT NOT NULL" for c in _KEY_COLUMNS)},
    requests INTEGER NOT NULL, input_tokens INTEGER NOT NULL, output_tokens INTEGER NOT NULL,
    cache_read_tokens INTEGER NOT NULL, cache_write_tokens INTEGER NOT NULL,
    cost_usd REAL NOT NULL, saved_usd REAL NOT NULL,
    PRIMARY KEY (hour, {", ".join(_KEY_COLUMNS)})
) WITHOUT ROWID;
PRAGMA user_version = {SCHEMA_VERSION};
"""
_UPSERT: Final = (
    f"INSERT INTO usage_hourly (hour, {', '.join(_KEY_COLUMNS)}, {', '.join(_SUM_COLUMNS)}) "
    f"VALUES ({', '.join('?' * (1 + len(_KEY_COLUMNS) + len(_SUM_COLUMNS)))}) "
    f"ON CONFLICT DO UPDATE SET {', '.join(f'{c} = {c} + excluded.{c}' for c in _SUM_COLUMNS)}"
)
_PERIOD: Final = {
    "hour": "hour * 3600",
    "day": "(hour / 24) * 86400",
    "month": "CAST(strftime('%s', hour * 3600, 'unixepoch', 'start of month') AS INTEGER)",
}
_GROUP: Final = {"feature": "feature", "user": "user", "prompt": "prompt, version", "model": "model", "route": "route"}


class UsageRecord(msgspec.Struct, frozen=True, kw_only=True):
    """One answered request, as the accounting step sees it."""

    at: float  # unix time it was answered
    feature: str = ""
    user: str = ""  # the pseudonym, never the raw key ("" for none)
    prompt: str = ""
    version: str = ""
    model: str = ""  # the model that answered (the requested one for errors and cache answers)
    route: str = ""
    outcome: Outcome = "ok"
    input_tokens: int = 0
    output_tokens: int = 0
    cache_read_tokens: int = 0
    cache_write_tokens: int = 0
    cost_usd: float = 0.0
    saved_usd: float = 0.0

    def __post_init__(self) -> None:
        if self.user and not _PSEUDONYM.fullmatch(self.user):
            raise ValueError("usage records carry the user's pseudonym (observe.redact.pseudonym), never the raw key")


def cache_savings(prices: PriceTable, model: str, usage: Usage, *, from_response_cache: bool) -> float:
    """USD the caches saved on one request (see the module docstring)."""
    if from_response_cache:
        return prices.cost(model, usage)
    if not usage.cache_read_input_tokens:
        return 0.0
    uncached = msgspec.structs.replace(
        usage, input_tokens=usage.input_tokens + usage.cache_read_input_tokens, cache_read_input_tokens=0
    )
    return max(0.0, prices.cost(model, uncached) - prices.cost(model, usage))


@dataclass(frozen=True, slots=True)
class UsageRow:
    """One key's usage in one period (a report row)."""

    period: int  # unix time the hour, day (UTC) or month (UTC) starts
    key: str  # the feature, user pseudonym, "prompt@version", model or route ("" for none)
    requests: int
    input_tokens: int
    output_tokens: int
    cache_read_tokens: int
    cache_write_tokens: int
    cost_usd: float
    saved_usd: float
    errors: int

    @property
    def error_rate(self) -> float:
        return self.errors / self.requests if self.requests else 0.0


Rollup = dict[tuple[int, str, str, str, str, str, str, str], list[float]]


def roll_up(records: Iterable[UsageRecord], into: Rollup | None = None) -> Rollup:
    """Sum records by hour and key."""
    rollup: Rollup = {} if into is None else into
    for r in records:
        key = (math.floor(r.at / 3600), r.feature, r.user, r.prompt, r.version, r.model, r.route, r.outcome)
        sums = rollup.get(key)
        if sums is None:
            rollup[key] = [1, r.input_tokens, r.output_tokens, r.cache_read_tokens, r.cache_write_tokens, r.cost_usd, r.saved_usd]
        else:
            sums[0] += 1
            sums[1] += r.input_tokens
            sums[2] += r.output_tokens
            sums[3] += r.cache_read_tokens
            sums[4] += r.cache_write_tokens
            sums[5] += r.cost_usd
            sums[6] += r.saved_usd
    return rollup


def _merge(rollup: Rollup, key: tuple[int, str, str, str, str, str, str, str], sums: list[float]) -> None:
    current = rollup.get(key)
    rollup[key] = sums if current is None else [a + b for a, b in zip(current, sums)]


class UsageStore:
    """The SQLite file. Blocking: from Trio, call it in a worker thread (the writer does). Thread-safe."""

    def __init__(self, path: str | os.PathLike[str], *, read_only: bool = False) -> None:
        """Raises sqlite3.Error for a file that is not a usage database (see `open_store`)."""
        self.path = Path(path)
        self._lock = threading.Lock()
        if read_only:
            self._db = sqlite3.connect(f"{self.path.resolve().as_uri()}?mode=ro", uri=True, check_same_thread=False)
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            check_regular(self.path)
            os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600))  # created 0600 (WAL files follow)
            self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        try:
            version = self._db.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise sqlite3.DatabaseError(f"written by a newer sidecard (schema {version})")
            if not read_only:
                self._db.execute("PRAGMA journal_mode = WAL")
                self._db.execute("PRAGMA synchronous = NORMAL")  # WAL: durable across a crash of ours, not the OS's
                self._db.executescript(_SCHEMA)
        except BaseException:
            self._db.close()
            raise

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def write(self, rollup: Rollup) -> None:
        """Add rollups in one transaction."""
        rows = [(*key, *sums) for key, sums in rollup.items()]
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.executemany(_UPSERT, rows)
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def prune(self, before: float) -> int:
        """Drop the rollups of hours that ended before `before` (unix time); returns how many rows went."""
        with self._lock:
            return self._db.execute("DELETE FROM usage_hourly WHERE hour < ?", (math.floor(before / 3600),)).rowcount

    def report(self, by: By, window: Window, since: float, until: float) -> list[UsageRow]:
        """Usage per `by` key per `window` period, for the hours that overlap [since, until): oldest period
        first, then the costliest key first."""
        if by not in _GROUP or window not in _PERIOD:
            raise ValueError(f"by must be one of {', '.join(_GROUP)}; window one of {', '.join(_PERIOD)}")
        group = _GROUP[by]
        key = "prompt || CASE WHEN version = '' THEN '' ELSE '@' || version END" if by == "prompt" else group
        sql = (
            f"SELECT {_PERIOD[window]} AS period, {key} AS key, "
            f"{', '.join(f'SUM({c})' for c in _SUM_COLUMNS)}, "
            "SUM(CASE WHEN outcome = 'error' THEN requests ELSE 0 END) "
            "FROM usage_hourly WHERE hour >= ? AND hour < ? "
            f"GROUP BY period, {group} ORDER BY period, SUM(cost_usd) DESC, key"
        )
        with self._lock:
            rows = self._db.execute(sql, (math.floor(since / 3600), math.ceil(until / 3600))).fetchall()
        return [UsageRow(*row) for row in rows]


def open_store(path: str | os.PathLike[str]) -> tuple[UsageStore, str | None]:
    """The store at `path`, or (when the file is corrupt or from a newer version) a fresh one with the old
    file moved aside, and what happened. Never raises for a bad file; raises OSError for a directory that
    cannot be written, and `NotRegularFile` for a path that is not a regular file (never moved)."""
    try:
        return UsageStore(path), None
    except sqlite3.DatabaseError as exc:
        moved = Path(f"{path}.corrupt-{int(time.time())}")
        for suffix in ("", "-wal", "-shm"):
            try:
                check_regular(f"{path}{suffix}")
                os.replace(f"{path}{suffix}", f"{moved}{suffix}")
            except FileNotFoundError:
                pass
        return UsageStore(path), f"usage file {path} is unusable ({exc}): moved to {moved}; usage starts from empty"


class RecordInbox:
    """A bounded channel of usage records: `submit` (the request path's side) never blocks and never raises; a
    full channel drops the record and counts it."""

    def __init__(self, queue_size: int) -> None:
        self._send, self._receive = trio.open_memory_channel[UsageRecord](queue_size)
        self.dropped = 0

    def submit(self, record: UsageRecord) -> None:
        try:
            self._send.send_nowait(record)
        except (trio.WouldBlock, trio.ClosedResourceError):
            self.dropped += 1


class UsageWriter(RecordInbox):
    """The request path's door to the store: `submit` never blocks and never raises."""

    def __init__(
        self,
        store: UsageStore,
        *,
        queue_size: int = 50_000,
        flush_interval_s: float = 1.0,
        retention_s: float | None = 400 * 86_400.0,
        max_pending_keys: int = 100_000,
        wall_clock: Callable[[], float] = time.time,
        on_error: Callable[[str], object] | None = None,
    ) -> None:
        """`retention_s`: rollups older than this are pruned (hourly); None keeps everything. `on_error` hears
        of a failing write once, until a write succeeds again; the rollups are kept for the next try (up to
        `max_pending_keys` of them, then new keys are dropped and counted)."""
        if queue_size < 1 or flush_interval_s <= 0 or max_pending_keys < 1:
            raise ValueError("queue_size and max_pending_keys must be at least 1, flush_interval_s positive")
        super().__init__(queue_size)
        self.store = store
        self._flush_interval_s = flush_interval_s
        self._retention_s = retention_s
        self._max_pending_keys = max_pending_keys
        self._wall_clock = wall_clock
        self._on_error = on_error
        self._pending: Rollup = {}
        self._next_prune = -math.inf
        # `dropped`: records lost, the channel was full or too many keys waited for a failing disk
        self.writes = 0
        self.write_failures = 0
        self.last_error: str | None = None

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Write until cancelled; then one last, shielded write of what has arrived (bounded)."""
        task_status.started()
        try:
            while True:
                self._take([await self._receive.receive()])  # taken at once: a cancellation must not lose it
                await trio.sleep(self._flush_interval_s)  # let a batch gather: one transaction per interval
                await self.flush()
        finally:
            with trio.move_on_after(FINAL_FLUSH_S, shield=True):
                await self.flush(abandon_on_cancel=True)

    def _take(self, records: list[UsageRecord]) -> None:
        """Sum what has arrived into the pending rollups."""
        while True:
            try:
                records.append(self._receive.receive_nowait())
            except trio.WouldBlock:
                break
        pending = self._pending
        for key, sums in roll_up(records).items():
            if key in pending or len(pending) < self._max_pending_keys:  # (the cap binds while the disk fails)
                _merge(pending, key, sums)
            else:
                self.dropped += int(sums[0])

    async def flush(self, *, abandon_on_cancel: bool = False) -> None:
        """Write what has arrived (the rollups of a failed write too), in a worker thread."""
        self._take([])
        now = self._wall_clock()
        prune = self._retention_s is not None and now >= self._next_prune
        if not self._pending and not prune:
            return
        pending, self._pending = self._pending, {}
        try:
            await trio.to_thread.run_sync(self._write, pending, now if prune else None, abandon_on_cancel=abandon_on_cancel)
        except (sqlite3.Error, OSError) as exc:
            for key, sums in pending.items():  # kept for the next try, with what arrived meanwhile
                _merge(self._pending, key, sums)
            self.write_failures += 1
            error = f"could not write {self.store.path}: {exc}"
            if error != self.last_error and self._on_error is not None:
                self._on_error(error)
            self.last_error = error
            return
        if prune:
            self._next_prune = now + PRUNE_EVERY_S
        self.writes += 1
        self.last_error = None

    def _write(self, pending: Rollup, prune_at: float | None) -> None:
        if pending:
            self.store.write(pending)
        if prune_at is not None and self._retention_s is not None:
            self.store.prune(prune_at - self._retention_s)
