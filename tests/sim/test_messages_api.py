"""The simulated upstream's whole Messages API: tools, thinking, prompt caching, streams of all of it, stream
faults, count_tokens, pass-through of unknown fields."""

from __future__ import annotations

import base64
import json
import struct
from typing import Any

import anthropic
import httpx2
import pytest
import trio

from sidecard.sim import Fault, Simulator
from sidecard.sim.accounting import PromptCache
from sidecard.sim.replies import cache_breakpoints, example

MODEL = "claude-sonnet-4-6"
ASK: dict[str, Any] = {"model": MODEL, "max_tokens": 400, "messages": [{"role": "user", "content": "Plan my trip."}]}
WEATHER = {
    "name": "get_weather",
    "description": "The forecast for a city.",
    "input_schema": {
        "type": "object",
        "properties": {
            "city": {"type": "string"},
            "days": {"type": "integer", "minimum": 1, "maximum": 7},
            "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            "hourly": {"type": "boolean"},
            "near": {"type": "object", "properties": {"lat": {"type": "number"}}, "required": ["lat"]},
            "tags": {"type": "array", "items": {"type": "string"}, "minItems": 2},
            "note": {"type": "string"},  # optional: left out
        },
        "required": ["city", "days", "unit", "hourly", "near", "tags"],
    },
}
LOOKUP = {"name": "lookup_order", "input_schema": {"type": "object", "properties": {}}}
TOOLS = [WEATHER, LOOKUP]
THINKING = {"type": "enabled", "budget_tokens": 2000}
VERSION = {"anthropic-version": "2023-06-01"}


@pytest.fixture
def sim() -> Simulator:
    return Simulator(seed=5)


@pytest.fixture
async def fresh_client(url: str):
    """A client that opens a connection per request: a jump of the clock outlasts the server's keep-alive."""
    http_client = httpx2.AsyncClient(limits=httpx2.Limits(max_keepalive_connections=0))
    client = anthropic.AsyncAnthropic(api_key="k", base_url=url, max_retries=0, http_client=http_client)
    yield client
    await client.close()


@pytest.fixture
async def http(url: str):
    async with httpx2.AsyncClient(base_url=url, headers=VERSION) as http:
        yield http


def ask(text: str | list[dict[str, Any]], **overrides: Any) -> dict[str, Any]:
    return {**ASK, "messages": [{"role": "user", "content": text}], **overrides}


def sse_events(text: str) -> list[dict[str, Any]]:
    return [json.loads(block.split("\ndata: ", 1)[1]) for block in text.split("\n\n") if "\ndata: " in block]


# ------------------------------------------------------------ tool use


async def test_a_tool_named_in_the_question_is_called(client, sim):
    message = await client.messages.create(**ask("What will get_weather say about Oslo?", tools=TOOLS))
    assert message.stop_reason == "tool_use"
    assert [block.type for block in message.content] == ["text", "tool_use"]
    assert message.content[0].text == "I'll use get_weather."
    call = message.content[1]
    assert call.id.startswith("toolu_sim_") and call.name == "get_weather"
    value = call.input
    assert set(value) == {"city", "days", "unit", "hourly", "near", "tags"}
    assert isinstance(value["city"], str) and value["city"]
    assert isinstance(value["days"], int) and 1 <= value["days"] <= 7
    assert value["unit"] == "celsius" and value["hourly"] is True
    assert isinstance(value["near"]["lat"], float) and len(value["tags"]) == 2
    assert message.usage.output_tokens == 3 + (len(json.dumps(value, separators=(",", ":"))) + 3) // 4
    again = await client.messages.create(**ask("What will get_weather say about Oslo?", tools=TOOLS))
    assert again.content == message.content  # deterministic, id included
    # the directive names the tool; a name that is only part of a word does not count
    message = await client.messages.create(**ask("Check it [[sim:tool:lookup_order]]", tools=TOOLS))
    assert message.content[1].name == "lookup_order" and message.content[1].input == {}
    assert (await client.messages.create(**ask("My get_weathers are odd", tools=TOOLS))).stop_reason == "end_turn"


async def test_tool_choice(client):
    forced = await client.messages.create(
        **ask("Plain question", tools=TOOLS, tool_choice={"type": "tool", "name": "lookup_order"})
    )
    assert forced.stop_reason == "tool_use" and forced.content[1].name == "lookup_order"
    anything = await client.messages.create(**ask("Plain question", tools=TOOLS, tool_choice={"type": "any"}))
    assert anything.content[1].name == "get_weather"  # the first tool
    asked = await client.messages.create(**ask("Use lookup_order", tools=TOOLS, tool_choice={"type": "any"}))
    assert asked.content[1].name == "lookup_order"
    never = await client.messages.create(**ask("[[sim:tool:get_weather]]", tools=TOOLS, tool_choice={"type": "none"}))
    assert never.stop_reason == "end_turn" and [b.type for b in never.content] == ["text"]
    auto = await client.messages.create(**ask("Plain question", tools=TOOLS, tool_choice={"type": "auto"}))
    assert auto.stop_reason == "end_turn"


async def test_parallel_calls(client):
    both = await client.messages.create(**ask("[[sim:tool:get_weather]] [[sim:tool:lookup_order]]", tools=TOOLS))
    assert both.content[0].text == "I'll use get_weather and lookup_order."
    assert [b.name for b in both.content[1:]] == ["get_weather", "lookup_order"]
    assert both.content[1].id != both.content[2].id
    one = await client.messages.create(
        **ask(
            "[[sim:tool:get_weather]] [[sim:tool:lookup_order]]",
            tools=TOOLS,
            tool_choice={"type": "auto", "disable_parallel_tool_use": True},
        )
    )
    assert [b.type for b in one.content] == ["text", "tool_use"]


async def test_a_tool_result_gets_a_final_answer(client):
    question = {"role": "user", "content": "What will get_weather say about Oslo?"}
    first = await client.messages.create(**{**ASK, "tools": TOOLS, "messages": [question]})
    call = first.content[1]
    result = "Oslo: 4 degrees, light rain in the evening, wind from the north-west at 20 km/h, clearing later."
    conversation = [
        question,
        {"role": "assistant", "content": [block.model_dump(exclude_none=True) for block in first.content]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call.id, "content": result}]},
    ]
    final = await client.messages.create(**{**ASK, "tools": TOOLS, "messages": conversation})
    assert final.stop_reason == "end_turn"
    assert final.content[0].text == f"The tool returned: {result[:60]}".rstrip()
    # a result given as blocks, and a forced tool_choice still forcing a call, as with the API
    conversation[-1]["content"][0]["content"] = [{"type": "text", "text": "Sunny."}]
    final = await client.messages.create(**{**ASK, "tools": TOOLS, "messages": conversation})
    assert final.content[0].text == "The tool returned: Sunny."
    forced = await client.messages.create(
        **{**ASK, "tools": TOOLS, "messages": conversation, "tool_choice": {"type": "any"}}
    )
    assert forced.stop_reason == "tool_use"


async def test_max_tokens_leaves_no_room_for_the_call(client):
    message = await client.messages.create(**ask("[[sim:tool:get_weather]]", tools=TOOLS, max_tokens=5))
    assert message.stop_reason == "max_tokens" and [b.type for b in message.content] == ["text"]
    assert message.usage.output_tokens == 3


def test_examples_follow_the_schema():
    assert example({"type": "string", "enum": ["x", "y"]}, "s") == "x"
    assert example({"const": 7}, "s") == 7
    assert example({"type": ["null", "integer"], "exclusiveMinimum": 10, "maximum": 11}, "s") == 11
    value = example({"type": "number", "minimum": 0.5, "maximum": 0.75}, "s")
    assert isinstance(value, float) and 0.5 <= value <= 0.75
    assert example({"anyOf": [{"type": "boolean"}, {"type": "string"}]}, "s") is True
    assert example({"type": "string", "minLength": 30, "maxLength": 40}, "s").startswith(
        example({"type": "string"}, "s")
    )
    assert len(example({"type": "string", "minLength": 30}, "s")) == 30
    assert example({"type": "array", "items": {"type": "integer"}}, "s") == []
    assert example({"properties": {"a": {}}, "required": ["a", "b"]}, "s").keys() == {"a", "b"}
    assert example({"type": "string"}, "one") == example({"type": "string"}, "one")
    pydantic_style = {
        "$defs": {"Address": {"properties": {"zip": {"type": "integer"}}, "required": ["zip"], "type": "object"}},
        "properties": {"home": {"$ref": "#/$defs/Address"}},
        "required": ["home"],
        "type": "object",
    }
    assert isinstance(example(pydantic_style, "s")["home"]["zip"], int)
    looped = {"properties": {"next": {"$ref": "#"}}, "required": ["next"]}
    assert example(looped, "s")  # cut off, not endless


# ------------------------------------------------------------ thinking


async def test_thinking_comes_first_and_counts_as_output(client):
    plain = await client.messages.create(**ask("Why is the sky blue?"))
    message = await client.messages.create(**ask("Why is the sky blue?", thinking=THINKING))
    thinking, text = message.content
    assert thinking.type == "thinking" and thinking.signature.startswith("sig_sim_") and thinking.thinking
    assert text.text == plain.content[0].text
    assert message.usage.output_tokens == plain.usage.output_tokens + len(thinking.thinking.split(" "))
    short = await client.messages.create(**ask("Why is the sky blue?", thinking={**THINKING, "budget_tokens": 3}))
    assert short.content[0].thinking == "Let me think"
    redacted = await client.messages.create(**ask("Why? [[sim:redacted_thinking]]", thinking=THINKING))
    assert [b.type for b in redacted.content] == ["thinking", "redacted_thinking", "text"]
    base64.b64decode(redacted.content[1].data, validate=True)
    with_tools = await client.messages.create(**ask("Ask get_weather", thinking=THINKING, tools=TOOLS))
    assert [b.type for b in with_tools.content] == ["thinking", "text", "tool_use"]


# ------------------------------------------------------------ prompt caching

LONG_SYSTEM = "You are the support assistant of a large shop. " * 40


async def test_prompt_caching_writes_then_reads_then_expires(fresh_client, mock_clock):
    client = fresh_client
    system = [{"type": "text", "text": LONG_SYSTEM, "cache_control": {"type": "ephemeral"}}]
    request = ask("Where is my order?", system=system)
    counted = await client.messages.count_tokens(model=MODEL, system=system, messages=request["messages"])
    prefix = (len(LONG_SYSTEM) + 3) // 4
    first = (await client.messages.create(**request)).usage
    assert (first.cache_creation_input_tokens, first.cache_read_input_tokens) == (prefix, 0)
    assert first.input_tokens == counted.input_tokens - prefix > 0
    assert first.cache_creation.ephemeral_5m_input_tokens == prefix
    second = (await client.messages.create(**request)).usage
    assert (second.input_tokens, second.cache_creation_input_tokens, second.cache_read_input_tokens) == (
        first.input_tokens,
        0,
        prefix,
    )
    other_model = (await client.messages.create(**{**request, "model": "claude-haiku-4-5"})).usage
    assert other_model.cache_creation_input_tokens == prefix  # each model has its own cache
    mock_clock.jump(299)  # a read refreshes the TTL
    assert (await client.messages.create(**request)).usage.cache_read_input_tokens == prefix
    mock_clock.jump(301)
    assert (await client.messages.create(**request)).usage.cache_creation_input_tokens == prefix
    # without cache_control nothing is cached, and the count is the same
    plain = (await client.messages.create(**ask("Where is my order?", system=LONG_SYSTEM))).usage
    assert plain.input_tokens == counted.input_tokens and plain.cache_read_input_tokens == 0


async def test_the_longest_cached_prefix_is_read(fresh_client, mock_clock):
    client = fresh_client
    tools = [{**WEATHER, "cache_control": {"type": "ephemeral", "ttl": "1h"}}]
    system = [{"type": "text", "text": LONG_SYSTEM, "cache_control": {"type": "ephemeral"}}]
    first = (await client.messages.create(**ask("Hello", tools=tools, system=system))).usage
    tools_tokens = (len(json.dumps(WEATHER, separators=(",", ":"))) + 3) // 4
    assert first.cache_creation.ephemeral_1h_input_tokens == tools_tokens
    assert first.cache_creation_input_tokens == tools_tokens + first.cache_creation.ephemeral_5m_input_tokens
    mock_clock.jump(600)  # the system prompt's entry expired, the tools' did not
    second = (await client.messages.create(**ask("Hello", tools=tools, system=system))).usage
    assert second.cache_read_input_tokens == tools_tokens
    assert second.cache_creation_input_tokens == first.cache_creation.ephemeral_5m_input_tokens
    # a conversation that grows: the earlier turn's breakpoint is read, the new part written
    turn = {"role": "user", "content": [{"type": "text", "text": "x" * 400, "cache_control": {"type": "ephemeral"}}]}
    grown = [
        turn,
        {"role": "assistant", "content": "ok"},
        {**turn, "content": [{**turn["content"][0], "text": "y" * 400}]},
    ]
    await client.messages.create(**{**ASK, "messages": [turn]})
    usage = (await client.messages.create(**{**ASK, "messages": grown})).usage
    assert usage.cache_read_input_tokens == 100 and usage.cache_creation_input_tokens == 101


def test_the_prompt_cache_is_bounded():
    cache = PromptCache(max_entries=2)
    prompts = [
        cache_breakpoints(
            MODEL, {"messages": [{"role": "user", "content": [{"type": "text", "text": t, "cache_control": {}}]}]}
        )
        for t in ("aaaa", "bbbb", "cccc")
    ]
    for size, points in prompts:
        assert cache.usage(size, points, 0.0)["cache_creation_input_tokens"] == 1
    assert cache.usage(*prompts[2], 1.0)["cache_read_input_tokens"] == 1
    assert cache.usage(*prompts[0], 1.0)["cache_read_input_tokens"] == 0  # evicted: the oldest went first


# ------------------------------------------------------------ streams


async def test_everything_streams_in_the_apis_order(client, http):
    request = ask("Ask get_weather [[sim:redacted_thinking]]", thinking=THINKING, tools=TOOLS)
    created = await client.messages.create(**request)
    response = await http.post("/v1/messages", json={**request, "stream": True})
    events = sse_events(response.text)
    shape = [(e["type"], e.get("content_block", e.get("delta", {})).get("type")) for e in events]
    thinking_deltas = sum(1 for s in shape if s == ("content_block_delta", "thinking_delta"))
    json_deltas = sum(1 for s in shape if s == ("content_block_delta", "input_json_delta"))
    assert thinking_deltas > 1 and json_deltas > 1
    assert shape == [
        ("message_start", None),
        ("content_block_start", "thinking"), ("ping", None),
        *[("content_block_delta", "thinking_delta")] * thinking_deltas,
        ("content_block_delta", "signature_delta"), ("content_block_stop", None),
        ("content_block_start", "redacted_thinking"), ("content_block_stop", None),
        ("content_block_start", "text"), ("content_block_delta", "text_delta"), ("content_block_stop", None),
        ("content_block_start", "tool_use"),
        *[("content_block_delta", "input_json_delta")] * json_deltas,
        ("content_block_stop", None),
        ("message_delta", None), ("message_stop", None),
    ]  # fmt: skip
    assert events[-2]["delta"]["stop_reason"] == "tool_use"
    tool_start = next(e for e in events if e.get("content_block", {}).get("type") == "tool_use")
    assert tool_start["content_block"]["input"] == {} and tool_start["index"] == 3
    partial = "".join(
        e["delta"]["partial_json"] for e in events if e.get("delta", {}).get("type") == "input_json_delta"
    )
    assert json.loads(partial) == created.content[3].input
    assert events[-2]["usage"]["output_tokens"] == created.usage.output_tokens
    async with client.messages.stream(**request) as stream:
        final = await stream.get_final_message()
    dump = [block.model_dump(exclude_none=True) for block in final.content]
    assert dump == [block.model_dump(exclude_none=True) for block in created.content]
    assert final.usage == created.usage and final.stop_reason == "tool_use"


async def test_stream_usage_carries_the_cache_counts(client):
    system = [{"type": "text", "text": LONG_SYSTEM, "cache_control": {"type": "ephemeral"}}]
    await client.messages.create(**ask("Hi", system=system))
    events = [event async for event in await client.messages.create(**ask("Hi", system=system), stream=True)]
    usage = events[0].message.usage
    assert usage.cache_read_input_tokens == (len(LONG_SYSTEM) + 3) // 4 and usage.cache_creation_input_tokens == 0
    assert usage.input_tokens > 0 and events[-2].usage.output_tokens > 1


async def test_quality_faults_apply_to_streams(client, sim):
    sim.set_fault("*", Fault(quality="refusal"))
    async with client.messages.stream(**ASK) as stream:
        assert (await stream.get_final_text()).startswith("I'm sorry")
    sim.set_fault("*", Fault(quality="empty"))
    async with client.messages.stream(**ASK) as stream:
        message = await stream.get_final_message()
    assert message.content == [] and message.usage.output_tokens == 0


# ------------------------------------------------------------ stream faults


async def _raw(url: str, path: str, body: dict[str, Any]) -> tuple[bytes, bool]:
    """POST over a bare socket; everything received, and whether the connection was reset."""
    host, port = url.removeprefix("http://").split(":")
    stream = await trio.open_tcp_stream(host, int(port))
    payload = json.dumps(body).encode()
    await stream.send_all(
        b"POST %b HTTP/1.1\r\nhost: x\r\nanthropic-version: 2023-06-01\r\ncontent-length: %d\r\n\r\n%b"
        % (path.encode(), len(payload), payload)
    )
    received, reset = b"", False
    try:
        while data := await stream.receive_some():
            received += data
    except trio.BrokenResourceError:
        reset = True
    await stream.aclose()
    return received, reset


def _dechunk(body: bytes) -> tuple[bytes, bool]:
    """The chunked body's whole chunks joined, and whether the last chunk came."""
    data = b""
    while b"\r\n" in body:
        size_line, rest = body.split(b"\r\n", 1)
        size = int(size_line, 16)
        if size == 0:
            return data, True
        if len(rest) < size + 2:
            break
        data, body = data + rest[:size], rest[size + 2 :]
    return data, False


def _bedrock_events(data: bytes) -> list[dict[str, Any]]:
    events = []
    while len(data) >= 12:
        total, headers_length = struct.unpack(">II", data[:8])
        payload = data[12 + headers_length : total - 4]
        events.append(json.loads(base64.b64decode(json.loads(payload)["bytes"])))
        data = data[total:]
    return events


@pytest.mark.parametrize("bedrock", [False, True])
async def test_reset_after_events(url, sim, bedrock):
    sim.set_fault("*", Fault(reset_after_events=3))
    if bedrock:
        path, body = f"/model/{MODEL}/invoke-with-response-stream", {**ASK, "anthropic_version": "bedrock-2023-05-31"}
        del body["model"]
    else:
        path, body = "/v1/messages", {**ASK, "stream": True}
    received, reset = await _raw(url, path, body)
    head, _, chunked = received.partition(b"\r\n\r\n")
    data, ended = _dechunk(chunked)
    events = _bedrock_events(data) if bedrock else sse_events(data.decode())
    assert head.startswith(b"HTTP/1.1 200") and reset and not ended
    assert [e["type"] for e in events] == ["message_start", "content_block_start", "ping"]
    # not streamed: reset before any answer
    received, reset = await _raw(url, "/v1/messages", ASK)
    assert received == b"" and reset


async def test_stream_faults_through_the_sdk(client, sim, autojump_clock):
    sim.set_fault("*", Fault(reset_after_events=4))
    kinds = []
    with pytest.raises((anthropic.APIConnectionError, httpx2.TransportError)):
        async for event in await client.messages.create(**ASK, stream=True):
            kinds.append(event.type)
    assert kinds == ["message_start", "content_block_start", "content_block_delta"]  # (ping skipped)
    sim.set_fault("*", Fault(stall_after_events=0))
    start = trio.current_time()
    stream = await client.messages.create(**ASK, stream=True, timeout=10)  # the head arrives
    with pytest.raises((anthropic.APITimeoutError, httpx2.ReadTimeout)):
        async for _ in stream:
            pytest.fail("no event was due")
    assert trio.current_time() - start == pytest.approx(10, abs=1)


async def test_bedrock_reset_after_bytes(url, sim):
    sim.set_fault("*", Fault(reset_after_bytes=700))
    body = {**ASK, "anthropic_version": "bedrock-2023-05-31"}
    received, reset = await _raw(url, f"/model/{MODEL}/invoke-with-response-stream", body)
    assert len(received) == 700 and reset and b"application/vnd.amazon.eventstream" in received


# ------------------------------------------------------------ count_tokens and pass-through


async def test_count_tokens_calls_are_counted_apart(client, sim, autojump_clock):
    counted = await client.messages.count_tokens(model=MODEL, messages=ASK["messages"], tools=TOOLS)
    with_tools = await client.messages.create(**ASK, tools=TOOLS)
    assert (
        counted.input_tokens == with_tools.usage.input_tokens > (await client.messages.create(**ASK)).usage.input_tokens
    )
    assert sim.calls_for(MODEL) == 2 and sim.stats[MODEL].count_tokens == 1
    total = sim.stats_total()
    assert total["requests"] == 2 and total["count_tokens"] == 1 and total["by_status"] == {200: 2}
    assert [c.path for c in sim.count_tokens_calls] == ["/v1/messages/count_tokens"]
    assert all(c.path == "/v1/messages" for c in sim.calls)
    sim.set_fault(MODEL, Fault(status=529, count=1))
    with pytest.raises(anthropic.OverloadedError):
        await client.messages.count_tokens(model=MODEL, messages=ASK["messages"])
    assert not sim.active_faults()  # the counted fault was spent on count_tokens
    sim.set_fault("*", Fault(hang=True))
    with pytest.raises(anthropic.APITimeoutError):
        await client.messages.count_tokens(model=MODEL, messages=ASK["messages"], timeout=5)
    assert sim.stats_total()["count_tokens"] == 3 and sim.stats_total()["requests"] == 2


async def test_unknown_fields_pass_through(client, sim):
    extra = {"brand_new_option": {"level": 3}, "service_tier": "auto"}
    await client.messages.create(**ASK, extra_body=extra)
    await client.messages.count_tokens(model=MODEL, messages=ASK["messages"], extra_body=extra)
    assert sim.calls[-1].body["brand_new_option"] == {"level": 3} and sim.calls[-1].body["service_tier"] == "auto"
    assert sim.count_tokens_calls[-1].body["brand_new_option"] == {"level": 3}
