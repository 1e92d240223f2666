import pytest

from sidecard.policies.concurrency import AIMDLimit, ConcurrencyLimit, GradientLimit, StaticLimit


def test_static_limit_never_moves():
    limit: ConcurrencyLimit = StaticLimit(4)
    limit.on_sample(0, 100.0, 4, True)
    limit.on_sample(1, 0.1, 4, False)
    assert limit.limit == 4
    with pytest.raises(ValueError):
        StaticLimit(0)


def test_aimd_trajectory():
    limit = AIMDLimit(10, min_limit=2, max_limit=13, timeout_s=5)
    trajectory = []

    def sample(now, rtt, in_flight, dropped=False):
        limit.on_sample(now, rtt, in_flight, dropped)
        trajectory.append(limit.limit)

    sample(1, 1, 5)  # half the limit in flight: +1
    sample(2, 1, 5)  # 5 of 11 is less than half: the limit was not tested
    sample(3, 1, 6)
    sample(4, 1, 13)
    sample(5, 1, 13)  # capped at max_limit
    sample(10, 1, 13, dropped=True)  # 13 * 0.9 = 11.7 -> 11
    sample(10.5, 2, 11, dropped=True)  # started at 8.5, before the decrease: the same congestion event
    sample(11, 0.5, 11, dropped=True)  # started at 10.5, after it: 11 * 0.9 = 9.9 -> 9
    sample(20, 6, 9)  # slower than timeout_s counts as a drop: 8.1 -> 8
    assert trajectory == [11, 11, 12, 13, 13, 11, 11, 9, 8]


def test_aimd_decreases_by_at_least_one_and_stops_at_min_limit():
    limit = AIMDLimit(3, min_limit=1, backoff=0.9)
    for now in (1, 2, 3, 4):
        limit.on_sample(now, 0.1, 3, True)
    assert limit.limit == 1  # 2.7 -> 2, 1.8 -> 1, then held at min_limit
    limit = AIMDLimit(2, min_limit=1, backoff=0.99)
    limit.on_sample(1, 0.1, 2, True)
    assert limit.limit == 1  # 1.98: rounding down always takes at least one off


@pytest.mark.parametrize("kwargs", [{"initial": 0}, {"initial": 5, "min_limit": 6}, {"initial": 5, "max_limit": 4}, {"initial": 5, "backoff": 1}])
def test_aimd_bad_parameters(kwargs):
    with pytest.raises(ValueError):
        AIMDLimit(**kwargs)


def test_gradient_exact_steps():
    limit = GradientLimit(10, smoothing=0.5, tolerance=1.0, queue_size=lambda limit: 2)
    limit.on_sample(1, 1.0, 10, False)  # gradient 1: target 10 + 2, halfway there
    assert limit.limit == 11
    limit.on_sample(2, 1.0, 10, False)
    assert limit.limit == 12
    limit.on_sample(3, 4.0, 12, False)  # long rtt (1 + 1 + 4) / 3 = 2, gradient 2 / 4: target 12 * 0.5 + 2 = 8
    assert limit.long_rtt == 2.0
    assert limit.limit == 10
    limit.on_sample(4, 1.0, 4, False)  # app-limited (4 < 10 / 2): measured, but the limit stays
    assert limit.long_rtt == 1.75
    assert limit.limit == 10
    limit.on_sample(5, 0.01, 10, True)  # a drop: target half the estimate, its rtt ignored
    assert limit.long_rtt == 1.75
    assert limit.limit == 7  # 10 * 0.75 = 7.5


def test_gradient_drops_drive_it_to_min_limit():
    limit = GradientLimit(50, min_limit=3)
    for now in range(100):
        limit.on_sample(now, 0.1, 50, True)
    assert limit.limit == 3


def test_gradient_converges_down_under_rising_rtt_and_up_again():
    limit = GradientLimit(20, max_limit=200)
    seen = []
    now = 0.0

    def run(rtt, n):
        nonlocal now
        for _ in range(n):
            now += rtt
            limit.on_sample(now, rtt, limit.limit, False)  # the pipe is kept full
            seen.append(limit.limit)

    run(1.0, 50)  # flat latency: the queue allowance grows the limit by 0.8 a sample
    assert limit.limit == 60
    assert seen == sorted(seen)
    start = len(seen)
    run(3.0, 30)  # latency triples: the gradient pulls the limit down (until it becomes the new baseline)
    down = seen[start:]
    assert down == sorted(down, reverse=True)
    assert limit.limit == 12  # from 60 in 30 samples
    start = len(seen)
    run(1.0, 60)  # latency back to normal: growing again at once (the baseline is not above 2x: no decay needed)
    up = seen[start:]
    assert up == sorted(up)
    assert limit.limit > 50


def test_gradient_baseline_decays_after_a_long_overload():
    limit = GradientLimit(20, long_window=10)
    for now in range(200):
        limit.on_sample(now, 10.0, 20, False)
    assert limit.long_rtt == pytest.approx(10.0)
    limit.on_sample(200, 1.0, 20, False)
    # the average alone would give 10 + (1 - 10) * 2 / 11; more than twice the rtt, so also * 0.9
    assert limit.long_rtt == pytest.approx((10 - 9 * 2 / 11) * 0.9)


def test_gradient_limits_are_clamped():
    limit = GradientLimit(5, max_limit=6)
    for now in range(20):
        limit.on_sample(now, 1.0, 6, False)
    assert limit.limit == 6
    with pytest.raises(ValueError):
        GradientLimit(5, smoothing=0)
    with pytest.raises(ValueError):
        GradientLimit(5, tolerance=0.5)
