"""Simulated experiments: how many requests a verdict takes, and how often equal arms get a winner.

Planning ("how long would a 5-point difference take at my traffic?") and the checks of the sequential test's
error rate both run the real test (`stats`) on simulated values: requests split between two arms, the
statistics merged batch by batch as a fleet's would be, the verdict looked at after every batch.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final

import msgspec
import numpy as np

from .stats import Decision, Stats, Verdict

Draw = Callable[[np.random.Generator, int], np.ndarray]  # (rng, count) -> that many values
Test = Callable[[Stats, Stats], Verdict]  # (control, treatment) -> verdict

# A judge's scores: most answers good (about 0.87, give or take 0.05), some poor (about 0.25, give or take 0.12),
# reported to two decimals; a version's quality is its share of good answers.
GOOD: Final = (0.87, 0.05)
POOR: Final = (0.25, 0.12)


def judge_scores(mean: float) -> Draw:
    """Judge scores with this mean (between the poor and the good answers' means), from the mixture above."""
    good_share = (mean - POOR[0]) / (GOOD[0] - POOR[0])
    if not 0 <= good_share <= 1:
        raise ValueError(f"a mean judge score must be between {POOR[0]} and {GOOD[0]}")
    good, poor = _beta(*GOOD), _beta(*POOR)

    def draw(rng: np.random.Generator, count: int) -> np.ndarray:
        is_good = rng.random(count) < good_share
        scores = np.empty(count)
        scores[is_good] = rng.beta(*good, int(is_good.sum()))
        scores[~is_good] = rng.beta(*poor, count - int(is_good.sum()))
        return np.round(scores, 2)

    return draw


class Outcome(msgspec.Struct, frozen=True):
    decision: Decision  # at the first decided look, or UNDECIDED at the horizon
    requests: int  # both arms together, at that look
    looks: int


def run(control: Draw, treatment: Draw, test: Test, rng: np.random.Generator, *, horizon: int, batch: int = 10,
        share: float = 0.5) -> Outcome:
    """One experiment: `horizon` requests at most, each to the treatment with probability `share`, the test
    looked at after every `batch` requests until it decides."""
    looks = -(-horizon // batch)
    size = looks * batch
    to_treatment = rng.random(size) < share
    values = np.empty(size)
    values[~to_treatment] = control(rng, size - int(to_treatment.sum()))
    values[to_treatment] = treatment(rng, int(to_treatment.sum()))
    values, to_treatment = values.reshape(looks, batch), to_treatment.reshape(looks, batch)
    # Per batch and arm: count, sum and sum of squares (small batches, so no cancellation), merged look by look.
    sums = [(mask.sum(1).tolist(), (values * mask).sum(1).tolist(), (values * values * mask).sum(1).tolist())
            for mask in (~to_treatment, to_treatment)]
    seen = [Stats(), Stats()]
    for look in range(looks):
        for arm, (counts, totals, squares) in enumerate(sums):
            seen[arm] = seen[arm].merge(Stats.from_sums(counts[look], totals[look], squares[look]))
        verdict = test(seen[0], seen[1])
        if verdict.decision is not Decision.UNDECIDED:
            return Outcome(verdict.decision, (look + 1) * batch, look + 1)
    return Outcome(Decision.UNDECIDED, size, looks)


def runs(control: Draw, treatment: Draw, test: Test, *, count: int, seed: int, horizon: int, batch: int = 10,
         share: float = 0.5) -> list[Outcome]:
    rng = np.random.default_rng(seed)
    return [run(control, treatment, test, rng, horizon=horizon, batch=batch, share=share) for _ in range(count)]


def _beta(mean: float, sd: float) -> tuple[float, float]:
    """The Beta distribution's (a, b) with this mean and standard deviation."""
    concentration = mean * (1 - mean) / (sd * sd) - 1
    return mean * concentration, (1 - mean) * concentration
