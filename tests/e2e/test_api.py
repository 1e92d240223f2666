"""The whole Messages API through the daemon: pass-through, tools, thinking, streams, count_tokens."""

import base64

import trio

from sidecard.sim import Fault
from tests.harness import AppClient, connect, stream_frame

PRIMARY, FALLBACK = "claude-sonnet-4-6", "claude-haiku-4-5-20251001"
WEATHER_TOOL = {
    "name": "get_weather",
    "description": "Current weather for a city",
    "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}


def routes(resume=False, **primary):
    return {
        "default": {
            "resume": resume,
            "targets": [{"model": PRIMARY, "timeout_s": 10, **primary}, {"model": FALLBACK, "timeout_s": 10}],
        }
    }


async def stream(client: AppClient, text: str, **fields) -> tuple[list[dict], dict]:
    """Send a streaming request; returns (event frames, the final frame: done or error)."""
    return await stream_frame(client, {"op": "complete", "messages": [{"role": "user", "content": text}], **fields})


def joined(events: list[dict]) -> str:
    return "".join(e.get("text", "") for e in events if e.get("event") == "delta" and e.get("type") == "text")


async def test_unknown_and_new_fields_reach_the_upstream(daemon, sim):
    reply = await (await connect(daemon)).complete(
        "hi", top_k=5, service_tier="auto", some_future_field={"nested": [1, 2]}, cache="bypass"
    )
    assert reply["ok"]
    body = sim.calls[-1].body
    assert body["top_k"] == 5 and body["service_tier"] == "auto" and body["some_future_field"] == {"nested": [1, 2]}
    assert "feature" not in body and "deadline_ms" not in body  # sidecard's own fields stay home


async def test_image_block_passes_through(daemon, sim):
    png = base64.b64encode(b"\x89PNG\r\n\x1a\n" + b"\x00" * 64).decode()
    content = [
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": png}},
        {"type": "image", "source": {"type": "url", "url": "https://example.com/cat.png"}},
        {"type": "text", "text": "What is in these pictures?", "cache_control": {"type": "ephemeral"}},
    ]
    reply = await (await connect(daemon)).call({"op": "complete", "messages": [{"role": "user", "content": content}]})
    assert reply["ok"]
    assert sim.calls[-1].body["messages"][0]["content"] == content


async def test_tool_use_round_trip(daemon, sim):
    client = await connect(daemon)
    ask = [{"role": "user", "content": "What is the weather in Paris? [[sim:tool:get_weather]]"}]
    first = await client.call({"op": "complete", "messages": ask, "tools": [WEATHER_TOOL]})
    assert first["ok"] and first["stop_reason"] == "tool_use"
    tool_use = next(b for b in first["content"] if b["type"] == "tool_use")
    assert tool_use["name"] == "get_weather" and "city" in tool_use["input"]
    result = [
        *ask,
        {"role": "assistant", "content": first["content"]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": tool_use["id"], "content": "18 C and sunny"}]},
    ]
    final = await client.call({"op": "complete", "messages": result, "tools": [WEATHER_TOOL]})
    assert final["ok"] and final["stop_reason"] == "end_turn" and "18 C and sunny" in final["text"]


async def test_thinking_blocks_come_back_intact(daemon, sim):
    reply = await (await connect(daemon)).call(
        {"op": "complete", "max_tokens": 2000, "thinking": {"type": "enabled", "budget_tokens": 1024},
         "messages": [{"role": "user", "content": "Think first. [[sim:redacted_thinking]]"}]}
    )
    assert reply["ok"]
    kinds = [b["type"] for b in reply["content"]]
    assert kinds[0] == "thinking" and "redacted_thinking" in kinds and kinds[-1] == "text"
    assert reply["content"][0]["signature"] and reply["content"][0]["thinking"]


async def test_prompt_cache_tokens_are_reported_and_priced(daemon, sim):
    system = [{"type": "text", "text": "A long shared preamble. " * 50, "cache_control": {"type": "ephemeral"}}]
    client = await connect(daemon)
    first = await client.call({"op": "complete", "system": system, "messages": [{"role": "user", "content": "q1"}], "cache": "bypass"})
    second = await client.call({"op": "complete", "system": system, "messages": [{"role": "user", "content": "q2"}], "cache": "bypass"})
    assert first["usage"]["cache_creation_input_tokens"] > 0
    assert second["usage"]["cache_read_input_tokens"] > 0
    assert second["cost_usd"] < first["cost_usd"]  # cache reads cost a tenth of input tokens


async def test_stream_deltas_join_to_the_final_reply(daemon, sim):
    events, done = await stream(await connect(daemon), "Tell me something.")
    assert events[0]["event"] == "start" and events[0]["served_by"]["model"] == PRIMARY
    assert done["event"] == "done" and done["ok"]
    assert joined(events) == done["text"] and done["text"]
    assert done["ttft_ms"] is not None and done["usage"]["output_tokens"] > 0


async def test_streamed_tool_use_input_arrives_in_pieces(daemon, sim):
    events, done = await stream(
        await connect(daemon), "Weather in Oslo? [[sim:tool:get_weather]]", tools=[WEATHER_TOOL]
    )
    assert done["ok"] and done["stop_reason"] == "tool_use"
    pieces = "".join(e["partial_json"] for e in events if e.get("type") == "input_json")
    tool_use = next(b for b in done["content"] if b["type"] == "tool_use")
    import json

    assert json.loads(pieces) == tool_use["input"]
    assert any(e["event"] == "block" and e["block"]["type"] == "tool_use" for e in events)


async def test_stall_before_the_first_event_fails_over_by_ttft(daemon_factory, sim, autojump_clock):
    d = await daemon_factory(routes=routes(ttft_timeout_s=1.0))
    sim.set_fault(PRIMARY, Fault(stall_after_events=0))
    events, done = await stream(await connect(d), "slow start")
    assert done["ok"] and done["served_by"]["model"] == FALLBACK
    assert [e["event"] for e in events].count("start") == 1  # one clean stream
    assert joined(events) == done["text"]


async def test_reset_mid_stream_ends_with_a_partial_error(daemon_factory, sim, autojump_clock):
    d = await daemon_factory(routes=routes())
    sim.set_fault(PRIMARY, Fault(reset_after_events=6))
    events, final = await stream(await connect(d), "break me")
    assert final["ok"] is False and final["partial"] is True
    assert final["text"] == joined(events) and final["text"]
    assert final["error"]["code"] == "upstream_error"


async def test_stall_mid_stream_is_caught_by_the_idle_timeout(daemon_factory, sim, autojump_clock):
    d = await daemon_factory(routes=routes(), requests={"stream_idle_timeout_s": 5})
    sim.set_fault(PRIMARY, Fault(stall_after_events=6))
    start = trio.current_time()
    events, final = await stream(await connect(d), "stall me")
    assert final["partial"] and final["error"]["code"] == "upstream_timeout"
    assert 5 <= trio.current_time() - start < 6



async def test_a_clients_stream_idle_ms_caps_the_stall_limit_but_not_below_a_second(daemon_factory, sim, autojump_clock):
    d = await daemon_factory(routes=routes())
    sim.set_fault(PRIMARY, Fault(stall_after_events=6))
    start = trio.current_time()
    events, final = await stream(await connect(d), "stall me", stream_idle_ms=3000)
    assert final["partial"] and "stalled for 3 s" in final["error"]["message"] and trio.current_time() - start < 4
    sim.set_fault(PRIMARY, Fault(event_interval_ms=500))  # slow but steady: 1 ms would call every gap a stall
    events, done = await stream(await connect(d), "slow but steady", stream_idle_ms=1)
    assert done["ok"] and joined(events) == done["text"]

async def test_an_error_event_mid_stream_is_never_reported_complete(daemon_factory, sim, autojump_clock):
    d = await daemon_factory(routes=routes())
    sim.set_fault(PRIMARY, Fault(error_after_events=6, status=529))
    events, final = await stream(await connect(d), "cut me")
    assert final["ok"] is False and final["partial"] is True and final.get("event") != "done"


async def test_resume_continues_on_the_fallback_as_one_stream(daemon_factory, sim, autojump_clock):
    d = await daemon_factory(routes=routes(resume=True))
    sim.set_fault(PRIMARY, Fault(reset_after_events=7))
    events, done = await stream(await connect(d), "a long answer please [[sim:long]]", max_tokens=60)
    assert done["ok"] and done["resumed"] is True and done["served_by"]["model"] == FALLBACK
    assert joined(events) == done["text"]
    assert [e["event"] for e in events].count("start") == 1
    prefill = sim.calls[-1].body["messages"][-1]
    assert prefill["role"] == "assistant" and done["text"].startswith(prefill["content"])


async def test_a_client_that_does_not_read_is_cut_off_alone(daemon_factory, sim, autojump_clock):
    d = await daemon_factory(server={"client_write_timeout_s": 2})
    greedy = await connect(d)
    # many long streams and no reading: the daemon's outbox and the socket buffer fill up
    for i in range(40):
        await greedy.send({"op": "complete", "stream": True, "max_tokens": 2000,
                           "messages": [{"role": "user", "content": f"long {i} [[sim:long]]"}]})
    await trio.sleep(5)
    polite = await connect(d)
    assert (await polite.complete("still fine"))["ok"]
    assert d.metrics.clients_cut("slow_reader").value >= 1
    assert d.engine.in_flight == 0


async def test_cache_hit_is_replayed_as_a_stream(daemon, sim):
    client = await connect(daemon)
    plain = await client.complete("replay me", temperature=0.0)
    events, done = await stream(client, "replay me", temperature=0.0)
    assert done["cached"] is True and done["text"] == plain["text"] == joined(events)
    assert events[0]["event"] == "start"
    assert sim.calls_for(PRIMARY) == 1


async def test_streamed_answer_is_cached_when_complete(daemon, sim):
    client = await connect(daemon)
    _, done = await stream(client, "stream then cache", temperature=0.0)
    again = await client.complete("stream then cache", temperature=0.0)
    assert again["cached"] is True and again["text"] == done["text"]


async def test_count_tokens(daemon, sim):
    reply = await (await connect(daemon)).call(
        {"op": "count_tokens", "messages": [{"role": "user", "content": "How many tokens is this?"}], "tools": [WEATHER_TOOL]}
    )
    assert reply["ok"] and reply["input_tokens"] > 0 and reply["model"] == PRIMARY


async def test_hello_raises_the_frame_limit_for_this_connection(daemon_factory):
    d = await daemon_factory(server={"max_frame_bytes": 4096, "max_frame_bytes_ceiling": 1 << 20})
    big = "x" * 20_000
    small_limit = await connect(d)
    await small_limit.send({"op": "complete", "messages": [{"role": "user", "content": big}]})
    assert (await small_limit.next_frame())["error"]["code"] == "frame_too_large"
    raised = await connect(d)
    hello = await raised.call({"op": "hello", "max_frame_bytes": 10 << 20})
    assert hello["max_frame_bytes"] == 1 << 20  # capped at the ceiling
    assert (await raised.complete(big))["ok"]
