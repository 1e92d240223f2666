"""The experiments and rollouts in force, the arm each request is served by, and each arm's values.

- **Assignment** (`assign`, read by the planner): a request for an experiment's prompt that names no version, or
  for its feature that names no model (no route, for a route experiment), is served by the arm its user is
  assigned to, sticky by the user's pseudonym (`experiments.assign`). The request goes on as if it had named the
  arm's version, model or route itself; its plan carries the experiment and the arm.
- **Values**: as an accounting sink, each request of an arm gives `error_rate` (1 for an error sidecard or the
  upstream caused, or a degraded answer; a caller's mistake, or a refusal by sidecard's own rate limits or queues, gives nothing), and each fresh answer `latency` and
  `cost` (not an async job's: its latency is its queue's, its cost may be the batch price); the quality pipeline adds `judge_score` and `pass_rate` (`judged`, `checked`), feedback
  `feedback_score` (`on_feedback`), reviewers `review_score`. A prompt under a progressive rollout records the
  same values for its stable and candidate versions into the rollout; a route under a rollout of a new lead
  model (kept as `route:NAME`), for its stable and candidate models (`route_model`, read by the planner, gives
  `percent` of users, sticky, the candidate model).

Deciding, stopping and acting on it is the control layer's (`control/experiments.py`); this is the bookkeeping,
plain data, so that operator state can keep it across restarts.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Final

import msgspec

from ..engine.types import Finished, Trace
from ..errors import Code, SidecardError
from ..experiments.assign import assign
from ..experiments.experiment import Experiment
from ..experiments.feedback import Feedback
from ..experiments.metric import Tally
from ..experiments.rollout import Role, Rollout
from ..observe.redact import pseudonym
from ..protocol import Complete

ROUTE: Final = "route:"  # a route's rollout is kept under "route:NAME", a prompt's under its name
# Attempts sidecard's own admission queues turned away for want of capacity (not `paused`: the provider's hold).
QUEUES_REFUSED: Final = frozenset({"overloaded:queue_full", "overloaded:would_miss_deadline", "overloaded:shed"})
# Errors that are the caller's, not the arm's: they say nothing about the version, model or route serving it.
CALLERS: Final = frozenset({Code.BAD_FRAME, Code.BAD_REQUEST, Code.PROMPT_NOT_FOUND, Code.INVALID_REQUEST,
                            Code.REQUEST_TOO_LARGE, Code.AI_DISABLED, Code.BUDGET_EXCEEDED, Code.CACHE_MISS, Code.FORBIDDEN,
                            Code.POLICY_REFUSED, "cancelled", Code.SHUTTING_DOWN})


class ExperimentBook:
    def __init__(self, *, user_salt: Callable[[], bytes], rng: random.Random | None = None) -> None:
        """`user_salt`: the pseudonym salt (operator state's, known once it is restored)."""
        self.experiments: dict[str, Experiment] = {}
        self.tallies: dict[str, Tally] = {}
        self.rollouts: dict[str, Rollout] = {}  # by prompt name
        self._salt = user_salt
        self._rng = rng or random.Random()
        self.recorded = 0  # values recorded since the start: the control layer saves when this moves

    # ------------------------------------------------------------------ the set in force

    def add(self, experiment: Experiment, tally: Tally | None = None) -> None:
        self.experiments[experiment.name] = experiment
        self.tallies[experiment.name] = tally if tally is not None else self.tallies.get(experiment.name, Tally())

    def remove(self, name: str) -> None:
        self.experiments.pop(name, None)
        self.tallies.pop(name, None)

    def on_subject(self, kind: str, subject: str) -> Experiment | None:
        """The experiment on a prompt (kind "prompt_version") or a feature (kind "model" or "route"), if any."""
        for experiment in self.experiments.values():
            if experiment.subject == subject and (experiment.kind == "prompt_version") == (kind == "prompt_version"):
                return experiment
        return None

    def names_feature(self, feature: str) -> bool:
        """Whether an experiment in force splits FEATURE's traffic (its requests are then counted under their own
        feature, past requests.max_named_features too)."""
        return any(e.subject == feature and e.kind != "prompt_version" for e in self.experiments.values())

    # ------------------------------------------------------------------ assignment (the planner)

    def assign(self, request: Complete) -> tuple[str, str, Complete] | None:
        """(experiment, arm, the request as the arm serves it), or None when no experiment takes the request."""
        if not self.experiments:
            return None
        if request.prompt is not None:
            if request.version is not None:
                return None
            experiment = self.on_subject("prompt_version", request.prompt)
        elif request.model is None and request.route is None:
            experiment = self.on_subject("model", request.feature)
        else:
            return None
        if experiment is None:
            return None
        user = pseudonym(request.user, self._salt()) if request.user is not None else None
        name = experiment.assign(user, self._rng)
        value = next(arm.value for arm in experiment.arms if arm.name == name)
        if experiment.kind == "prompt_version":
            served = msgspec.structs.replace(request, version=int(value))
        elif experiment.kind == "model":
            served = msgspec.structs.replace(request, model=value)
        else:
            served = msgspec.structs.replace(request, route=value)
        return experiment.name, name, served

    def route_model(self, route: str, request: Complete) -> tuple[Role, str | None] | None:
        """The role a route's rollout gives this request, and the model to lead with (None: the route's own)."""
        rollout = self.rollouts.get(ROUTE + route)
        if rollout is None or rollout.finished:
            return None
        user = pseudonym(request.user, self._salt()) if request.user is not None else None
        share = rollout.percent
        role: Role = assign(rollout.subject, user, [("stable", 100.0 - share), ("candidate", share)], self._rng)  # type: ignore[assignment]
        return role, rollout.candidate if role == "candidate" else None

    # ------------------------------------------------------------------ values

    def __call__(self, finished: Finished) -> None:
        """The accounting sink."""
        trace, plan = finished.trace, finished.trace.plan
        if plan is None or finished.counting or trace.internal:
            return
        experiment = plan.experiment
        rollout = self.rollouts.get(plan.prompt) if plan.prompt is not None else None
        if experiment is None and rollout is None and plan.rollout is None:
            return
        error = finished.error
        if error is not None and (error.code in CALLERS or _refused_locally(error, trace)):
            return
        answer = finished.completion
        failed = answer is None or answer.degraded
        values = [("error_rate", 1.0 if failed else 0.0)]
        if answer is not None and not failed and not answer.cached and trace.job is None:
            # (a job's latency is its queue's, its cost may be the batch price: neither compares with a request's)
            values += [("latency", finished.latency_s), ("cost", trace.bill.cost_usd)]
        for metric, value in values:
            if experiment is not None and plan.arm is not None:
                self.record(experiment, plan.arm, metric, value)
            if rollout is not None and plan.version is not None:
                self.observe(plan.prompt, plan.version.version, metric, value)  # type: ignore[arg-type]
            if plan.rollout is not None:
                self._observe(ROUTE + plan.route_name, plan.rollout, metric, value)  # type: ignore[arg-type]

    def on_feedback(self, feedback: Feedback) -> None:
        """A feedback listener: feedback on an arm's (or a rollout's) answer."""
        served = feedback.request
        if served.experiment is not None and served.arm is not None:
            self.record(served.experiment, served.arm, "feedback_score", feedback.value)
        if served.prompt is not None and served.version is not None:
            self.observe(served.prompt, served.version, "feedback_score", feedback.value)
        self.by_model(served.route, served.model, "feedback_score", feedback.value)

    def judged(self, prompt: str | None, version: int | None, feature: str, model: str, metric: str, value: float,
               route: str | None = None) -> None:
        """The quality pipeline's value for an answer (`judge_score`, `pass_rate`), which it knows by prompt,
        version, feature, model and route: the arm (and the rollout's role) serving that version or model gets it."""
        self.by_model(route, model, metric, value)
        if prompt is not None and version is not None:
            self.observe(prompt, version, metric, value)
            experiment = self.on_subject("prompt_version", prompt)
            wanted = str(version)
        else:
            experiment = self.on_subject("model", feature)
            wanted = model
        if experiment is None or experiment.kind == "route":
            return  # a route's answers come from its targets' models: not attributable here
        arm = next((arm.name for arm in experiment.arms if arm.value == wanted), None)
        if arm is not None:
            self.record(experiment.name, arm, metric, value)

    def record(self, experiment: str, arm: str, metric: str, value: float) -> None:
        tally = self.tallies.get(experiment)
        if tally is None or not self.experiments[experiment].running:
            return
        self.tallies[experiment] = tally.record(arm, metric, value)
        self.recorded += 1

    def observe(self, prompt: str, version: int, metric: str, value: float) -> None:
        """A value of a prompt version's answer, for the prompt's rollout."""
        self._observe(prompt, _role(self.rollouts.get(prompt), str(version)), metric, value)

    def by_model(self, route: str | None, model: str, metric: str, value: float) -> None:
        """A value of a model's answer on a route, for the route's rollout."""
        if route is not None and self.rollouts:
            self._observe(ROUTE + route, _role(self.rollouts.get(ROUTE + route), model), metric, value)

    def _observe(self, key: str, role: Role | None, metric: str, value: float) -> None:
        rollout = self.rollouts.get(key)
        if rollout is None or rollout.finished or role is None:
            return
        self.rollouts[key] = rollout.observe(role, metric, value)
        self.recorded += 1


def _refused_locally(error: SidecardError, trace: Trace) -> bool:
    """Refused by sidecard's own traffic control before any target was reached, so the arm's version, model or
    route had no part in it: a `rate_limited` from its `[[rate_limits]]` (this sidecar's or the fleet's), refused
    before admission with no attempt; an `overloaded` whose every attempt its own admission queues turned away (full,
    would miss the deadline, shed). What the arm's targets said stays the arm's: a 429 or 529 from the provider, a
    target held back by the provider's rate limit (`overloaded:paused`), a breaker its failures opened."""
    if error.code == Code.RATE_LIMITED:
        return trace.admission is None and not trace.attempts
    return error.code == Code.OVERLOADED and bool(trace.attempts) and all(a.outcome in QUEUES_REFUSED for a in trace.attempts)


def _role(rollout: Rollout | None, served: str) -> Role | None:
    """The rollout's role of what served an answer (a version or a model), if it is the stable or the candidate."""
    if rollout is None:
        return None
    return "candidate" if served == rollout.candidate else "stable" if served == rollout.stable else None
