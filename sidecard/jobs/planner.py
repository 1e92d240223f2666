"""Which way a job runs and when things happen to it: pure decisions, `now` passed in (stdlib only, like
`policies/`). Times are unix seconds; a `Planner` is a frozen value made from the `[jobs]` settings.

- `lane`: a Message Batch when the job can wait for one (the batch's forming age, its expected turnaround and
  `min_slack_s` to spare before the deadline) and its request fits in a batch; else the engine.
- `form`: the jobs waiting for a batch, grouped per target into batches of at most `max_requests` requests and
  `max_bytes` bytes, oldest first. A full batch goes at once; a partial one when its oldest job has waited
  `max_age_s`, or when a job in it cannot wait longer and still be expected back in time. A job whose deadline
  no longer allows a batch goes to the engine.
- `fallbacks`: the jobs in a batch still running that must leave it for the engine, `min_slack_s` before their
  deadline.
- `on_item`: what a batch's result does to its job: complete it, fail it (the request itself is invalid:
  retrying cannot help; or its deadline has passed), or run it through the engine (any other error, a
  cancelled or expired request).
- `poll_at`: exponential backoff from `poll_initial_s` to `poll_max_s`, never past the batch's next fallback.
- `retry_at`: when an engine run that failed may run again, or None when it may not.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Final

BATCH: Final = "batch"
ENGINE: Final = "engine"
COMPLETE: Final = "complete"
FAIL: Final = "fail"  # the request is invalid: the engine would be refused the same way
LATE: Final = "late"  # the deadline has passed: fail with deadline_exceeded

REQUEST_OVERHEAD_BYTES: Final = 100  # a request's custom_id and framing within the create call's body
BODY_OVERHEAD_BYTES: Final = 64
# A batch request that errored for these reasons would be refused by the engine too.
INVALID_REQUEST_ERRORS: Final = frozenset({"invalid_request_error", "request_too_large"})


@dataclass(frozen=True, slots=True)
class Waiting:
    """A job waiting for a batch."""

    id: str
    target: str
    size: int  # its batch request's params, in bytes
    queued_at: float
    deadline: float


@dataclass(frozen=True, slots=True)
class Formation:
    batches: list[tuple[str, list[str]]]  # (target, job ids) to submit now, in order
    to_engine: list[str]  # jobs that can no longer make their deadline through a batch
    wake_at: float | None  # when the next partial batch falls due, if nothing else happens first


@dataclass(frozen=True, slots=True)
class Planner:
    max_requests: int = 10_000
    max_bytes: int = 32 * 1024 * 1024
    max_age_s: float = 60.0
    turnaround_s: float = 3600.0
    min_slack_s: float = 600.0
    poll_initial_s: float = 10.0
    poll_max_s: float = 300.0
    poll_multiplier: float = 2.0
    max_attempts: int = 5
    retry_initial_s: float = 5.0
    retry_max_s: float = 300.0

    @classmethod
    def from_settings(cls, settings: Any) -> Planner:
        """From a `JobsSettings` (read by name, so this module needs nothing but the standard library)."""
        return cls(
            max_requests=settings.batch_max_requests,
            max_bytes=settings.batch_max_bytes,
            max_age_s=settings.batch_max_age_s,
            turnaround_s=settings.expected_turnaround_s,
            min_slack_s=settings.min_slack_s,
            poll_initial_s=settings.poll_initial_s,
            poll_max_s=settings.poll_max_s,
            poll_multiplier=settings.poll_multiplier,
            max_attempts=settings.max_attempts,
            retry_initial_s=settings.retry_initial_s,
            retry_max_s=settings.retry_max_s,
        )

    def fits(self, size: int) -> bool:
        """Whether a request of SIZE bytes fits in a batch on its own."""
        return BODY_OVERHEAD_BYTES + REQUEST_OVERHEAD_BYTES + size <= self.max_bytes

    def lane(self, deadline: float, now: float, *, size: int | None) -> str:
        """BATCH or ENGINE for a job; SIZE is its batch request's (None: it has none, e.g. not a first-party target)."""
        if size is None or not self.fits(size):
            return ENGINE
        return BATCH if now + self.max_age_s <= self.last_submit(deadline) else ENGINE

    def last_submit(self, deadline: float) -> float:
        """The last moment a job can go into a batch and still be expected back `min_slack_s` before DEADLINE."""
        return deadline - self.min_slack_s - self.turnaround_s

    def fallback_at(self, deadline: float) -> float:
        return deadline - self.min_slack_s

    def form(self, waiting: Iterable[Waiting], now: float) -> Formation:
        """Batches to submit now from WAITING (in queue order, oldest first)."""
        by_target: dict[str, list[Waiting]] = {}
        to_engine: list[str] = []
        for job in waiting:
            if self.last_submit(job.deadline) < now:
                to_engine.append(job.id)
            else:
                by_target.setdefault(job.target, []).append(job)
        batches: list[tuple[str, list[str]]] = []
        wake_at: float | None = None
        for target, jobs in by_target.items():
            chunk: list[Waiting] = []
            size = BODY_OVERHEAD_BYTES
            for job in jobs:
                cost = job.size + REQUEST_OVERHEAD_BYTES
                if chunk and (len(chunk) == self.max_requests or size + cost > self.max_bytes):
                    batches.append((target, [j.id for j in chunk]))
                    chunk, size = [], BODY_OVERHEAD_BYTES
                chunk.append(job)
                size += cost
            due = min(min(j.queued_at for j in chunk) + self.max_age_s, min(self.last_submit(j.deadline) for j in chunk))
            if len(chunk) == self.max_requests or due <= now:
                batches.append((target, [j.id for j in chunk]))
            elif wake_at is None or due < wake_at:
                wake_at = due
        return Formation(batches, to_engine, wake_at)

    def fallbacks(self, running: Iterable[tuple[str, float]], now: float) -> list[str]:
        """Of RUNNING, (job id, deadline) in a batch still in progress, those that must leave it now."""
        return [job_id for job_id, deadline in running if self.fallback_at(deadline) <= now]

    def on_item(self, result_type: str, error_type: str | None, deadline: float, now: float) -> str:
        """COMPLETE, FAIL, LATE or ENGINE for a job given its batch result."""
        if result_type == "succeeded":
            return COMPLETE
        if result_type == "errored" and error_type in INVALID_REQUEST_ERRORS:
            return FAIL
        return ENGINE if now < deadline else LATE

    def poll_at(self, polls: int, now: float, fallback_at: float | None = None) -> float:
        """When to poll a batch polled POLLS times so far; FALLBACK_AT is the earliest fallback of its jobs."""
        at = now + min(self.poll_max_s, self.poll_initial_s * self.poll_multiplier**polls)
        if fallback_at is not None and fallback_at < at:
            at = max(now, fallback_at)
        return at

    def retry_at(self, attempt: int, now: float, deadline: float, *, retryable: bool) -> float | None:
        """When a job whose ATTEMPT-th run failed may run again; None if it may not (the error is final, its
        attempts are spent, or the wait would reach its deadline)."""
        if not retryable or attempt >= self.max_attempts:
            return None
        at = now + min(self.retry_max_s, self.retry_initial_s * 2 ** max(0, attempt - 1))
        return at if at < deadline else None
