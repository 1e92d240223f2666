"""The SDK drop-in, continued: what the official `anthropic` SDK sees of deadlines, failures, betas, named models and
streams when it talks to sidecard's HTTP face."""

import socket

import anthropic
import msgspec
import pytest
import trio
from prometheus_client import generate_latest

from sidecard.sim import Fault, replies
from tests.e2e.test_httpface import ASK, FALLBACK, PRIMARY, async_client
from tests.harness import connect, until_idle


async def test_requests_whose_deadline_passes_before_any_attempt_are_504_deadline_exceeded(daemon_factory, sim):
    """Real time, as on the socket: concurrent SDK calls with 1-5 ms deadlines. Before the fix some were a 500."""
    d = await daemon_factory()
    sim.set_fault("*", Fault(hang=True))
    statuses: list[tuple[int, str]] = []
    async with async_client(d) as client:

        async def one(i: int) -> None:
            try:
                await client.messages.create(model=PRIMARY, max_tokens=50, messages=ASK,
                                             extra_headers={"x-sidecard-deadline-ms": str(1 + i % 5), "x-sidecard-cache": "bypass"})
            except anthropic.APIStatusError as exc:
                statuses.append((exc.status_code, exc.response.headers["x-sidecard-error-code"]))

        async with trio.open_nursery() as nursery:
            for i in range(40):
                nursery.start_soon(one, i)
    assert set(statuses) == {(504, "deadline_exceeded")} and len(statuses) == 40


@pytest.mark.parametrize(
    ("status", "exception", "code"),
    [
        (401, anthropic.AuthenticationError, "upstream_auth"),
        (403, anthropic.PermissionDeniedError, "upstream_forbidden"),
        (404, anthropic.NotFoundError, "model_not_found"),
    ],
)
async def test_a_refusal_every_target_gives_is_its_own_error_not_an_overload(daemon_factory, sim, autojump_clock, status, exception, code):
    """A bad key, a key without access, an unknown model: no retry can cure them, and the app must be told which.
    Before the fix every one of them was a 529 `overloaded_error` (and `retryable: true` on the socket)."""
    d = await daemon_factory(routes={"default": {"targets": [{"model": PRIMARY}, {"model": FALLBACK}]}})
    sim.set_fault("*", Fault(status=status))
    async with async_client(d, max_retries=2) as client:
        for _ in range(2):  # the second time the breaker may be open: the answer is the same
            with pytest.raises(exception) as refused:
                await client.messages.create(model=PRIMARY, max_tokens=50, messages=ASK)
            err = refused.value
            assert err.status_code == status and err.response.headers["x-sidecard-error-code"] == code
            assert err.response.headers["x-should-retry"] == "false" and err.body["error"]["retryable"] is False
    reply = await (await connect(d)).complete("on the socket")
    assert reply["error"]["code"] == code and reply["error"]["retryable"] is False


async def test_every_target_rate_limited_is_a_429_with_retry_after(daemon_factory, sim, autojump_clock):
    d = await daemon_factory(routes={"default": {"targets": [{"model": PRIMARY, "max_attempts": 1}, {"model": FALLBACK, "max_attempts": 1}]}})
    sim.set_fault("*", Fault(status=429, retry_after_s=7))
    async with async_client(d) as client:
        with pytest.raises(anthropic.RateLimitError) as limited:
            await client.messages.create(model=PRIMARY, max_tokens=50, messages=ASK)
    headers = limited.value.response.headers
    assert headers["x-sidecard-error-code"] == "rate_limited" and headers["retry-after"] == "7"
    assert limited.value.body["error"]["type"] == "rate_limit_error" and limited.value.body["error"]["retryable"] is True
    reply = await (await connect(d)).complete("on the socket")
    assert reply["error"]["code"] == "rate_limited" and reply["error"]["retryable"] and reply["error"]["retry_after_ms"] > 0


async def test_a_refusal_from_one_target_and_an_outage_at_the_other_stays_retryable(daemon_factory, sim, autojump_clock):
    d = await daemon_factory(routes={"default": {"targets": [{"model": PRIMARY}, {"model": FALLBACK, "max_attempts": 1}]}})
    sim.set_fault(PRIMARY, Fault(status=404))
    sim.set_fault(FALLBACK, Fault(status=529))
    reply = await (await connect(d)).complete("half refused, half down")
    assert reply["error"]["code"] == "upstream_unavailable" and reply["error"]["retryable"]


OPUS = "claude-opus-4-6"


async def test_a_named_model_is_a_preference_unless_the_request_or_route_wants_it_alone(daemon_factory, sim, autojump_clock):
    """The SDK always names a model, so by default a failing named model falls back, and the reply says who answered;
    `x-sidecard-model-fallback: false` (or the route's `model_fallback = false`) keeps the named model alone. Before the
    fix there was no such control: `claude-opus-4-6` failing always gave a 200 from Sonnet."""
    d = await daemon_factory(routes={"default": {"targets": [{"model": PRIMARY}, {"model": FALLBACK}]},
                                     "exact": {"model_fallback": False, "targets": [{"model": PRIMARY}, {"model": FALLBACK}]}})
    sim.set_fault(OPUS, Fault(status=529, should_retry=False))
    async with async_client(d) as client:
        raw = await client.messages.with_raw_response.create(model=OPUS, max_tokens=50, messages=ASK)
        assert (await raw.parse()).model == PRIMARY
        assert raw.headers["x-sidecard-fallback"] == "true" and raw.headers["x-sidecard-served-by"] == f"anthropic:{PRIMARY}"
        for headers in ({"x-sidecard-model-fallback": "false"}, {"x-sidecard-route": "exact"}):
            calls = sim.stats_total()["requests"]
            with pytest.raises(anthropic.APIStatusError) as alone:
                await client.messages.create(model=OPUS, max_tokens=50, messages=ASK, extra_headers=headers)
            assert alone.value.status_code == 529 and sim.stats_total()["requests"] - calls == 1  # Opus alone, once
        both = {"x-sidecard-route": "exact", "x-sidecard-model-fallback": "true"}  # the request's word beats the route's
        message = await client.messages.create(model=OPUS, max_tokens=50, messages=ASK, extra_headers=both)
        assert message.model == PRIMARY
    reply = await (await connect(d)).complete("on the socket", model=OPUS, model_fallback=False)
    assert reply["error"]["code"] == "upstream_unavailable"


BETA = "context-management-2025-06-27"
CLOUDS = {"bedrock": {"provider": "bedrock", "model": "anthropic.claude-sonnet-4-6-v1:0", "region": "us-east-1"},
          "vertex": {"provider": "vertex", "model": "claude-sonnet-4-6@20250929", "region": "us-east5", "project_id": "p"}}


async def test_anthropic_beta_reaches_the_upstream_on_every_path(daemon_factory, sim, autojump_clock):
    """`client.beta.messages.create(betas=...)` and a plain `anthropic-beta` header; the fast path, streams, the SDK
    path (Vertex keeps the header, Bedrock's SDK moves it into the body) and count_tokens. Before the fix none of
    them carried it, so beta features were silently off."""
    d = await daemon_factory(routes={"default": {"targets": [{"model": PRIMARY}]},
                                     **{name: {"targets": [target]} for name, target in CLOUDS.items()}})
    async with async_client(d) as client:
        await client.beta.messages.create(model=PRIMARY, max_tokens=50, messages=ASK, betas=[BETA, "extra-beta-1"])
        assert sim.calls[-1].headers["anthropic-beta"] == f"{BETA},extra-beta-1"
        async with client.messages.stream(model=PRIMARY, max_tokens=50, messages=ASK, extra_headers={"anthropic-beta": BETA}) as stream:
            await stream.get_final_message()
        assert sim.calls[-1].stream and sim.calls[-1].headers["anthropic-beta"] == BETA
        await client.messages.create(model=PRIMARY, max_tokens=50, messages=ASK,
                                     extra_headers={"anthropic-beta": BETA, "x-sidecard-route": "vertex"})
        assert sim.calls[-1].headers["anthropic-beta"] == BETA
        await client.messages.create(model=PRIMARY, max_tokens=50, messages=ASK,
                                     extra_headers={"anthropic-beta": BETA, "x-sidecard-route": "bedrock"})
        assert sim.calls[-1].body["anthropic_beta"] == [BETA]
        await client.beta.messages.count_tokens(model=PRIMARY, messages=ASK, betas=[BETA])
        assert BETA in sim.count_tokens_calls[-1].headers["anthropic-beta"].split(",")  # beside the SDK's own
        with pytest.raises(anthropic.BadRequestError, match="anthropic-beta"):
            await client.messages.create(model=PRIMARY, max_tokens=50, messages=ASK, extra_headers={"anthropic-beta": "no spaces"})


async def test_an_answer_with_a_beta_is_never_the_cached_answer_without_it(daemon, sim, autojump_clock):
    cold = {"temperature": 0}
    async with async_client(daemon) as client:
        plain = await client.messages.with_raw_response.create(model=PRIMARY, max_tokens=50, messages=ASK, extra_body=cold)
        beta = await client.messages.with_raw_response.create(model=PRIMARY, max_tokens=50, messages=ASK, extra_body=cold,
                                                              extra_headers={"anthropic-beta": BETA})
    assert plain.headers["x-sidecard-cached"] == beta.headers["x-sidecard-cached"] == "false"
    assert sim.stats_total()["requests"] == 2
    reply = await (await connect(daemon)).complete("Hello", betas=[BETA], temperature=0)  # the socket's field
    assert reply["ok"] and sim.calls[-1].headers["anthropic-beta"] == BETA


LONG = [{"role": "user", "content": "[[sim:say:" + " ".join(f"word{i}" for i in range(60)) + "]]"}]  # 20 text deltas


async def test_the_sdks_stated_timeout_is_the_deadline(daemon_factory, sim, autojump_clock):
    """The SDK says its timeout (600 s by default) in x-stainless-timeout. Before the fix a 90 s answer was cut at
    sidecard's own 60 s default."""
    d = await daemon_factory(routes={"default": {"targets": [{"model": PRIMARY, "timeout_s": 300}]}})
    sim.set_fault("*", Fault(latency_ms=90_000))
    async with async_client(d) as client:
        started = trio.current_time()
        message = await client.messages.create(model=PRIMARY, max_tokens=50, messages=ASK)
    assert message.content[0].text and trio.current_time() - started == pytest.approx(90, abs=1)


async def test_a_stated_timeout_that_passes_is_a_typed_504_the_sdk_gets_before_its_own_timeout(daemon_factory, sim, autojump_clock):
    """sidecard's deadline was exactly the SDK's timeout, so the two raced and the app got the SDK's bare
    `APITimeoutError` (which it retries when `max_retries` > 0) instead of the typed 504 that says not to retry. And a
    timeout set on the client (`Anthropic(timeout=2)`, `with_options`) comes as `x-stainless-read-timeout` only
    (`x-stainless-timeout: NOT_GIVEN`): sidecard took its own 60 s default and answered long after the app gave up."""
    d = await daemon_factory(routes={"default": {"targets": [{"model": PRIMARY}]}})
    sim.set_fault("*", Fault(hang=True))
    async with async_client(d) as client:
        on_the_client = client.with_options(timeout=2.0)
        calls = [
            lambda: on_the_client.messages.create(model=PRIMARY, max_tokens=50, messages=ASK),
            lambda: on_the_client.messages.create(model=PRIMARY, max_tokens=50, messages=ASK, stream=True),
            lambda: on_the_client.messages.count_tokens(model=PRIMARY, messages=ASK),
            lambda: client.messages.create(model=PRIMARY, max_tokens=50, messages=ASK, timeout=2.0),
        ]
        for call in calls:
            started = trio.current_time()
            with pytest.raises(anthropic.APIStatusError) as late:
                await call()
            assert late.value.status_code == 504 and late.value.response.headers["x-sidecard-error-code"] == "deadline_exceeded"
            assert trio.current_time() - started == pytest.approx(1.9, abs=0.01)


async def test_a_streams_deadline_is_for_its_first_token_then_events_keep_it_alive(daemon_factory, sim, autojump_clock):
    """A 5 s deadline and an answer that streams for about 25 s: the first token is in time, and the stream lives on
    while events keep coming. Before the fix it was cut at 5 s with an error event."""
    d = await daemon_factory(routes={"default": {"targets": [{"model": PRIMARY}]}})
    sim.set_fault("*", Fault(event_interval_ms=1000))
    async with async_client(d, **{"x-sidecard-deadline-ms": "5000"}) as client:
        started = trio.current_time()
        async with client.messages.stream(model=PRIMARY, max_tokens=200, messages=LONG) as stream:
            text = await stream.get_final_text()
    assert text.split() == [f"word{i}" for i in range(60)] and trio.current_time() - started > 20

    sim.set_fault("*", Fault(latency_ms=10_000))  # no first token within the deadline: a plain 504, nothing streamed
    async with async_client(d, **{"x-sidecard-deadline-ms": "2000"}) as client:
        with pytest.raises(anthropic.APIStatusError) as late:
            async with client.messages.stream(model=PRIMARY, max_tokens=200, messages=LONG) as stream:
                await stream.get_final_text()
    assert late.value.status_code == 504 and late.value.response.headers["x-sidecard-error-code"] == "deadline_exceeded"


async def test_no_stream_runs_past_stream_max_duration_s(daemon_factory, sim, autojump_clock):
    d = await daemon_factory(routes={"default": {"targets": [{"model": PRIMARY}]}}, requests={"stream_max_duration_s": 10})
    sim.set_fault("*", Fault(event_interval_ms=1000))
    async with async_client(d) as client:
        started = trio.current_time()
        with pytest.raises(anthropic.APIStatusError) as cut:
            async with client.messages.stream(model=PRIMARY, max_tokens=200, messages=LONG) as stream:
                await stream.get_final_text()
    assert trio.current_time() - started == pytest.approx(10, abs=0.5)
    assert "stream_max_duration_s" in str(cut.value)


async def test_a_stream_carries_request_id_pings_and_typed_error_events(daemon_factory, sim, capture_log, autojump_clock):
    """Before the fix a streamed reply had no `request-id` header, dropped the upstream's `ping` events, and ended a
    failure with an `error` event that always said `api_error` and carried no sidecard code."""
    d = await daemon_factory(routes={"default": {"targets": [{"model": PRIMARY}]}})
    async with async_client(d) as client:
        # The SDK's own iterator skips pings: read the events as they come over the wire.
        async with client.messages.with_streaming_response.create(model=PRIMARY, max_tokens=50, messages=ASK, stream=True) as raw:
            kinds = [line.removeprefix("event: ") async for line in raw.iter_lines() if line.startswith("event: ")]
            request_id = raw.headers["request-id"]
        assert request_id == capture_log.events("request")[-1]["upstream_request_id"]
        assert kinds[:2] == ["message_start", "content_block_start"] and "ping" in kinds and kinds[-1] == "message_stop"

        sim.set_fault("*", Fault(error_after_events=6, status=529))
        with pytest.raises(anthropic.APIStatusError) as failed:
            async with client.messages.stream(model=PRIMARY, max_tokens=50, messages=ASK) as stream:
                await stream.get_final_text()
    error = failed.value.body["error"]
    assert error["type"] == "overloaded_error" and error["sidecard_code"] == "overloaded" and error["retryable"] is True


async def test_a_json_answer_to_a_stream_request_is_malformed_not_a_connection_failure(daemon_factory, sim, capture_log, autojump_clock):
    d = await daemon_factory(routes={"default": {"targets": [{"model": PRIMARY, "max_attempts": 1}, {"model": FALLBACK}]}})
    sim.set_fault(PRIMARY, Fault(not_streamed=True))
    async with async_client(d) as client:
        async with client.messages.stream(model=PRIMARY, max_tokens=50, messages=ASK) as stream:
            assert (await stream.get_final_message()).model == FALLBACK
    attempts = capture_log.events("request")[-1]["attempts"]
    assert [(a["model"], a["outcome"]) for a in attempts] == [(PRIMARY, "malformed"), (FALLBACK, "ok")]


async def test_every_target_failed_names_the_last_call_made_not_a_target_skipped_for_its_breaker(daemon_factory, sim, capture_log, autojump_clock):
    """The fallback's breaker is open (it failed alone on another route); the primary answers 500. The 529 names the
    primary's 500, the decisive cause; before the fix it named the fallback's `breaker_open`. So do the request's
    log line and its count in sidecard_requests_total (a fresh-clone trial: they blamed the skipped fallback)."""
    d = await daemon_factory(
        routes={"default": {"targets": [{"model": PRIMARY, "max_attempts": 1}, {"model": FALLBACK, "max_attempts": 1}]},
                "cheap": {"targets": [{"model": FALLBACK, "max_attempts": 1}]}},
        breaker={"consecutive_failures": 1, "cooldown_s": 600},
    )
    sim.set_fault(FALLBACK, Fault(status=500))
    assert (await (await connect(d)).complete("opens the fallback's breaker", route="cheap"))["ok"] is False
    sim.set_fault(PRIMARY, Fault(status=500))
    async with async_client(d, max_retries=0) as client:
        with pytest.raises(anthropic.APIStatusError) as failed:
            await client.messages.create(model=PRIMARY, max_tokens=50, messages=ASK)
    assert failed.value.status_code == 529
    message = failed.value.body["error"]["message"]
    assert f"last: anthropic:{PRIMARY} 500" in message and f"circuit breaker open: anthropic:{FALLBACK}" in message
    assert capture_log.events("request")[-1]["model"] == PRIMARY
    assert f'sidecard_requests_total{{feature="default",model="{PRIMARY}",outcome="upstream_unavailable"}}' in generate_latest(d.metrics.registry).decode()


async def test_the_sdks_models_list_and_retrieve_name_the_models_sidecard_routes_to(daemon_factory, sim):
    """`client.models.list()` pages through the routes' models (the default route's first, each once) and
    `retrieve()` finds one; a model no route calls is a `NotFoundError`. Before the fix both were a 404."""
    d = await daemon_factory(routes={"default": {"targets": [{"model": PRIMARY}, {"model": FALLBACK}]},
                                     "deep": {"targets": [{"model": "claude-opus-4-1-20250805"}, {"model": PRIMARY}]}})
    routed = d.engine.models()
    assert routed[:3] == [PRIMARY, FALLBACK, "claude-opus-4-1-20250805"] and len(set(routed)) == len(routed)
    async with async_client(d) as client:
        first = await client.models.list(limit=2)
        assert [m.id for m in first.data] == routed[:2] and first.has_more
        assert (first.first_id, first.last_id) == (PRIMARY, FALLBACK)
        assert [m.id async for m in await client.models.list(limit=2)] == routed  # the SDK follows has_more
        haiku = await client.models.retrieve(FALLBACK)
        assert (haiku.type, haiku.display_name, haiku.created_at.isoformat()) == ("model", "Claude Haiku 4.5", "2025-10-01T00:00:00+00:00")
        assert (await client.models.retrieve(PRIMARY)).display_name == "Claude Sonnet 4.6"
        with pytest.raises(anthropic.NotFoundError):
            await client.models.retrieve("claude-nobody-routes-to")
        with pytest.raises(anthropic.BadRequestError):
            await client.models.list(limit=0)


async def test_a_stall_mid_stream_is_a_typed_error_before_the_sdks_read_timeout(daemon_factory, sim, autojump_clock):
    """The SDK's timeout on a stream is a read timeout, the longest silence it accepts. sidecard's stall limit was a
    fixed 30 s, so with `timeout=20` a stall after the first tokens reached the app as the SDK's bare timeout (found
    trying the product from a fresh clone); now sidecard's stall limit is 95% of it, and its error comes first."""
    d = await daemon_factory(routes={"default": {"targets": [{"model": PRIMARY}]}})
    sim.set_fault("*", Fault(stall_after_events=4))
    async with async_client(d) as client:
        started = trio.current_time()
        with pytest.raises(anthropic.APIStatusError) as stalled:
            async with client.with_options(timeout=20.0).messages.stream(model=PRIMARY, max_tokens=200, messages=LONG) as stream:
                await stream.get_final_text()
    assert trio.current_time() - started == pytest.approx(19, abs=0.1)
    error = stalled.value.body["error"]
    assert error["sidecard_code"] == "upstream_timeout" and "stalled for 19 s" in error["message"], error


async def test_a_stream_resumed_after_a_stall_gives_the_sdk_a_ping_first(daemon_factory, sim, autojump_clock):
    """A stall found at 95% of the SDK's read timeout leaves the next target 5% of it to send a token: a `ping` as
    the resume begins starts the SDK's timeout again."""
    targets = [{"model": PRIMARY}, {"model": FALLBACK}]
    d = await daemon_factory(routes={"default": {"targets": targets, "resume": True}})
    sim.set_fault(PRIMARY, Fault(stall_after_events=4))
    sim.set_fault(FALLBACK, Fault(latency_ms=5_000))  # longer than 5% of 20 s before its first event
    async with async_client(d) as client:
        async with client.with_options(timeout=20.0).messages.stream(model=PRIMARY, max_tokens=200, messages=LONG) as stream:
            message = await stream.get_final_message()
    assert message.stop_reason == "end_turn" and message.content[0].text.startswith("word0")  # resumed, no timeout
    assert sim.calls[-1].model == FALLBACK


async def test_a_client_leaving_a_stream_is_a_cancelled_request_not_an_internal_error(daemon_factory, sim, capture_log, autojump_clock):
    """The Node SDK's abort mid-stream was logged `internal_error` and counted as outcome `internal`, which the
    error-rate alert reads (a fourth fresh-clone trial); on the socket, a client leaving is `cancelled`."""
    d = await daemon_factory(routes={"default": {"targets": [{"model": PRIMARY}]}})
    sim.set_fault("*", Fault(event_interval_ms=1000))
    body = b'{"model":"%s","max_tokens":200,"stream":true,"messages":[{"role":"user","content":"long"}]}' % PRIMARY.encode()
    stream = await trio.open_unix_socket(d.config.http.socket)
    await stream.send_all(b"POST /v1/messages HTTP/1.1\r\nhost: s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%b"
                          % (len(body), body))
    received = b""
    while b"content_block_delta" not in received:
        received += await stream.receive_some(65536)
    await stream.aclose()  # the app gives up mid-answer
    with trio.fail_after(30):
        while not capture_log.events("request"):
            await trio.sleep(0.5)
    assert [e["outcome"] for e in capture_log.events("request")] == ["cancelled"]
    assert not capture_log.events("internal_error")


async def test_a_client_that_leaves_before_the_answer_stops_the_request_and_its_upstream_call(daemon_factory, sim, capture_log, autojump_clock):
    """An SDK's timeout or abort closes its connection; the daemon kept the upstream call (and its spend) going to
    the end, and an SDK retrying on its timeout ran three at once. Streams stopped only at their next write."""
    d = await daemon_factory(routes={"default": {"targets": [{"model": PRIMARY}]}})
    for fault, stream in ((Fault(hang=True), b"false"), (Fault(stall_after_events=6), b"true")):
        sim.set_fault("*", fault)
        body = b'{"model":"%s","max_tokens":200,"stream":%s,"messages":[{"role":"user","content":"hang"}]}' % (PRIMARY.encode(), stream)
        client = await trio.open_unix_socket(d.config.http.socket)
        await client.send_all(b"POST /v1/messages HTTP/1.1\r\nhost: s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%b"
                              % (len(body), body))
        with trio.fail_after(5):
            while not sim.stats_total()["in_flight"]:
                await trio.sleep(0.01)
        await client.aclose()  # the app gives up
        with trio.fail_after(2):  # (not the 30 s stall timeout, nor the request's deadline)
            await until_idle(d, sim, step=0.1)
    assert [e["outcome"] for e in capture_log.events("request")] == ["cancelled", "cancelled"]


async def test_a_client_that_stops_reading_a_stream_is_cut_off_and_gives_its_target_slot_back(
    daemon_factory, sim, capture_log, autojump_clock
):
    """A client that never read its stream held the request, its upstream call and its target's concurrency slot until
    the stream's hour was up: 300 such connections to http.sock held every slot of the default route's primary, and
    every other app's request waited and failed 529 (third fresh-clone trial). It is cut off after
    `server.client_write_timeout_s` without taking a byte, as on the app socket."""
    d = await daemon_factory(server={"client_write_timeout_s": 2}, routes={"default": {"targets": [{"model": PRIMARY}]}})
    body = b'{"model":"%s","max_tokens":3000,"stream":true,"messages":[{"role":"user","content":"[[sim:long]]"}]}' % PRIMARY.encode()
    stalled = await trio.open_unix_socket(d.config.http.socket)
    stalled.socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    await stalled.send_all(b"POST /v1/messages HTTP/1.1\r\nhost: s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%b"
                           % (len(body), body))
    with trio.fail_after(30):  # (before: never, but at stream_max_duration_s)
        while not capture_log.events("request"):
            await trio.sleep(0.5)
    assert [e["outcome"] for e in capture_log.events("request")] == ["cancelled"]
    assert [(e["reason"], e["face"]) for e in capture_log.events("client_disconnected")] == [("slow_reader", "http")]
    assert d.metrics.clients_cut("slow_reader").value == 1
    assert d.engine.in_flight == 0 and not capture_log.events("internal_error")
    with trio.fail_after(5):  # the connection is closed: what was sent before the cut, then the end
        while await stalled.receive_some(65536):
            pass
    async with async_client(d) as client:  # and the target serves the next request
        assert (await client.messages.create(model=PRIMARY, max_tokens=5, messages=ASK)).content


LEAVING = b'{"model":"%s","max_tokens":50,"messages":[{"role":"user","content":"leaving"}]}' % PRIMARY.encode()


async def test_requests_the_drain_stops_get_a_503_shutting_down_not_a_dropped_connection(daemon_factory, sim, capture_log, autojump_clock):
    """Requests still running when `server.drain_grace_s` ends: a plain call and a stream not begun get the 503
    `shutting_down` with `x-should-retry: true` (the SDK retries against the replacement daemon), a stream under way
    an `error` event; an app that left during the drain stays `cancelled`. Before the fix the daemon dropped the
    connections (`APIConnectionError: Server disconnected without sending a response`) and logged `cancelled`, as if
    the apps had left."""
    d = await daemon_factory(server={"drain_grace_s": 3}, routes={"default": {"targets": [{"model": PRIMARY}, {"model": FALLBACK}]}})
    sim.set_fault(PRIMARY, Fault(latency_ms=10_000))
    sim.set_fault(FALLBACK, Fault(event_interval_ms=1000))  # a stream of 20 s, begun at once
    failures: dict[str, anthropic.APIStatusError] = {}
    streaming = trio.Event()
    async with async_client(d) as client:

        async def plain() -> None:
            with pytest.raises(anthropic.APIStatusError) as failed:
                await client.messages.create(model=PRIMARY, max_tokens=50, messages=ASK)
            failures["plain"] = failed.value

        async def stream(model: str) -> None:
            with pytest.raises(anthropic.APIStatusError) as failed:
                async with client.messages.stream(model=model, max_tokens=200, messages=LONG) as events:
                    async for _ in events:
                        streaming.set()
            failures[model] = failed.value

        async with trio.open_nursery() as nursery:
            nursery.start_soon(plain)
            nursery.start_soon(stream, PRIMARY)
            nursery.start_soon(stream, FALLBACK)
            leaving = await trio.open_unix_socket(d.config.http.socket)  # an app that gives up during the drain
            await leaving.send_all(b"POST /v1/messages HTTP/1.1\r\nhost: s\r\ncontent-length: %d\r\n\r\n%b" % (len(LEAVING), LEAVING))
            await sim.wait_for_calls(4)
            await streaming.wait()
            d.shutdown()
            await trio.sleep(1)
            await leaving.aclose()
    for name in ("plain", PRIMARY):
        refused = failures[name]
        assert isinstance(refused, anthropic.InternalServerError) and refused.status_code == 503, name
        headers = refused.response.headers
        assert (headers["x-sidecard-error-code"], headers["x-should-retry"], headers["retry-after"]) == ("shutting_down", "true", "1")
        assert refused.body["error"] == {"type": "api_error", "message": "the daemon stopped before the answer",
                                         "sidecard_code": "shutting_down", "retryable": True}
    cut = failures[FALLBACK]
    assert cut.response.status_code == 200 and cut.body["error"]["sidecard_code"] == "shutting_down", cut.body
    assert sorted(e["outcome"] for e in capture_log.events("request")) == ["cancelled", *["shutting_down"] * 3]
    # Each names its request, as every other reply to a request sidecard began does (the 503s had no id).
    stopped = {e["request_id"] for e in capture_log.events("request") if e["outcome"] == "shutting_down"}
    assert {failures[name].response.headers.get("x-sidecard-request-id") for name in ("plain", PRIMARY, FALLBACK)} == stopped
    assert not capture_log.events("internal_error")



_BODY = b'{"model":"%s","max_tokens":20,"messages":[{"role":"user","content":"hi"}]}' % PRIMARY.encode()


async def raw_post(d, headers: bytes) -> bytes:
    """POST /v1/messages with HEADERS as written (copies, case and encoding kept: what an SDK would not send), on
    a connection of its own; the whole response."""
    stream = await trio.open_unix_socket(d.config.http.socket)
    await stream.send_all(b"POST /v1/messages HTTP/1.1\r\nhost: s\r\ncontent-type: application/json\r\n%b"
                          b"connection: close\r\ncontent-length: %d\r\n\r\n%b" % (headers, len(_BODY), _BODY))
    received = b""
    while data := await stream.receive_some(65536):
        received += data
    return received


async def test_a_header_value_node_sends_in_latin_1_is_read_as_the_same_text(daemon_factory, sim, capture_log, autojump_clock):
    """Node's fetch (the TS SDK) sends "José" as Latin-1 bytes, which sidecard refused as "cannot read" on every
    request of that user (a fresh-clone trial); Python's SDK sends UTF-8. Both are the same user, and JSON vars."""
    d = await daemon_factory(routes={"default": {"targets": [{"model": PRIMARY}]}})
    for user in ("Jos\u00e9".encode("latin-1"), "Jos\u00e9".encode("utf-8")):
        received = await raw_post(d, b"x-sidecard-user: %b\r\n" % user)
        assert received.startswith(b"HTTP/1.1 200 "), received[:300]
    users = {e["user"] for e in capture_log.events("request")}
    assert len(users) == 1, users


async def test_a_sidecard_header_given_twice_is_a_400_naming_it(daemon_factory, sim, autojump_clock):
    """Two x-sidecard-deadline-ms lines (a proxy's, a hand-built request's) took the last in silence (a fresh-clone
    trial): which was meant is unknown, so the request is refused, naming the header, before any call upstream. The
    API's own headers that may repeat (anthropic-beta) still may."""
    d = await daemon_factory(routes={"default": {"targets": [{"model": PRIMARY}]}})
    twice = await raw_post(d, b"x-sidecard-deadline-ms: 5000\r\nX-Sidecard-Deadline-Ms: 60000\r\n")
    assert twice.startswith(b"HTTP/1.1 400 "), twice[:300]
    error = msgspec.json.decode(twice.partition(b"\r\n\r\n")[2])["error"]
    assert error["type"] == "invalid_request_error" and error["sidecard_code"] == "bad_request"
    assert error["message"] == "header x-sidecard-deadline-ms: given more than once: send it once", error
    assert not sim.calls
    betas = await raw_post(d, b"anthropic-beta: a-beta\r\nanthropic-beta: another-beta\r\nx-sidecard-deadline-ms: 60000\r\n")
    assert betas.startswith(b"HTTP/1.1 200 "), betas[:300]


async def test_a_traceparent_bad_or_given_twice_is_not_refused(daemon_factory, sim, capture_log, autojump_clock):
    """docs/http.md said a bad value of any header in its table, `traceparent` included, or one sent twice, was a
    400: a traceparent is never refused (one that cannot be read is ignored, tracing.md), whatever the copies. Two
    copies are invalid, as the W3C Trace Context spec says (the last one counted before): the request starts a trace
    of its own, so its log line names neither copy's trace (tracing is off here: it names none)."""
    d = await daemon_factory(routes={"default": {"targets": [{"model": PRIMARY}]}})
    app = b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    other = b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    for headers in (b"traceparent: %b\r\n" % app, b"traceparent: not-a-trace\r\n",
                    b"traceparent: %b\r\nTraceparent: %b\r\n" % (app, app), b"traceparent: %b\r\ntraceparent: %b\r\n" % (app, other),
                    b"traceparent: %b\r\ntraceparent: %b\r\ntraceparent: %b\r\n" % (app, app, other)):
        received = await raw_post(d, headers)
        assert received.startswith(b"HTTP/1.1 200 "), received[:300]
    named = [line.get("trace_id") for line in capture_log.events("request")]
    assert named == ["4bf92f3577b34da6a3ce929d0e0e4736", None, None, None, None], named


def corrupt_the_primarys_streams(monkeypatch, at: int, event: dict) -> None:
    """The simulator's streams from PRIMARY get EVENT, which parses but is not the API's shape, before their event AT
    (1: before the first token; 4: after it, which follows message_start, content_block_start and a ping)."""
    made = replies.stream_events
    monkeypatch.setattr(replies, "stream_events", lambda message_id, model, *rest: (
        (lambda events: events[:at] + [event] + events[at:] if model == PRIMARY else events)(made(message_id, model, *rest))))


@pytest.mark.parametrize("event", [
    {"type": "content_block_delta", "index": 0, "delta": "oops"},
    {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": 5}},
    {"type": "content_block_delta", "index": 3, "delta": {"type": "text_delta", "text": "no block 3"}},
    {"type": "content_block_start", "index": 100_000, "content_block": {"type": "text", "text": ""}},
    {"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": [1]},
], ids=["delta-not-an-object", "text-not-text", "delta-to-no-block", "block-index-far-on", "usage-not-an-object"])
async def test_an_event_not_in_the_apis_shape_breaks_the_stream_as_malformed(daemon_factory, sim, capture_log, autojump_clock,
                                                                             monkeypatch, event):
    """An upstream (or a proxy before it) that sends an event which parses but has a field of another type: sidecard
    ended the stream with `internal` (a bug in sidecard, not retryable; an AttributeError in its log), or passed the
    event on for the SDK to fail on (a delta for a block never started), or padded the answer with 100,000 empty
    blocks for one index far on (a billion for a corrupted digit, in the event loop). It is the upstream's
    malformed stream: `upstream_error`, retryable, counted as `stream_broken:malformed` (a trial with the SDKs)."""
    corrupt_the_primarys_streams(monkeypatch, 4, event)
    d = await daemon_factory(routes={"default": {"targets": [{"model": PRIMARY}]}})
    async with async_client(d) as client:
        with pytest.raises(anthropic.APIStatusError) as failed:
            async with client.messages.stream(model=PRIMARY, max_tokens=50, messages=ASK) as stream:
                await stream.get_final_text()
    error = failed.value.body["error"]
    assert (error["sidecard_code"], error["retryable"]) == ("upstream_error", True) and "does not parse" in error["message"]
    assert capture_log.events("request")[-1]["attempts"][0]["outcome"] == "stream_broken:malformed"
    assert not capture_log.events("internal_error")


async def test_an_event_not_in_the_apis_shape_before_the_first_token_fails_over(daemon_factory, sim, capture_log, autojump_clock,
                                                                                monkeypatch):
    """Before the first token such a stream is a malformed attempt, retried and failed over like any other; it was
    logged as an error, `target_unusable` (as if the target's settings were wrong), and the target not retried."""
    corrupt_the_primarys_streams(monkeypatch, 1, {"type": "content_block_start", "index": 0, "content_block": "text"})
    d = await daemon_factory(routes={"default": {"targets": [{"model": PRIMARY, "max_attempts": 1}, {"model": FALLBACK}]}})
    async with async_client(d) as client:
        async with client.messages.stream(model=PRIMARY, max_tokens=50, messages=ASK) as stream:
            assert (await stream.get_final_message()).model == FALLBACK
    attempts = capture_log.events("request")[-1]["attempts"]
    assert [(a["model"], a["outcome"]) for a in attempts] == [(PRIMARY, "malformed"), (FALLBACK, "ok")]
    assert not capture_log.events("internal_error") and not capture_log.events("target_unusable")
