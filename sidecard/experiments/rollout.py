"""Progressive rollout: a canary ramped through steps, promoted while its guards hold, rolled back when one breaks.

The subject (a prompt, a model or a route change) is opaque here: a rollout moves a `candidate` against the
`stable` one through canary shares (default 1, 5, 25, 50 then 100 %), and the caller serves that share.

At each step, each guard metric is compared, candidate against stable, with the non-inferiority form of the
always-valid sequential test (`stats.non_inferior`) on the values seen at this step: a step is judged on its
own traffic, so a regression that only shows under more load is caught at the step where it appears (and as
later steps carry more traffic, they decide faster). On `tick(now)`:

- any guard **shown worse** than stable by more than its margin: roll back at once;
- every guard **shown not worse** (each with at least `min_samples` values per arm at this step), and the step
  has held `min_hold_s`: promote to the next step (from the last step: complete at 100 %);
- the step has held `max_hold_s` without either: roll back (or with `on_timeout="pause"`, pause for an operator);
- otherwise hold.

`alpha` is shared by the guards and the held steps (Bonferroni), so over the whole rollout: the chance that a
candidate within every margin is rolled back by a guard, or that one worse than a margin on some guard is
completed, is at most `alpha`.

A rollout is plain data (a msgspec Struct, its tally inside): the caller persists it after every transition,
and a restarted daemon decodes it and carries on. `now` is wall-clock seconds, so holds survive a restart;
time spent paused does not count toward a hold. Every transition appends an `Event` to `history`, which is
the audit trail.
"""

from __future__ import annotations

from typing import Final, Literal

import msgspec

from .metric import DEFAULT_GUARDS, Guard, Tally, check_guards, non_inferior
from .stats import DEFAULT_ALPHA, DEFAULT_MIN_SAMPLES, DEFAULT_TAU, Decision, Verdict

State = Literal["running", "paused", "completed", "rolled_back", "aborted"]
Role = Literal["stable", "candidate"]
DEFAULT_STEPS: Final = (1.0, 5.0, 25.0, 50.0, 100.0)


class Event(msgspec.Struct, frozen=True):
    at: float
    action: Literal["start", "promote", "complete", "rollback", "pause", "resume", "abort"]
    percent: float  # the candidate's share after it
    reason: str


# ---------------------------------------------------------------- what `tick` asks the caller to do


class Hold(msgspec.Struct, frozen=True, tag="hold"):
    reason: str


class Promote(msgspec.Struct, frozen=True, tag="promote"):
    percent: float  # the new canary share
    reason: str


class Complete(msgspec.Struct, frozen=True, tag="complete"):
    """The candidate is the new stable (100 %)."""

    reason: str


class Rollback(msgspec.Struct, frozen=True, tag="rollback"):
    """Back to stable (0 %); fire the alert webhook."""

    reason: str
    guard: str | None  # the guard shown worse; None: the hold ran out


class Pause(msgspec.Struct, frozen=True, tag="pause"):
    """The hold ran out with `on_timeout="pause"`: the share stays, an operator decides; alert them."""

    reason: str


Action = Hold | Promote | Complete | Rollback | Pause


class Rollout(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    subject: str  # opaque: "prompt:support-reply", "route:chat", ...
    stable: str  # opaque: the version, model or route serving now
    candidate: str
    steps: tuple[float, ...] = DEFAULT_STEPS  # canary shares in %, increasing; reaching 100 completes
    guards: tuple[Guard, ...] = DEFAULT_GUARDS
    alpha: float = DEFAULT_ALPHA
    tau: float = DEFAULT_TAU
    min_samples: int = DEFAULT_MIN_SAMPLES  # values per arm and guard at a step, before it is judged
    min_hold_s: float = 0.0
    max_hold_s: float = 6 * 3600.0
    on_timeout: Literal["rollback", "pause"] = "rollback"
    state: State = "running"
    step: int = 0  # index into steps
    step_started_at: float = 0.0
    paused_at: float | None = None
    tally: Tally = Tally()  # this step's values, arms "stable" and "candidate"
    history: tuple[Event, ...] = ()
    reason: str = ""

    def __post_init__(self) -> None:
        steps = self.steps
        if not steps or any(not 0 < s <= 100 for s in steps) or any(a >= b for a, b in zip(steps, steps[1:])):
            raise ValueError("steps must be increasing shares above 0 and at most 100")
        if steps[0] >= 100:
            raise ValueError("the first step must be below 100%")
        if not self.guards:
            raise ValueError("a rollout needs at least one guard")
        check_guards(self.guards)
        if not 0 < self.alpha < 1:
            raise ValueError("alpha must be between 0 and 1")
        if self.min_hold_s < 0 or self.max_hold_s <= self.min_hold_s:
            raise ValueError("max_hold_s must be above min_hold_s, which must not be negative")

    # -- reading

    @property
    def percent(self) -> float:
        """The share of traffic the candidate gets now."""
        if self.state == "completed":
            return 100.0
        if self.state in ("rolled_back", "aborted"):
            return 0.0
        return self.steps[self.step]

    @property
    def finished(self) -> bool:
        return self.state in ("completed", "rolled_back", "aborted")

    @property
    def held_steps(self) -> int:
        """The steps held and judged (a step of 100 % is the completion, not a hold)."""
        return sum(step < 100 for step in self.steps)

    def verdicts(self, *, estimate: bool = True) -> dict[str, Verdict]:
        """Each guard's verdict at this step, candidate against stable."""
        alpha = self.alpha / (len(self.guards) * self.held_steps)
        return {
            guard.metric: non_inferior(guard, self.tally.get("stable", guard.metric),
                                       self.tally.get("candidate", guard.metric), alpha=alpha, tau=self.tau,
                                       min_samples=self.min_samples, estimate=estimate)
            for guard in self.guards
        }

    # -- transitions

    def begin(self, now: float) -> Rollout:
        """The rollout started now, at its first step."""
        return msgspec.structs.replace(self, state="running", step=0, step_started_at=now, tally=Tally(),
                                       history=(Event(now, "start", self.steps[0], f"{self.candidate} against {self.stable}"),))

    def observe(self, role: Role, metric: str, value: float) -> Rollout:
        """One value of one metric from a request the stable or the candidate served (any state: a paused
        rollout keeps measuring)."""
        if self.finished:
            return self
        return msgspec.structs.replace(self, tally=self.tally.record(role, metric, value))

    def merge(self, tally: Tally) -> Rollout:
        """Many values at once: a batch, or (fleet mode) the other instances' since the last merge."""
        if self.finished:
            return self
        return msgspec.structs.replace(self, tally=self.tally.merge(tally))

    def tick(self, now: float) -> tuple[Rollout, Action]:
        if self.state != "running":
            return self, Hold(f"rollout is {self.state.replace('_', ' ')}")
        verdicts = self.verdicts(estimate=False)
        for guard in self.guards:
            verdict = verdicts[guard.metric]
            if verdict.decision is Decision.WORSE:
                reason = (f"{guard.metric}: the candidate is worse than stable by more than {guard.margin_text()} "
                          f"(effect {verdict.effect:+.4g}, confidence {verdict.ci_low:+.4g} to {verdict.ci_high:+.4g})")
                return self._end("rolled_back", "rollback", now, reason), Rollback(reason, guard.metric)
        held = now - self.step_started_at
        waiting = [guard.metric for guard in self.guards if verdicts[guard.metric].decision is not Decision.NOT_WORSE]
        if not waiting and held >= self.min_hold_s:
            return self._promote(now)
        if held >= self.max_hold_s:
            reason = f"step {self.percent:g}% undecided after {self.max_hold_s:g} s: {', '.join(waiting)}"
            if self.on_timeout == "pause":  # resuming gives the step a fresh hold
                return msgspec.structs.replace(self, step_started_at=now)._pause(now, reason), Pause(reason)
            return self._end("rolled_back", "rollback", now, reason), Rollback(reason, None)
        if waiting:
            return self, Hold(f"not yet shown not worse at {self.percent:g}%: {', '.join(waiting)}")
        return self, Hold(f"holding {self.min_hold_s - held:.0f} s more at {self.percent:g}%")

    def pause(self, now: float, reason: str = "paused by an operator") -> Rollout:
        if self.state != "running":
            return self
        return self._pause(now, reason)

    def resume(self, now: float, reason: str = "resumed by an operator") -> Rollout:
        """Running again; the time spent paused does not count toward the step's hold."""
        if self.state != "paused":
            return self
        paused_for = now - (self.paused_at if self.paused_at is not None else now)
        return msgspec.structs.replace(self, state="running", paused_at=None,
                                       step_started_at=self.step_started_at + paused_for,
                                       history=(*self.history, Event(now, "resume", self.percent, reason)), reason="")

    def abort(self, now: float, reason: str = "aborted by an operator") -> Rollout:
        """Back to stable for good (an operator's rollback: no alert)."""
        if self.finished:
            return self
        return self._end("aborted", "abort", now, reason)

    # -- internals

    def _promote(self, now: float) -> tuple[Rollout, Action]:
        was = self.percent
        if self.step + 1 >= len(self.steps) or self.steps[self.step + 1] >= 100:
            reason = f"every guard shown not worse at {was:g}%"
            return self._end("completed", "complete", now, reason), Complete(reason)
        to = self.steps[self.step + 1]
        reason = f"every guard shown not worse at {was:g}%: to {to:g}%"
        promoted = msgspec.structs.replace(
            self, step=self.step + 1, step_started_at=now, tally=Tally(),
            history=(*self.history, Event(now, "promote", to, reason)),
        )
        return promoted, Promote(to, reason)

    def _pause(self, now: float, reason: str) -> Rollout:
        return msgspec.structs.replace(self, state="paused", paused_at=now, reason=reason,
                                       history=(*self.history, Event(now, "pause", self.percent, reason)))

    def _end(self, state: State, action: Literal["complete", "rollback", "abort"], now: float, reason: str) -> Rollout:
        ended = msgspec.structs.replace(self, state=state, reason=reason, paused_at=None)
        return msgspec.structs.replace(ended, history=(*self.history, Event(now, action, ended.percent, reason)))


_decoder = msgspec.json.Decoder(Rollout)


def encode(rollout: Rollout) -> bytes:
    return msgspec.json.encode(rollout)


def decode(data: bytes) -> Rollout:
    return _decoder.decode(data)
