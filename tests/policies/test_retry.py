import random

import pytest

from sidecard.policies.retry import Backoff, Disposition, Retry, classify


@pytest.mark.parametrize(
    "status, should_retry, expected",
    [
        (429, None, Disposition.RETRY),
        (529, None, Disposition.RETRY),
        (500, None, Disposition.RETRY),
        (503, None, Disposition.RETRY),
        (None, None, Disposition.RETRY),  # connection error, timeout, malformed body
        (400, None, Disposition.FAIL),
        (413, None, Disposition.FAIL),
        (400, True, Disposition.FAIL),  # the caller's error even if the header says retry
        (401, None, Disposition.FAILOVER),
        (403, None, Disposition.FAILOVER),
        (404, None, Disposition.FAILOVER),
        (500, False, Disposition.FAILOVER),  # x-should-retry: false
        (418, True, Disposition.RETRY),  # x-should-retry: true
        (418, None, Disposition.FAIL),
    ],
)
def test_classify(status, should_retry, expected):
    assert classify(status, should_retry) is expected


class FixedRandom(random.Random):
    def __init__(self, fraction):
        super().__init__()
        self.fraction = fraction

    def uniform(self, a, b):
        return a + (b - a) * self.fraction


def test_full_jitter_exponential_with_cap():
    b = Backoff(base_s=0.5, cap_s=3.0)
    top = FixedRandom(1.0)
    assert [b.delay(n, top) for n in range(1, 6)] == [0.5, 1.0, 2.0, 3.0, 3.0]
    assert b.delay(3, FixedRandom(0.25)) == 0.5
    seeded = random.Random(7)
    assert all(0 <= b.delay(n, seeded) <= 3.0 for n in range(1, 50))


def test_retry_is_immutable_and_counts_attempts():
    r = Retry(max_attempts=2)
    r1 = r.started()
    assert r.attempts == 0 and r1.attempts == 1 and not r1.exhausted
    assert r1.started().exhausted


def test_delay_uses_backoff_then_retry_after_then_refuses_what_does_not_fit():
    r = Retry(max_attempts=3, backoff=Backoff(base_s=1.0, cap_s=8.0)).started()
    rng = FixedRandom(1.0)
    assert r.delay_before_retry(retry_after_s=None, remaining_s=10, rng=rng) == 1.0
    assert r.started().delay_before_retry(retry_after_s=None, remaining_s=10, rng=rng) == 2.0
    assert r.delay_before_retry(retry_after_s=4.0, remaining_s=10, rng=rng) == 4.0
    # retry-after longer than the deadline: fail over now instead of sleeping past it
    assert r.delay_before_retry(retry_after_s=30.0, remaining_s=10, rng=rng) is None
    assert r.delay_before_retry(retry_after_s=None, remaining_s=1.0, rng=rng) is None
    assert r.started().started().delay_before_retry(retry_after_s=0, remaining_s=10, rng=rng) is None


def test_a_retry_after_longer_than_max_retry_after_is_not_waited_for_however_much_time_is_left():
    r = Retry(max_attempts=3, backoff=Backoff(base_s=1.0, cap_s=8.0), max_retry_after_s=1.0).started()
    rng = FixedRandom(1.0)
    assert r.delay_before_retry(retry_after_s=1.0, remaining_s=600, rng=rng) == 1.0
    assert r.delay_before_retry(retry_after_s=1.001, remaining_s=600, rng=rng) is None
    assert r.delay_before_retry(retry_after_s=0.0, remaining_s=600, rng=rng) == 0.0
    # The bound is on the provider's word: sidecard's own backoff may be longer (and survives `started`).
    assert r.started().delay_before_retry(retry_after_s=None, remaining_s=600, rng=rng) == 2.0
    assert r.started().delay_before_retry(retry_after_s=5.0, remaining_s=600, rng=rng) is None
    assert Retry().started().delay_before_retry(retry_after_s=500.0, remaining_s=600, rng=rng) == 500.0  # unbounded
