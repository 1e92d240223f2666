"""The always-valid sequential test, pinned against its formulas (scipy as the reference) and by simulation."""

import functools
import math
import statistics

import pytest
from scipy.stats import binomtest, norm

from sidecard.experiments import simulate, stats
from sidecard.experiments.stats import Decision, Stats, compare, non_inferior, paired


def stats_of(n: int, mean: float, sd: float) -> Stats:
    return Stats(n, mean, sd * sd * (n - 1))


# ---------------------------------------------------------------- sufficient statistics


def test_stats_are_count_mean_and_squared_deviations():
    values = [1.0, 2.0, 3.0, 4.0]
    assert Stats.of(values) == Stats(4, 2.5, 5.0)
    assert Stats.of(values).variance == statistics.variance(values)
    assert Stats().variance == 0.0 and Stats.of([7.0]).variance == 0.0


def test_merging_equals_adding_one_by_one_in_any_grouping():
    values = [0.91, 0.12, 0.88, 0.85, 0.3, 0.97, 0.79, 0.86]
    whole = Stats.of(values)
    for cut in range(len(values) + 1):
        merged = Stats.of(values[:cut]).merge(Stats.of(values[cut:]))
        assert merged.n == whole.n
        assert merged.mean == pytest.approx(whole.mean, rel=1e-12)
        assert merged.m2 == pytest.approx(whole.m2, rel=1e-12)


def test_sums_round_trip_for_stores_that_can_only_add():
    values = [0.2, 0.4, 0.9]
    n, total, total_sq = Stats.of(values).sums()
    assert (n, total, total_sq) == (3, pytest.approx(1.5), pytest.approx(0.04 + 0.16 + 0.81))
    back = Stats.from_sums(n, total, total_sq)
    assert back.n == 3 and back.mean == pytest.approx(0.5) and back.m2 == pytest.approx(Stats.of(values).m2)
    assert Stats.from_sums(0, 0.0, 0.0) == Stats()


# ---------------------------------------------------------------- the formulas


@pytest.mark.parametrize("difference, variance, tau2", [(0.0, 1e-4, 4e-3), (0.03, 2e-4, 1.6e-3), (-0.5, 0.01, 0.04)])
def test_likelihood_ratio_is_the_ratio_of_two_normal_densities(difference, variance, tau2):
    # Λ = N(d; θ0, V + τ²) / N(d; θ0, V): the normal mixture's marginal likelihood over the null's.
    expected = norm.logpdf(difference, 0, math.sqrt(variance + tau2)) - norm.logpdf(difference, 0, math.sqrt(variance))
    assert stats.log_likelihood_ratio(difference, variance, tau2) == pytest.approx(expected, rel=1e-12, abs=1e-12)


@pytest.mark.parametrize("alpha", [0.01, 0.05, 0.2])
def test_the_confidence_sequence_ends_where_the_ratio_reaches_one_over_alpha(alpha):
    variance, tau2 = 2e-4, 1.6e-3
    half = stats.half_width(variance, tau2, alpha)
    assert stats.log_likelihood_ratio(half, variance, tau2) == pytest.approx(math.log(1 / alpha), rel=1e-12)


def test_compare_reports_effect_interval_and_always_valid_p_value():
    control, treatment = stats_of(400, 0.80, 0.2), stats_of(400, 0.75, 0.2)
    verdict = compare(control, treatment, alpha=0.05, tau=0.2)
    variance, tau2 = 0.04 / 400 * 2, 0.2**2 * 0.04
    half = stats.half_width(variance, tau2, 0.05)
    assert verdict.decision is Decision.WORSE
    assert verdict.effect == pytest.approx(-0.05)
    assert (verdict.ci_low, verdict.ci_high) == (pytest.approx(-0.05 - half), pytest.approx(-0.05 + half))
    assert verdict.ci_high < 0
    assert verdict.p_value == pytest.approx(math.exp(-stats.log_likelihood_ratio(-0.05, variance, tau2)))
    assert verdict.p_value < 0.05 and verdict.samples_needed == 0
    # The same numbers when lower is better (a latency): the treatment is better.
    assert compare(control, treatment, tau=0.2, higher_is_better=False).decision is Decision.BETTER


def test_nothing_is_decided_before_min_samples_per_arm():
    control, treatment = stats_of(99, 0.9, 0.1), stats_of(500, 0.1, 0.1)
    verdict = compare(control, treatment, min_samples=100)
    assert verdict.decision is Decision.UNDECIDED
    assert (verdict.ci_low, verdict.ci_high, verdict.p_value) == (None, None, 1.0)
    assert verdict.samples_needed == 1 and verdict.reason == "1 more samples before a verdict"
    assert compare(stats_of(100, 0.9, 0.1), treatment, min_samples=100).decision is Decision.WORSE


def test_equal_within_the_equivalence_margin():
    control, treatment = stats_of(5000, 0.80, 0.2), stats_of(5000, 0.801, 0.2)
    assert compare(control, treatment).decision is Decision.UNDECIDED
    assert compare(control, treatment, equivalence=0.03).decision is Decision.EQUAL
    assert compare(control, treatment, equivalence=0.01).decision is Decision.UNDECIDED


@pytest.mark.parametrize("equivalence, effect", [(0.0, -0.03), (0.0, 0.02), (0.04, 0.005)])
def test_samples_needed_is_where_the_decision_comes_if_the_effect_holds(equivalence, effect):
    control, treatment = stats_of(300, 0.80, 0.2), stats_of(100, 0.80 + effect, 0.25)
    verdict = compare(control, treatment, equivalence=equivalence)
    assert verdict.decision is Decision.UNDECIDED
    needed = verdict.samples_needed
    assert needed is not None and needed > 0

    def at(extra: int) -> Decision:  # the same means and spreads, with `extra` more values at a 3:1 split
        total = 400 + extra
        return compare(stats_of(total * 3 // 4, 0.80, 0.2), stats_of(total // 4, 0.80 + effect, 0.25),
                       equivalence=equivalence).decision

    assert at(needed + 4) is not Decision.UNDECIDED
    assert at(needed - 4) is Decision.UNDECIDED


def test_no_effect_means_no_decision_in_sight():
    assert compare(stats_of(1000, 0.8, 0.2), stats_of(1000, 0.8, 0.2)).samples_needed is None
    assert compare(stats_of(1000, 0.8, 0.2), stats_of(1000, 0.81, 0.2), estimate=False).samples_needed is None


def test_a_small_arm_is_never_surer_than_the_pooled_variance_allows():
    """A canary's small arm that drew few of the judge's poor answers has a high mean and a low variance
    together; on its own variance it would look sure (this pair is a clear BETTER on the unpooled variance)."""
    control, lucky = stats_of(20_000, 0.80, 0.2), stats_of(100, 0.85, 0.07)
    pooled = (control.m2 + lucky.m2) / (20_100 - 2)
    tau2 = 0.2**2 * pooled
    verdict = compare(control, lucky)
    assert verdict.decision is Decision.UNDECIDED
    assert verdict.ci_high - verdict.effect == pytest.approx(stats.half_width(pooled * (1 / 20_000 + 1 / 100), tau2, 0.05))
    assert 0.05 > stats.half_width(0.04 / 20_000 + 0.07**2 / 100, tau2, 0.05)


def test_a_small_arm_whose_values_spread_more_keeps_its_own_variance():
    control, wide = stats_of(20_000, 0.80, 0.2), stats_of(100, 0.88, 0.35)
    pooled = (control.m2 + wide.m2) / (20_100 - 2)
    verdict = compare(control, wide)
    unpooled = 0.04 / 20_000 + 0.35**2 / 100
    assert verdict.ci_high - verdict.effect == pytest.approx(stats.half_width(unpooled, 0.2**2 * pooled, 0.05))
    assert verdict.decision is Decision.UNDECIDED
    assert 0.08 > stats.half_width(pooled * (1 / 20_000 + 1 / 100), 0.2**2 * pooled, 0.05)  # pooled: "better"


def test_a_run_of_identical_values_is_only_as_sure_as_its_resolution():
    same = Stats(200, 0.5, 0.0)
    verdict = compare(same, same)
    assert verdict.decision is Decision.UNDECIDED and verdict.reason == "no spread in the values"
    assert compare(same, Stats(200, 0.51, 0.0), resolution=0.01).decision is Decision.BETTER
    assert compare(same, Stats(200, 0.5, 0.0), resolution=0.01).decision is Decision.UNDECIDED


def test_bad_parameters_are_refused():
    for kwargs in ({"alpha": 0.0}, {"alpha": 1.0}, {"tau": 0.0}, {"min_samples": -1}, {"equivalence": -0.1}):
        with pytest.raises(ValueError):
            compare(Stats(), Stats(), **kwargs)
    with pytest.raises(ValueError):
        non_inferior(Stats(), Stats(), margin=-0.01)


# ---------------------------------------------------------------- non-inferiority


def test_non_inferiority_against_the_margin():
    control = stats_of(2000, 0.80, 0.2)
    shown = non_inferior(control, stats_of(2000, 0.795, 0.2), margin=0.03)
    assert shown.decision is Decision.NOT_WORSE and shown.ci_low > -0.03
    # p against "worse by exactly the margin": the effect's distance from -0.03.
    variance, tau2 = 0.04 / 1000, 0.2**2 * 0.04
    assert shown.p_value == pytest.approx(math.exp(-stats.log_likelihood_ratio(0.025, variance, tau2)))
    worse = non_inferior(control, stats_of(2000, 0.70, 0.2), margin=0.03)
    assert worse.decision is Decision.WORSE and worse.ci_high < -0.03
    near = non_inferior(control, stats_of(2000, 0.77, 0.2), margin=0.03)
    assert near.decision is Decision.UNDECIDED and near.ci_low < -0.03 < near.ci_high


def test_non_inferiority_when_lower_is_better():
    control = stats_of(2000, 1.00, 0.3)  # latency in seconds
    assert non_inferior(control, stats_of(2000, 1.02, 0.3), margin=0.1, higher_is_better=False).decision is Decision.NOT_WORSE
    assert non_inferior(control, stats_of(2000, 1.25, 0.3), margin=0.1, higher_is_better=False).decision is Decision.WORSE


def test_a_rate_with_no_events_yet_still_has_a_variance():
    none = Stats(3000, 0.0, 0.0)  # no errors in either arm
    assert non_inferior(none, none, margin=0.01, binary=True, higher_is_better=False).decision is Decision.NOT_WORSE
    assert compare(none, none, binary=True).decision is Decision.UNDECIDED
    many = Stats.from_sums(3000, 300.0, 300.0)  # 10 % errors
    assert non_inferior(none, many, margin=0.01, binary=True, higher_is_better=False).decision is Decision.WORSE


def test_paired_differences():
    better = stats_of(200, 0.04, 0.1)  # the shadow scores 4 points higher on the same requests
    verdict = paired(better)
    half = stats.half_width(0.01 / 200, 0.2**2 * 0.01, 0.05)
    assert verdict.decision is Decision.BETTER
    assert (verdict.ci_low, verdict.ci_high) == (pytest.approx(0.04 - half), pytest.approx(0.04 + half))
    assert verdict.control == Stats() and verdict.treatment == better
    assert paired(better, higher_is_better=False).decision is Decision.WORSE
    assert paired(stats_of(50, 0.04, 0.1)).samples_needed == 50


# ---------------------------------------------------------------- error rate and power, by simulation

RUNS = 1000


def test_equal_arms_get_a_winner_no_more_often_than_alpha_with_continuous_peeking():
    """1,000 A/A runs, the test looked at after every 10 requests up to 2,000: the false-positive rate is at most
    alpha within sampling error (a one-sided binomial test would not call it above 5 % at the 1 % level)."""
    scores = simulate.judge_scores(0.80)
    test = functools.partial(compare, alpha=0.05, estimate=False, resolution=0.01)
    outcomes = simulate.runs(scores, scores, test, count=RUNS, seed=20, horizon=2000, batch=10)
    false_positives = sum(o.decision is not Decision.UNDECIDED for o in outcomes)
    assert binomtest(false_positives, RUNS, 0.05, alternative="greater").pvalue > 0.01, false_positives


def test_a_candidate_worse_by_the_margin_is_rarely_called_not_worse():
    control, at_margin = simulate.judge_scores(0.80), simulate.judge_scores(0.77)
    test = functools.partial(non_inferior, margin=0.03, alpha=0.05, estimate=False, resolution=0.01)
    outcomes = simulate.runs(control, at_margin, test, count=300, seed=21, horizon=2000, batch=10)
    wrong = sum(o.decision is Decision.NOT_WORSE for o in outcomes)
    assert binomtest(wrong, 300, 0.05, alternative="greater").pvalue > 0.01, wrong


def test_a_five_point_drop_is_found_every_time():
    good, bad = simulate.judge_scores(0.80), simulate.judge_scores(0.75)
    test = functools.partial(compare, alpha=0.05, estimate=False, resolution=0.01)
    outcomes = simulate.runs(good, bad, test, count=200, seed=22, horizon=6000, batch=10)
    assert all(o.decision is Decision.WORSE for o in outcomes)
    assert statistics.median(o.requests for o in outcomes) < 1500
