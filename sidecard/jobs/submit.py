"""What a submit must carry, checked before a job is accepted: every refusal a typed `SidecardError`.

`by` is the job's deadline: seconds from now (a number, or in a string), a duration ("90s", "45m", "6h", "2d": the
one spelling of `durations`), or an RFC 3339 time with its offset ("2025-06-01T12:00:00Z"). It must lie in the
future and within `max_deadline_s`.
"""

from __future__ import annotations

import math
from datetime import datetime
from typing import Final

from ..errors import Code, SidecardError
from ..durations import duration_seconds
from .settings import JobsSettings
from .webhook import url_problem

JOB_NOT_FOUND: Final = Code.JOB_NOT_FOUND
BATCH_NOT_FOUND: Final = Code.BATCH_NOT_FOUND


def deadline_from(by: object, now: float, settings: JobsSettings) -> float:
    """The unix time BY names; raises `SidecardError` (bad_request) when it is missing, malformed, past or too far."""
    if by is None:
        raise SidecardError(Code.BAD_REQUEST, "by: a job needs a deadline (seconds, a duration such as \"6h\", or a time)")
    if isinstance(by, (int, float)) and not isinstance(by, bool):
        if not math.isfinite(by):
            raise SidecardError(Code.BAD_REQUEST, "by: expected a finite number of seconds")
        deadline = now + float(by)
    elif isinstance(by, str) and (seconds := duration_seconds(by)) is not None:
        deadline = now + seconds
    elif isinstance(by, str):
        try:
            moment = datetime.fromisoformat(by.strip().replace("Z", "+00:00"))
        except ValueError:
            moment = None
        if moment is None or moment.tzinfo is None:
            raise SidecardError(Code.BAD_REQUEST, f"by: {by[:40]!r} is neither a duration (\"6h\") nor a time with its offset")
        deadline = moment.timestamp()
    else:
        raise SidecardError(Code.BAD_REQUEST, "by: expected seconds, a duration such as \"6h\", or a time")
    if deadline <= now:
        raise SidecardError(Code.BAD_REQUEST, "by: the deadline has passed")
    if deadline - now > settings.max_deadline_s:
        raise SidecardError(Code.BAD_REQUEST, f"by: a deadline may be at most {settings.max_deadline_s:g} s away")
    return deadline


def check_submit(count: int, pending: int, webhook: str | None, settings: JobsSettings) -> None:
    """Refuse a submit of COUNT jobs, with PENDING already unfinished, naming WEBHOOK."""
    if count < 1:
        raise SidecardError(Code.BAD_REQUEST, "jobs: a submit needs at least one job")
    if count > settings.max_submit:
        raise SidecardError(Code.REQUEST_TOO_LARGE, f"jobs: at most {settings.max_submit} jobs in one submit, got {count}")
    if webhook is not None and (problem := url_problem(webhook, settings.webhook.allowed_prefixes)) is not None:
        raise SidecardError(Code.BAD_REQUEST, problem)
    if pending + count > settings.max_pending:
        raise SidecardError(Code.OVERLOADED, f"jobs: {pending} jobs are pending, the most is {settings.max_pending}", retry_after_ms=60_000)


def not_found(job_id: str) -> SidecardError:
    return SidecardError(JOB_NOT_FOUND, f"no job {job_id[:80]!r} (unknown, or finished and forgotten)")
