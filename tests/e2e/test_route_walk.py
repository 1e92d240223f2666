"""The route walk's answers through the real daemon: deadlines that pass early, the error that ends a walk, a target
that cannot be called, first-token timeouts and named models."""

import msgspec
import pytest
import trio

from sidecard.sim import Fault
from tests.harness import admin, connect, metric, stream_frame

PRIMARY, FALLBACK = "claude-sonnet-4-6", "claude-haiku-4-5-20251001"
ASK = [{"role": "user", "content": "Hello"}]


async def test_pipelined_requests_whose_deadline_passes_before_any_attempt_are_deadline_exceeded(daemon_factory, sim):
    """Real time on purpose: with 60 frames in one write, most requests are first scheduled after their 1-5 ms have
    passed, which is what a mock clock never lets happen. Before the fix they computed a negative attempt timeout and
    answered `internal`."""
    d = await daemon_factory()
    sim.set_fault("*", Fault(hang=True))  # whatever reaches the upstream gets no answer before its deadline
    client = await connect(d)
    frames = [{"op": "complete", "id": i, "messages": ASK, "deadline_ms": 1 + i % 5, "cache": "bypass"} for i in range(60)]
    await client.send_raw(b"".join(msgspec.json.encode(f) + b"\n" for f in frames))
    replies = [await client.reply(i) for i in range(60)]
    assert {r["error"]["code"] for r in replies} == {"deadline_exceeded"}
    assert all(r["error"]["retryable"] for r in replies)
    # Deadlines the clients chose are not the targets' failures: no breaker opened.
    assert {t["breaker"] for t in d.status()["routes"]["default"]["targets"]} == {"closed"}


async def test_a_deadline_shorter_than_one_call_on_an_idle_daemon_is_deadline_exceeded(daemon_factory, sim, autojump_clock):
    """Nothing is queued, so this is no overload: before the fix the queue's free-slot refusal (the time left is
    shorter than the target's usual call) answered `overloaded` (retryable after 1 ms, which could never help)."""
    d = await daemon_factory(routes={"default": {"targets": [{"model": PRIMARY}]}})
    sim.set_fault("*", Fault(latency_ms=100))
    client = await connect(d)
    assert (await client.complete("learn the call time", cache="bypass"))["ok"]
    reply = await client.call({"op": "complete", "messages": ASK, "deadline_ms": 50, "cache": "bypass"})
    assert reply["error"]["code"] == "deadline_exceeded" and reply["error"]["retryable"], reply
    assert "shorter than one call" in reply["error"]["message"]
    assert metric(d, "sidecard_refusals_total", reason="deadline_too_short") == 1


BEDROCK = {"provider": "bedrock", "model": "anthropic.claude-sonnet-4-6-v1:0", "region": "us-east-1"}


async def test_a_target_that_cannot_be_called_is_that_targets_failure_and_the_walk_goes_on(daemon_factory, sim, capture_log, autojump_clock):
    """The Bedrock SDK refuses to build a call for model "." and cannot count tokens at all: before the fix either
    ended every request with `internal` and the fallback was never tried."""
    d = await daemon_factory(routes={"default": {"targets": [BEDROCK, {"model": FALLBACK}]}})
    client = await connect(d)
    reply = await client.complete("via a broken lead", model=".", cache="bypass")  # "." leads; the route stays behind it
    assert reply["ok"] and reply["served_by"]["model"] == BEDROCK["model"] and reply["fallback"], reply
    counted = await client.call({"op": "count_tokens", "messages": ASK})
    assert counted["ok"] and counted["model"] == FALLBACK, counted
    unusable = capture_log.events("target_unusable")
    assert [e["exception"] for e in unusable] == ["ValueError", "AnthropicError"]
    assert unusable[0]["request_id"] == reply["request_id"] and "model" in unusable[0]["message"]
    attempts = capture_log.events("request")[0]["attempts"]
    assert [(a["model"], a["outcome"]) for a in attempts] == [(".", "unusable"), (BEDROCK["model"], "ok")]


async def test_count_tokens_writes_a_request_line_and_no_library_noise(daemon, sim, capture_log, autojump_clock):
    counted = await (await connect(daemon)).call({"op": "count_tokens", "messages": ASK, "feature": "sizing"})
    assert counted["ok"]
    line = capture_log.events("request")[-1]
    assert line["op"] == "count_tokens" and line["outcome"] == "ok" and line["feature"] == "sizing"
    assert line["model"] == PRIMARY and line["input_tokens"] == counted["input_tokens"] and line["request_id"]
    assert capture_log.events("library_log") == []


async def test_an_internal_error_logs_its_message_and_request_id(daemon, sim, capture_log, monkeypatch, autojump_clock):
    def bug(request, started, **options):
        raise KeyError("the planner's own bug")

    monkeypatch.setattr(daemon.engine.planner, "plan", bug)  # a bug in sidecard: nothing a client sends reaches this today
    reply = await (await connect(daemon)).complete("anything")
    assert reply["error"]["code"] == "internal" and not reply["error"]["retryable"]
    logged = capture_log.events("internal_error")[-1]
    assert logged["exception"] == "KeyError" and "the planner's own bug" in logged["message"]
    assert logged["request_id"] in reply["error"]["message"]
    assert capture_log.events("request")[-1]["outcome"] == "internal"


async def test_a_bedrock_target_without_a_region_is_refused_by_the_override_and_the_config(daemon, sim):
    from sidecard.config import ConfigError, from_mapping
    from tests.harness import admin

    no_region = {"provider": "bedrock", "model": BEDROCK["model"]}
    refused = await admin(daemon, {"op": "route.override", "route": "default", "targets": [no_region, {"model": FALLBACK}]})
    assert refused["error"]["code"] == "bad_request" and "needs region" in refused["error"]["message"]
    assert daemon.control.state.routes.get("default").targets[0].model == PRIMARY  # nothing changed
    moved = await admin(daemon, {"op": "route.override", "route": "default", "targets": [{**no_region, "region": "eu-west-1"}]})
    assert moved["ok"] and daemon.control.state.routes.get("default").targets[0].region == "eu-west-1"
    with pytest.raises(ConfigError, match=r"routes\.clouds.*needs region"):
        from_mapping({"routes": {"clouds": {"targets": [no_region]}, "default": {"targets": [{"model": PRIMARY}]}}})
    with pytest.raises(ConfigError, match="needs project_id"):
        from_mapping({"routes": {"default": {"targets": [{"provider": "vertex", "model": "claude-sonnet-4-6@20250929"}]}}})


async def test_a_first_token_timeout_moves_to_the_next_target_at_once(daemon_factory, sim, autojump_clock):
    """Before the fix the slow primary was tried max_attempts times: the stream started after about 3 x ttft_timeout_s."""
    slow = {"model": PRIMARY, "ttft_timeout_s": 2.0, "max_attempts": 3}
    d = await daemon_factory(routes={"default": {"targets": [slow, {"model": FALLBACK}]}})
    sim.set_fault(PRIMARY, Fault(latency_ms=30_000))
    client = await connect(d)
    started = trio.current_time()
    events, done = await stream_frame(client, {"op": "complete", "messages": ASK, "cache": "bypass"})
    assert done["ok"] and done["served_by"]["model"] == FALLBACK
    assert done["ttft_ms"] == pytest.approx(2000, abs=50) and trio.current_time() - started < 2.5
    assert sim.calls_for(PRIMARY) == 1

    patient = await daemon_factory(routes={"default": {"targets": [{**slow, "ttft_retry": True}, {"model": FALLBACK}]}})
    sim.reset()
    sim.set_fault(PRIMARY, Fault(latency_ms=30_000))
    events, done = await stream_frame(await connect(patient), {"op": "complete", "messages": ASK, "cache": "bypass"})
    assert done["ok"] and done["served_by"]["model"] == FALLBACK and sim.calls_for(PRIMARY) == 3


async def test_on_the_socket_a_streams_deadline_is_for_its_first_token(daemon_factory, sim, autojump_clock):
    d = await daemon_factory(routes={"default": {"targets": [{"model": PRIMARY}]}})
    sim.set_fault("*", Fault(event_interval_ms=1000))
    ask = [{"role": "user", "content": "[[sim:say:" + " ".join(f"w{i}" for i in range(30)) + "]]"}]
    events, done = await stream_frame(await connect(d), {"op": "complete", "messages": ask, "deadline_ms": 5000})
    assert done["ok"], done
    assert done["text"].split() == [f"w{i}" for i in range(30)] and done["latency_ms"] > 10_000


async def test_a_stream_event_that_does_not_parse_is_a_malformed_attempt(daemon_factory, sim, capture_log, autojump_clock):
    """Before the fix the decoder's exception escaped the walk: the request ended `internal`."""
    d = await daemon_factory(routes={"default": {"targets": [{"model": PRIMARY, "max_attempts": 1}, {"model": FALLBACK}]}})
    sim.set_fault(PRIMARY, Fault(malformed=True))
    events, done = await stream_frame(await connect(d), {"op": "complete", "messages": ASK})
    assert done["ok"] and done["served_by"]["model"] == FALLBACK
    attempts = capture_log.events("request")[-1]["attempts"]
    assert [(a["model"], a["outcome"]) for a in attempts] == [(PRIMARY, "malformed"), (FALLBACK, "ok")]


async def test_models_named_outside_the_routes_are_bounded(daemon_factory):
    """Each model a request names gets breakers, queues and metric series of its own: a client naming a new one
    on every request once grew them without end (300 models: 300 rows in `sidecardctl limits`, 15,000 series)."""
    d = await daemon_factory(requests={"max_named_models": 2})
    client = await connect(d)
    for model in ("claude-a-1", "claude-b-1", "claude-a-1"):
        assert (await client.complete("x", model=model, cache="bypass"))["ok"]
    refused = (await client.complete("x", model="claude-c-1"))["error"]
    assert refused["code"] == "bad_request" and "requests.max_named_models" in refused["message"]
    assert (await client.complete("x", model="claude-haiku-4-5-20251001", cache="bypass"))["ok"]  # on a route: always
    assert "claude-c-1" not in str((await admin(d, {"op": "limits"}))["result"])


async def test_count_tokens_ends_a_failed_walk_with_the_code_complete_gives(daemon, sim, autojump_clock):
    """Every target answering 529 was `upstream_unavailable` for complete but `overloaded` (the last target's own
    status) for count_tokens: one outage, two codes for the app to handle."""
    sim.set_fault("*", Fault(status=529))
    client = await connect(daemon)
    completed = await client.call({"op": "complete", "messages": ASK, "cache": "bypass"})
    counted = await client.call({"op": "count_tokens", "messages": ASK})
    assert completed["error"]["code"] == counted["error"]["code"] == "upstream_unavailable", (completed, counted)
    assert counted["error"]["retryable"]
