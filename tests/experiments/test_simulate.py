import numpy as np
import pytest

from sidecard.experiments import simulate
from sidecard.experiments.stats import Decision, Stats, Verdict


def test_judge_scores_have_the_asked_mean_a_realistic_spread_and_two_decimals():
    scores = simulate.judge_scores(0.80)(np.random.default_rng(1), 100_000)
    assert scores.mean() == pytest.approx(0.80, abs=0.005)
    assert scores.std() == pytest.approx(0.2, abs=0.02)  # good answers and a tail of poor ones
    assert ((scores >= 0) & (scores <= 1)).all() and np.allclose(scores * 100, np.round(scores * 100))
    assert (scores < 0.5).mean() == pytest.approx(0.1, abs=0.02)
    with pytest.raises(ValueError):
        simulate.judge_scores(0.95)


def test_a_run_looks_after_every_batch_until_the_test_decides():
    seen: list[tuple[int, int]] = []

    def test(control: Stats, treatment: Stats) -> Verdict:
        seen.append((control.n, treatment.n))
        decision = Decision.BETTER if control.n + treatment.n >= 50 else Decision.UNDECIDED
        return Verdict(decision=decision, effect=0.0, ci_low=None, ci_high=None, p_value=1.0, control=control,
                       treatment=treatment, alpha=0.05)

    constant = simulate.judge_scores(0.80)
    outcome = simulate.run(constant, constant, test, np.random.default_rng(2), horizon=100, batch=10, share=0.3)
    assert outcome == simulate.Outcome(Decision.BETTER, 50, 5)
    assert [a + b for a, b in seen] == [10, 20, 30, 40, 50]
    assert sum(b for _, b in seen[-1:]) == pytest.approx(15, abs=10)  # about 30 % to the treatment


def test_a_run_that_never_decides_ends_at_its_horizon():
    never = simulate.runs(simulate.judge_scores(0.8), simulate.judge_scores(0.8),
                          lambda c, t: Verdict(decision=Decision.UNDECIDED, effect=0.0, ci_low=None, ci_high=None,
                                               p_value=1.0, control=c, treatment=t, alpha=0.05),
                          count=3, seed=3, horizon=95, batch=10)
    assert never == [simulate.Outcome(Decision.UNDECIDED, 100, 10)] * 3
