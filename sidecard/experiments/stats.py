"""Always-valid sequential comparison of two arms: the mixture sequential probability ratio test (mSPRT).

The test (Johari, Koomen, Pekelis and Walsh, "Always Valid Inference: Continuous Monitoring of A/B Tests",
Operations Research 70(3), 2022; arXiv:1512.04922) compares the difference of two means. With `d` the
observed difference (treatment - control), `V` its variance (about s_c²/n_c + s_t²/n_t, see below) and a normal
mixture N(θ0, τ²) over the alternative, the likelihood ratio against H0: θ = θ0 is the ratio of two normal
densities of `d`:

    Λ = N(d; θ0, V + τ²) / N(d; θ0, V) = sqrt(V / (V + τ²)) · exp(τ² (d - θ0)² / (2 V (V + τ²)))

Λ is a martingale under H0, so by Ville's inequality P(Λ ever reaches 1/α) ≤ α however often it is looked at:
`p = min(1, 1/Λ)` is an always-valid p-value, and the θ0 where Λ < 1/α form an always-valid confidence sequence
`d ± h(V)`, with h² = 2V(V+τ²)/τ² · (log(1/α) + ½ log(1 + τ²/V)).

**The stated error rate.** Every decision here is "the (1 - α) confidence sequence excludes a value", so at
any number of looks, with any stopping rule: a superiority test declares a winner between equal arms with
probability at most α; a non-inferiority test calls a candidate "not worse" when it is worse by the margin or
more with probability at most α, and "worse" when it is within the margin with probability at most α.

**Assumptions.** Observations are independent, and identically distributed within an arm while the test runs
(a drift that hits both arms alike, such as the time of day, cancels out). Assignment is sticky by user, so one
user's answers are correlated; the test treats them as independent, which is close when each user contributes
a small share of an arm. `V` uses the sample variances (a plug-in, as in the paper's two-sample form) and a
normal approximation of the means, which is why nothing is decided before `min_samples` per arm. `V` is the
larger of the unpooled and the pooled estimate: with a skewed metric, a small arm (a 1 % canary) that drew few
of the tail looks both better and surer than it is (on the unpooled estimate alone, equal judge-score arms
split 99 to 1 got a winner in 5.8 % of 500 simulated runs at alpha 5 %, 1.6 % with this); the pooled one alone
would be too sure of an arm whose values truly spread more. Binary metrics use a Jeffreys-smoothed variance,
so that an arm with no failures yet still has some.

**τ** is the mixture's spread, in units of the metric's pooled standard deviation (scale-free, so one default
serves scores, latencies and costs): the test is most sensitive to effects of about τ standard deviations.

Statistics are plain counts, means and sums of squared deviations (`Stats`), mergeable, so a fleet can keep one
per instance and sum them. Every function here is pure.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterable
from enum import Enum
from typing import Final, NamedTuple

import msgspec

DEFAULT_ALPHA: Final = 0.05
DEFAULT_TAU: Final = 0.2  # standard deviations; see bench/experiments.py for the sample sizes it gives
DEFAULT_MIN_SAMPLES: Final = 100  # per arm, before the normal approximation is trusted
MAX_SAMPLES_NEEDED: Final = 10**12  # beyond this an estimate says nothing: reported as None


class Stats(msgspec.Struct, frozen=True, array_like=True):
    """Count, mean and sum of squared deviations from the mean (Welford's M2) of one arm's values."""

    n: int = 0
    mean: float = 0.0
    m2: float = 0.0

    @classmethod
    def of(cls, values: Iterable[float]) -> Stats:
        total = Stats()
        for value in values:
            total = total.add(value)
        return total

    @classmethod
    def from_sums(cls, n: int, total: float, total_sq: float) -> Stats:
        """From a count, a sum and a sum of squares: what a store that can only add numbers keeps."""
        if n <= 0:
            return cls()
        mean = total / n
        return cls(n, mean, max(0.0, total_sq - total * mean))

    def sums(self) -> tuple[int, float, float]:
        """(count, sum, sum of squares), the inverse of `from_sums`."""
        return self.n, self.n * self.mean, self.m2 + self.n * self.mean * self.mean

    def add(self, value: float) -> Stats:
        n = self.n + 1
        delta = value - self.mean
        mean = self.mean + delta / n
        return Stats(n, mean, self.m2 + delta * (value - mean))

    def merge(self, other: Stats) -> Stats:
        """The statistics of both sets of values together (Chan, Golub and LeVeque's pairwise update)."""
        if other.n == 0:
            return self
        if self.n == 0:
            return other
        n = self.n + other.n
        delta = other.mean - self.mean
        return Stats(n, self.mean + delta * other.n / n, self.m2 + other.m2 + delta * delta * self.n * other.n / n)

    @property
    def variance(self) -> float:
        """The unbiased sample variance (0 below two values)."""
        return self.m2 / (self.n - 1) if self.n > 1 else 0.0


class Decision(str, Enum):
    UNDECIDED = "undecided"
    BETTER = "better"  # the treatment is better than the control
    WORSE = "worse"  # the treatment is worse (non-inferiority: worse by more than the margin)
    EQUAL = "equal"  # within the equivalence margin of each other
    NOT_WORSE = "not_worse"  # non-inferiority: not worse than the control by the margin or more


class Verdict(msgspec.Struct, frozen=True, kw_only=True):
    decision: Decision
    effect: float  # treatment mean - control mean, in the metric's units
    # The always-valid (1 - alpha) confidence sequence for the effect at this look; None before `min_samples`.
    ci_low: float | None
    ci_high: float | None
    p_value: float  # always-valid, against "no difference" (non-inferiority: "worse by exactly the margin")
    control: Stats
    treatment: Stats
    alpha: float
    # More observations (both arms together, at the current split) until a decision if the observed effect is the
    # true one; 0 once decided; before `min_samples`, the ones still missing; None when no decision is in sight
    # (no effect, no spread, or not asked for).
    samples_needed: int | None = None
    reason: str = ""


def compare(
    control: Stats,
    treatment: Stats,
    *,
    alpha: float = DEFAULT_ALPHA,
    tau: float = DEFAULT_TAU,
    higher_is_better: bool = True,
    min_samples: int = DEFAULT_MIN_SAMPLES,
    equivalence: float = 0.0,
    binary: bool = False,
    resolution: float = 0.0,
    estimate: bool = True,
) -> Verdict:
    """Is the treatment better, worse, or (with an `equivalence` margin above 0) equal within that margin?

    `resolution` is the metric's smallest step (a score's 0.01, a latency's millisecond): each arm's variance
    is at least that of rounding to it (resolution²/12), so a run of identical values is not infinitely sure.
    `estimate=False` skips the samples-needed estimate (a root search) on hot paths.
    """
    if equivalence < 0:
        raise ValueError("equivalence must not be negative")
    evidence = _two_sample(control, treatment, alpha, tau, min_samples, binary, resolution)
    sign = 1.0 if higher_is_better else -1.0

    def decide(low: float, high: float) -> Decision:
        if equivalence > 0 and -equivalence < low and high < equivalence:
            return Decision.EQUAL
        return _superiority(sign, low, high)

    size = abs(evidence.effect)
    # Superiority is reached when the half-width falls below |effect|; equivalence when below margin - |effect|.
    return _verdict(evidence, alpha, 0.0, decide, max(size, equivalence - size), estimate)


def non_inferior(
    control: Stats,
    treatment: Stats,
    *,
    margin: float,
    alpha: float = DEFAULT_ALPHA,
    tau: float = DEFAULT_TAU,
    higher_is_better: bool = True,
    min_samples: int = DEFAULT_MIN_SAMPLES,
    binary: bool = False,
    resolution: float = 0.0,
    estimate: bool = True,
) -> Verdict:
    """Is the treatment not worse than the control by `margin` or more (NOT_WORSE), or worse by more (WORSE)?

    The margin is in the metric's units, in its bad direction: a margin of 0.03 on a judge score asks "at most
    three points lower"; on a latency in seconds, 0.05 asks "at most 50 ms slower". A true effect exactly at the
    margin stays undecided. The p-value is against "worse by exactly the margin".
    """
    if margin < 0:
        raise ValueError("margin must not be negative")
    evidence = _two_sample(control, treatment, alpha, tau, min_samples, binary, resolution)
    sign = 1.0 if higher_is_better else -1.0
    bound = -sign * margin  # the effect at which the treatment is worse by exactly the margin

    def decide(low: float, high: float) -> Decision:
        good_low, good_high = (low, high) if sign > 0 else (-high, -low)  # in the good direction
        if good_low > -margin:
            return Decision.NOT_WORSE
        if good_high < -margin:
            return Decision.WORSE
        return Decision.UNDECIDED

    return _verdict(evidence, alpha, bound, decide, abs(evidence.effect - bound), estimate)


def paired(
    differences: Stats,
    *,
    alpha: float = DEFAULT_ALPHA,
    tau: float = DEFAULT_TAU,
    higher_is_better: bool = True,
    min_samples: int = DEFAULT_MIN_SAMPLES,
    resolution: float = 0.0,
    estimate: bool = True,
) -> Verdict:
    """The one-sample form on per-request differences (treatment - control for the same request), as shadow
    traffic gives them: the same test with V = s_d²/n, with more power when the two answers are correlated.
    Reported with `control` empty and `treatment` holding the differences."""
    _check(alpha, tau, min_samples)
    spread = _spread(differences, False, resolution)
    n = differences.n
    evidence = _Evidence(Stats(), differences, differences.mean, spread / n if n else 0.0, tau * tau * spread,
                         max(0, max(min_samples, 2) - n), n)
    sign = 1.0 if higher_is_better else -1.0

    return _verdict(evidence, alpha, 0.0, functools.partial(_superiority, sign), abs(evidence.effect), estimate)


def log_likelihood_ratio(difference: float, variance: float, tau2: float) -> float:
    """log Λ for an observed difference from θ0 (difference = d - θ0), its variance V and the mixture's τ²."""
    return 0.5 * math.log(variance / (variance + tau2)) + tau2 * difference * difference / (2 * variance * (variance + tau2))


def half_width(variance: float, tau2: float, alpha: float) -> float:
    """Half the width of the always-valid (1 - alpha) confidence sequence at variance V."""
    return math.sqrt(2 * variance * (variance + tau2) / tau2 * (math.log(1 / alpha) + 0.5 * math.log1p(tau2 / variance)))


# ---------------------------------------------------------------- internals


class _Evidence(NamedTuple):
    control: Stats
    treatment: Stats
    effect: float  # the observed difference
    variance: float  # its variance V
    tau2: float  # the mixture's variance, in the metric's units squared
    short: int  # observations still missing before anything is decided
    total: int  # observations so far: V falls as 1/total at the current split


def _check(alpha: float, tau: float, min_samples: int) -> None:
    if not 0 < alpha < 1:
        raise ValueError("alpha must be between 0 and 1")
    if not tau > 0:
        raise ValueError("tau must be positive")
    if min_samples < 0:
        raise ValueError("min_samples must not be negative")


def _superiority(sign: float, low: float, high: float) -> Decision:
    """BETTER or WORSE (by the metric's direction `sign`) once the confidence sequence excludes no difference."""
    if low > 0 or high < 0:
        return Decision.BETTER if sign * low > 0 else Decision.WORSE
    return Decision.UNDECIDED


def _spread(stats: Stats, binary: bool, resolution: float) -> float:
    """One value's variance: the sample variance, at least that of rounding to `resolution`."""
    if binary:  # Jeffreys: a rate of 0/n or n/n still has a variance
        rate = (stats.n * stats.mean + 0.5) / (stats.n + 1)
        variance = rate * (1 - rate)
    else:
        variance = stats.variance
    return max(variance, resolution * resolution / 12)


def _two_sample(control: Stats, treatment: Stats, alpha: float, tau: float, min_samples: int, binary: bool,
                resolution: float) -> _Evidence:
    _check(alpha, tau, min_samples)
    floor = max(min_samples, 2)
    short = max(0, floor - control.n) + max(0, floor - treatment.n)
    effect = treatment.mean - control.mean
    if control.n == 0 or treatment.n == 0:
        return _Evidence(control, treatment, effect, 0.0, 0.0, short, control.n + treatment.n)
    var_c, var_t = _spread(control, binary, resolution), _spread(treatment, binary, resolution)
    pooled = ((control.n - 1) * var_c + (treatment.n - 1) * var_t) / max(1, control.n + treatment.n - 2)
    # The larger of the unpooled (Welch) and pooled variances of the difference. With a skewed metric (a judge
    # score's tail of poor answers), a small arm that drew few of the tail has a high mean and a low variance
    # together, and on its own variance would look sure of it; one whose values truly spread more needs its own.
    variance = max(var_c / control.n + var_t / treatment.n, pooled * (1 / control.n + 1 / treatment.n))
    return _Evidence(control, treatment, effect, variance, tau * tau * pooled, short, control.n + treatment.n)


def _verdict(evidence: _Evidence, alpha: float, null: float, decide: Callable[[float, float], Decision],
             target: float, estimate: bool) -> Verdict:
    """The verdict from the evidence: `null` is the effect the p-value is against, `decide` reads the confidence
    sequence, and `target` is the half-width at which a decision would come if the observed effect held."""
    control, treatment, effect, variance, tau2 = evidence[:5]
    if evidence.short or variance <= 0 or tau2 <= 0:
        reason = f"{evidence.short} more samples before a verdict" if evidence.short else "no spread in the values"
        return Verdict(decision=Decision.UNDECIDED, effect=effect, ci_low=None, ci_high=None, p_value=1.0,
                       control=control, treatment=treatment, alpha=alpha, samples_needed=evidence.short or None,
                       reason=reason)
    half = half_width(variance, tau2, alpha)
    decision = decide(effect - half, effect + half)
    needed = None
    if decision is not Decision.UNDECIDED:
        needed = 0
    elif estimate:
        needed = _samples_needed(evidence, alpha, target)
    return Verdict(decision=decision, effect=effect, ci_low=effect - half, ci_high=effect + half,
                   p_value=math.exp(-max(0.0, log_likelihood_ratio(effect - null, variance, tau2))), control=control,
                   treatment=treatment, alpha=alpha, samples_needed=needed)


def _samples_needed(evidence: _Evidence, alpha: float, target: float) -> int | None:
    """Observations to add for the half-width to fall to `target`: V falls as 1/total at the current split (τ²
    held at its current value), and the half-width rises with V, so one root search finds the V that does it."""
    from scipy.optimize import brentq  # on first use: importing scipy.optimize takes about half a second

    variance, tau2 = evidence.variance, evidence.tau2
    low = variance * 1e-15
    if target <= 0 or half_width(low, tau2, alpha) >= target:
        return None
    solved = brentq(lambda v: half_width(v, tau2, alpha) - target, low, variance, xtol=variance * 1e-12, rtol=1e-10)
    extra = variance * evidence.total / solved - evidence.total
    return None if extra > MAX_SAMPLES_NEEDED else max(1, math.ceil(extra))
