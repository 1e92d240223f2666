"""Names a request chooses, bounded (`engine/names.py`): the feature it is accounted under, the models it names."""

import msgspec
import pytest

from sidecard.config import from_mapping
from sidecard.engine.names import OTHER, FeatureNames, NamedModels, configured_features
from sidecard.errors import SidecardError
from sidecard.observe.log import JsonLog
from sidecard.protocol import Attempt
from sidecard.safety.settings import parse

SAFETY = {
    "guardrails": {"features": {"g": {}}},
    "injection": {"features": {"i": {}}},
    "data": {"features": {"d": {"scrub": ["email"]}}},
    "access": {"enabled": True, "apps": {"app": {"uids": [1], "features": ["exact", "glob-*", "q?"]}}},
    "audit": {"features": ["audited", "*"]},
}


def config(**sections):
    return from_mapping(sections)


def test_every_feature_the_config_names_is_known():
    c = config(
        features={"own": {}}, quality={"features": {"q": {}}}, review={"rates": {"feature:r": 0.5, "prompt-x": 0.1}},
        rate_limits=[{"scope": "feature:rl", "requests_per_minute": 1}, {"scope": "feature", "requests_per_minute": 1}],
        budgets=[{"scope": "feature:b", "hard_usd": 1}, {"scope": "feature:*", "hard_usd": 1}],
        experiments=[{"name": "e", "feature": "ex", "arms": [{"name": "a", "model": "m1"}, {"name": "b", "model": "m2"}]}],
        shadows=[{"name": "s", "feature": "sh", "model": "m3"}],
        fleet={"url": "redis://127.0.0.1:6379/0", "on_failure": {"feature:fl": "closed"}},
    )
    known = configured_features(c, parse(SAFETY))
    assert known == {"default", OTHER, "own", "q", "r", "rl", "b", "ex", "sh", "fl", "g", "i", "d", "exact", "audited"}


def test_features_past_the_limit_are_counted_as_other_and_the_config_frees_slots():
    lines: list[bytes] = []
    names = FeatureNames(log=JsonLog(lines.append), named=lambda feature: feature.startswith("op-"))
    names.configure(config(requests={"max_named_features": 2}, features={"own": {}}), parse({}))
    assert [names.label(f) for f in ("a", "b", "c", "a", "own", "default", "op-1", "d")] == ["a", "b", OTHER, "a", "own", "default", "op-1", OTHER]
    assert names.slots == {"a", "b"}
    assert [msgspec.json.decode(line)["event"] for line in lines] == ["feature_limit_reached"]  # once
    # A reload naming `a` frees its slot for the next new name; nothing admitted is forgotten.
    names.configure(config(requests={"max_named_features": 2}, features={"a": {}}), parse({}))
    assert names.label("c") == "c" and names.label("own") == "own" and names.label("e") == OTHER


def test_models_off_the_routes_hold_slots_until_the_upstream_says_it_does_not_know_them():
    routes = {"claude-on-route"}.__contains__
    models = NamedModels()
    for model in ("claude-a", "claude-b", "claude-on-route"):
        models.admit(model, routes, limit=2)
    with pytest.raises(SidecardError, match="requests.max_named_models"):
        models.admit("claude-c", routes, limit=2)
    assert not models.ended("claude-on-route", [Attempt("anthropic", "claude-on-route", "404", 1.0)], routes)
    assert not models.ended("claude-a", [Attempt("anthropic", "claude-a", "ok", 1.0)], routes)
    assert models.ended("claude-b", [Attempt("anthropic", "claude-b", "404", 1.0), Attempt("anthropic", "claude-x", "ok", 1.0)], routes)
    assert models.ended("claude-b", [], routes)  # a request that was on its way: what it made goes too
    models.admit("claude-c", routes, limit=2)
    # A reload: claude-a answered and keeps its slot; claude-c never answered and gives its slot back.
    assert models.reconfigure(routes) == ["claude-c"]
    assert models.off_route == {"claude-a"} and "claude-c" not in models.seen
    # A model a route now has holds no slot.
    assert models.reconfigure({"claude-a", "claude-on-route"}.__contains__) == []
    assert models.off_route == set() and "claude-a" in models.seen


def test_a_model_answered_by_one_target_keeps_its_slot_whatever_another_said():
    """Review: a 404 from one provider released a model another provider's target answered in the same request,
    and a model whose streams broke after their first token (`stream_broken:*`) was never counted as answered; a
    request that never called the model (a cache miss, a refusal) held its slot until a reload."""
    routes = set().__contains__
    models = NamedModels()
    for model in ("claude-a", "claude-b", "claude-c", "claude-d"):
        models.admit(model, routes, limit=4)
    assert not models.ended("claude-a", [Attempt("bedrock", "claude-a", "404", 1.0), Attempt("anthropic", "claude-a", "ok", 1.0)], routes)
    assert not models.ended("claude-b", [Attempt("anthropic", "claude-b", "stream_broken:reset", 1.0)], routes)
    assert models.answered == {"claude-a", "claude-b"}
    assert not models.ended("claude-c", [Attempt("anthropic", "claude-c", "500", 1.0)], routes)  # called: it may exist
    assert models.ended("claude-d", [Attempt("anthropic", "claude-d", "breaker_open", 0.0)], routes)  # never called
    assert not models.ended("claude-a", [], routes)  # answered before: a request that did not call it changes nothing
    assert models.off_route == {"claude-a", "claude-b", "claude-c"}
