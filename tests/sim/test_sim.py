"""The simulated upstream, driven by the official SDK (direct, Bedrock, Vertex) and over raw HTTP."""

from __future__ import annotations

import base64
import json
import random
import struct
import zlib
from typing import Any

import anthropic
import httpx2
import pytest
import trio
import trio.testing

from sidecard.sim import Fault, Simulator, serve_sim
from sidecard.sim.faults import FaultTable

MODEL = "claude-sonnet-4-6"
PROMPT = "How do I reset my password? I have tried twice already."
ASK: dict[str, Any] = {"model": MODEL, "max_tokens": 200, "messages": [{"role": "user", "content": PROMPT}]}


@pytest.fixture
def sim() -> Simulator:
    return Simulator(seed=3)


@pytest.fixture
async def http(url: str):
    async with httpx2.AsyncClient(base_url=url) as http:
        yield http


async def text_of(client: anthropic.AsyncAnthropic, **overrides: Any) -> str:
    message = await client.messages.create(**{**ASK, **overrides})
    return "".join(block.text for block in message.content if block.type == "text")


# ------------------------------------------------------------ answers


async def test_create_answers_like_the_api(client, sim):
    raw = await client.messages.with_raw_response.create(**ASK)
    message = await raw.parse()
    body = json.loads(raw.http_response.content)
    assert list(body) == ["id", "type", "role", "model", "content", "stop_reason", "stop_sequence", "usage"]
    assert body["stop_sequence"] is None
    assert message.id.startswith("msg_sim_") and message.type == "message" and message.role == "assistant"
    assert message.model == MODEL and message.stop_reason == "end_turn"
    text = message.content[0].text
    assert text and PROMPT not in text and text.endswith(".")
    assert message.usage.input_tokens == (len(PROMPT) + 3) // 4
    assert message.usage.output_tokens == len(text.split())
    assert message.usage.cache_creation_input_tokens == 0 and message.usage.cache_read_input_tokens == 0
    assert raw.headers["request-id"].startswith("req_sim_") and raw.headers["content-type"] == "application/json"
    assert raw.headers["anthropic-ratelimit-requests-remaining"] == "3999"
    assert int(raw.headers["anthropic-ratelimit-tokens-remaining"]) < int(
        raw.headers["anthropic-ratelimit-tokens-limit"]
    )
    assert raw.headers["anthropic-ratelimit-requests-reset"].endswith("Z")
    assert sim.calls_for(MODEL) == 1 and sim.stats_total()["by_status"] == {200: 1}


async def test_answers_are_a_function_of_model_and_prompt(client):
    first = await text_of(client)
    assert await text_of(client) == first
    assert await text_of(client, model="claude-haiku-4-5") != first
    assert await text_of(client, messages=[{"role": "user", "content": "Something else"}]) != first
    assert await text_of(client, system="Be brief.") == first


async def test_max_tokens_cuts_the_answer(client):
    message = await client.messages.create(**{**ASK, "max_tokens": 3})
    assert message.stop_reason == "max_tokens" and message.usage.output_tokens == 3
    assert len(message.content[0].text.split(" ")) == 3


async def test_stop_sequences_cut_the_answer(client):
    words = (await text_of(client)).split(" ")
    message = await client.messages.create(**ASK, stop_sequences=["zzz", f" {words[2]} "])
    assert message.stop_reason == "stop_sequence" and message.stop_sequence == f" {words[2]} "
    assert message.content[0].text == " ".join(words[:2])
    assert message.usage.output_tokens == 2


async def test_directives_choose_the_answer(client):
    echoed = [{"type": "text", "text": "Ticket: [[sim:echo]]"}, {"type": "text", "text": '{"a": 1}'}]
    assert await text_of(client, messages=[{"role": "user", "content": echoed}]) == 'Ticket: {"a": 1}'
    assert await text_of(client, messages=[{"role": "user", "content": "x [[sim:say:Hello there]]"}]) == "Hello there"
    long = await client.messages.create(
        **{**ASK, "max_tokens": 4096, "messages": [{"role": "user", "content": "[[sim:long]]"}]}
    )
    assert 1500 <= long.usage.output_tokens <= 2000


async def test_stream_follows_the_api_and_matches_create(client):
    expected = await client.messages.create(**ASK)
    events = [event async for event in await client.messages.create(**ASK, stream=True)]
    kinds = [event.type for event in events]
    deltas = kinds.count("content_block_delta")
    assert deltas > 1
    assert kinds == [
        "message_start",
        "content_block_start",
        *["content_block_delta"] * deltas,
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]  # fmt: skip (the SDK drops the ping)
    assert events[0].message.usage.input_tokens == expected.usage.input_tokens and events[0].message.content == []
    assert "".join(e.delta.text for e in events if e.type == "content_block_delta") == expected.content[0].text
    assert events[-2].delta.stop_reason == "end_turn" and events[-2].usage.output_tokens == expected.usage.output_tokens
    async with client.messages.stream(**ASK) as stream:
        assert await stream.get_final_text() == expected.content[0].text


async def test_stream_wire_format(http):
    response = await http.post(
        "/v1/messages", json={**ASK, "stream": True}, headers={"anthropic-version": "2023-06-01"}
    )
    assert response.headers["content-type"].startswith("text/event-stream")
    assert response.headers["request-id"].startswith("req_sim_")
    assert response.text.endswith("\n\n")
    events = [block.split("\n") for block in response.text.removesuffix("\n\n").split("\n\n")]
    names = [name.removeprefix("event: ") for name, _ in events]
    assert all(json.loads(data.removeprefix("data: "))["type"] == name for name, (_, data) in zip(names, events))
    deltas = names.count("content_block_delta")
    assert names == [
        "message_start", "content_block_start", "ping", *["content_block_delta"] * deltas,
        "content_block_stop", "message_delta", "message_stop",
    ]  # fmt: skip


async def test_count_tokens_agrees_with_usage(client):
    counted = await client.messages.count_tokens(model=MODEL, messages=ASK["messages"], system="You are terse.")
    message = await client.messages.create(**ASK, system="You are terse.")
    assert counted.input_tokens == message.usage.input_tokens == (len(PROMPT) + len("You are terse.") + 3) // 4


# ------------------------------------------------------------ errors


@pytest.mark.parametrize(
    ("status", "exception", "error_type"),
    [
        (400, anthropic.BadRequestError, "invalid_request_error"),
        (401, anthropic.AuthenticationError, "authentication_error"),
        (403, anthropic.PermissionDeniedError, "permission_error"),
        (404, anthropic.NotFoundError, "not_found_error"),
        (413, anthropic.ContentTooLargeError, "request_too_large"),
        (429, anthropic.RateLimitError, "rate_limit_error"),
        (500, anthropic.InternalServerError, "api_error"),
        (502, anthropic.InternalServerError, "api_error"),
        (503, anthropic.ServiceUnavailableError, "api_error"),
        (504, anthropic.GatewayTimeoutError, "api_error"),
        (529, anthropic.OverloadedError, "overloaded_error"),
    ],
)
async def test_error_statuses_raise_the_sdk_exceptions(client, sim, status, exception, error_type):
    sim.set_fault(MODEL, Fault(status=status))
    with pytest.raises(exception) as caught:
        await client.messages.create(**ASK)
    assert caught.value.status_code == status
    assert caught.value.body["type"] == "error" and caught.value.body["error"]["type"] == error_type
    assert caught.value.body["request_id"] == caught.value.request_id
    assert caught.value.response.headers["anthropic-ratelimit-requests-limit"] == "4000"
    assert "retry-after" not in caught.value.response.headers
    assert sim.stats[MODEL].by_status == {status: 1} and sim.stats[MODEL].faulted == 1


async def test_faults_send_retry_headers(client, sim):
    sim.set_fault("*", Fault(status=429, retry_after_s=1.5, should_retry=False))
    with pytest.raises(anthropic.RateLimitError) as caught:
        await client.messages.create(**ASK)
    headers = caught.value.response.headers
    assert (headers["retry-after"], headers["retry-after-ms"], headers["x-should-retry"]) == ("1.5", "1500", "false")


async def test_api_key_is_checked(nursery):
    url = await nursery.start(serve_sim, Simulator(api_key="secret"))
    for credentials, ok in [
        ({"api_key": "wrong"}, False),
        ({"api_key": "secret"}, True),
        ({"auth_token": "secret"}, True),
    ]:
        client = anthropic.AsyncAnthropic(**credentials, base_url=url, max_retries=0, open_telemetry=False)
        try:
            if ok:
                assert await text_of(client)
            else:
                with pytest.raises(anthropic.AuthenticationError):
                    await text_of(client)
        finally:
            await client.close()


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"max_tokens": 5, "messages": ASK["messages"]}, "model: Field required"),
        ({"model": MODEL, "messages": ASK["messages"]}, "max_tokens: Field required"),
        ({"model": MODEL, "max_tokens": 0, "messages": ASK["messages"]}, "max_tokens: Input should be"),
        ({"model": MODEL, "max_tokens": 5}, "messages: Field required"),
        ({"model": MODEL, "max_tokens": 5, "messages": []}, "messages: Input should be a non-empty list"),
        ({**ASK, "messages": [{"role": "robot", "content": "hi"}]}, "messages.0.role"),
        ({**ASK, "messages": [{"role": "user", "content": 7}]}, "messages.0.content"),
        ({**ASK, "stop_sequences": "END"}, "stop_sequences"),
    ],
)
async def test_requests_are_validated(client, sim, body, message):
    with pytest.raises(anthropic.BadRequestError) as caught:
        await client.post("/v1/messages", body=body, cast_to=httpx2.Response)
    assert caught.value.body["error"]["message"].startswith(message)
    assert sim.stats_total() == {
        "requests": 1, "streamed": 0, "faulted": 0, "throttled": 0, "by_status": {400: 1},
        "count_tokens": 0, "batched": 0, "in_flight": 0, "max_in_flight": 1,
    }  # fmt: skip


async def test_bad_json_and_missing_version_are_refused(http):
    response = await http.post("/v1/messages", content=b"{nope", headers={"anthropic-version": "2023-06-01"})
    assert response.status_code == 400 and response.json()["error"]["type"] == "invalid_request_error"
    response = await http.post("/v1/messages", json=ASK)
    assert response.status_code == 400 and "anthropic-version" in response.json()["error"]["message"]


async def test_unknown_routes_are_404(http):
    for method, path in [("POST", "/v1/complete"), ("GET", "/v1/messages"), ("POST", "/model/x/converse")]:
        response = await http.request(method, path)
        assert response.status_code == 404 and response.json()["error"]["type"] == "not_found_error"


# ------------------------------------------------------------ faults


async def test_fault_rate_is_about_right(client, sim):
    sim.set_fault(MODEL, Fault(status=529, rate=0.3))
    failures = 0
    for _ in range(200):
        try:
            await client.messages.create(**ASK)
        except anthropic.OverloadedError:
            failures += 1
    assert 40 <= failures <= 80
    assert sim.stats[MODEL].by_status == {529: failures, 200: 200 - failures}


def test_fault_choices_follow_the_seed():
    def run(seed: int) -> list[bool]:
        table = FaultTable(random.Random(seed))
        table.set("*", Fault(status=500, rate=0.5))
        return [table.pick("m") is not None for _ in range(100)]

    assert run(1) == run(1) != run(2)


async def test_counted_faults_are_spent_and_exact_models_win(client, sim):
    fault = Fault(status=500, count=2)
    sim.set_fault("*", fault)
    sim.set_fault("claude-haiku-4-5", Fault(status=403))
    with pytest.raises(anthropic.PermissionDeniedError):
        await client.messages.create(**{**ASK, "model": "claude-haiku-4-5"})
    for _ in range(2):
        with pytest.raises(anthropic.InternalServerError):
            await client.messages.create(**ASK)
    assert await text_of(client)
    assert fault.count == 2  # the simulator spends its own copy
    assert list(sim.active_faults()) == ["claude-haiku-4-5"]
    sim.clear_faults("claude-haiku-4-5")
    assert await text_of(client, model="claude-haiku-4-5")


def test_faults_are_checked():
    for bad in [
        {"rate": 1.5},
        {"status": 200},
        {"count": 0},
        {"quality": "awful"},
        {"latency_ms": -1},
        {"reset_after_events": -1},
    ]:
        with pytest.raises(ValueError):
            Fault(**bad)


async def test_quality_degrades_the_answer(client, sim):
    sim.set_fault("*", Fault(quality="refusal"))
    assert (await text_of(client)).startswith("I'm sorry")
    sim.set_fault("*", Fault(quality="empty"))
    message = await client.messages.create(**ASK)
    assert message.content == [] and message.usage.output_tokens == 0


async def test_latency_is_trio_time(client, sim, autojump_clock):
    sim.set_fault(MODEL, Fault(latency_ms=5000))
    start = trio.current_time()
    assert await text_of(client)
    assert 5.0 <= trio.current_time() - start < 6.0


async def test_simulator_latency_applies_to_every_call(nursery, autojump_clock):
    url = await nursery.start(serve_sim, Simulator(latency_ms=250))
    async with httpx2.AsyncClient(base_url=url) as http:
        start = trio.current_time()
        response = await http.post("/v1/messages", json=ASK, headers={"anthropic-version": "2023-06-01"})
        assert response.status_code == 200 and trio.current_time() - start >= 0.25


async def test_hang_holds_until_the_client_leaves(client, sim, url, autojump_clock):
    sim.set_fault("*", Fault(hang=True))
    start = trio.current_time()
    with pytest.raises(anthropic.APITimeoutError):
        await client.messages.create(**ASK, timeout=30)
    assert trio.current_time() - start == pytest.approx(30, abs=1)
    # over a raw connection: half-close and the simulator lets go at once
    host, port = url.removeprefix("http://").split(":")
    stream = await trio.open_tcp_stream(host, int(port))
    body = json.dumps(ASK).encode()
    await stream.send_all(
        b"POST /v1/messages HTTP/1.1\r\nhost: x\r\nanthropic-version: 2023-06-01\r\ncontent-length: %d\r\n\r\n%b"
        % (len(body), body)
    )
    await sim.wait_for_calls(2)
    await stream.send_eof()
    with trio.fail_after(1):
        assert await stream.receive_some() == b""
    await stream.aclose()
    sim.clear_faults()
    assert await text_of(client)


async def test_reset_after_bytes(client, sim):
    for limit in (0, 40, 400):
        sim.set_fault("*", Fault(reset_after_bytes=limit))
        with pytest.raises(anthropic.APIConnectionError):
            await client.messages.create(**ASK)
    sim.set_fault("*", Fault(reset_after_bytes=600))
    with pytest.raises((anthropic.APIConnectionError, httpx2.TransportError)):
        async for _ in await client.messages.create(**ASK, stream=True):
            pass
    sim.set_fault("*", Fault(status=529, reset_after_bytes=20))
    with pytest.raises(anthropic.APIConnectionError):
        await client.messages.create(**ASK)


async def test_malformed_bodies(client, sim):
    sim.set_fault("*", Fault(malformed=True))
    raw = await client.messages.with_raw_response.create(**ASK)
    assert raw.status_code == 200
    with pytest.raises(json.JSONDecodeError):
        json.loads(raw.http_response.content)
    kinds = []
    with pytest.raises(json.JSONDecodeError):
        async for event in await client.messages.create(**ASK, stream=True):
            kinds.append(event.type)
    assert kinds == ["message_start"]


async def test_status_faults_precede_a_stream(client, sim):
    sim.set_fault("*", Fault(status=529))
    with pytest.raises(anthropic.OverloadedError):
        await client.messages.create(**ASK, stream=True)
    assert sim.stats[MODEL].streamed == 1


async def test_error_after_events_is_an_error_event(client, sim):
    sim.set_fault("*", Fault(error_after_events=4, status=429))
    with pytest.raises(anthropic.RateLimitError):  # not a stream: answered with the status
        await client.messages.create(**ASK)
    kinds = []
    with pytest.raises(anthropic.APIStatusError) as caught:
        async for event in await client.messages.create(**ASK, stream=True):
            kinds.append(event.type)
    assert kinds == ["message_start", "content_block_start", "content_block_delta"]  # the SDK skips ping
    assert caught.value.body["error"]["type"] == "rate_limit_error"
    sim.set_fault("*", Fault(error_after_events=0))
    with pytest.raises(anthropic.OverloadedError):
        await client.messages.create(**ASK)


async def test_stall_after_events(client, sim, autojump_clock):
    sim.set_fault("*", Fault(stall_after_events=2))
    kinds = []
    with pytest.raises((anthropic.APITimeoutError, httpx2.ReadTimeout)):
        async for event in await client.messages.create(**ASK, stream=True, timeout=10):
            kinds.append(event.type)
    assert kinds == ["message_start", "content_block_start"]


# ------------------------------------------------------------ bookkeeping and control


async def test_calls_are_recorded_without_credentials(client, sim):
    async with trio.open_nursery() as nursery:
        waited = trio.Event()

        async def wait() -> None:
            await sim.wait_for_calls(2)
            waited.set()

        nursery.start_soon(wait)
        await text_of(client)
        await trio.testing.wait_all_tasks_blocked()
        assert not waited.is_set()
        await text_of(client, model="claude-haiku-4-5", metadata={"user_id": "u1"})
    assert waited.is_set()
    call = sim.calls[-1]
    assert call.path == "/v1/messages" and call.model == "claude-haiku-4-5" and not call.stream
    assert call.body["metadata"] == {"user_id": "u1"} and call.body["messages"] == ASK["messages"]
    assert "x-api-key" not in call.headers and "anthropic-version" in call.headers
    assert sim.calls_for(MODEL) == sim.calls_for("claude-haiku-4-5") == 1
    sim.set_fault("*", Fault(status=500))
    sim.reset()
    assert not sim.calls and sim.stats_total()["requests"] == 0 and not sim.active_faults()


async def test_control_endpoint(http, client, sim):
    response = await http.post("/_sim/faults", json={"model": MODEL, "status": 529, "count": 1, "retry_after_s": 2})
    assert response.status_code == 200 and response.json() == {
        "model": MODEL,
        "fault": {"status": 529, "count": 1, "retry_after_s": 2.0},
    }
    with pytest.raises(anthropic.OverloadedError):
        await client.messages.create(**ASK)
    await client.messages.create(**ASK, stream=True)
    stats = (await http.get("/_sim/stats")).json()
    assert stats["total"] == {
        "requests": 2, "streamed": 1, "faulted": 1, "throttled": 0, "by_status": {"200": 1, "529": 1},
        "count_tokens": 0, "batched": 0, "in_flight": 0, "max_in_flight": 1,
    }  # fmt: skip
    assert stats["models"][MODEL]["requests"] == 2 and stats["faults"] == {} and stats["errors"] == 0
    assert stats["limits"] == {
        "concurrency_limit": None, "requests_per_minute": None, "tokens_per_minute": None,
        "input_tokens_per_minute": None, "output_tokens_per_minute": None, "window_s": 60.0,
    }  # fmt: skip

    for bad in [{"rate": 2}, {"colour": "red"}, {"model": 5}, [1]]:
        response = await http.post("/_sim/faults", json=bad)
        assert response.status_code == 400 and response.json()["error"]
    await http.post("/_sim/faults", json={"hang": True})
    await http.post("/_sim/faults", json={"model": MODEL, "status": 500})
    assert (await http.delete("/_sim/faults", params={"model": MODEL})).status_code == 200
    assert list(sim.active_faults()) == ["*"]
    assert (await http.delete("/_sim/faults")).json() == {"ok": True}
    assert not sim.active_faults()
    assert (await http.post("/_sim/reset")).status_code == 200
    assert (await http.get("/_sim/stats")).json()["total"]["requests"] == 0
    assert (await http.get("/_sim/nothing")).status_code == 404


# ------------------------------------------------------------ Bedrock and Vertex

BEDROCK_MODEL = "anthropic.claude-sonnet-4-6-v1:0"


@pytest.fixture
async def bedrock(url: str):
    client = anthropic.AsyncAnthropicBedrock(api_key="k", aws_region="us-east-1", base_url=url, max_retries=0)
    yield client
    await client.close()


async def test_bedrock_invoke(bedrock, client, sim):
    message = await bedrock.messages.create(**{**ASK, "model": BEDROCK_MODEL})
    assert message.content[0].text == await text_of(client, model=BEDROCK_MODEL)
    call = sim.calls[0]
    assert call.path == "/model/anthropic.claude-sonnet-4-6-v1:0/invoke" and call.model == BEDROCK_MODEL
    assert "model" not in call.body and "anthropic_version" in call.body
    sim.set_fault(BEDROCK_MODEL, Fault(status=429))
    with pytest.raises(anthropic.RateLimitError):
        await bedrock.messages.create(**{**ASK, "model": BEDROCK_MODEL})


def _eventstream_frames(data: bytes) -> list[tuple[dict[str, str], bytes]]:
    """AWS event-stream messages, checksums verified: (string headers, payload)."""
    frames = []
    while data:
        total, headers_length = struct.unpack(">II", data[:8])
        assert struct.unpack(">I", data[8:12])[0] == zlib.crc32(data[:8])
        assert struct.unpack(">I", data[total - 4 : total])[0] == zlib.crc32(data[: total - 4])
        raw, headers = data[12 : 12 + headers_length], {}
        while raw:
            name_length = raw[0]
            name, kind = raw[1 : 1 + name_length].decode(), raw[1 + name_length]
            assert kind == 7  # string
            (value_length,) = struct.unpack(">H", raw[2 + name_length : 4 + name_length])
            headers[name] = raw[4 + name_length : 4 + name_length + value_length].decode()
            raw = raw[4 + name_length + value_length :]
        frames.append((headers, data[12 + headers_length : total - 4]))
        data = data[total:]
    return frames


async def test_bedrock_stream_framing(http, client):
    response = await http.post(
        f"/model/{BEDROCK_MODEL}/invoke-with-response-stream", json={**ASK, "anthropic_version": "bedrock-2023-05-31"}
    )
    assert response.headers["content-type"] == "application/vnd.amazon.eventstream"
    frames = _eventstream_frames(response.content)
    assert all(
        h == {":event-type": "chunk", ":content-type": "application/json", ":message-type": "event"} for h, _ in frames
    )
    events = [json.loads(base64.b64decode(json.loads(payload)["bytes"])) for _, payload in frames]
    assert [e["type"] for e in events][:3] == ["message_start", "content_block_start", "ping"]
    text = "".join(e["delta"]["text"] for e in events if e["type"] == "content_block_delta")
    assert text == await text_of(client, model=BEDROCK_MODEL)


async def test_bedrock_stream_with_the_sdk(bedrock, client, sim):
    pytest.importorskip("botocore", reason="the SDK decodes Bedrock streams with botocore")
    async with bedrock.messages.stream(**{**ASK, "model": BEDROCK_MODEL}) as stream:
        assert await stream.get_final_text() == await text_of(client, model=BEDROCK_MODEL)
    assert sim.calls[0].path.endswith("/invoke-with-response-stream") and sim.calls[0].stream
    sim.set_fault("*", Fault(error_after_events=3, status=429))
    with pytest.raises(anthropic.APIStatusError) as caught:
        async with bedrock.messages.stream(**{**ASK, "model": BEDROCK_MODEL}) as stream:
            await stream.get_final_text()
    assert caught.value.body["error"]["type"] == "throttlingException"


@pytest.mark.parametrize("suffix", ["/v1", ""])
async def test_vertex(url, client, sim, suffix):
    vertex = anthropic.AsyncAnthropicVertex(
        region="us-east5", project_id="p", access_token="t", base_url=url + suffix, max_retries=0
    )
    try:
        model = "claude-sonnet-4-6@20250514"
        message = await vertex.messages.create(**{**ASK, "model": model})
        assert (
            sim.calls[0].path
            == f"{suffix}/projects/p/locations/us-east5/publishers/anthropic/models/{model}:rawPredict"
        )
        assert sim.calls[0].model == model and "anthropic_version" in sim.calls[0].body
        assert message.content[0].text == await text_of(client, model=model)
        async with vertex.messages.stream(**{**ASK, "model": model}) as stream:
            assert await stream.get_final_text() == message.content[0].text
        assert sim.calls[-1].path.endswith(":streamRawPredict") and sim.calls[-1].stream
        counted = await vertex.messages.count_tokens(model=model, messages=ASK["messages"])
        assert counted.input_tokens == message.usage.input_tokens
        sim.set_fault(model, Fault(status=529))
        with pytest.raises(anthropic.OverloadedError):
            await vertex.messages.create(**{**ASK, "model": model})
    finally:
        await vertex.close()
