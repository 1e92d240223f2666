"""The experiment book without a daemon: which requests an experiment takes, sticky assignment, and which values
count for an arm."""

import random

import msgspec

from sidecard.config import ExperimentConfig
from sidecard.control.experiments import experiment_of
from sidecard.experiments.feedback import Feedback, Issued
from sidecard.loop.experiments import ExperimentBook
from sidecard.protocol import Complete

PROMPT = {"name": "tone", "prompt": "echo", "primary": "feedback_score",
          "arms": [{"name": "a", "version": 1}, {"name": "b", "version": 2}]}
MODELS = {"name": "models", "feature": "chat", "arms": [{"name": "s", "model": "sonnet"}, {"name": "h", "model": "haiku"}]}


def book(*specs: dict) -> ExperimentBook:
    kept = ExperimentBook(user_salt=lambda: b"salt", rng=random.Random(1))
    for spec in specs:
        kept.add(experiment_of(msgspec.convert(spec, ExperimentConfig), 0.0))
    return kept


def test_an_experiment_takes_requests_that_name_nothing_it_decides_and_is_sticky_by_user():
    kept = book(PROMPT, MODELS)
    first = kept.assign(Complete(id=1, prompt="echo", user="ann"))
    assert first is not None and first[:1] == ("tone",) and first[2].version in (1, 2)
    assert all(kept.assign(Complete(id=n, prompt="echo", user="ann"))[1] == first[1] for n in range(20))
    arms = {kept.assign(Complete(id=n, prompt="echo", user=f"user{n}"))[1] for n in range(50)}
    assert arms == {"a", "b"}
    assert kept.assign(Complete(id=1, prompt="echo", version=1, user="ann")) is None  # names its version
    assert kept.assign(Complete(id=1, prompt="other", user="ann")) is None
    chat = kept.assign(Complete(id=1, feature="chat", user="ann"))
    assert chat is not None and chat[2].model in ("sonnet", "haiku")
    assert kept.assign(Complete(id=1, feature="chat", model="opus")) is None  # names its model


def test_feedback_and_judged_values_reach_the_arm_that_served_the_answer():
    kept = book(PROMPT, MODELS)
    served = Issued(feature="default", model="m", prompt="echo", version=2, experiment="tone", arm="b")
    kept.on_feedback(Feedback(request_id="r", request=served, kind="thumbs", value=1.0, label=None, comment=None, at=0.0))
    kept.judged("echo", 1, "default", "m", "judge_score", 0.4)  # by version: arm a
    kept.judged(None, None, "chat", "haiku", "pass_rate", 1.0)  # by model: arm h
    assert kept.tallies["tone"].get("b", "feedback_score").n == 1
    assert kept.tallies["tone"].get("a", "judge_score").mean == 0.4
    assert kept.tallies["models"].get("h", "pass_rate").n == 1


def test_an_experiment_and_a_rollout_never_split_the_same_prompt():
    import pytest

    from sidecard.config import Config
    from sidecard.control.experiments import ExperimentControl
    from sidecard.errors import SidecardError
    from sidecard.experiments.rollout import Rollout
    from sidecard.observe.log import JsonLog
    from sidecard.observe.metrics import Metrics
    from prometheus_client import CollectorRegistry

    kept = book()
    control = ExperimentControl(Config(), book=kept, prompts=None, routes=None, metrics=Metrics(CollectorRegistry()),  # type: ignore[arg-type]
                                log=JsonLog(lambda line: None), wall=lambda: 0.0)
    kept.rollouts["echo"] = Rollout(subject="echo", stable="1", candidate="2").begin(0.0)
    with pytest.raises(SidecardError, match="rolling out v2"):
        control.start(msgspec.convert(PROMPT, ExperimentConfig))
    del kept.rollouts["echo"]
    kept.add(experiment_of(msgspec.convert(PROMPT, ExperimentConfig), 0.0))
    with pytest.raises(SidecardError, match="experiment 'tone' splits"):
        control.rollout("echo", 2, None)
