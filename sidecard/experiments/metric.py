"""The metrics experiments and rollouts compare, guards on them, and the mergeable tally of their values.

| metric | a request's value | better |
|---|---|---|
| `judge_score` | the judge's overall score, 0-1 | higher |
| `feedback_score` | explicit feedback scaled to 0-1 (thumbs: up 1, down 0) | higher |
| `review_score` | a human reviewer's label as a score, 0-1 | higher |
| `pass_rate` | 1 when the answer passed every heuristic check, else 0 | higher |
| `error_rate` | 1 when the request failed, else 0 | lower |
| `cost` | USD spent on the request | lower |
| `latency` | seconds to the whole answer | lower |
"""

from __future__ import annotations

from typing import Final

import msgspec

from . import stats
from .stats import Stats, Verdict


class Metric(msgspec.Struct, frozen=True):
    name: str
    higher_is_better: bool
    binary: bool  # values are 0 or 1: a rate
    resolution: float  # the smallest step a value is reported in (0 for a rate: its variance is p(1-p))
    unit: str


METRICS: Final = {
    metric.name: metric
    for metric in (
        Metric("judge_score", True, False, 0.01, "score"),
        Metric("feedback_score", True, False, 0.01, "score"),
        Metric("review_score", True, False, 0.01, "score"),
        Metric("pass_rate", True, True, 0.0, "share"),
        Metric("error_rate", False, True, 0.0, "share"),
        Metric("cost", False, False, 1e-6, "USD"),
        Metric("latency", False, False, 0.001, "s"),
    )
}


def metric(name: str) -> Metric:
    try:
        return METRICS[name]
    except KeyError:
        raise ValueError(f"unknown metric {name!r} (known: {', '.join(METRICS)})") from None


class Guard(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A metric that must not get worse than the control's by `margin` or more.

    The margin is in the metric's units, or with `relative` a share of the control's mean (latency and cost
    differ too much between apps for one absolute margin; the control mean's own uncertainty is ignored).
    """

    metric: str
    margin: float
    relative: bool = False

    def __post_init__(self) -> None:
        metric(self.metric)
        if not self.margin >= 0:
            raise ValueError(f"guard {self.metric}: the margin must not be negative")

    def margin_for(self, control: Stats) -> float:
        return self.margin * abs(control.mean) if self.relative else self.margin

    def margin_text(self) -> str:
        """`0.03`, or `10%` of the control's mean."""
        return f"{self.margin:.0%}" if self.relative else f"{self.margin:g}"


def check_guards(guards: tuple[Guard, ...]) -> None:
    metrics = [guard.metric for guard in guards]
    if len(set(metrics)) != len(metrics):
        raise ValueError("each metric takes one guard")


# Quality at most 3 points lower, errors at most 1 point more often, latency and cost at most 10 % higher.
DEFAULT_GUARDS: Final = (
    Guard("judge_score", 0.03),
    Guard("error_rate", 0.01),
    Guard("latency", 0.10, relative=True),
    Guard("cost", 0.10, relative=True),
)


def compare(name: str, control: Stats, treatment: Stats, *, alpha: float, tau: float, min_samples: int,
            equivalence: float = 0.0, estimate: bool = True) -> Verdict:
    """`stats.compare` with the metric's direction, kind and resolution."""
    known = metric(name)
    return stats.compare(control, treatment, alpha=alpha, tau=tau, min_samples=min_samples, equivalence=equivalence,
                         estimate=estimate, higher_is_better=known.higher_is_better, binary=known.binary,
                         resolution=known.resolution)


def non_inferior(guard: Guard, control: Stats, treatment: Stats, *, alpha: float, tau: float, min_samples: int,
                 estimate: bool = True) -> Verdict:
    """`stats.non_inferior` for a guard: its margin, the metric's direction, kind and resolution."""
    known = metric(guard.metric)
    return stats.non_inferior(control, treatment, margin=guard.margin_for(control), alpha=alpha, tau=tau,
                              min_samples=min_samples, estimate=estimate, higher_is_better=known.higher_is_better,
                              binary=known.binary, resolution=known.resolution)


class Tally(msgspec.Struct, frozen=True):
    """Statistics per arm and metric. Immutable: `record` and `merge` return new tallies; a fleet sums the
    instances' tallies with `merge`."""

    arms: dict[str, dict[str, Stats]] = {}

    def get(self, arm: str, name: str) -> Stats:
        return self.arms.get(arm, {}).get(name, Stats())

    def record(self, arm: str, name: str, value: float) -> Tally:
        metric(name)
        return self._with(arm, name, self.get(arm, name).add(value))

    def merge(self, other: Tally) -> Tally:
        merged = self
        for arm, values in other.arms.items():
            for name, seen in values.items():
                merged = merged._with(arm, name, merged.get(arm, name).merge(seen))
        return merged

    def _with(self, arm: str, name: str, seen: Stats) -> Tally:
        return Tally({**self.arms, arm: {**self.arms.get(arm, {}), name: seen}})
