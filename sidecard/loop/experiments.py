"""The experiments and rollouts in force, the arm each request is served by, and each arm's values.

- **Assignment** (`assign`, read by the planner): a request for an experiment's prompt that names no version, or
  for its feature that names no model (no route, for a route experiment), is served by the arm its user is
  assigned to, sticky by the user's pseudonym (`experiments.assign`). The request goes on as if it had named the
  arm's version, model or route itself; its plan carries the experiment and the arm.
- **Values**: as an accounting sink, each request of an arm gives `error_rate` (1 for an error sidecard or the
  upstream caused, or a degraded answer; a caller's mistake gives nothing), and each fresh answer `latency` and
  `cost`; the quality pipeline adds `judge_score` and `pass_rate` (`judged`, `checked`), feedback
  `feedback_score` (`on_feedback`), reviewers `review_score`. A prompt under a progressive rollout records the
  same values for its stable and candidate versions into the rollout.

Deciding, stopping and acting on it is the control layer's (`control/experiments.py`); this is the bookkeeping,
plain data, so that operator state can keep it across restarts.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Final

import msgspec

from ..engine.types import Finished
from ..errors import Code
from ..experiments.experiment import Experiment
from ..experiments.feedback import Feedback
from ..experiments.metric import Tally
from ..experiments.rollout import Role, Rollout
from ..observe.redact import pseudonym
from ..protocol import Complete

# Errors that are the caller's, not the arm's: they say nothing about the version, model or route serving it.
CALLERS: Final = frozenset({Code.BAD_FRAME, Code.BAD_REQUEST, Code.PROMPT_NOT_FOUND, Code.INVALID_REQUEST,
                            Code.REQUEST_TOO_LARGE, Code.AI_DISABLED, Code.BUDGET_EXCEEDED, Code.CACHE_MISS, "cancelled"})


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

    # ------------------------------------------------------------------ values

    def __call__(self, finished: Finished) -> None:
        """The accounting sink."""
        trace, plan = finished.trace, finished.trace.plan
        if plan is None or finished.counting or trace.internal:
            return
        experiment = plan.experiment
        rollout = self.rollouts.get(plan.prompt) if plan.prompt is not None else None
        if experiment is None and rollout is None:
            return
        error = finished.error
        if error is not None and error.code in CALLERS:
            return
        answer = finished.completion
        failed = answer is None or answer.degraded
        values = [("error_rate", 1.0 if failed else 0.0)]
        if answer is not None and not failed and not answer.cached:
            values += [("latency", finished.latency_s), ("cost", trace.bill.cost_usd)]
        for metric, value in values:
            if experiment is not None and plan.arm is not None:
                self.record(experiment, plan.arm, metric, value)
            if rollout is not None and plan.version is not None:
                self.observe(plan.prompt, plan.version.version, metric, value)  # type: ignore[arg-type]

    def on_feedback(self, feedback: Feedback) -> None:
        """A feedback listener: feedback on an arm's (or a rollout's) answer."""
        served = feedback.request
        if served.experiment is not None and served.arm is not None:
            self.record(served.experiment, served.arm, "feedback_score", feedback.value)
        if served.prompt is not None and served.version is not None:
            self.observe(served.prompt, served.version, "feedback_score", feedback.value)

    def judged(self, prompt: str | None, version: int | None, feature: str, model: str, metric: str, value: float) -> None:
        """The quality pipeline's value for an answer (`judge_score`, `pass_rate`), which it knows by prompt,
        version, feature and model: the arm serving that version or model gets it."""
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
        rollout = self.rollouts.get(prompt)
        if rollout is None or rollout.finished:
            return
        role: Role | None = "candidate" if str(version) == rollout.candidate else "stable" if str(version) == rollout.stable else None
        if role is not None:
            self.rollouts[prompt] = rollout.observe(role, metric, value)
            self.recorded += 1
