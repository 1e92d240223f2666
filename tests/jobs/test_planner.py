"""The jobs planner's decisions, pinned: lanes, batch forming, fallbacks, per-result actions, poll and retry
schedules (pure: no clock, no I/O)."""

from __future__ import annotations

import pytest

from sidecard.jobs.planner import (
    BATCH,
    BODY_OVERHEAD_BYTES,
    COMPLETE,
    ENGINE,
    FAIL,
    LATE,
    REQUEST_OVERHEAD_BYTES,
    Planner,
    Waiting,
)
from sidecard.jobs.settings import JobsSettings

P = Planner(max_requests=3, max_bytes=1000, max_age_s=60, turnaround_s=3600, min_slack_s=600, poll_initial_s=10,
            poll_max_s=300, poll_multiplier=2, max_attempts=3, retry_initial_s=5, retry_max_s=30)  # fmt: skip
NOW = 1_000_000.0
ROOM = 60 + 3600 + 600  # forming age + turnaround + slack: the least a deadline needs for a batch


def test_from_settings_reads_every_field():
    settings = JobsSettings(batch_max_requests=7, batch_max_bytes=2048, batch_max_age_s=5, expected_turnaround_s=50,
                            min_slack_s=9, poll_initial_s=1, poll_max_s=2, poll_multiplier=3, max_attempts=4,
                            retry_initial_s=6, retry_max_s=8)  # fmt: skip
    assert Planner.from_settings(settings) == Planner(7, 2048, 5, 50, 9, 1, 2, 3, 4, 6, 8)


@pytest.mark.parametrize(
    ("deadline", "size", "lane"),
    [
        (NOW + ROOM, 10, BATCH),  # exactly enough room
        (NOW + ROOM - 0.001, 10, ENGINE),
        (NOW + 86_400, None, ENGINE),  # no batch request (not a first-party target)
        (NOW + 86_400, 1000 - BODY_OVERHEAD_BYTES - REQUEST_OVERHEAD_BYTES, BATCH),  # fits alone, just
        (NOW + 86_400, 1000 - BODY_OVERHEAD_BYTES - REQUEST_OVERHEAD_BYTES + 1, ENGINE),
    ],
)
def test_lane(deadline, size, lane):
    assert P.lane(deadline, NOW, size=size) == lane


def waiting(job_id: str, *, target: str = "a", size: int = 100, queued: float = NOW, deadline: float = NOW + 86_400):
    return Waiting(job_id, target, size, queued, deadline)


def test_a_partial_batch_waits_for_its_oldest_jobs_age():
    formed = P.form([waiting("j1", queued=NOW - 30), waiting("j2", queued=NOW - 10)], NOW)
    assert formed.batches == [] and formed.to_engine == [] and formed.wake_at == NOW + 30
    formed = P.form([waiting("j1", queued=NOW - 60), waiting("j2", queued=NOW - 10)], NOW)
    assert formed.batches == [("a", ["j1", "j2"])] and formed.wake_at is None


def test_full_batches_go_at_once_split_by_count_and_bytes_per_target():
    jobs = [waiting(f"a{i}") for i in range(7)] + [waiting("b1", target="b", size=400), waiting("b2", target="b", size=400)]
    formed = P.form(jobs, NOW)
    # target a: 3 + 3 go now, the seventh waits; target b: 2 x 500 bytes + 64 > 1000, so one each, the second waits
    assert formed.batches == [("a", ["a0", "a1", "a2"]), ("a", ["a3", "a4", "a5"]), ("b", ["b1"])]
    assert formed.wake_at == NOW + 60


def test_a_job_that_cannot_wait_longer_makes_its_partial_batch_due():
    urgent = NOW + 3600 + 600 + 20  # its last moment to be submitted is in 20 s, before the batch's age is up
    formed = P.form([waiting("j1", queued=NOW - 5), waiting("j2", deadline=urgent)], NOW)
    assert formed.batches == [] and formed.wake_at == NOW + 20
    formed = P.form([waiting("j1", queued=NOW - 5), waiting("j2", deadline=urgent)], NOW + 20)
    assert formed.batches == [("a", ["j1", "j2"])]


def test_a_job_past_its_last_submit_goes_to_the_engine():
    late = NOW + 3600 + 600 - 1
    formed = P.form([waiting("j1", deadline=late), waiting("j2", queued=NOW - 60)], NOW)
    assert formed.to_engine == ["j1"] and formed.batches == [("a", ["j2"])]


def test_fallbacks_leave_the_batch_min_slack_before_the_deadline():
    running = [("j1", NOW + 600), ("j2", NOW + 600.5), ("j3", NOW + 10)]
    assert P.fallbacks(running, NOW) == ["j1", "j3"]
    assert P.fallback_at(NOW + 600.5) == NOW + 0.5


@pytest.mark.parametrize(
    ("result", "error", "deadline", "action"),
    [
        ("succeeded", None, NOW + 1, COMPLETE),
        ("succeeded", None, NOW - 1, COMPLETE),  # an answer that came is taken even late
        ("errored", "invalid_request_error", NOW + 100, FAIL),
        ("errored", "request_too_large", NOW + 100, FAIL),
        ("errored", "overloaded_error", NOW + 100, ENGINE),
        ("errored", "api_error", NOW + 100, ENGINE),
        ("errored", "not_found_error", NOW + 100, ENGINE),  # the engine may have another target
        ("expired", None, NOW + 100, ENGINE),
        ("canceled", None, NOW + 100, ENGINE),
        ("expired", None, NOW, LATE),
        ("errored", "overloaded_error", NOW - 5, LATE),
    ],
)
def test_on_item(result, error, deadline, action):
    assert P.on_item(result, error, deadline, NOW) == action


def test_polls_back_off_and_never_pass_the_next_fallback():
    assert [P.poll_at(n, NOW) - NOW for n in range(7)] == [10, 20, 40, 80, 160, 300, 300]
    assert P.poll_at(4, NOW, fallback_at=NOW + 100) == NOW + 100
    assert P.poll_at(4, NOW, fallback_at=NOW + 500) == NOW + 160
    assert P.poll_at(0, NOW, fallback_at=NOW - 5) == NOW  # a fallback already due: poll now


def test_retries_back_off_until_attempts_or_the_deadline_run_out():
    assert [P.retry_at(n, NOW, NOW + 1000, retryable=True) for n in (1, 2)] == [NOW + 5, NOW + 10]
    assert P.retry_at(3, NOW, NOW + 1000, retryable=True) is None  # max_attempts spent
    assert P.retry_at(1, NOW, NOW + 1000, retryable=False) is None
    assert P.retry_at(2, NOW, NOW + 10, retryable=True) is None  # the wait would reach the deadline
    long = Planner(max_attempts=20, retry_initial_s=5, retry_max_s=30)
    assert long.retry_at(9, NOW, NOW + 1000, retryable=True) == NOW + 30
