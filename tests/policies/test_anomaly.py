"""Unusual spend on synthetic traffic (seeded): normal daily rhythms stay quiet, a runaway fires within minutes."""

from __future__ import annotations

import json
import math
import random
from collections.abc import Callable

import pytest

from sidecard.policies.anomaly import AnomalyDetector, AnomalyEvent, AnomalySettings

DAY = 1440  # minutes
START = 1_764_547_200 // 60  # 2025-12-01 00:00 UTC (a Monday), in minutes
MEAN_COST = 0.01  # USD per request


def poisson(rng: random.Random, lam: float) -> int:
    if lam <= 0:
        return 0
    if lam > 40:
        return max(0, round(rng.gauss(lam, math.sqrt(lam))))
    limit, k, p = math.exp(-lam), 0, 1.0
    while True:
        p *= rng.random()
        if p <= limit:
            return k
        k += 1


def costs(rng: random.Random, n: int, mean: float = MEAN_COST, sigma: float = 0.8) -> list[float]:
    """n requests with log-normal costs (a long tail, like real prompts)."""
    mu = math.log(mean) - sigma**2 / 2
    return [rng.lognormvariate(mu, sigma) for _ in range(n)]


def diurnal(base: float, amplitude: float = 0.8) -> Callable[[int], float]:
    """Requests per minute following the day: base * (1 + amplitude * sin), trough at 06:00 UTC."""
    return lambda minute: base * (1 + amplitude * math.sin(2 * math.pi * ((minute % DAY) / DAY - 0.5)))


def run(
    detector: AnomalyDetector, rate: Callable[[int], float], minutes: range, rng: random.Random, scope: str = "feature:search",
    mean: float = MEAN_COST,
) -> list[AnomalyEvent]:
    """Feed each minute's requests, spread over it, and tick at its end; returns the events."""
    events = []
    for minute in minutes:
        n = poisson(rng, rate(minute))
        for i, usd in enumerate(costs(rng, n, mean)):
            event = detector.add(scope, usd, (START + minute) * 60 + (i + 0.5) * 60 / n)
            if event is not None:
                events.append(event)
        events += detector.tick((START + minute) * 60 + 59.9)
    return events


def test_a_daily_rhythm_never_fires() -> None:
    for seed in range(2):
        detector = AnomalyDetector()
        assert run(detector, diurnal(10), range(3 * DAY), random.Random(seed)) == []


def test_business_hours_and_quiet_weekends_do_not_fire_once_learned() -> None:
    """A tenfold step every weekday at 09:00 UTC, a third of it at weekends: a rhythm, not a runaway."""

    def office(minute: int) -> float:
        weekday = (minute // DAY) % 7 < 5
        busy = 9 * 60 <= minute % DAY < 18 * 60
        return (10.0 if busy else 1.0) * (1.0 if weekday else 0.3)

    detector = AnomalyDetector(AnomalySettings(warmup_s=86_400))  # a day to learn the shape of a day
    assert run(detector, office, range(9 * DAY), random.Random(1)) == []  # through a weekend, into the next week


def test_a_sparse_expensive_scope_does_not_fire_on_its_noise_but_on_a_loop() -> None:
    """A user's few, costly requests (a long-tailed $0.50 each) are noise; the same user in a loop is not."""
    detector = AnomalyDetector()
    assert run(detector, diurnal(0.2), range(5 * DAY), random.Random(2), scope="user:ab12", mean=0.5) == []
    [fired] = run(detector, lambda m: 3.0, range(5 * DAY, 5 * DAY + 30), random.Random(2), scope="user:ab12", mean=0.5)
    assert fired.scope == "user:ab12" and fired.at - (START + 5 * DAY) * 60 <= detector.settings.window_s


@pytest.mark.parametrize("at_minute", [2 * DAY + 6 * 60 + 17, 2 * DAY + 18 * 60 + 41])  # at the trough, at the peak
def test_a_tenfold_jump_fires_within_the_window(at_minute: int) -> None:
    detector = AnomalyDetector()
    normal = diurnal(10)
    events = run(detector, lambda m: normal(m) * (10 if m >= at_minute else 1), range(at_minute + 60), random.Random(3))
    [fired] = events
    assert fired.state == "firing" and fired.scope == "feature:search"
    assert fired.at - (START + at_minute) * 60 <= detector.settings.window_s
    normal_now = normal(at_minute) * MEAN_COST * 60
    assert normal_now / 2 < fired.expected_usd_per_hour < normal_now * 2  # the level lags the daily curve a little
    assert fired.rate_usd_per_hour > detector.settings.factor * fired.expected_usd_per_hour
    assert "feature:search is spending $" in fired.message


def test_sensitivity_is_the_factor() -> None:
    jump = 2 * DAY + 14 * 60

    def tripled(m: int) -> float:
        return diurnal(10)(m) * (3 if m >= jump else 1)

    assert run(AnomalyDetector(), tripled, range(jump + 60), random.Random(4)) == []
    [fired] = run(AnomalyDetector(AnomalySettings(factor=2.0)), tripled, range(jump + 60), random.Random(4))
    assert fired.at - (START + jump) * 60 <= 300


def test_a_runaway_below_the_minimum_rate_is_not_worth_an_alert() -> None:
    jump = 2 * DAY
    tiny = AnomalySettings(min_usd_per_hour=5.0)  # the runaway reaches about $2/h
    assert run(AnomalyDetector(tiny), lambda m: 0.3 * (10 if m >= jump else 1), range(jump + 60), random.Random(5)) == []


def test_the_alert_holds_while_the_runaway_lasts_and_resolves_after() -> None:
    jump, stop = DAY + 600, DAY + 600 + 180
    detector = AnomalyDetector()
    events = run(detector, lambda m: 10 * (10 if jump <= m < stop else 1), range(stop + 30), random.Random(6))
    fired, resolved = events
    assert (fired.state, resolved.state) == ("firing", "resolved") and resolved.since == fired.at
    assert (START + stop) * 60 <= resolved.at <= (START + stop) * 60 + 2 * detector.settings.window_s


def test_a_lasting_new_rate_becomes_the_normal() -> None:
    jump = DAY + 600
    settings = AnomalySettings(accept_after_s=3600)
    events = run(AnomalyDetector(settings), lambda m: 10 * (10 if m >= jump else 1), range(jump + 4 * 60), random.Random(7))
    assert [e.state for e in events] == ["firing", "resolved"]
    assert events[1].at - events[0].at >= settings.accept_after_s


def test_state_survives_a_restart_without_counting_the_downtime_as_quiet() -> None:
    rng, detector = random.Random(8), AnomalyDetector()
    run(detector, diurnal(10), range(2 * DAY), rng)
    state = json.loads(json.dumps(detector.state()))
    down_until = 2 * DAY + 4 * 60  # four hours down
    restored = AnomalyDetector.restore(AnomalySettings(), state, (START + down_until) * 60)
    now = (START + down_until) * 60
    assert restored.expected_per_minute("feature:search", now) == pytest.approx(
        detector.expected_per_minute("feature:search", (START + 2 * DAY) * 60), rel=0.5
    )
    assert run(restored, diurnal(10), range(down_until, 3 * DAY + 12 * 60), rng) == []  # normal traffic after it: quiet
    with pytest.raises(ValueError):
        AnomalyDetector.restore(AnomalySettings(), {"format": 1, "scopes": {"x": {"minute": 1}}}, now)


def test_a_fleet_state_is_the_sum_of_its_instances() -> None:
    """Two instances share a feature's traffic; their merged state expects what one instance with all of it would."""
    whole, halves = AnomalyDetector(), [AnomalyDetector(), AnomalyDetector()]
    rng = random.Random(9)
    for minute in range(DAY + 12 * 60):
        for detector in halves:
            for usd in costs(rng, poisson(rng, diurnal(5)(minute))):
                detector.add("feature:search", usd, (START + minute) * 60 + 30)
                whole.add("feature:search", usd, (START + minute) * 60 + 30)
    now = (START + DAY + 12 * 60) * 60
    merged = AnomalyDetector.restore(AnomalySettings(), AnomalyDetector.merge(*(d.state() for d in halves)), now)
    assert merged.expected_per_minute("feature:search", now) == pytest.approx(whole.expected_per_minute("feature:search", now), rel=0.02)


def test_scopes_are_bounded() -> None:
    detector = AnomalyDetector(AnomalySettings(max_scopes=3))
    for i in range(5):
        detector.add(f"user:{i}", 0.1, START * 60 + i)
    assert len(detector) == 3 and detector.expected_per_minute("user:0", START * 60) is None
    detector.tick((START + 9 * DAY) * 60)  # quiet for longer than forget_after_s
    assert len(detector) == 0


def test_a_clock_stepping_back_keeps_counting() -> None:
    detector = AnomalyDetector()
    detector.add("global", 1.0, START * 60 + 120)
    assert detector.add("global", 1.0, START * 60) is None
    with pytest.raises(ValueError):
        detector.add("global", -1.0, START * 60)
