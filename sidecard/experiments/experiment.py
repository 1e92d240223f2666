"""An A/B(/n) experiment as a frozen value, and the pure bookkeeping that decides and stops it.

An experiment splits a subject's traffic (a prompt, a feature's route) between two or more arms by weight,
sticky by user (`assign`). The first arm is the control. Its values are kept in a `Tally` beside it (mergeable:
a fleet sums the instances' tallies), and `evaluate` reads them:

- **Primary metric.** Every pair of arms is compared with the always-valid sequential test (`stats.compare`)
  at alpha / (number of pairs), so the chance of declaring any winner among equal arms is at most `alpha`
  however often it is looked at (Bonferroni). An arm shown better than every other arm is the winner. When
  every pair is decided and no arm beats all the others (the best are equal within `equivalence`), it is
  decided with no winner.
- **Guardrails.** Each other arm against the control, with the non-inferiority test (`stats.non_inferior`) at
  guard_alpha / (guards x other arms): an arm shown worse than the control by more than a guard's margin stops
  the experiment as failed, so the chance of a false stop is at most `guard_alpha`.
- **Max samples.** With every arm past `max_samples` on the primary metric and nothing decided, it stops as
  inconclusive.

A winner other than the control also needs each guardrail shown not worse than the control's, so the chance of
declaring a winner that is worse than a guardrail's margin is at most `guard_alpha`.

Once stopped, every user gets the winner (failed, inconclusive or no winner: the control).
"""

from __future__ import annotations

import itertools
import random
from typing import Literal

import msgspec

from . import assign
from .metric import Guard, Tally, check_guards, compare, metric, non_inferior
from .stats import DEFAULT_ALPHA, DEFAULT_MIN_SAMPLES, DEFAULT_TAU, Decision, Verdict

Kind = Literal["prompt_version", "model", "route"]
State = Literal["running", "decided", "failed", "inconclusive", "stopped"]


class Arm(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    name: str
    value: str  # the prompt version, model or route this arm serves
    weight: float = 1.0


class Experiment(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    name: str
    subject: str  # what it splits: a prompt's name, or a feature for models and routes
    kind: Kind
    arms: tuple[Arm, ...]  # the first is the control
    primary: str  # a metric name (metric.METRICS)
    guardrails: tuple[Guard, ...] = ()
    alpha: float = DEFAULT_ALPHA
    guard_alpha: float = DEFAULT_ALPHA
    tau: float = DEFAULT_TAU
    min_samples: int = DEFAULT_MIN_SAMPLES  # per arm and metric, before anything is decided
    equivalence: float = 0.0  # arms this close on the primary metric are equal (0: never decided equal)
    max_samples: int | None = None  # per arm on the primary metric
    started_at: float = 0.0
    state: State = "running"
    winner: str | None = None
    reason: str = ""
    ended_at: float | None = None

    def __post_init__(self) -> None:
        names = [arm.name for arm in self.arms]
        if len(names) < 2 or len(set(names)) != len(names):
            raise ValueError("an experiment needs two or more arms with distinct names")
        if not any(arm.weight > 0 for arm in self.arms) or any(arm.weight < 0 for arm in self.arms):
            raise ValueError("arm weights must be at least 0, and one above 0")
        metric(self.primary)
        check_guards(self.guardrails)
        for value in (self.alpha, self.guard_alpha):
            if not 0 < value < 1:
                raise ValueError("alpha and guard_alpha must be between 0 and 1")
        if self.winner is not None and self.winner not in names:
            raise ValueError(f"winner {self.winner!r} is not an arm")

    @property
    def control(self) -> str:
        return self.arms[0].name

    @property
    def running(self) -> bool:
        return self.state == "running"

    def assign(self, user: str | None, rng: random.Random) -> str:
        """The arm serving this user: sticky by weight while running; afterwards the winner, else the control."""
        if not self.running:
            return self.winner or self.control
        return assign.assign(self.name, user, [(arm.name, arm.weight) for arm in self.arms], rng)

    def stop(self, now: float, reason: str) -> Experiment:
        """An operator's stop: no winner, the control serves."""
        if not self.running:
            return self
        return msgspec.structs.replace(self, state="stopped", reason=reason, ended_at=now)

    def update(self, tally: Tally, now: float) -> tuple[Experiment, Report]:
        """Evaluate the tally (without the samples-needed estimates: this runs often); when it decides the
        experiment, the stopped experiment with it."""
        report = evaluate(self, tally, estimate=False)
        if not self.running or report.state == "running":
            return self, report
        return msgspec.structs.replace(self, state=report.state, winner=report.winner, reason=report.reason,
                                       ended_at=now), report


class Comparison(msgspec.Struct, frozen=True):
    control: str  # arm names
    treatment: str
    metric: str
    verdict: Verdict
    margin: str = ""  # a guardrail's: how much worse the treatment may be


class Report(msgspec.Struct, frozen=True, kw_only=True):
    state: State
    winner: str | None
    reason: str
    primary: list[Comparison]
    guardrails: list[Comparison]


def evaluate(experiment: Experiment, tally: Tally, *, estimate: bool = True) -> Report:
    """The experiment's comparisons and what they decide (pure; nothing is stopped here, see `update`)."""
    names = [arm.name for arm in experiment.arms]
    primary = _primary(experiment, tally, names, estimate)
    guardrails = _guardrails(experiment, tally, names, estimate)
    if not experiment.running:
        return Report(state=experiment.state, winner=experiment.winner, reason=experiment.reason, primary=primary,
                      guardrails=guardrails)
    state, winner, reason = _decide(experiment, tally, names, primary, guardrails)
    return Report(state=state, winner=winner, reason=reason, primary=primary, guardrails=guardrails)


def _primary(experiment: Experiment, tally: Tally, names: list[str], estimate: bool) -> list[Comparison]:
    pairs = list(itertools.combinations(names, 2))
    alpha = experiment.alpha / len(pairs)
    return [
        Comparison(a, b, experiment.primary, verdict=
                   compare(experiment.primary, tally.get(a, experiment.primary), tally.get(b, experiment.primary),
                           alpha=alpha, tau=experiment.tau, min_samples=experiment.min_samples,
                           equivalence=experiment.equivalence, estimate=estimate))
        for a, b in pairs
    ]


def _guardrails(experiment: Experiment, tally: Tally, names: list[str], estimate: bool) -> list[Comparison]:
    if not experiment.guardrails:
        return []
    control, others = names[0], names[1:]
    alpha = experiment.guard_alpha / (len(experiment.guardrails) * len(others))
    return [
        Comparison(control, arm, guard.metric, margin=guard.margin_text(), verdict=
                   non_inferior(guard, tally.get(control, guard.metric), tally.get(arm, guard.metric), alpha=alpha,
                                tau=experiment.tau, min_samples=experiment.min_samples, estimate=estimate))
        for arm in others
        for guard in experiment.guardrails
    ]


def _decide(experiment: Experiment, tally: Tally, names: list[str], primary: list[Comparison],
            guardrails: list[Comparison]) -> tuple[State, str | None, str]:
    for comparison in guardrails:
        if comparison.verdict.decision is Decision.WORSE:
            return "failed", None, (f"guardrail {comparison.metric}: {comparison.treatment} is worse than "
                                    f"{comparison.control} by more than {comparison.margin}")
    beats: dict[str, set[str]] = {name: set() for name in names}
    for comparison in primary:
        decision = comparison.verdict.decision
        if decision is Decision.BETTER:
            beats[comparison.treatment].add(comparison.control)
        elif decision is Decision.WORSE:
            beats[comparison.control].add(comparison.treatment)
    leader = next((name for name in names if len(beats[name]) == len(names) - 1), None)
    unsure = [c.metric for c in guardrails if c.treatment == leader and c.verdict.decision is not Decision.NOT_WORSE]
    if leader is not None and not unsure:
        others = ", ".join(other for other in names if other != leader)
        return "decided", leader, f"{leader} is better than {others} on {experiment.primary}"
    if leader is None and all(comparison.verdict.decision is not Decision.UNDECIDED for comparison in primary):
        best = [name for name in names if not any(name in beaten for beaten in beats.values())]
        return "decided", None, f"no single best arm on {experiment.primary}: {', '.join(best)} are equal within {experiment.equivalence:g}"
    # A leader other than the control wins only once its guardrails are shown not worse than the control's.
    waiting = f"{leader} leads on {experiment.primary}; guardrails not yet shown not worse: {', '.join(unsure)}" if unsure else ""
    if experiment.max_samples is not None and all(tally.get(name, experiment.primary).n >= experiment.max_samples for name in names):
        return "inconclusive", None, f"no verdict after {experiment.max_samples} samples per arm" + (f" ({waiting})" if waiting else "")
    return "running", None, waiting
