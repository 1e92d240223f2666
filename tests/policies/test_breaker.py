from sidecard.policies.breaker import Breaker, BreakerSettings, State

S = BreakerSettings(failure_rate=0.5, min_volume=10, consecutive_failures=5, window_s=10, cooldown_s=30, probes=2)


def call(b, now, ok):
    allowed, _ = b.allow(now)
    assert allowed
    return b.record(now, success=ok)


def test_opens_on_consecutive_failures():
    b = Breaker(S)
    for i in range(4):
        assert call(b, i, False) is None
    assert call(b, 4, False) is State.OPEN
    assert b.allow(5) == (False, None)
    assert b.retry_after(5) == 29


def test_busy_failures_count_toward_the_rate_but_not_the_run_in_a_row():
    """A 529 storm over every target opened every breaker by chance runs of five, leaving routes nothing to try."""
    b = Breaker(S)
    for i in range(9):
        assert b.allow(i)[0] and b.record(i, success=False, busy=True) is None
    assert b.state is State.CLOSED
    assert b.allow(9)[0] and b.record(9, success=False, busy=True) is State.OPEN  # 10 of 10: the rate rule
    b = Breaker(S)
    for i in range(4):
        call(b, i, False)
    b.allow(4) and b.record(4, success=False, busy=True)  # neither extends nor breaks the run of real failures
    assert b.state is State.CLOSED and call(b, 5, False) is State.OPEN


def test_opens_on_failure_rate_only_with_enough_volume():
    b = Breaker(S)
    for i in range(8):  # alternate: never 5 in a row, 50% failures
        call(b, 0.1 * i, i % 2 == 0)
    assert b.state is State.CLOSED  # 8 calls < min_volume
    call(b, 1.0, True)
    assert call(b, 1.1, False) is State.OPEN  # 10 calls, 5 failures


def test_old_failures_leave_the_window():
    b = Breaker(S)
    for ok in [False, False, False, False, True] * 2:  # 8 of 10 failed, never 5 in a row
        call(b, 0, ok)
    assert b.state is State.CLOSED  # the rate is only checked on a failure
    # at t=20 the window has forgotten t=0: one failure is 1 of 1 call, below min_volume
    assert call(b, 20, False) is None
    assert b.state is State.CLOSED


def test_half_open_bounds_probes_and_closes_after_successes():
    b = Breaker(S)
    b.force_open(0)
    assert b.allow(29.9) == (False, None)
    assert b.allow(30) == (True, State.HALF_OPEN)
    assert b.allow(30) == (True, None)
    assert b.allow(30) == (False, None)  # only two probes at a time
    assert b.record(31, success=True) is None
    assert b.record(31, success=True) is State.CLOSED
    assert b.allow(31) == (True, None)


def test_half_open_failure_reopens_and_release_frees_a_probe():
    b = Breaker(S)
    b.force_open(0)
    b.allow(30)
    b.allow(30)
    b.release()
    assert b.allow(30) == (True, None)
    assert b.record(30, success=False) is State.OPEN
    assert b.retry_after(30) == 30


def test_force_open_from_closed():
    b = Breaker(S)
    assert b.force_open(3) is State.OPEN
    assert b.force_open(4) is None and b.opened_at == 4


def test_would_allow_says_what_allow_would_without_taking_a_probe():
    b = Breaker(S)
    assert b.would_allow(0.0)
    b.force_open(0.0)
    assert not b.would_allow(S.cooldown_s - 0.001)
    assert b.would_allow(S.cooldown_s)  # (the cooldown is over: a probe would go)
    for _ in range(S.probes):
        assert b.would_allow(S.cooldown_s) and b.allow(S.cooldown_s)[0]
    assert not b.would_allow(S.cooldown_s) and not b.allow(S.cooldown_s)[0]  # every probe out
    b.release()
    assert b.would_allow(S.cooldown_s)
