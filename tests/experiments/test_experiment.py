import random

import msgspec
import numpy as np
import pytest

from sidecard.experiments import simulate
from sidecard.experiments.experiment import Arm, Experiment, Report, evaluate
from sidecard.experiments.metric import Guard, Tally
from sidecard.experiments.stats import Decision, Stats


def experiment(*arms: str, **fields) -> Experiment:
    return Experiment(name="tone", subject="support-reply", kind="prompt_version",
                      arms=tuple(Arm(name, f"v{i + 1}") for i, name in enumerate(arms)), primary="judge_score", **fields)


def run(exp: Experiment, quality: dict[str, float], *, seed: int = 1, requests: int = 20_000,
        latency: dict[str, float] | None = None) -> tuple[Experiment, Report, int]:
    """Requests from 2,000 users, each assigned by the experiment and scored from its arm's quality, looked at
    after every request until the experiment stops."""
    rng, draws = random.Random(seed), np.random.default_rng(seed)
    scores = {arm: iter(simulate.judge_scores(mean)(draws, requests).tolist()) for arm, mean in quality.items()}
    tally, now = Tally(), 1000.0
    report = evaluate(exp, tally)
    for served in range(1, requests + 1):
        arm = exp.assign(f"user-{rng.randrange(2000)}", rng)
        tally = tally.record(arm, "judge_score", next(scores[arm]))
        if latency is not None:
            tally = tally.record(arm, "latency", max(0.0, rng.gauss(latency[arm], 0.2)))
        exp, report = exp.update(tally, now + served)
        if not exp.running:
            return exp, report, served
    return exp, report, requests


def test_a_good_version_beats_a_bad_one_and_then_serves_everyone():
    exp, report, served = run(experiment("control", "candidate"), {"control": 0.75, "candidate": 0.80})
    assert (exp.state, exp.winner) == ("decided", "candidate")
    assert exp.reason == "candidate is better than control on judge_score"
    assert exp.ended_at == 1000.0 + served and served < 5000
    (comparison,) = report.primary
    assert comparison.verdict.decision is Decision.BETTER and comparison.verdict.ci_low > 0
    assert {exp.assign(f"user-{i}", random.Random(i)) for i in range(50)} == {"candidate"}


def test_a_worse_candidate_makes_the_control_the_winner():
    exp, _, _ = run(experiment("control", "candidate"), {"control": 0.80, "candidate": 0.75}, seed=2)
    assert (exp.state, exp.winner) == ("decided", "control")


def test_equal_arms_end_inconclusive_at_max_samples():
    exp, report, served = run(experiment("a", "b", max_samples=1500), {"a": 0.8, "b": 0.8}, seed=3)
    assert (exp.state, exp.winner) == ("inconclusive", None)
    assert exp.reason == "no verdict after 1500 samples per arm"
    assert report.primary[0].verdict.decision is Decision.UNDECIDED
    assert {exp.assign(f"user-{i}", random.Random(i)) for i in range(50)} == {"a"}


def test_equal_arms_within_the_equivalence_margin_are_decided_with_no_winner():
    exp, _, _ = run(experiment("a", "b", equivalence=0.04), {"a": 0.8, "b": 0.8}, seed=4)
    assert (exp.state, exp.winner) == ("decided", None)
    assert exp.reason == "no single best arm on judge_score: a, b are equal within 0.04"


def test_with_three_arms_the_winner_must_beat_both_others():
    exp, report, _ = run(experiment("a", "b", "c"), {"a": 0.70, "b": 0.80, "c": 0.72}, seed=5)
    assert (exp.state, exp.winner) == ("decided", "b")
    assert [(c.control, c.treatment) for c in report.primary] == [("a", "b"), ("a", "c"), ("b", "c")]
    # Three pairs share alpha.
    assert [c.verdict.alpha for c in report.primary] == [pytest.approx(0.05 / 3)] * 3


def test_a_guardrail_shown_worse_stops_the_experiment_as_failed():
    guarded = experiment("control", "candidate", guardrails=(Guard("latency", 0.10, relative=True),))
    exp, report, _ = run(guarded, {"control": 0.75, "candidate": 0.80}, latency={"control": 1.0, "candidate": 1.5}, seed=6)
    assert (exp.state, exp.winner) == ("failed", None)
    assert exp.reason == "guardrail latency: candidate is worse than control by more than 10%"
    (guard,) = report.guardrails
    assert guard.verdict.decision is Decision.WORSE and guard.margin == "10%"


def test_a_leader_wins_only_once_its_guardrails_are_shown_not_worse():
    guarded = experiment("control", "candidate", guardrails=(Guard("latency", 0.10, relative=True),), max_samples=3000)
    ahead = Tally({"control": {"judge_score": Stats(2000, 0.75, 0.04 * 1999), "latency": Stats(100, 1.0, 0.09 * 99)},
                   "candidate": {"judge_score": Stats(2000, 0.80, 0.04 * 1999), "latency": Stats(100, 1.0, 0.09 * 99)}})
    report = evaluate(guarded, ahead)
    assert (report.state, report.winner) == ("running", None)
    assert report.reason == "candidate leads on judge_score; guardrails not yet shown not worse: latency"
    shown = Tally({"control": {"latency": Stats(3000, 1.0, 0.09 * 2999)},
                   "candidate": {"latency": Stats(3000, 1.0, 0.09 * 2999)}})
    exp, report = guarded.update(ahead.merge(shown), 10.0)
    assert (exp.state, exp.winner) == ("decided", "candidate")
    assert report.guardrails[0].verdict.decision is Decision.NOT_WORSE
    late = Tally({arm: {"judge_score": Stats(3000, mean, 0.04 * 2999), "latency": Stats(100, 1.0, 0.09 * 99)}
                  for arm, mean in (("control", 0.75), ("candidate", 0.80))})
    assert evaluate(guarded, late).reason == ("no verdict after 3000 samples per arm (candidate leads on judge_score; "
                                              "guardrails not yet shown not worse: latency)")


def test_an_operator_stop_ends_it_with_the_control_serving():
    exp = experiment("a", "b").stop(50.0, "stopped by an operator")
    assert (exp.state, exp.ended_at, exp.reason) == ("stopped", 50.0, "stopped by an operator")
    assert exp.stop(60.0, "again") is exp
    assert exp.assign("user-1", random.Random(0)) == "a"
    tally = Tally().record("a", "judge_score", 0.9)
    assert exp.update(tally, 70.0)[0] is exp and evaluate(exp, tally).state == "stopped"


def test_an_experiment_and_its_tally_survive_encoding():
    exp = experiment("a", "b", guardrails=(Guard("cost", 0.1, relative=True),))
    tally = Tally().record("a", "judge_score", 0.9).record("b", "cost", 0.002)
    assert msgspec.json.decode(msgspec.json.encode(exp), type=Experiment) == exp
    assert msgspec.json.decode(msgspec.json.encode(tally), type=Tally) == tally
    assert tally.get("b", "cost") == Stats(1, 0.002, 0.0) and tally.get("b", "judge_score") == Stats()


def test_tallies_merge_across_instances():
    one = Tally().record("a", "judge_score", 0.9).record("b", "judge_score", 0.5)
    two = Tally().record("a", "judge_score", 0.7).record("a", "latency", 1.0)
    merged = one.merge(two)
    a = merged.get("a", "judge_score")
    assert (a.n, a.mean, a.m2) == (2, pytest.approx(0.8), pytest.approx(0.02))
    assert merged.get("a", "latency").n == 1 and merged.get("b", "judge_score").n == 1


@pytest.mark.parametrize("fields, message", [
    ({"arms": (Arm("a", "v1"),)}, "two or more arms"),
    ({"arms": (Arm("a", "v1"), Arm("a", "v2"))}, "distinct names"),
    ({"arms": (Arm("a", "v1", 0), Arm("b", "v2", 0))}, "weights"),
    ({"primary": "happiness"}, "unknown metric"),
    ({"alpha": 1.5}, "alpha"),
    ({"guardrails": (Guard("latency", 0.1), Guard("latency", 0.2))}, "one guard"),
    ({"guardrails": (Guard("latency", 0.1),), "winner": "z"}, "not an arm"),
])
def test_bad_experiments_are_refused(fields, message):
    base = {"name": "x", "subject": "p", "kind": "model", "arms": (Arm("a", "m1"), Arm("b", "m2")),
            "primary": "judge_score"}
    with pytest.raises(ValueError, match=message):
        Experiment(**{**base, **fields})
    with pytest.raises(ValueError, match="margin"):
        Guard("latency", -1.0)


def test_an_experiment_reads_from_a_release_table():
    declared = b"""
name = "tone"
subject = "support-reply"
kind = "prompt_version"
primary = "feedback_score"
equivalence = 0.02
guardrails = [{ metric = "latency", margin = 0.1, relative = true }, { metric = "judge_score", margin = 0.03 }]
arms = [{ name = "stable", value = "3", weight = 9 }, { name = "warmer", value = "4" }]
"""
    exp = msgspec.toml.decode(declared, type=Experiment)
    assert exp.control == "stable" and exp.arms[1] == Arm("warmer", "4", 1.0)
    assert exp.guardrails[0] == Guard("latency", 0.1, relative=True) and exp.state == "running"
    with pytest.raises(msgspec.ValidationError, match="unknown field"):
        msgspec.toml.decode(declared + b'colour = "blue"\n', type=Experiment)
    with pytest.raises(msgspec.ValidationError, match="unknown metric"):
        msgspec.toml.decode(declared.replace(b"feedback_score", b"happiness"), type=Experiment)
