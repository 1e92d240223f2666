from collections.abc import Callable

import msgspec
import numpy as np
import pytest

from sidecard.experiments import rollout as rollouts
from sidecard.experiments import simulate
from sidecard.experiments.metric import DEFAULT_GUARDS, Guard, Tally
from sidecard.experiments.rollout import Complete, Hold, Pause, Promote, Rollback, Rollout
from sidecard.experiments.stats import Decision, Stats

START = 1_700_000_000.0  # wall-clock seconds


class Profile(msgspec.Struct, frozen=True):
    judge: float = 0.80
    errors: float = 0.01
    latency: float = 1.0  # seconds
    cost: float = 0.002  # USD


STABLE = Profile()


def traffic(rng: np.random.Generator, percent: float, requests: int, candidate: Profile) -> Tally:
    """A minute of requests split at the canary share: every guard's values per arm, summed as a fleet would."""
    to_candidate = int(rng.binomial(requests, percent / 100))
    arms = {}
    for role, profile, n in (("stable", STABLE, requests - to_candidate), ("candidate", candidate, to_candidate)):
        values = {
            "judge_score": simulate.judge_scores(profile.judge)(rng, n),
            "error_rate": (rng.random(n) < profile.errors).astype(float),
            "latency": np.round(rng.gamma(25.0, profile.latency / 25, n), 3),
            "cost": np.round(rng.normal(profile.cost, profile.cost / 5, n), 6),
        }
        arms[role] = {name: Stats.from_sums(n, float(v.sum()), float((v * v).sum())) for name, v in values.items()}
    return Tally(arms)


def drive(rollout: Rollout, candidate: Profile | Callable[[float], Profile], *, seed: int = 1, per_minute: int = 2000,
          minutes: int = 2000, until: Callable[[Rollout], bool] = lambda r: r.finished):
    rng = np.random.default_rng(seed)
    now, actions = rollout.step_started_at, []
    while not until(rollout) and len(actions) < minutes:
        now += 60
        profile = candidate(rollout.percent) if callable(candidate) else candidate
        rollout, action = rollout.merge(traffic(rng, rollout.percent, per_minute, profile)).tick(now)
        actions.append(action)
    return rollout, actions


def begin(**fields) -> Rollout:
    return Rollout(subject="prompt:support-reply", stable="v1", candidate="v2", **fields).begin(START)


def moves(actions) -> list:
    return [a for a in actions if not isinstance(a, Hold)]


def test_a_good_version_is_promoted_step_by_step_to_completion():
    done, actions = drive(begin(), STABLE)
    assert (done.state, done.percent) == ("completed", 100.0)
    assert [type(a) for a in moves(actions)] == [Promote, Promote, Promote, Complete]
    assert [a.percent for a in moves(actions)[:3]] == [5.0, 25.0, 50.0]
    assert [(e.action, e.percent) for e in done.history] == [
        ("start", 1.0), ("promote", 5.0), ("promote", 25.0), ("promote", 50.0), ("complete", 100.0)]
    assert done.history[1].reason == "every guard shown not worse at 1%: to 5%"
    # Each step is judged on its own traffic, and a later step's larger share decides it faster.
    promoted_at = [i for i, a in enumerate(actions) if not isinstance(a, Hold)]
    assert promoted_at[0] > promoted_at[1] - promoted_at[0] > promoted_at[2] - promoted_at[1]


def test_a_bad_version_is_rolled_back_at_the_first_step():
    done, actions = drive(begin(), Profile(judge=0.70))
    (rollback,) = moves(actions)
    assert isinstance(rollback, Rollback) and rollback.guard == "judge_score"
    assert (done.state, done.percent, done.steps[done.step]) == ("rolled_back", 0.0, 1.0)
    assert rollback.reason.startswith("judge_score: the candidate is worse than stable by more than 0.03 (effect -0.")
    assert [e.action for e in done.history] == ["start", "rollback"] and done.history[-1].percent == 0.0
    # Rolled back as soon as the evidence was there: one minute earlier it was not.
    assert not drive(begin(), Profile(judge=0.70), minutes=len(actions) - 1)[0].finished


def test_a_regression_that_shows_under_load_is_caught_at_its_step():
    def slower_from_25(percent: float) -> Profile:
        return Profile(latency=1.5 if percent >= 25 else 1.0)

    done, actions = drive(begin(), slower_from_25)
    assert [type(a) for a in moves(actions)] == [Promote, Promote, Rollback]
    assert moves(actions)[-1].guard == "latency" and done.history[-2].percent == 25.0
    assert "latency: the candidate is worse than stable by more than 10%" in done.reason


def test_a_restart_mid_rollout_resumes_it():
    at_25, _ = drive(begin(), STABLE, until=lambda r: r.percent == 25.0)
    saved = rollouts.encode(at_25)
    restarted = rollouts.decode(saved)
    assert restarted == at_25 and restarted.step == 2 and restarted.tally == at_25.tally
    done, actions = drive(restarted, STABLE, seed=2)
    assert done.state == "completed" and [type(a) for a in moves(actions)] == [Promote, Complete]
    assert [e.action for e in done.history] == ["start", "promote", "promote", "promote", "complete"]


def test_pause_holds_the_share_keeps_measuring_and_does_not_count_toward_the_hold():
    running = begin(max_hold_s=3600)
    paused = running.pause(START + 600)
    assert (paused.state, paused.percent, paused.paused_at) == ("paused", 1.0, START + 600)
    assert paused.tick(START + 99_999) == (paused, Hold("rollout is paused"))
    measured = paused.observe("candidate", "judge_score", 0.9)
    assert measured.tally.get("candidate", "judge_score").n == 1
    resumed = measured.resume(START + 4200)
    assert resumed.state == "running" and resumed.step_started_at == START + 3600
    assert [e.action for e in resumed.history] == ["start", "pause", "resume"]
    # Held 600 s before the pause: 3,000 s more, not 0, before the hold runs out.
    assert isinstance(resumed.tick(START + 7199)[1], Hold)
    assert isinstance(resumed.tick(START + 7200)[1], Rollback)
    assert running.resume(START) is running and paused.pause(START) is paused


def test_an_abort_returns_to_stable_for_good():
    aborted = begin().abort(START + 60, "abandoned by an operator")
    assert (aborted.state, aborted.percent, aborted.finished) == ("aborted", 0.0, True)
    assert aborted.history[-1] == rollouts.Event(START + 60, "abort", 0.0, "abandoned by an operator")
    assert aborted.abort(START + 120) is aborted and aborted.observe("stable", "cost", 1.0) is aborted
    assert aborted.tick(START + 120)[1] == Hold("rollout is aborted")


def test_a_step_that_stays_undecided_rolls_back_or_pauses_when_its_hold_runs_out():
    slow = dict(max_hold_s=600)
    done, actions = drive(begin(**slow), STABLE, per_minute=100)
    assert len(actions) == 10 and actions[-1] == Rollback(actions[-1].reason, None)
    assert done.reason.startswith("step 1% undecided after 600 s: judge_score")
    paused, actions = drive(begin(**slow, on_timeout="pause"), STABLE, per_minute=100, until=lambda r: r.state != "running")
    assert isinstance(actions[-1], Pause) and paused.state == "paused"
    # An operator resumes it: the step gets a fresh hold.
    resumed = paused.resume(START + 3600)
    assert resumed.step_started_at == START + 3600
    assert isinstance(resumed.tick(START + 3600 + 599)[1], Hold)


def test_a_minimum_hold_keeps_a_step_even_when_its_guards_are_shown_not_worse():
    held = begin(guards=(Guard("judge_score", 0.05),), min_hold_s=3 * 3600)
    done, actions = drive(held, STABLE, until=lambda r: r.percent > 1)
    decided_at = next(i for i, a in enumerate(actions) if a.reason.startswith("holding"))
    assert actions[decided_at].reason.endswith("s more at 1%")
    assert len(actions) == 180 and isinstance(actions[-1], Promote)
    assert done.verdicts(estimate=False)["judge_score"].decision is Decision.UNDECIDED  # a fresh step


def test_guards_and_held_steps_share_alpha():
    verdicts = begin().verdicts()
    assert list(verdicts) == [guard.metric for guard in DEFAULT_GUARDS]
    assert {v.alpha for v in verdicts.values()} == {0.05 / (4 * 4)}
    assert begin(steps=(10.0, 50.0)).verdicts()["cost"].alpha == 0.05 / (4 * 2)


@pytest.mark.parametrize("fields, message", [
    ({"steps": ()}, "steps"),
    ({"steps": (5.0, 1.0)}, "steps"),
    ({"steps": (0.0, 50.0)}, "steps"),
    ({"steps": (100.0,)}, "below 100"),
    ({"guards": ()}, "guard"),
    ({"guards": (Guard("cost", 0.1), Guard("cost", 0.2))}, "one guard"),
    ({"alpha": 0.0}, "alpha"),
    ({"min_hold_s": 10.0, "max_hold_s": 10.0}, "max_hold_s"),
])
def test_bad_rollouts_are_refused(fields, message):
    with pytest.raises(ValueError, match=message):
        begin(**fields)
