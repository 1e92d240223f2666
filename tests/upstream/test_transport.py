"""TrioTransport under httpx2 and the real anthropic SDK, against the h11 server in conftest.py."""

from __future__ import annotations

import json

import anthropic
import h11
import httpx2
import pytest
import trio

from sidecard.upstream.client import ANTHROPIC_VERSION
from sidecard.upstream.transport import TrioTransport

IDLE = {"open": 0, "idle": 0, "waiting": 0}
MESSAGES = [{"role": "user", "content": "hi"}]
MESSAGE = {
    "id": "msg_1", "type": "message", "role": "assistant", "model": "claude-test",
    "content": [{"type": "text", "text": "hello"}], "stop_reason": "end_turn", "stop_sequence": None,
    "usage": {"input_tokens": 3, "output_tokens": 1},
}


@pytest.fixture
async def client(server, pool):
    client = anthropic.AsyncAnthropic(
        api_key="test-key",
        base_url=server.url,
        max_retries=0,
        open_telemetry=False,
        http_client=httpx2.AsyncClient(transport=TrioTransport(pool)),
    )
    yield client
    await client.close()  # under Trio, never leave it to the SDK's __del__ (it assumes asyncio)


def sse(*events: tuple[str, dict]) -> list[bytes]:
    return [f"event: {name}\ndata: {json.dumps(data)}\n\n".encode() for name, data in events]


STREAM = sse(
    ("message_start", {"type": "message_start", "message": {
        "id": "msg_1", "type": "message", "role": "assistant", "model": "claude-test", "content": [],
        "stop_reason": None, "stop_sequence": None, "usage": {"input_tokens": 3, "output_tokens": 0}}}),
    ("content_block_start", {"type": "content_block_start", "index": 0,
                             "content_block": {"type": "text", "text": ""}}),
    ("content_block_delta", {"type": "content_block_delta", "index": 0,
                             "delta": {"type": "text_delta", "text": "hel"}}),
    ("content_block_delta", {"type": "content_block_delta", "index": 0,
                             "delta": {"type": "text_delta", "text": "lo"}}),
    ("content_block_stop", {"type": "content_block_stop", "index": 0}),
    ("message_delta", {"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                       "usage": {"output_tokens": 2}}),
    ("message_stop", {"type": "message_stop"}),
)


async def _stream(x) -> None:
    await x.send(h11.Response(status_code=200, headers=[(b"content-type", b"text/event-stream")]))
    for event in STREAM:
        await trio.sleep(0.1)
        await x.send(h11.Data(data=event))
    await x.send(h11.EndOfMessage())


async def test_httpx2_client(server, pool, autojump_clock):
    async with httpx2.AsyncClient(transport=TrioTransport(pool), base_url=server.url) as http:
        response = await http.post("/json?q=1", json={"a": 1})
        assert response.status_code == 200
        assert response.json() == {"ok": True, "path": "/json?q=1"}
        assert response.http_version == "HTTP/1.1"
        seen = server.exchanges[-1]
        assert (seen.method, seen.body) == (b"POST", b'{"a":1}')
        assert seen.headers[b"host"] == f"127.0.0.1:{server.port}".encode()
        assert seen.headers[b"content-type"] == b"application/json"

        async with http.stream("GET", "/chunked") as response:
            assert [chunk async for chunk in response.aiter_raw()] == [b"part0;", b"part1;", b"part2;"]

        with pytest.raises(httpx2.ReadTimeout):
            await http.get("/hang", timeout=httpx2.Timeout(None, read=2))
        assert pool.stats == IDLE
    # Closing the client closed the transport, not the shared pool.
    response = await pool.request(server.origin, b"GET", b"/json", [], b"")
    assert (response.status, server.accepted) == (200, 2)
    await response.aclose()


async def test_streamed_response_closed_early(server, pool, autojump_clock):
    http = httpx2.AsyncClient(transport=TrioTransport(pool), base_url=server.url)
    async with http, http.stream("GET", "/sse") as response:
        async for chunk in response.aiter_raw():
            assert chunk == b"data: 0\n\n"
            break
    assert pool.stats == IDLE  # the rest of the body never came: the connection was closed


async def test_sdk_create(client, server, pool):
    message = await client.messages.create(model="claude-test", max_tokens=10, messages=MESSAGES)
    assert message.content[0].text == "hello"
    seen = server.exchanges[-1]
    assert (seen.method, seen.path) == (b"POST", b"/v1/messages")
    assert seen.headers[b"authorization"] == b"Bearer test-key"
    assert json.loads(seen.body)["model"] == "claude-test"
    await client.messages.create(model="claude-test", max_tokens=10, messages=MESSAGES)
    assert server.accepted == 1
    assert pool.stats == {"open": 1, "idle": 1, "waiting": 0}


async def test_sdk_raw_response(client, server):
    async def handler(x) -> None:
        await x.json({**MESSAGE, "id": "msg_raw"}, headers=[(b"request-id", b"req_1")])

    server.handlers[b"/v1/messages"] = handler
    raw = await client.messages.with_raw_response.create(model="claude-test", max_tokens=10, messages=MESSAGES)
    assert raw.status_code == 200
    assert raw.headers["request-id"] == "req_1"
    assert (await raw.parse()).id == "msg_raw"


async def test_sdk_streaming(client, server, pool, autojump_clock):
    server.handlers[b"/v1/messages"] = _stream
    stream = await client.messages.create(model="claude-test", max_tokens=10, messages=MESSAGES, stream=True)
    received = []
    async for event in stream:
        received.append((trio.current_time(), event.type))
    assert [t for _, t in received] == [
        "message_start", "content_block_start", "content_block_delta", "content_block_delta",
        "content_block_stop", "message_delta", "message_stop",
    ]
    times = [t for t, _ in received]
    assert times == sorted(times) and times[-1] - times[0] == pytest.approx(0.6)  # as they arrived
    assert pool.stats == {"open": 1, "idle": 1, "waiting": 0}


async def test_sdk_status_error(client, server):
    async def handler(x) -> None:
        error = {"type": "error", "error": {"type": "rate_limit_error", "message": "slow down"}}
        await x.json(error, status=429, headers=[(b"retry-after", b"7")])

    server.handlers[b"/v1/messages"] = handler
    with pytest.raises(anthropic.RateLimitError) as caught:
        await client.messages.create(model="claude-test", max_tokens=10, messages=MESSAGES)
    assert caught.value.status_code == 429
    assert caught.value.response.headers["retry-after"] == "7"


async def test_sdk_transport_errors(client, server, pool, autojump_clock):
    server.handlers[b"/v1/messages"] = server.handlers[b"/hang"]
    with pytest.raises(anthropic.APITimeoutError):
        await client.messages.create(model="claude-test", max_tokens=10, messages=MESSAGES, timeout=3)
    server.handlers[b"/v1/messages"] = server.handlers[b"/reset"]
    with pytest.raises(anthropic.APIConnectionError) as caught:
        await client.messages.create(model="claude-test", max_tokens=10, messages=MESSAGES)
    assert isinstance(caught.value.__cause__, httpx2.ReadError)
    assert pool.stats == IDLE


async def test_sdk_bedrock(server, pool):
    client = anthropic.AsyncAnthropicBedrock(
        api_key="x",
        aws_region="us-east-1",
        base_url=server.url,
        max_retries=0,
        open_telemetry=False,
        http_client=httpx2.AsyncClient(transport=TrioTransport(pool)),
    )
    try:
        message = await client.messages.create(model="claude-test", max_tokens=10, messages=MESSAGES)
    finally:
        await client.close()
    assert message.content[0].text == "hello"
    assert server.exchanges[-1].path == b"/model/claude-test/invoke"


async def test_unsupported_scheme(pool):
    async with httpx2.AsyncClient(transport=TrioTransport(pool)) as http:
        with pytest.raises(httpx2.UnsupportedProtocol):
            await http.get("ftp://example.com/")


async def test_the_fast_path_speaks_the_api_version_the_sdk_sends(client, server):
    # The fast path does not import the SDK to ask: its own constant must match what the installed SDK sends.
    await client.messages.create(model="claude-test", max_tokens=10, messages=MESSAGES)
    assert server.exchanges[-1].headers[b"anthropic-version"] == ANTHROPIC_VERSION.encode()
