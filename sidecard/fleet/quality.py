"""Quality windows across the fleet, and decisions taken once for the whole fleet.

Each sidecar counts what its monitor sees (judge scores, heuristic check failures) per (prompt, version, model)
and per time bucket, and adds its counts to the store in the background every `flush_interval_s`
(HINCRBYFLOAT into `{ns}:q:<bucket start>`, one hash per bucket, expiring after `retention_s`). A fleet-wide
read sums the buckets of a window, so a canary is judged on the whole fleet's sample. The batch is bounded:
counts that cannot be added while the store is away are kept for the next flush up to `max_fields`, then
dropped (and counted).

`decide` is how a fleet-wide remedy (a canary's rollback) happens once per release: a decision's record
(`{ns}:d:<name>`: who took it, when) is replaced by compare-and-set, so of the sidecars that judged on the same
record one takes it and the others learn who did. The record is also where the next release starts: a canary
re-released after a rollback is judged on the buckets after it (`read_window`'s `after`), not on the answers
that had it rolled back.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from ..config import MonitorSettings
from .connection import ADMIN_TIMEOUT_S, Connection
from .errors import StoreDataError
from .keys import SCHEMA, Keys
from .scripts import DECIDE

Key = tuple[str, str, str]  # (prompt or "feature:<name>", version or "-", model): the monitor's keys
SCORE_SUM, SCORES, CHECKED, FAILED = "s", "n", "a", "f:"


@dataclass(slots=True)
class Counts:
    score_sum: float = 0.0
    scores: int = 0
    checked: int = 0  # answers the heuristic checks ran on
    failures: dict[str, int] = field(default_factory=dict)  # per check

    @property
    def mean(self) -> float | None:
        return self.score_sum / self.scores if self.scores else None

    def failure_rate(self, check: str) -> float | None:
        return self.failures.get(check, 0) / self.checked if self.checked else None


def _field(key: Key, counter: str) -> str:
    if any("\t" in part for part in key):
        raise ValueError("a quality key must not contain a tab")
    return "\t".join((*key, counter))


class QualityBatch:
    """Counts not yet in the store, by bucket (pure: `now` passed in)."""

    def __init__(self, bucket_s: int, *, max_fields: int = 10_000) -> None:
        self.bucket_s = bucket_s
        self.max_fields = max_fields
        self.dropped = 0
        self._pending: dict[int, dict[str, float]] = {}
        self._fields = 0

    def _add(self, now: float, name: str, delta: float) -> None:
        bucket = math.floor(now / self.bucket_s) * self.bucket_s
        fields = self._pending.setdefault(bucket, {})
        if name not in fields:
            if self._fields >= self.max_fields:
                self.dropped += 1
                return
            self._fields += 1
        fields[name] = fields.get(name, 0.0) + delta

    def add_score(self, key: Key, score: float, now: float) -> None:
        self._add(now, _field(key, SCORE_SUM), score)
        self._add(now, _field(key, SCORES), 1)

    def add_checks(self, key: Key, failed: Iterable[str], now: float) -> None:
        """One answer the heuristic checks ran on, and the checks it failed."""
        self._add(now, _field(key, CHECKED), 1)
        for check in failed:
            self._add(now, _field(key, FAILED + check), 1)

    def drain(self) -> dict[int, dict[str, float]]:
        pending, self._pending, self._fields = self._pending, {}, 0
        return pending

    def restore(self, pending: dict[int, dict[str, float]]) -> None:
        """Put back counts a flush could not deliver (older than what came since, so added first)."""
        for bucket, fields in pending.items():
            for name, delta in fields.items():
                self._add(bucket, name, delta)

    def __bool__(self) -> bool:
        return bool(self._pending)


async def flush(connection: Connection, keys: Keys, batch: QualityBatch, *, retention_s: int) -> None:
    """Add the batch's counts to the store in one round trip; on failure they stay in the batch (and the error
    is raised for the caller to report)."""
    pending = batch.drain()
    if not pending:
        return
    commands: list[tuple[object, ...]] = []
    for bucket, fields in pending.items():
        commands += [("HINCRBYFLOAT", keys.quality(bucket), name, delta) for name, delta in fields.items()]
        commands.append(("EXPIRE", keys.quality(bucket), retention_s))
    try:
        await connection.pipeline(commands, op="quality_flush", timeout_s=ADMIN_TIMEOUT_S)  # type: ignore[arg-type]
    except BaseException:
        batch.restore(pending)
        raise


async def read_window(
    connection: Connection, keys: Keys, *, now: float, span_s: float, bucket_s: int, after: Mapping[tuple[str, str], float] = {},
) -> dict[Key, Counts]:
    """The whole fleet's counts per key over the buckets that overlap the last `span_s`; a (prompt, version) in
    `after` counts only the buckets that start after its time."""
    last = math.floor(now / bucket_s) * bucket_s
    first = math.floor((now - span_s) / bucket_s) * bucket_s
    buckets = range(first, last + bucket_s, bucket_s)
    replies = await connection.pipeline([("HGETALL", keys.quality(b)) for b in buckets], op="quality_read", timeout_s=ADMIN_TIMEOUT_S)
    out: dict[Key, Counts] = {}
    for bucket, reply in zip(buckets, replies):
        for i in range(0, len(reply), 2):
            name, value = reply[i].decode(errors="replace"), reply[i + 1]
            parts = name.split("\t")
            try:
                number = float(value)
            except ValueError:
                number = math.nan
            if len(parts) != 4 or not math.isfinite(number):
                raise StoreDataError(f"{keys.quality(bucket)} holds {name[:60]!r} = {value[:20]!r}: not a quality count")
            if bucket <= after.get((parts[0], parts[1]), -math.inf):
                continue
            counts = out.setdefault((parts[0], parts[1], parts[2]), Counts())
            counter = parts[3]
            if counter == SCORE_SUM:
                counts.score_sum += number
            elif counter == SCORES:
                counts.scores += round(number)
            elif counter == CHECKED:
                counts.checked += round(number)
            elif counter.startswith(FAILED):
                check = counter[len(FAILED):]
                counts.failures[check] = counts.failures.get(check, 0) + round(number)
            else:
                raise StoreDataError(f"{keys.quality(bucket)} holds an unknown counter {counter[:30]!r}")
    return out


@dataclass(frozen=True, slots=True)
class Decision:
    by: str  # the instance that took it
    at: float  # unix time

    def text(self) -> str:
        return f"{self.by}|{self.at!r}"


def _decision(keys: Keys, name: str, value: bytes | None) -> Decision | None:
    if not value:
        return None
    by, _, at = value.decode(errors="replace").rpartition("|")
    try:
        return Decision(by, float(at))
    except ValueError:
        raise StoreDataError(f"{keys.decision(name)} holds {value[:40]!r}: not a decision") from None


async def read_decisions(connection: Connection, keys: Keys, names: list[str]) -> list[Decision | None]:
    if not names:
        return []
    replies = await connection.pipeline([("GET", keys.decision(n)) for n in names], op="decisions", timeout_s=ADMIN_TIMEOUT_S)
    return [_decision(keys, n, r) for n, r in zip(names, replies)]


async def decide(
    connection: Connection, keys: Keys, name: str, *, seen: Decision | None, instance: str, now: float, ttl_s: float,
) -> tuple[bool, Decision | None]:
    """(True, ours) if this sidecar takes decision `name`, whose record it read as `seen`; (False, the record
    now) if another sidecar took it since. The record lasts `ttl_s`."""
    ours = Decision(instance, now)
    reply = await connection.run_script(
        DECIDE, [keys.schema, keys.decision(name)], [SCHEMA, seen.text() if seen else "", ours.text(), math.ceil(ttl_s * 1000)],
        timeout_s=ADMIN_TIMEOUT_S,
    )
    if not (isinstance(reply, list) and len(reply) == 2 and reply[0] in (0, 1)):
        raise StoreDataError(f"the decide script answered something this sidecard cannot read: {reply!r:.80}")
    return reply[0] == 1, _decision(keys, name, reply[1])


def merged(window: dict[Key, Counts], prompt: str, version: str) -> Counts:
    """One prompt version's counts over every model (a canary is judged as a version, whichever model answered)."""
    total = Counts()
    for (name, v, _model), counts in window.items():
        if name == prompt and v == version:
            total.score_sum += counts.score_sum
            total.scores += counts.scores
            total.checked += counts.checked
            for check, n in counts.failures.items():
                total.failures[check] = total.failures.get(check, 0) + n
    return total


def canary_verdict(canary: Counts, stable: Counts, settings: MonitorSettings) -> str | None:
    """Why the fleet's sample of a canary fails, or None: its mean score below the floor (the threshold, or the
    baseline minus `max_drop`: a configured baseline, else stable's fleet mean once it has `baseline_samples`), or
    a check failing on more than `check_rate_threshold` of its answers; each needs `min_samples` of the fleet's."""
    mean = canary.mean
    if mean is not None and canary.scores >= settings.min_samples:
        baseline = settings.baseline
        if baseline is None and stable.scores >= settings.baseline_samples:
            baseline = stable.mean
        floor = settings.threshold if baseline is None else max(settings.threshold, baseline - settings.max_drop)
        if mean < floor:
            return f"the fleet's mean score {mean:.2f} over {canary.scores} judged answers is below {floor:.2f}"
    if canary.checked >= settings.min_samples:
        for check in sorted(canary.failures):
            rate = canary.failure_rate(check)
            if rate is not None and rate > settings.check_rate_threshold:
                return (f"check {check} failed on {rate:.0%} of the fleet's {canary.checked} answers "
                        f"(more than {settings.check_rate_threshold:.0%})")
    return None
