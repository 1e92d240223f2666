import random

import numpy as np
import pytest

from sidecard.experiments.shadow import ShadowBudget, ShadowComparison, ShadowSettings, Ticket
from sidecard.experiments.stats import Decision, compare


class Always(random.Random):
    """An rng whose draws always pass the share."""

    def random(self) -> float:
        return 0.0


def test_a_share_of_requests_is_mirrored():
    budget = ShadowBudget(ShadowSettings(share=0.1, budget_usd=1e9, max_in_flight=10**6))
    rng = random.Random(3)
    mirrored = sum(budget.decide(0.0, rng, 0.001) is not None for _ in range(10_000))
    assert mirrored == pytest.approx(1000, abs=100)


def test_mirroring_stops_when_the_windows_budget_is_spent_and_starts_again_in_the_next():
    budget = ShadowBudget(ShadowSettings(share=1.0, budget_usd=0.01, window_s=3600, max_in_flight=100))
    tickets = [budget.decide(10.0, Always(), 0.004) for _ in range(3)]
    assert tickets == [Ticket(0, 0.004), Ticket(0, 0.004), None]  # a third would pass $0.01
    assert budget.status(10.0) == {"spent_usd": 0.008, "remaining_usd": pytest.approx(0.002), "exhausted": True,
                                   "in_flight": 2, "window_ends_at": 3600.0}
    assert budget.decide(3599.0, Always(), 0.001) == Ticket(0, 0.001)
    assert budget.decide(3599.0, Always(), 0.002) is None
    assert budget.decide(3600.0, Always(), 0.004) == Ticket(1, 0.004)
    assert budget.status(3600.0)["exhausted"] is False


def test_settling_swaps_the_estimate_for_the_actual_cost():
    budget = ShadowBudget(ShadowSettings(share=1.0, budget_usd=0.01))
    ticket = budget.decide(0.0, Always(), 0.008)
    assert budget.decide(0.0, Always(), 0.004) is None
    budget.settle(ticket, 0.003, 1.0)
    assert budget.status(1.0)["spent_usd"] == pytest.approx(0.003) and budget.status(1.0)["in_flight"] == 0
    assert budget.decide(1.0, Always(), 0.004) is not None
    # A ticket from a closed window is not charged to the new one.
    old = budget.decide(3599.0, Always(), 0.001)
    budget.settle(old, 0.5, 3601.0)
    assert budget.status(3601.0)["spent_usd"] == 0.0


def test_at_most_max_in_flight_shadows_run_at_once():
    budget = ShadowBudget(ShadowSettings(share=1.0, budget_usd=100.0, max_in_flight=2))
    first, second = budget.decide(0.0, Always(), 0.01), budget.decide(0.0, Always(), 0.01)
    assert budget.decide(0.0, Always(), 0.01) is None
    budget.settle(first, 0.01, 0.0)
    assert budget.decide(0.0, Always(), 0.01) is not None and second is not None


def test_a_zero_budget_mirrors_nothing():
    budget = ShadowBudget(ShadowSettings(share=1.0, budget_usd=0.0))
    assert budget.decide(0.0, Always(), 0.0001) is None


def test_the_comparison_pairs_each_requests_two_answers():
    rng = np.random.default_rng(8)
    difficulty = rng.uniform(0.5, 0.95, 400)  # shared by both answers to a request
    real = np.round(difficulty + rng.normal(0, 0.03, 400), 2)
    shadow = np.round(difficulty + 0.02 + rng.normal(0, 0.03, 400), 2)
    comparison = ShadowComparison()
    for a, b in zip(real.tolist(), shadow.tolist()):
        comparison = comparison.record("judge_score", a, b)
    verdict = comparison.verdict("judge_score")
    assert verdict.decision is Decision.BETTER and verdict.ci_low > 0
    assert verdict.effect == pytest.approx(float((shadow - real).mean()))
    assert comparison.tally.get("real", "judge_score").n == comparison.tally.get("shadow", "judge_score").n == 400
    # Unpaired, the spread of difficulty would hide a 2-point difference at this size.
    unpaired = compare(comparison.tally.get("real", "judge_score"), comparison.tally.get("shadow", "judge_score"))
    assert unpaired.decision is Decision.UNDECIDED


def test_lower_is_better_metrics_compare_the_right_way():
    slower = ShadowComparison()
    for _ in range(100):
        slower = slower.record("latency", 1.0, 1.3).record("latency", 1.1, 1.35)
    assert slower.verdict("latency").decision is Decision.WORSE
    differences = slower.tally.get("difference", "latency")  # 0.3 and 0.25 s slower, half the requests each
    assert (differences.n, differences.mean, differences.m2) == (200, pytest.approx(0.275), pytest.approx(200 * 0.025**2))
