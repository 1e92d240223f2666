"""The durable job store: one SQLite file (WAL, mode 0600), every change one transaction.

A job's states: accepted -> queued_batch | queued_engine -> running -> succeeded | failed | cancelled (a job added
with its lane already chosen starts queued). A job in a batch is `running` with lane "batch" from the moment it
is put in one; one on the engine is `running` with lane "engine". A batch: submitting (its jobs chosen, the create call not yet answered) -> in_progress (the
upstream's id recorded) -> done (its results applied) | abandoned.

Exactly once: every claim of a job (into a batch, onto the engine), every requeue and every cancel bumps its
fencing token (`fence`) and its attempt counter on a claim. A completion names the fence of the claim it comes
from and takes effect only if the job is still `running` under that fence: a batch result that arrives after
its job fell back to the engine, a second worker, or a result read again after a restart can never complete a
job twice. A batch's requests carry the fence in their `custom_id` (`custom_id`, `parse_custom_id`).

Durability: `synchronous="full"` fsyncs every commit (the WAL) before it returns, so an accepted job survives a
power cut; "normal" fsyncs at checkpoints, so it survives a crash of the process but not of the machine.

Recovery (`recover`, once at start): jobs that were running on the engine go back to its queue (a run cut short
may have been paid for; the job still completes once); batches whose create call was never recorded are
abandoned and their jobs queued for a batch again (an upstream batch created in that instant is paid for and
never read); batches in flight stay, to be polled and read again (completions already made are no-ops).

The file holds the jobs' requests and answers until `purge` removes them (after the retention time): it is
created 0600, in the state directory, like the spend file. One connection, used by one thread at a time (the
runner serializes its calls and runs them in a worker thread); every method takes `now` (unix time).
"""

from __future__ import annotations

import os
import secrets
import sqlite3
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import msgspec

from ..durable import check_regular
from ..protocol import Usage

ACCEPTED: Final = "accepted"
QUEUED_BATCH: Final = "queued_batch"
QUEUED_ENGINE: Final = "queued_engine"
RUNNING: Final = "running"
SUCCEEDED: Final = "succeeded"
FAILED: Final = "failed"
CANCELLED: Final = "cancelled"
TERMINAL: Final = (SUCCEEDED, FAILED, CANCELLED)
STATES: Final = (ACCEPTED, QUEUED_BATCH, QUEUED_ENGINE, RUNNING, *TERMINAL)
# Batches
SUBMITTING: Final = "submitting"
IN_PROGRESS: Final = "in_progress"
DONE: Final = "done"
ABANDONED: Final = "abandoned"

SCHEMA_VERSION: Final = 1
_CHUNK: Final = 500  # ids per IN (...) clause, well under SQLite's variable limit
_TERMINAL_SQL: Final = "('succeeded', 'failed', 'cancelled')"
_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY,      -- insertion order: the queues' order
    id TEXT NOT NULL UNIQUE,
    state TEXT NOT NULL,
    lane TEXT,                    -- 'batch' | 'engine', once routed
    target TEXT,                  -- the batch's grouping key; NULL: the engine only
    params BLOB,                  -- the batch request's params (JSON, model included)
    request BLOB NOT NULL,        -- what the engine runs (opaque here)
    meta BLOB NOT NULL,           -- the caller's own (opaque here)
    webhook TEXT,
    created REAL NOT NULL,
    deadline REAL NOT NULL,
    queued REAL,                  -- when it entered its current queue
    not_before REAL,              -- the engine queue: not to run before
    attempt INTEGER NOT NULL DEFAULT 0,
    fence INTEGER NOT NULL DEFAULT 0,
    batch TEXT,                   -- the batch it is running in, or that served it
    served TEXT,
    cost_usd REAL,
    list_usd REAL,
    outcome BLOB,
    error BLOB,
    finished REAL,
    hook TEXT,                    -- webhook delivery: 'pending' | 'delivered' | 'failed'
    hook_attempts INTEGER NOT NULL DEFAULT 0,
    hook_next REAL
);
CREATE INDEX IF NOT EXISTS jobs_by_state ON jobs (state, seq);
CREATE INDEX IF NOT EXISTS jobs_by_batch ON jobs (batch) WHERE batch IS NOT NULL;
CREATE INDEX IF NOT EXISTS jobs_engine_queue ON jobs (deadline) WHERE state = 'queued_engine';
CREATE INDEX IF NOT EXISTS jobs_hooks ON jobs (hook_next) WHERE hook = 'pending';
CREATE INDEX IF NOT EXISTS jobs_finished ON jobs (finished) WHERE finished IS NOT NULL;
CREATE TABLE IF NOT EXISTS batches (
    id TEXT PRIMARY KEY,
    target TEXT NOT NULL,
    upstream TEXT,
    state TEXT NOT NULL,
    size INTEGER NOT NULL,
    created REAL NOT NULL,
    submitted REAL,
    next_poll REAL,
    polls INTEGER NOT NULL DEFAULT 0,
    ended REAL,
    wasted_usd REAL NOT NULL DEFAULT 0  -- results paid for and dropped: their job had moved on
);
"""


class StoreError(Exception):
    """The store cannot be opened or written (a corrupt file, a full disk): the message says which and why."""


class JobSpec(msgspec.Struct, frozen=True, kw_only=True):
    """A job as submitted."""

    request: bytes  # what the engine runs, when the job runs there (opaque to the jobs core)
    created: float  # unix time: the submit's one reading, which its reply states and its deadline counts from
    deadline: float  # unix time
    target: str | None = None  # the batch's grouping key (a base URL and key); None: the engine only
    params: bytes | None = None  # the Messages call's params for a batch (JSON, `model` included)
    webhook: str | None = None
    meta: bytes = b""  # the caller's own (feature, route, budget reservation...), kept with the job


class Failure(msgspec.Struct, frozen=True):
    code: str
    message: str
    retryable: bool = False


class Outcome(msgspec.Struct, kw_only=True):
    """How a job was served and what it cost."""

    served: str  # "batch" | "engine" | "cache"
    message: msgspec.Raw  # the Messages API message
    usage: Usage = msgspec.field(default_factory=Usage)
    cost_usd: float = 0.0
    list_usd: float = 0.0  # the same usage at the interactive price (equal to cost_usd off a batch)
    batch: str | None = None  # the upstream batch's id
    request_id: str | None = None  # the answer's request id, which takes feedback (docs/experiments.md)


class JobView(msgspec.Struct, kw_only=True, omit_defaults=True):
    """A job as a poll sees it."""

    id: str
    state: str
    created: float
    deadline: float
    attempts: int
    webhook: str | None = None
    finished: float | None = None
    outcome: Outcome | None = None
    error: Failure | None = None


@dataclass(frozen=True, slots=True)
class Claim:
    """A job claimed to run: its fence, the bytes to run (batch params or engine request) and its deadline."""

    id: str
    fence: int
    payload: bytes
    deadline: float
    attempt: int
    meta: bytes


@dataclass(frozen=True, slots=True)
class Settle:
    """What happens to a claimed job: an outcome, a failure, or (neither) back to the engine's queue."""

    id: str
    fence: int
    outcome: Outcome | None = None
    failure: Failure | None = None
    not_before: float | None = None  # back to the engine's queue: not to run before


@dataclass(frozen=True, slots=True)
class Batch:
    id: str
    target: str
    upstream: str | None
    state: str
    size: int
    created: float
    submitted: float | None
    next_poll: float | None
    polls: int


@dataclass(frozen=True, slots=True)
class Routable:
    """An accepted job, for the planner."""

    id: str
    target: str | None
    size: int | None
    deadline: float


@dataclass(frozen=True, slots=True)
class Hook:
    id: str
    url: str
    attempts: int


_outcome_decoder: Final = msgspec.json.Decoder(Outcome)
_failure_decoder: Final = msgspec.json.Decoder(Failure)
_encoder: Final = msgspec.json.Encoder()


def new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(12)}"


def custom_id(job_id: str, fence: int) -> str:
    """A batch request's custom_id: the job and its fence (within the API's 64 characters of [A-Za-z0-9_-])."""
    return f"{job_id}-{fence}"


def parse_custom_id(value: str) -> tuple[str, int] | None:
    job_id, _, fence = value.rpartition("-")
    return (job_id, int(fence)) if job_id and fence.isdigit() else None


class JobStore:
    def __init__(self, path: str | os.PathLike[str], *, synchronous: str = "full") -> None:
        """Open (or create) the store at PATH. Raises `StoreError`."""
        self.path = Path(path)
        if synchronous not in ("full", "normal"):
            raise ValueError("synchronous must be 'full' or 'normal'")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            check_regular(self.path)  # never chmod a device or another's file through a link
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            os.close(fd)
            os.chmod(self.path, 0o600)  # the WAL and shared-memory files take the database file's mode
            self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        except OSError as exc:
            raise StoreError(f"job store {self.path}: {exc.strerror or exc}") from None
        except sqlite3.Error as exc:
            raise StoreError(f"job store {self.path}: {exc}") from None
        try:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute(f"PRAGMA synchronous={synchronous.upper()}")
            self._db.execute("PRAGMA busy_timeout=5000")  # a second process (or store object) waits, never fails at once
            version = self._db.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise StoreError(f"job store {self.path}: written by a newer sidecard (schema {version})")
            self._db.executescript(f"BEGIN IMMEDIATE; {_SCHEMA} PRAGMA user_version={SCHEMA_VERSION}; COMMIT;")
        except sqlite3.DatabaseError as exc:
            self._db.close()
            raise StoreError(f"job store {self.path}: {exc} (move it aside to start afresh; its jobs would be lost)") from None

    def close(self) -> None:
        self._db.close()

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            yield db
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")

    # ------------------------------------------------------------ submitting and reading

    def add(self, specs: Sequence[JobSpec], now: float, lanes: Sequence[str] | None = None) -> list[str]:
        """Accept SPECS (one transaction), queued at once in their LANES ("batch" | "engine") when given; their
        ids, in order."""
        ids = [new_id("job") for _ in specs]
        states = [ACCEPTED] * len(specs) if lanes is None else [f"queued_{lane}" for lane in lanes]
        rows = [
            (job_id, state, None if lanes is None else state[7:], None if lanes is None else now,
             s.target, s.params, s.request, s.meta, s.webhook, s.created, s.deadline)
            for job_id, state, s in zip(ids, states, specs, strict=True)
        ]  # fmt: skip
        with self._write() as db:
            db.executemany(
                "INSERT INTO jobs (id, state, lane, queued, target, params, request, meta, webhook, created, deadline)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                rows,
            )
        return ids

    def add_done(self, spec: JobSpec, outcome: Outcome) -> str:
        """A job answered at once (a cached answer): accepted and succeeded in one step, as it was created."""
        now = spec.created  # (the time its submit's reply states)
        job_id = new_id("job")
        with self._write() as db:
            db.execute(
                "INSERT INTO jobs (id, state, request, meta, webhook, created, deadline, served, cost_usd, list_usd,"
                " outcome, finished, hook, hook_next) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    job_id, SUCCEEDED, spec.request, spec.meta, spec.webhook, now, spec.deadline, outcome.served,
                    outcome.cost_usd, outcome.list_usd, _encoder.encode(outcome), now,
                    None if spec.webhook is None else "pending", now,
                ),
            )  # fmt: skip
        return job_id

    def view(self, job_id: str) -> JobView | None:
        row = self._db.execute(
            "SELECT state, created, deadline, attempt, webhook, finished, outcome, error FROM jobs WHERE id = ?",
            (job_id,),
        ).fetchone()
        if row is None:
            return None
        state, created, deadline, attempt, webhook, finished, outcome, error = row
        return JobView(
            id=job_id,
            state=state,
            created=created,
            deadline=deadline,
            attempts=attempt,
            webhook=webhook,
            finished=finished,
            outcome=None if outcome is None else _outcome_decoder.decode(outcome),
            error=None if error is None else _failure_decoder.decode(error),
        )

    def requests(self, job_ids: Sequence[str]) -> dict[str, bytes]:
        """The requests of JOB_IDS, as submitted (those still kept)."""
        found: dict[str, bytes] = {}
        for chunk in _chunks(job_ids):
            found.update(self._db.execute(f"SELECT id, request FROM jobs WHERE id IN ({_marks(chunk)})", chunk).fetchall())
        return found

    def metas(self, job_ids: Sequence[str]) -> dict[str, bytes]:
        """The callers' own data of JOB_IDS (those still kept)."""
        found: dict[str, bytes] = {}
        for chunk in _chunks(job_ids):
            found.update(self._db.execute(f"SELECT id, meta FROM jobs WHERE id IN ({_marks(chunk)})", chunk).fetchall())
        return found

    def pending(self) -> int:
        """Jobs accepted and not finished."""
        return self._db.execute(f"SELECT COUNT(*) FROM jobs WHERE state NOT IN {_TERMINAL_SQL}").fetchone()[0]

    def cancel(self, job_id: str, now: float, failure: Failure) -> str | None:
        """Cancel a job that has not finished; its state afterwards (None: no such job). A result that comes for it
        later is dropped (its fence has moved on)."""
        with self._write() as db:
            db.execute(
                f"UPDATE jobs SET state = ?, fence = fence + 1, batch = NULL, finished = ?, error = ?, {_HOOK_PENDING}"
                f" WHERE id = ? AND state NOT IN {_TERMINAL_SQL}",
                (CANCELLED, now, _encoder.encode(failure), now, job_id),
            )
            row = db.execute("SELECT state FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return None if row is None else row[0]

    # ------------------------------------------------------------ routing

    def accepted(self, limit: int) -> list[Routable]:
        rows = self._db.execute(
            "SELECT id, target, length(params), deadline FROM jobs WHERE state = ? ORDER BY seq LIMIT ?",
            (ACCEPTED, limit),
        )
        return [Routable(job_id, target, size, deadline) for job_id, target, size, deadline in rows]

    def route(self, lanes: Iterable[tuple[str, str]], now: float) -> None:
        """Queue accepted jobs, each (id, "batch" | "engine")."""
        with self._write() as db:
            db.executemany(
                "UPDATE jobs SET state = 'queued_' || ?, lane = ?, queued = ? WHERE id = ? AND state = ?",
                [(lane, lane, now, job_id, ACCEPTED) for job_id, lane in lanes],
            )

    def waiting(self) -> list[tuple[str, str, int, float, float]]:
        """Jobs queued for a batch, oldest first: (id, target, params size, queued at, deadline)."""
        return self._db.execute(
            "SELECT id, target, length(params), queued, deadline FROM jobs WHERE state = ? ORDER BY seq",
            (QUEUED_BATCH,),
        ).fetchall()

    def to_engine(self, job_ids: Sequence[str], now: float) -> None:
        """Jobs queued for a batch that will run through the engine instead."""
        with self._write() as db:
            for chunk in _chunks(job_ids):
                db.execute(
                    f"UPDATE jobs SET state = ?, lane = 'engine', queued = ? WHERE state = ? AND id IN ({_marks(chunk)})",
                    (QUEUED_ENGINE, now, QUEUED_BATCH, *chunk),
                )

    # ------------------------------------------------------------ batches

    def form_batch(self, target: str, job_ids: Sequence[str], now: float) -> tuple[str, list[Claim]]:
        """Claim the jobs of a new batch (those still queued for one), in queue order: (batch id, claims). The
        batch is `submitting` until `batch_submitted` records the upstream's id."""
        batch_id = new_id("bat")
        claims: list[tuple[int, Claim]] = []
        with self._write() as db:
            for chunk in _chunks(job_ids):
                marks = _marks(chunk)
                rows = db.execute(
                    f"SELECT seq, id, fence, params, deadline, attempt, meta FROM jobs WHERE state = ? AND id IN ({marks})",
                    (QUEUED_BATCH, *chunk),
                ).fetchall()
                db.execute(
                    "UPDATE jobs SET state = ?, batch = ?, fence = fence + 1, attempt = attempt + 1"
                    f" WHERE state = ? AND id IN ({marks})",
                    (RUNNING, batch_id, QUEUED_BATCH, *chunk),
                )
                claims += ((seq, Claim(i, f + 1, p, d, a + 1, m)) for seq, i, f, p, d, a, m in rows)
            if claims:
                db.execute(
                    "INSERT INTO batches (id, target, state, size, created) VALUES (?, ?, ?, ?, ?)",
                    (batch_id, target, SUBMITTING, len(claims), now),
                )
        claims.sort(key=lambda pair: pair[0])
        return batch_id, [claim for _, claim in claims]

    def batch_submitted(self, batch_id: str, upstream_id: str, now: float, next_poll: float) -> None:
        with self._write() as db:
            db.execute(
                "UPDATE batches SET state = ?, upstream = ?, submitted = ?, next_poll = ? WHERE id = ?",
                (IN_PROGRESS, upstream_id, now, next_poll, batch_id),
            )

    def batch_unsubmitted(self, batch_id: str) -> int:
        """The create call failed: the batch is abandoned and its jobs queued for a batch again (their queue age
        kept, so the planner can still send them to the engine in time). Returns how many."""
        with self._write() as db:
            moved = db.execute(
                "UPDATE jobs SET state = ?, batch = NULL, fence = fence + 1 WHERE batch = ? AND state = ?",
                (QUEUED_BATCH, batch_id, RUNNING),
            ).rowcount
            db.execute("UPDATE batches SET state = ? WHERE id = ?", (ABANDONED, batch_id))
        return moved

    def batches_in_flight(self) -> list[Batch]:
        rows = self._db.execute(
            "SELECT id, target, upstream, state, size, created, submitted, next_poll, polls FROM batches"
            " WHERE state = ? ORDER BY next_poll",
            (IN_PROGRESS,),
        )
        return [Batch(*row) for row in rows]

    def batch(self, batch_id: str) -> Batch | None:
        row = self._db.execute(
            "SELECT id, target, upstream, state, size, created, submitted, next_poll, polls FROM batches WHERE id = ?",
            (batch_id,),
        ).fetchone()
        return None if row is None else Batch(*row)

    def batch_polled(self, batch_id: str, next_poll: float) -> None:
        with self._write() as db:
            db.execute("UPDATE batches SET polls = polls + 1, next_poll = ? WHERE id = ?", (next_poll, batch_id))

    def batch_jobs(self, batch_id: str) -> list[tuple[str, int, float]]:
        """The jobs still running in a batch: (id, fence, deadline)."""
        return self._db.execute(
            "SELECT id, fence, deadline FROM jobs WHERE batch = ? AND state = ?", (batch_id, RUNNING)
        ).fetchall()

    def completed_in(self, batch_id: str) -> list[str]:
        """The jobs a batch's results have completed so far."""
        return [row[0] for row in self._db.execute("SELECT id FROM jobs WHERE batch = ? AND state = ?", (batch_id, SUCCEEDED))]

    def batch_done(self, batch_id: str, now: float, *, wasted_usd: float = 0.0, state: str = DONE) -> None:
        """The batch's results are all applied (or it was given up); WASTED_USD is what its results cost that were
        dropped because their job had moved on. Jobs still running in it (no result came for them) go to the
        engine's queue."""
        with self._write() as db:
            db.execute(
                "UPDATE jobs SET state = ?, lane = 'engine', batch = NULL, fence = fence + 1, queued = ?"
                " WHERE batch = ? AND state = ?",
                (QUEUED_ENGINE, now, batch_id, RUNNING),
            )
            db.execute(
                "UPDATE batches SET state = ?, ended = ?, wasted_usd = ? WHERE id = ?", (state, now, wasted_usd, batch_id)
            )

    # ------------------------------------------------------------ the engine's queue

    def claim_engine(self, now: float, limit: int) -> list[Claim]:
        """Claim up to LIMIT jobs due on the engine, earliest deadline first."""
        with self._write() as db:
            rows = db.execute(
                "SELECT id, fence, request, deadline, attempt, meta FROM jobs WHERE state = ?"
                " AND (not_before IS NULL OR not_before <= ?) ORDER BY deadline LIMIT ?",
                (QUEUED_ENGINE, now, limit),
            ).fetchall()
            db.executemany(
                "UPDATE jobs SET state = ?, lane = 'engine', fence = fence + 1, attempt = attempt + 1 WHERE id = ?",
                [(RUNNING, row[0]) for row in rows],
            )
        return [Claim(i, f + 1, r, d, a + 1, m) for i, f, r, d, a, m in rows]

    def next_engine_at(self) -> float | None:
        """When the next job held back on the engine's queue falls due (None: none is held back)."""
        return self._db.execute(
            "SELECT MIN(not_before) FROM jobs WHERE state = ? AND not_before IS NOT NULL", (QUEUED_ENGINE,)
        ).fetchone()[0]

    # ------------------------------------------------------------ settling

    def settle(self, settles: Iterable[Settle], now: float) -> list[Settle]:
        """Apply what happened to claimed jobs (one transaction); the ones that took effect: a settle whose fence
        is stale, or whose job is no longer running, changes nothing."""
        done = []
        with self._write() as db:
            for s in settles:
                if s.outcome is not None:
                    o = s.outcome
                    cursor = db.execute(  # (`batch` stays: the batch that served it)
                        f"UPDATE jobs SET state = ?, served = ?, cost_usd = ?, list_usd = ?, outcome = ?, finished = ?,"
                        f" {_HOOK_PENDING} WHERE id = ? AND fence = ? AND state = ?",
                        (SUCCEEDED, o.served, o.cost_usd, o.list_usd, _encoder.encode(o), now, now, s.id, s.fence, RUNNING),
                    )
                elif s.failure is not None:
                    cursor = db.execute(
                        f"UPDATE jobs SET state = ?, error = ?, finished = ?, batch = NULL, {_HOOK_PENDING}"
                        " WHERE id = ? AND fence = ? AND state = ?",
                        (FAILED, _encoder.encode(s.failure), now, now, s.id, s.fence, RUNNING),
                    )
                else:
                    cursor = db.execute(
                        "UPDATE jobs SET state = ?, lane = 'engine', batch = NULL, fence = fence + 1, queued = ?,"
                        " not_before = ? WHERE id = ? AND fence = ? AND state = ?",
                        (QUEUED_ENGINE, now, s.not_before, s.id, s.fence, RUNNING),
                    )
                if cursor.rowcount:
                    done.append(s)
        return done

    # ------------------------------------------------------------ webhooks

    def hooks_due(self, now: float, limit: int) -> list[Hook]:
        rows = self._db.execute(
            "SELECT id, webhook, hook_attempts FROM jobs WHERE hook = 'pending' AND hook_next <= ?"
            " ORDER BY hook_next LIMIT ?",
            (now, limit),
        )
        return [Hook(*row) for row in rows]

    def next_hook_at(self) -> float | None:
        return self._db.execute("SELECT MIN(hook_next) FROM jobs WHERE hook = 'pending'").fetchone()[0]

    def hook_attempted(self, job_id: str, *, delivered: bool, next_at: float | None) -> None:
        """One delivery attempt: delivered, to be tried again at NEXT_AT, or (neither) given up."""
        state = "delivered" if delivered else "pending" if next_at is not None else "failed"
        with self._write() as db:
            db.execute(
                "UPDATE jobs SET hook = ?, hook_attempts = hook_attempts + 1, hook_next = ? WHERE id = ?",
                (state, next_at, job_id),
            )

    # ------------------------------------------------------------ upkeep

    def recover(self, now: float) -> dict[str, int]:
        """After a restart (see the module's docstring): how many engine runs and unrecorded batches' jobs were
        queued again."""
        with self._write() as db:
            engine = db.execute(
                "UPDATE jobs SET state = ?, fence = fence + 1, not_before = NULL WHERE state = ? AND lane = 'engine'",
                (QUEUED_ENGINE, RUNNING),
            ).rowcount
            unrecorded = [row[0] for row in db.execute("SELECT id FROM batches WHERE state = ?", (SUBMITTING,))]
            batched = 0
            for batch_id in unrecorded:
                batched += db.execute(
                    "UPDATE jobs SET state = ?, batch = NULL, fence = fence + 1 WHERE batch = ? AND state = ?",
                    (QUEUED_BATCH, batch_id, RUNNING),
                ).rowcount
                db.execute("UPDATE batches SET state = ? WHERE id = ?", (ABANDONED, batch_id))
        return {"engine": engine, "unrecorded_batches": len(unrecorded), "batch_jobs": batched}

    def purge(self, before: float) -> int:
        """Forget jobs finished before BEFORE (their webhook settled) and batches created before it."""
        with self._write() as db:
            removed = db.execute(
                "DELETE FROM jobs WHERE finished < ? AND (hook IS NULL OR hook != 'pending')", (before,)
            ).rowcount
            db.execute("DELETE FROM batches WHERE state IN (?, ?) AND created < ?", (DONE, ABANDONED, before))
        return removed

    def stats(self, now: float, *, at_risk_s: float) -> dict[str, Any]:
        """For operators: jobs by state, the oldest unfinished job's age, batches in flight, jobs at risk (not
        finished within AT_RISK_S of their deadline), and the batch discount so far (over the jobs kept)."""
        db = self._db
        by_state = dict.fromkeys(STATES, 0)
        by_state.update(db.execute("SELECT state, COUNT(*) FROM jobs GROUP BY state").fetchall())
        oldest = db.execute(f"SELECT MIN(created) FROM jobs WHERE state NOT IN {_TERMINAL_SQL}").fetchone()[0]
        batches, in_batches = db.execute(
            "SELECT COUNT(*), COALESCE(SUM(size), 0) FROM batches WHERE state IN (?, ?)", (SUBMITTING, IN_PROGRESS)
        ).fetchone()
        at_risk = db.execute(
            f"SELECT COUNT(*) FROM jobs WHERE state NOT IN {_TERMINAL_SQL} AND deadline <= ?", (now + at_risk_s,)
        ).fetchone()[0]
        listed, cost = db.execute(
            "SELECT COALESCE(SUM(list_usd), 0), COALESCE(SUM(cost_usd), 0) FROM jobs WHERE served = 'batch'"
        ).fetchone()
        wasted = db.execute("SELECT COALESCE(SUM(wasted_usd), 0) FROM batches").fetchone()[0]
        return {
            "jobs": by_state,
            "oldest_pending_s": None if oldest is None else max(0.0, now - oldest),
            "batches_in_flight": batches,
            "jobs_in_batches": in_batches,
            "at_risk": at_risk,
            "batch_cost_usd": cost,
            # What the batch-served jobs would have cost interactively less what they cost, less the results
            # paid for and dropped because their job had moved on.
            "savings_usd": listed - cost - wasted,
        }


# A job that finishes with a webhook to call gets its delivery queued (the statement's next parameter: now).
_HOOK_PENDING: Final = "hook = CASE WHEN webhook IS NULL THEN NULL ELSE 'pending' END, hook_next = ?"


def _chunks(items: Sequence[str]) -> Iterator[Sequence[str]]:
    for start in range(0, len(items), _CHUNK):
        yield items[start : start + _CHUNK]


def _marks(chunk: Sequence[str]) -> str:
    return ",".join("?" * len(chunk))
