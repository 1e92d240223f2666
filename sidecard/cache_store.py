"""Optional SQLite persistence for the response cache, so a restart keeps it warm (and stale-if-error
still has answers to give right after a restart).

Writes never touch the request path: they go through a bounded channel to one writer task, which commits
them in batches from a worker thread. Entries the memory cache evicts or lets expire are deleted the same
way, so the file stays within the cache's bounds. When the channel is full a write is dropped and counted;
the cache in memory is still right, only the copy on disk is behind (and trimmed at the next start-up).
Times on disk are wall-clock, converted to and from the daemon's monotonic clock at the edges.
"""

from __future__ import annotations

import os
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import trio

from .cache import ENTRY_OVERHEAD, Entry, ResponseCache
from .config import CacheConfig
from .durable import check_regular
from .observe.log import JsonLog
from .observe.metrics import Metrics

WRITE_QUEUE = 1024
BATCH = 256

_SCHEMA = """
CREATE TABLE IF NOT EXISTS entries (
    key TEXT PRIMARY KEY, payload BLOB NOT NULL, stored_at REAL NOT NULL, expires_at REAL NOT NULL,
    stale_until REAL NOT NULL, feature TEXT NOT NULL, prompt TEXT
);
CREATE INDEX IF NOT EXISTS entries_by_age ON entries (stored_at);
"""
_NEWEST = "ORDER BY stored_at DESC, key LIMIT ?"


@dataclass(frozen=True, slots=True)
class Put:
    key: str
    entry: Entry


@dataclass(frozen=True, slots=True)
class Delete:
    keys: tuple[str, ...]


class SqliteStore:
    def __init__(self, path: str, *, clock: Callable[[], float] = trio.current_time, wall: Callable[[], float] = time.time) -> None:
        self.path = path
        self._clock = clock
        self._wall = wall
        self._db: sqlite3.Connection | None = None
        self._send, self._receive = trio.open_memory_channel[Put | Delete](WRITE_QUEUE)
        self.dropped_writes = 0
        self.moved_aside: str | None = None
        self.open_error: str | None = None

    # -- opening (once, at start-up, from a worker thread)

    async def open_async(self, cache: ResponseCache) -> list[tuple[str, Entry]]:
        wall_now = self._wall()
        bounds = (cache.max_entries, cache.max_bytes, cache.max_entry_bytes)
        return await trio.to_thread.run_sync(self.open, wall_now, self._clock() - wall_now, bounds)

    def open(self, wall_now: float, shift: float, bounds: tuple[int, int, int]) -> list[tuple[str, Entry]]:
        """Open (or create) the database and read back the newest entries that fit the cache's `bounds`
        (entries, bytes, bytes per entry), oldest first; the rest are deleted.

        A corrupt or unreadable file is renamed `<path>.corrupt-<unix time>` and replaced by an empty one. If
        even that fails (the directory cannot be created or written), the error propagates, as does
        `NotRegularFile` for a path that is not a regular file (never touched).
        """
        check_regular(self.path)
        try:
            return self._open(wall_now, shift, bounds)
        except sqlite3.OperationalError as exc:
            self.close()
            if _in_use(exc):
                raise  # another process holds it: a healthy file, not to be moved (the daemon serves from memory)
            self._move_aside(exc, wall_now)
        except (sqlite3.DatabaseError, OSError) as exc:
            self.close()
            self._move_aside(exc, wall_now)
        try:
            return self._open(wall_now, shift, bounds)
        except BaseException:
            self.close()
            raise

    def _move_aside(self, exc: BaseException, wall_now: float) -> None:
        self.open_error = str(exc)
        aside = f"{self.path}.corrupt-{int(wall_now)}"
        for suffix in ("", "-wal", "-shm"):
            if os.path.lexists(self.path + suffix):
                check_regular(self.path + suffix)
                os.replace(self.path + suffix, aside + suffix)
                self.moved_aside = aside

    def _open(self, wall_now: float, shift: float, bounds: tuple[int, int, int]) -> list[tuple[str, Entry]]:
        """`shift` converts wall-clock times on disk to the daemon's clock."""
        max_entries, max_bytes, max_entry_bytes = bounds
        path = Path(self.path)
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.exists():
            os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o600))  # SQLite's WAL files copy this mode
        os.chmod(path, 0o600)
        db = self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        if db.execute("PRAGMA quick_check").fetchone()[0] != "ok":
            raise sqlite3.DatabaseError("quick_check failed")
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        db.executescript(_SCHEMA)
        db.execute(
            "DELETE FROM entries WHERE stale_until <= ? OR length(payload) + ? > ?", (wall_now, ENTRY_OVERHEAD, max_entry_bytes)
        )
        # Sizes first (no payloads), to find how many of the newest fit; then read just those.
        count = total = 0
        sizes = db.execute(f"SELECT length(payload) FROM entries {_NEWEST}", (max_entries,))
        try:
            for (size,) in sizes:
                total += size + ENTRY_OVERHEAD
                if total > max_bytes:
                    break
                count += 1
        finally:
            sizes.close()
        db.execute(f"DELETE FROM entries WHERE key NOT IN (SELECT key FROM entries {_NEWEST})", (count,))
        rows = db.execute(
            f"SELECT key, payload, stored_at, expires_at, stale_until, feature, prompt FROM entries {_NEWEST}", (count,)
        ).fetchall()
        rows.reverse()  # oldest first: the LRU's order
        return [
            (key, Entry(payload, stored + shift, expires + shift, stale + shift, (feature, prompt)))
            for key, payload, stored, expires, stale, feature, prompt in rows
        ]

    # -- writing

    def put(self, key: str, entry: Entry) -> None:
        self._enqueue(Put(key, entry))

    def delete(self, keys: list[str]) -> None:
        if keys:
            self._enqueue(Delete(tuple(keys)))

    def _enqueue(self, op: Put | Delete) -> None:
        try:
            self._send.send_nowait(op)
        except trio.WouldBlock:
            self.dropped_writes += 1

    async def run_writer(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Own the write queue until cancelled; on cancellation, flush what is queued (bounded)."""
        task_status.started()
        try:
            async for op in self._receive:
                batch = [op]
                while len(batch) < BATCH:
                    try:
                        batch.append(self._receive.receive_nowait())
                    except trio.WouldBlock:
                        break
                await trio.to_thread.run_sync(self._commit, batch, self._wall() - self._clock())
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(2):
                rest = []
                while True:
                    try:
                        rest.append(self._receive.receive_nowait())
                    except (trio.WouldBlock, trio.EndOfChannel):
                        break
                if rest:
                    await trio.to_thread.run_sync(self._commit, rest, self._wall() - self._clock())
                await trio.to_thread.run_sync(self.close)

    def _commit(self, batch: list[Put | Delete], shift: float) -> None:
        """Runs in a worker thread; `shift` converts the daemon's clock to wall-clock time."""
        db = self._db
        if db is None:
            return
        try:
            db.execute("BEGIN")
            for op in batch:
                if isinstance(op, Put):
                    e = op.entry
                    db.execute(
                        "INSERT OR REPLACE INTO entries VALUES (?, ?, ?, ?, ?, ?, ?)",
                        (op.key, e.payload, e.stored_at + shift, e.expires_at + shift, e.stale_until + shift, e.labels[0], e.labels[1]),
                    )
                else:
                    db.executemany("DELETE FROM entries WHERE key = ?", [(k,) for k in op.keys])
            db.execute("COMMIT")
        except sqlite3.Error:
            try:
                db.execute("ROLLBACK")
            except sqlite3.Error:
                pass
            self.dropped_writes += len(batch)

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None


def _in_use(exc: sqlite3.OperationalError) -> bool:
    return "locked" in str(exc) or "busy" in str(exc)


async def start_cache(
    settings: CacheConfig, path: str, services: trio.Nursery, *, metrics: Metrics, log: JsonLog, wall: Callable[[], float]
) -> tuple[ResponseCache | None, SqliteStore | None]:
    """The response cache as configured (None when off): in memory, and with `store = "sqlite"` restored from and
    kept in the file at PATH, its writer started in SERVICES. A file that cannot be used leaves the cache in memory
    alone: the cache is an optimisation, never a reason not to serve."""
    if not settings.enabled:
        return None, None
    cache = ResponseCache(max_entries=settings.max_entries, max_bytes=settings.max_bytes, max_entry_bytes=settings.max_entry_bytes)

    def dropped(keys: list[str]) -> None:  # evicted, expired or flushed
        if store is not None:
            store.delete(keys)
        metrics.cache_entries.set(len(cache))
        metrics.cache_bytes.set(cache.bytes)

    def undecodable(count: int) -> None:
        """Counted every time, logged the first time: a damaged file may hold many such entries."""
        metrics.cache_undecodable.inc()
        if count == 1:
            log.warning("cache_entry_undecodable", action="dropped, answered as a miss",
                        more="further ones are counted in sidecard_cache_undecodable_total, not logged")

    store: SqliteStore | None = None
    cache.on_drop, cache.on_undecodable = dropped, undecodable
    if settings.store != "sqlite":
        return cache, None
    opened = SqliteStore(path, wall=wall)
    try:
        entries = await opened.open_async(cache)
    except (OSError, sqlite3.Error) as exc:
        log.error("cache_store_unavailable", path=opened.path, reason=str(exc))
        return cache, None
    if opened.moved_aside:
        log.error("cache_store_corrupt", path=opened.path, moved_to=opened.moved_aside, reason=opened.open_error)
    for key, entry in entries:
        cache.put(key, entry)
    store = opened
    dropped([])
    log.info("cache_loaded", path=store.path, entries=len(cache))
    await services.start(store.run_writer)
    return cache, store
