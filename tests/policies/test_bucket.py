import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sidecard.policies.bucket import BucketSet, TokenBucket


def test_burst_then_sustained_rate():
    b = TokenBucket(rate_per_s=2, burst=3)
    assert [b.try_take(0) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert b.try_take(0) == 0.5  # one token back every 0.5 s
    assert b.try_take(0.25) == 0.25  # a refusal takes nothing: the wait just shrinks
    assert b.try_take(0.5) == 0.0
    assert b.try_take(0.5) == 0.5
    assert b.try_take(1.0) == 0.0


def test_idle_refills_to_the_burst_only():
    b = TokenBucket(rate_per_s=2, burst=3)
    b.try_take(0)
    assert b.peek(0) == 2
    assert b.peek(100) == 3
    assert [b.try_take(100) for _ in range(4)] == [0.0, 0.0, 0.0, 0.5]


def test_amounts_tokens_per_minute():
    b = TokenBucket(rate_per_s=100, burst=1000)  # 6,000 tokens per minute, 1,000 at once
    assert b.try_take(0, 600) == 0.0
    assert b.try_take(0, 600) == 2.0  # 200 more tokens come in 2 s
    assert b.peek(1) == 500
    assert b.try_take(2, 600) == 0.0
    assert b.peek(2) == 0


def test_more_than_the_burst_is_allowed_when_full_and_goes_into_debt():
    # 40,000 tokens a minute with burst_s = 10: a bucket of 6,666.67 tokens; a 10,000-token request.
    rate = 40_000 / 60
    b = TokenBucket(rate_per_s=rate, burst=rate * 10)
    assert b.try_take(0, 10_000) == 0.0  # full: admitted, 3,333.3 tokens into debt
    assert b.peek(0) == 0
    assert b.delay(0, 10_000) == pytest.approx(15.0)  # until full again: 10,000 tokens at 666.7 a second
    assert b.delay(0, 1) == pytest.approx(15.0 - (rate * 10 - 1) / rate)  # the debt first, then one token
    assert b.try_take(14.9, 10_000) == pytest.approx(0.1)  # refused until full; nothing taken
    assert b.try_take(15.0, 10_000) == 0.0
    # Over a minute of back-to-back big requests the long-run rate holds: 4 x 10,000 = 40,000 by t = 45 s.
    assert [b.try_take(t, 10_000) for t in (30.0, 45.0)] == [0.0, 0.0]
    assert b.delay(59.99, 10_000) > 0


def test_a_partly_drained_bucket_waits_until_full_for_an_oversized_take():
    b = TokenBucket(rate_per_s=1, burst=5)
    assert b.try_take(0, 2) == 0.0
    assert b.try_take(0, 5.5) == 2.0  # full again in 2 s; nothing taken
    assert b.peek(0) == 3
    assert b.try_take(2, 5.5) == 0.0
    assert b.delay(2, 1) == 1.5  # 0.5 of debt, then one token


def test_delay_takes_nothing():
    b = TokenBucket(rate_per_s=4, burst=1)
    assert b.delay(0) == 0.0
    assert b.delay(0) == 0.0
    b.try_take(0)
    assert b.delay(0) == 0.25
    assert b.delay(0, 0) == 0.0
    with pytest.raises(ValueError):
        b.delay(0, -1)


def test_adjust_charges_into_debt_and_gives_back_up_to_full():
    b = TokenBucket(rate_per_s=10, burst=100)
    b.try_take(0, 50)  # estimated 50 tokens
    b.adjust(0, 150)  # the answer used 200
    assert b.peek(0) == 0
    assert b.delay(0, 1) == 10.1  # 100 tokens of debt, then one
    b.adjust(0, -1000)  # a refund never overfills
    assert b.peek(0) == 100
    assert b.try_take(0, 100) == 0.0


@pytest.mark.parametrize("rate, burst", [(0, 1), (-1, 1), (1, 0.5), (1, math.inf), (math.nan, 1)])
def test_bad_parameters(rate, burst):
    with pytest.raises(ValueError):
        TokenBucket(rate, burst)


# GCRA against a literal token bucket: tokens refill continuously, capped at the burst. With binary
# fractions all arithmetic is exact, so the two must agree on every decision and every wait.
@settings(max_examples=200, deadline=None)
@given(
    rate=st.sampled_from([0.5, 1.0, 2.0, 4.0]),
    burst=st.sampled_from([1.0, 2.0, 3.5, 8.0]),
    steps=st.lists(st.tuples(st.integers(0, 16), st.integers(0, 40)), max_size=40),
)
def test_gcra_is_a_token_bucket(rate, burst, steps):
    b = TokenBucket(rate, burst)
    tokens, last, now = burst, 0.0, 0.0
    for dt_eighths, amount_quarters in steps:
        now += dt_eighths / 8
        amount = amount_quarters / 4
        tokens = min(burst, tokens + (now - last) * rate)
        last = now
        assert b.peek(now) == max(0.0, tokens)
        wait = b.try_take(now, amount)
        if amount > burst:  # only from a full bucket, into debt
            assert wait == (burst - tokens) / rate
            if wait == 0.0:
                tokens -= amount
        elif tokens >= amount:
            assert wait == 0.0
            tokens -= amount
        else:
            assert wait == (amount - tokens) / rate


def test_bucket_set_keys_are_independent():
    s = BucketSet(rate_per_s=1, burst=2)
    assert s.try_take("a", 0) == s.try_take("a", 0) == 0.0
    assert s.try_take("a", 0) == 1.0
    assert s.try_take("b", 0) == 0.0
    assert s.peek("a", 0) == 0 and s.peek("b", 0) == 1 and s.peek("c", 0) == 2
    assert len(s) == 2


def test_bucket_set_drops_least_recently_used_keys():
    s = BucketSet(rate_per_s=1, burst=1, max_keys=2)
    s.try_take("a", 0)
    s.try_take("b", 0)
    assert s.try_take("a", 0) == 1.0  # "a" is now the most recently used
    s.try_take("c", 0)  # evicts "b"
    assert len(s) == 2
    assert s.peek("b", 0) == 1  # "b" starts full again: the accepted trade-off
    assert s.try_take("a", 0) == 1.0  # "a" kept its state


def test_bucket_set_delay_and_adjust_create_nothing():
    s = BucketSet(rate_per_s=1, burst=2)
    assert s.delay("a", 0, 2) == 0.0
    assert s.delay("a", 0, 3) == 0.0  # a full bucket lets even more than its burst through
    s.adjust("a", 0, 5)
    assert len(s) == 0
    s.try_take("a", 0, 2)
    assert s.delay("a", 0) == 1.0
    s.adjust("a", 0, -2)
    assert s.delay("a", 0, 2) == 0.0
    with pytest.raises(ValueError):
        BucketSet(1, 1, max_keys=0)
