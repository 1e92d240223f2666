"""Bad submits get typed errors: no deadline, a deadline in the past or too far, too many jobs at once, a webhook
not allowed, too many pending."""

from __future__ import annotations

import pytest

from sidecard.errors import Code, SidecardError
from sidecard.jobs.settings import JobsSettings, WebhookSettings
from sidecard.jobs.submit import check_submit, deadline_from

NOW = 1_700_000_000.0
SETTINGS = JobsSettings(max_deadline_s=2 * 86_400, max_submit=10, max_pending=100,
                        webhook=WebhookSettings(allowed_prefixes=["https://app/hooks/"], secret_file="s"))  # fmt: skip


@pytest.mark.parametrize(
    ("by", "deadline"),
    [
        (90, NOW + 90),
        (0.5, NOW + 0.5),
        ("90s", NOW + 90),
        ("45m", NOW + 2700),
        (" 6h ", NOW + 21_600),
        ("1.5d", NOW + 129_600),
        ("90", NOW + 90),  # plain seconds in a string, as sidecardctl's durations (once "neither a duration")
        ("2023-11-15T00:00:00Z", 1_700_006_400.0),
        ("2023-11-15T02:00:00+02:00", 1_700_006_400.0),
    ],
)
def test_by_is_seconds_a_duration_or_a_time(by, deadline):
    assert deadline_from(by, NOW, SETTINGS) == deadline


@pytest.mark.parametrize(
    ("by", "message"),
    [
        (None, "by: a job needs a deadline"),
        (0, "by: the deadline has passed"),
        (-5, "by: the deadline has passed"),
        ("2023-11-14T00:00:00Z", "by: the deadline has passed"),
        (3 * 86_400, "by: a deadline may be at most 172800 s away"),
        ("3d", "by: a deadline may be at most"),
        ("-5m", "by: the deadline has passed"),
        (float("nan"), "by: expected a finite number"),
        (float("inf"), "by: expected a finite number"),
        ("soon", "is neither a duration"),
        ("2023-11-15T00:00:00", "is neither a duration"),  # a time without its offset is ambiguous
        (True, "by: expected seconds"),
        ([1], "by: expected seconds"),
    ],
)
def test_a_bad_deadline_is_a_bad_request(by, message):
    with pytest.raises(SidecardError) as caught:
        deadline_from(by, NOW, SETTINGS)
    assert caught.value.code == Code.BAD_REQUEST and not caught.value.retryable
    assert caught.value.message.startswith(message) or message in caught.value.message


@pytest.mark.parametrize(
    ("count", "pending", "webhook", "code", "message"),
    [
        (0, 0, None, Code.BAD_REQUEST, "at least one job"),
        (11, 0, None, Code.REQUEST_TOO_LARGE, "at most 10 jobs in one submit, got 11"),
        (1, 0, "https://evil/hooks/", Code.BAD_REQUEST, "not under one of"),
        (5, 96, None, Code.OVERLOADED, "96 jobs are pending, the most is 100"),
    ],
)
def test_a_bad_submit_is_refused_with_its_code(count, pending, webhook, code, message):
    with pytest.raises(SidecardError) as caught:
        check_submit(count, pending, webhook, SETTINGS)
    assert caught.value.code == code and message in caught.value.message
    assert caught.value.retryable == (code == Code.OVERLOADED)


def test_a_good_submit_passes():
    check_submit(10, 90, "https://app/hooks/x", SETTINGS)
