"""Experiments and progressive rollouts as operator state: starting, reading, stopping and acting on them.

- **Experiments** come from the config (`[[experiments]]`, started when the daemon starts or a reload adds one)
  or from an operator (`sidecardctl experiment start`). Every `rollout.evaluate_every_s` each running one is
  evaluated (`experiments.experiment.Experiment.update`); one that is decided, failed or inconclusive stops, with
  an audit line (`experiment_decided`) holding its verdict and evidence, and from then on every user gets the
  winner (or the control). `promote` makes a prompt experiment's winner the prompt's stable version and ends it.
- **Rollouts** (`sidecardctl prompt rollout NAME VERSION`) move a prompt's canary through `rollout.steps`: each
  tick of `experiments.rollout.Rollout` that promotes sets the canary's share, one that completes makes the
  candidate stable, one that rolls back stops the canary and fires the alert sinks (webhook, command). A route's
  rollout of a new lead model (`sidecardctl route rollout ROUTE MODEL`, kept as `route:ROUTE`) is served by the
  book at the rollout's share, and completing it puts the model first on the route. Every step is an audit line
  (`rollout_step`) and part of the rollout's history; operators pause, resume and abort.

Everything here is kept through operator state (the book is part of it), so a restart resumes where it was.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Final

import msgspec

from ..config import Config, ExperimentConfig, GuardConfig, RolloutConfig, Target
from ..errors import Code, SidecardError
from ..experiments.experiment import Arm, Experiment, Report, evaluate
from ..experiments.metric import Guard
from ..experiments.rollout import Complete, Hold, Pause, Promote, Rollback, Rollout
from ..loop.experiments import ROUTE, ExperimentBook
from ..observe.log import JsonLog
from ..observe.metrics import Metrics
from ..prompts.registry import PromptStore
from ..routes import RouteTable, no_route

STATES: Final = ("running", "decided", "failed", "inconclusive", "stopped")
TALLY_SAVE_EVERY_S: Final = 60.0  # values tallied since the last save are kept at least this often


def experiment_of(spec: ExperimentConfig, now: float) -> Experiment:
    """The config's (or an operator's) experiment as the core's frozen value."""
    if spec.prompt is not None:
        kind, subject, arms = "prompt_version", spec.prompt, [Arm(a.name, str(a.version), a.weight) for a in spec.arms]
    elif spec.arms[0].model is not None:
        kind, subject, arms = "model", spec.feature, [Arm(a.name, str(a.model), a.weight) for a in spec.arms]
    else:
        kind, subject, arms = "route", spec.feature, [Arm(a.name, str(a.route), a.weight) for a in spec.arms]
    return Experiment(name=spec.name, subject=subject or "", kind=kind, arms=tuple(arms), primary=spec.primary,  # type: ignore[arg-type]
                      guardrails=_guards(spec.guardrails), alpha=spec.alpha, guard_alpha=spec.guard_alpha,
                      min_samples=spec.min_samples, max_samples=spec.max_samples, equivalence=spec.equivalence,
                      started_at=now)


def _guards(guards: list[GuardConfig]) -> tuple[Guard, ...]:
    return tuple(Guard(g.metric, g.margin, g.relative) for g in guards)


class ExperimentControl:
    def __init__(self, config: Config, *, book: ExperimentBook, prompts: PromptStore, routes: RouteTable,
                 metrics: Metrics, log: JsonLog, wall: Callable[[], float],
                 track: Callable[[list[Target]], None] = lambda targets: None,
                 alert: Callable[[dict[str, Any]], None] | None = None) -> None:
        """`track`: told a route's new targets (the walker's breakers); `alert`: where a rollback's or a pause's
        alert goes (the alert sinks: log, webhook, command)."""
        self.book = book
        self.prompts = prompts
        self.routes = routes
        self._track = track
        self.metrics = metrics
        self.log = log
        self._wall = wall
        self._alert = alert
        self._saved = (0, wall())  # (values recorded, when) at the last save
        self.configure(config)

    def configure(self, config: Config) -> None:
        """Start the config's experiments that are not known yet (kept ones carry on as they were)."""
        self.settings: RolloutConfig = config.rollout
        for spec in config.experiments:
            if spec.name not in self.book.experiments:
                try:
                    self.start(spec, source="config")
                except SidecardError as err:
                    self.log.error("experiment_refused", experiment=spec.name, reason=err.message)

    # ------------------------------------------------------------------ experiments

    def start(self, spec: ExperimentConfig, *, source: str = "operator") -> dict[str, Any]:
        book = self.book
        if spec.name in book.experiments:
            raise SidecardError(Code.BAD_REQUEST, f"an experiment named {spec.name!r} exists: stop and promote it first")
        experiment = experiment_of(spec, self._wall())
        other = book.on_subject(experiment.kind, experiment.subject)
        if other is not None:
            raise SidecardError(Code.BAD_REQUEST, f"experiment {other.name!r} already splits {experiment.subject!r}")
        rollout = book.rollouts.get(experiment.subject)
        if experiment.kind == "prompt_version" and rollout is not None and not rollout.finished:
            raise SidecardError(Code.BAD_REQUEST, f"prompt {experiment.subject!r} is rolling out v{rollout.candidate}: "
                                "let it finish, or abort it, first")
        if experiment.kind == "prompt_version":
            for arm in experiment.arms:
                self.prompts.resolve(experiment.subject, version=int(arm.value))  # prompt_not_found if it is not there
        book.add(experiment)
        self.log.info("experiment_started", experiment=spec.name, subject=experiment.subject, kind=experiment.kind,
                      arms={arm.name: arm.value for arm in experiment.arms}, primary=experiment.primary, source=source)
        return self.view(spec.name)

    def view(self, name: str, *, estimate: bool = True) -> dict[str, Any]:
        experiment, tally = self._experiment(name), self.book.tallies[name]
        report = evaluate(experiment, tally, estimate=estimate)
        metrics = sorted({experiment.primary, *(g.metric for g in experiment.guardrails)})
        return {
            "name": name, "subject": experiment.subject, "kind": experiment.kind, "primary": experiment.primary,
            "state": report.state, "winner": report.winner, "reason": report.reason, "alpha": experiment.alpha,
            "started_at": experiment.started_at, "ended_at": experiment.ended_at,
            "arms": [{"name": arm.name, "value": arm.value, "weight": arm.weight,
                      "samples": {m: tally.get(arm.name, m).n for m in metrics},
                      "means": {m: tally.get(arm.name, m).mean for m in metrics if tally.get(arm.name, m).n}}
                     for arm in experiment.arms],
            "comparisons": _comparisons(report),
        }

    def status(self, name: str | None) -> list[dict[str, Any]]:
        names = [name] if name is not None else sorted(self.book.experiments)
        return [self.view(n) for n in names]

    def stop(self, name: str) -> tuple[dict[str, Any], dict[str, Any]]:
        before = self.view(name, estimate=False)
        self.book.experiments[name] = self._experiment(name).stop(self._wall(), "stopped by an operator")
        self.log.info("experiment_stopped", experiment=name)
        return before, self.view(name, estimate=False)

    def promote(self, name: str, arm: str | None) -> dict[str, Any]:
        """A prompt experiment's winner (or ARM) becomes the prompt's stable version; the experiment ends."""
        experiment = self._experiment(name)
        chosen = arm or experiment.winner
        if chosen is None:
            raise SidecardError(Code.BAD_REQUEST, f"experiment {name!r} has no winner ({experiment.state}): name the arm to promote")
        value = next((a.value for a in experiment.arms if a.name == chosen), None)
        if value is None:
            raise SidecardError(Code.BAD_REQUEST, f"experiment {name!r} has no arm {chosen!r}")
        if experiment.kind != "prompt_version":
            raise SidecardError(Code.BAD_REQUEST, f"experiment {name!r} compares {experiment.kind}s: put {value} in place with "
                                "`sidecardctl route set-primary` or the config, then `experiment stop`")
        with self.prompts.change():
            before, after = self.prompts.use(experiment.subject, int(value))
        self.book.remove(name)
        self.log.info("experiment_promoted", experiment=name, arm=chosen, prompt=experiment.subject, version=int(value))
        return {"prompt": experiment.subject, "before": before.describe(), "after": after.describe()}

    def _experiment(self, name: str) -> Experiment:
        experiment = self.book.experiments.get(name)
        if experiment is None:
            raise SidecardError(Code.BAD_REQUEST, f"no experiment named {name!r}")
        return experiment

    # ------------------------------------------------------------------ rollouts

    def rollout(self, prompt: str, version: int, steps: list[float] | None) -> dict[str, Any]:
        """A progressive rollout of a prompt version, as the prompt's canary."""
        self._not_rolling(prompt)
        experiment = self.book.on_subject("prompt_version", prompt)
        if experiment is not None:
            raise SidecardError(Code.BAD_REQUEST, f"experiment {experiment.name!r} splits {prompt!r}: promote or stop "
                                "and promote it first (its arms decide the version)")
        rollout = self._rollout(prompt, str(self.prompts.effective(prompt).stable), str(version), steps)
        with self.prompts.change():
            self.prompts.set_canary(prompt, version, rollout.steps[0])
        return self._begin(rollout)

    def route_rollout(self, route: str, model: str, steps: list[float] | None) -> dict[str, Any]:
        """A progressive rollout of a new lead model on a route (the book gives the candidate its share)."""
        key = ROUTE + route
        self._not_rolling(key)
        current = self.routes.get(route)
        if current is None:
            raise no_route(route, self.routes.names())
        if current.targets[0].model == model:
            raise SidecardError(Code.BAD_REQUEST, f"{model} already leads route {route!r}")
        return self._begin(self._rollout(key, current.targets[0].model, model, steps))

    def _not_rolling(self, key: str) -> None:
        current = self.book.rollouts.get(key)
        if current is not None and not current.finished:
            raise SidecardError(Code.BAD_REQUEST, f"{key!r} is already rolling out {current.candidate}: abort it first")

    def _rollout(self, subject: str, stable: str, candidate: str, steps: list[float] | None) -> Rollout:
        settings = self.settings
        try:
            return Rollout(subject=subject, stable=stable, candidate=candidate, steps=tuple(steps or settings.steps),
                           guards=_guards(settings.guards), alpha=settings.alpha, min_samples=settings.min_samples,
                           min_hold_s=settings.min_hold_s, max_hold_s=settings.max_hold_s, on_timeout=settings.on_timeout)
        except ValueError as exc:
            raise SidecardError(Code.BAD_REQUEST, str(exc)) from None

    def _begin(self, rollout: Rollout) -> dict[str, Any]:
        self.book.rollouts[rollout.subject] = rollout = rollout.begin(self._wall())
        self._audit(rollout, "start", rollout.percent, rollout.history[-1].reason)
        return rollout_view(rollout)

    def rollout_status(self, prompt: str | None) -> list[dict[str, Any]]:
        rollouts = self.book.rollouts
        return [rollout_view(rollouts[p]) for p in ([prompt] if prompt is not None else sorted(rollouts)) if p in rollouts]

    def rollout_control(self, prompt: str, action: str) -> tuple[dict[str, Any], dict[str, Any]]:
        rollout = self.book.rollouts.get(prompt)
        if rollout is None:
            raise SidecardError(Code.BAD_REQUEST, f"no rollout of prompt {prompt!r}")
        now = self._wall()
        changed = {"pause": rollout.pause, "resume": rollout.resume, "abort": rollout.abort}[action](now)
        if changed is rollout:
            raise SidecardError(Code.BAD_REQUEST, f"the rollout of {prompt!r} is {rollout.state.replace('_', ' ')}: nothing to {action}")
        if action == "abort" and not prompt.startswith(ROUTE):
            with self.prompts.change():
                self.prompts.stop_canary(prompt)
        self.book.rollouts[prompt] = changed
        self._audit(changed, action, changed.percent, changed.history[-1].reason)
        return rollout_view(rollout), rollout_view(changed)

    # ------------------------------------------------------------------ the periodic evaluation

    def evaluate(self) -> bool:
        """Decide experiments and move rollouts; whether operator state should be saved now."""
        now, changed = self._wall(), False
        for name, experiment in list(self.book.experiments.items()):
            if not experiment.running:
                continue
            updated, report = experiment.update(self.book.tallies[name], now)
            self._gauges(updated, report)
            if updated is not experiment:
                self.book.experiments[name] = updated
                changed = True
                self.log.info("experiment_decided", experiment=name, state=updated.state, winner=updated.winner,
                              reason=updated.reason, evidence=_comparisons(report))
        for prompt, rollout in list(self.book.rollouts.items()):
            updated, action = rollout.tick(now)
            self.book.rollouts[prompt] = updated
            self.metrics.rollout_percent(prompt).set(updated.percent)
            if isinstance(action, Hold):
                continue
            changed = True
            self._act(updated, action)
        recorded = self.book.recorded
        if changed or (recorded != self._saved[0] and now - self._saved[1] >= TALLY_SAVE_EVERY_S):
            self._saved = (recorded, now)
            return True
        return False

    def unsaved(self) -> bool:
        """Values tallied since the last save (shutdown keeps them)."""
        if self.book.recorded == self._saved[0]:
            return False
        self._saved = (self.book.recorded, self._wall())
        return True

    def _act(self, rollout: Rollout, action: Promote | Complete | Rollback | Pause) -> None:
        prompt, prompts = rollout.subject, self.prompts
        if prompt.startswith(ROUTE):  # the book serves the share; only completing changes the route
            if isinstance(action, Complete):
                _, after = self.routes.set_primary(prompt.removeprefix(ROUTE), rollout.candidate)
                self._track(after)
        else:
            with prompts.change():
                if isinstance(action, Promote):
                    prompts.set_canary(prompt, int(rollout.candidate), action.percent)
                elif isinstance(action, Complete):
                    prompts.promote(prompt)
                elif isinstance(action, Rollback):
                    prompts.stop_canary(prompt)
        name = type(action).__struct_config__.tag
        self._audit(rollout, name, rollout.percent, action.reason)  # type: ignore[arg-type]
        if isinstance(action, (Rollback, Pause)) and self._alert is not None:
            self._alert({"kind": "rollout", "state": name, "prompt": prompt, "stable": rollout.stable,
                         "candidate": rollout.candidate, "reason": action.reason,
                         "guard": action.guard if isinstance(action, Rollback) else None})

    def _audit(self, rollout: Rollout, action: str, percent: float, reason: str) -> None:
        self.metrics.rollout_actions(rollout.subject, action).inc()
        self.metrics.rollout_percent(rollout.subject).set(rollout.percent)
        self.log.info("rollout_step", prompt=rollout.subject, action=action, stable=rollout.stable,
                      candidate=rollout.candidate, percent=percent, state=rollout.state, reason=reason)

    def _gauges(self, experiment: Experiment, report: Report) -> None:
        metrics, name = self.metrics, experiment.name
        for state in STATES:
            metrics.experiment_state(name, state).set(1 if state == experiment.state else 0)
        for comparison in report.primary:
            if comparison.control == experiment.control:
                verdict = comparison.verdict
                metrics.experiment_samples(name, comparison.treatment).set(verdict.treatment.n)
                metrics.experiment_samples(name, comparison.control).set(verdict.control.n)
                metrics.experiment_effect(name, comparison.treatment).set(verdict.effect)
                metrics.experiment_p_value(name, comparison.treatment).set(verdict.p_value)


def _comparisons(report: Report) -> list[dict[str, Any]]:
    rows = []
    for kind, comparisons in (("primary", report.primary), ("guardrail", report.guardrails)):
        for c in comparisons:
            v = c.verdict
            rows.append({"kind": kind, "control": c.control, "treatment": c.treatment, "metric": c.metric,
                         "margin": c.margin or None, "decision": v.decision.value, "effect": v.effect, "ci_low": v.ci_low,
                         "ci_high": v.ci_high, "p_value": v.p_value, "samples": [v.control.n, v.treatment.n],
                         "samples_needed": v.samples_needed, "note": v.reason or None})
    return rows


def rollout_view(rollout: Rollout) -> dict[str, Any]:
    verdicts = rollout.verdicts(estimate=False) if not rollout.finished else {}
    return {
        "prompt": rollout.subject, "stable": rollout.stable, "candidate": rollout.candidate, "state": rollout.state,
        "percent": rollout.percent, "steps": list(rollout.steps), "step": rollout.step, "reason": rollout.reason,
        "guards": {metric: {"decision": v.decision.value, "effect": v.effect, "ci_low": v.ci_low, "ci_high": v.ci_high,
                            "samples": [v.control.n, v.treatment.n]} for metric, v in verdicts.items()},
        "history": [msgspec.to_builtins(event) for event in rollout.history],
    }
