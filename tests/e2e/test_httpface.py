"""The drop-in HTTP face, driven by the official anthropic SDK configured only with sidecard's address."""

import time

import anthropic
import httpx2
import pytest
import trio
from anthropic._base_client import get_platform

from sidecard.sim import Fault
from tests.harness import connect

PRIMARY, FALLBACK = "claude-sonnet-4-6", "claude-haiku-4-5-20251001"
ASK = [{"role": "user", "content": "Hello through the SDK"}]


def sync_client(d, **headers) -> anthropic.Anthropic:
    """The app's one-line switch: an HTTP transport bound to sidecard's Unix socket."""
    return anthropic.Anthropic(
        api_key="unused-sidecard-holds-the-key",
        base_url="http://sidecard",
        max_retries=0,
        default_headers=headers,
        http_client=httpx2.Client(transport=httpx2.HTTPTransport(uds=d.config.http.socket)),
    )


async def in_thread(fn):
    return await trio.to_thread.run_sync(fn)


async def test_sync_sdk_completes_with_sidecard_headers(daemon, sim):
    def call():
        with sync_client(daemon, **{"x-sidecard-feature": "sdk-app"}) as client:
            raw = client.messages.with_raw_response.create(model=PRIMARY, max_tokens=100, messages=ASK)
            return raw.headers, raw.parse()

    headers, message = await in_thread(call)
    assert message.content[0].text and message.usage.output_tokens > 0 and message.model == PRIMARY
    assert headers["x-sidecard-served-by"] == f"anthropic:{PRIMARY}"
    assert headers["x-sidecard-attempts"] == "1" and headers["x-sidecard-cached"] == "false"
    assert float(headers["x-sidecard-cost-usd"]) > 0 and headers["request-id"].startswith("req_")
    assert daemon.metrics.requests("ok", PRIMARY, "sdk-app").value == 1


async def test_sdk_streams_through_sidecard(daemon, sim):
    def call():
        with sync_client(daemon) as client:
            with client.messages.stream(model=PRIMARY, max_tokens=100, messages=ASK) as stream:
                text = "".join(stream.text_stream)
                return text, stream.get_final_message()

    text, final = await in_thread(call)
    assert text and text == final.content[0].text and final.stop_reason in ("end_turn", "max_tokens")


async def test_sdk_counts_tokens(daemon, sim):
    def call():
        with sync_client(daemon) as client:
            return client.messages.count_tokens(model=PRIMARY, messages=ASK)

    assert (await in_thread(call)).input_tokens > 0


async def test_fallback_and_sidecard_options_travel_as_headers(daemon_factory, sim):
    d = await daemon_factory(routes={"default": {"targets": [{"model": PRIMARY, "max_attempts": 1}, {"model": FALLBACK}]}})
    sim.set_fault(PRIMARY, Fault(status=529))

    def call():
        with sync_client(d, **{"x-sidecard-deadline-ms": "5000", "x-sidecard-cache": "bypass"}) as client:
            raw = client.messages.with_raw_response.create(model=PRIMARY, max_tokens=50, messages=ASK)
            return raw.headers

    headers = await in_thread(call)
    assert headers["x-sidecard-served-by"] == f"anthropic:{FALLBACK}" and headers["x-sidecard-fallback"] == "true"


async def test_typed_errors_and_no_retry_on_top_of_sidecards(daemon_factory, sim):
    d = await daemon_factory(routes={"default": {"targets": [{"model": PRIMARY, "max_attempts": 2}]}})
    sim.set_fault("*", Fault(status=529))

    def call():
        # max_retries=2 in the app's SDK: x-should-retry: false must stop it from retrying a sidecard 529
        client = anthropic.Anthropic(api_key="x", base_url="http://sidecard", max_retries=2,
                                     http_client=httpx2.Client(transport=httpx2.HTTPTransport(uds=d.config.http.socket)))
        with client:
            try:
                client.messages.create(model=PRIMARY, max_tokens=50, messages=ASK)
            except anthropic.APIStatusError as exc:
                return exc
        return None

    before = sim.stats_total()["requests"]
    err = await in_thread(call)
    assert isinstance(err, anthropic.APIStatusError) and err.status_code == 529
    assert err.response.headers["x-should-retry"] == "false"
    assert err.response.headers["x-sidecard-error-code"] == "upstream_unavailable"
    assert sim.stats_total()["requests"] - before == 2  # sidecard's own two attempts, and no SDK retries


async def test_max_tokens_no_model_takes_is_a_bad_request_before_the_upstream(daemon, sim):
    """Before, 10**15 went upstream (its 400) and a budget's worst case read $7.5e10. A timeout is given: for a
    non-streaming call without one, the SDK itself refuses a max_tokens this large."""
    def call():
        with sync_client(daemon) as client:
            with pytest.raises(anthropic.BadRequestError) as refused:
                client.messages.create(model=PRIMARY, max_tokens=10**15, messages=ASK, timeout=30)
        return refused.value

    err = await in_thread(call)
    assert err.status_code == 400 and err.response.headers["x-should-retry"] == "false"
    assert err.body["error"] == {"type": "invalid_request_error", "message": "max_tokens: expected int <= 1000000",
                                 "sidecard_code": "bad_request", "retryable": False}
    assert sim.stats_total()["requests"] == 0


async def test_bad_requests_map_to_the_sdks_error_types(daemon, sim):
    def call():
        with sync_client(daemon, **{"x-sidecard-feature": "has space"}) as client:
            with pytest.raises(anthropic.BadRequestError) as bad_header:
                client.messages.create(model=PRIMARY, max_tokens=50, messages=ASK)
        with sync_client(daemon, **{"x-sidecard-prompt": "no-such-prompt"}) as client:
            with pytest.raises(anthropic.NotFoundError):
                client.messages.create(model=PRIMARY, max_tokens=50, messages=ASK)
        return bad_header.value

    err = await in_thread(call)
    assert "x-sidecard-feature" in str(err)


async def test_a_bad_variable_value_in_the_vars_header_is_named(daemon, sim):
    def call():
        with sync_client(daemon, **{"x-sidecard-prompt": "support-reply", "x-sidecard-vars": '{"product": "x", "question": null}'}) as client:
            with pytest.raises(anthropic.BadRequestError) as bad:
                client.messages.create(model=PRIMARY, max_tokens=50, messages=[])
        return bad.value

    err = await in_thread(call)
    assert err.body["error"]["message"] == "header x-sidecard-vars: vars.question: expected bool | int | float | str, got null"
    assert not sim.calls


async def test_prompts_kill_switches_and_cache_apply(daemon, sim):
    def prompt_call():
        with sync_client(daemon, **{"x-sidecard-prompt": "support-reply", "x-sidecard-vars": '{"question": "Where is my invoice?"}',
                                    "x-sidecard-user": "u-1"}) as client:
            raw = client.messages.with_raw_response.create(model=PRIMARY, max_tokens=200, messages=[])
            return raw.headers

    headers = await in_thread(prompt_call)
    assert headers["x-sidecard-prompt"] == "support-reply" and headers["x-sidecard-prompt-version"] in ("1", "2")
    assert "Where is my invoice?" in str(sim.calls[-1].body["messages"])

    await (await connect(daemon)).complete("warm", temperature=0.0)
    from tests.harness import admin

    await admin(daemon, {"op": "kill", "scope": "global", "mode": "static", "text": "AI is paused"})

    def killed_call():
        with sync_client(daemon) as client:
            raw = client.messages.with_raw_response.create(model=PRIMARY, max_tokens=50, messages=ASK)
            return raw.headers, raw.parse()

    headers, message = await in_thread(killed_call)
    assert message.content[0].text == "AI is paused" and headers["x-sidecard-degraded"] == "true"


async def test_async_sdk_under_trio_on_a_loopback_port(daemon_factory, sim):
    d = await daemon_factory(http={"address": "127.0.0.1:0"})
    host, port = d.http_address
    client = anthropic.AsyncAnthropic(api_key="x", base_url=f"http://{host}:{port}", max_retries=0)
    try:
        message = await client.messages.create(model=PRIMARY, max_tokens=50, messages=ASK)
        stream = await client.messages.create(model=PRIMARY, max_tokens=50, messages=ASK, stream=True)
        kinds = [event.type async for event in stream]
        counted = await client.messages.count_tokens(model=PRIMARY, messages=ASK)
    finally:
        await client.close()
    assert message.content[0].text and counted.input_tokens > 0
    assert kinds[0] == "message_start" and kinds[-1] == "message_stop" and "content_block_delta" in kinds


def async_client(d, max_retries: int = 0, **headers) -> anthropic.AsyncAnthropic:
    """The async SDK on the Unix socket: httpx2's transport runs on anyio, so under Trio as under asyncio.

    Its platform is read here: the SDK would read it in a worker thread at the first request, and while the loop
    waits for that thread a `MockClock` with autojump skips to the next timer (15 s and more on a loaded machine),
    so a test timing that request saw time it never spent."""
    client = anthropic.AsyncAnthropic(
        api_key="unused", base_url="http://sidecard", max_retries=max_retries, default_headers=headers,
        http_client=httpx2.AsyncClient(transport=httpx2.AsyncHTTPTransport(uds=d.config.http.socket)),
    )
    client._platform = get_platform()
    return client


async def test_the_async_sdks_first_request_takes_no_mock_time(daemon_factory, sim, autojump_clock, monkeypatch):
    """Reading the platform as slowly as a loaded machine does (a real 50 ms) costs no virtual time."""
    slow = get_platform()
    monkeypatch.setattr(anthropic._base_client, "get_platform", lambda: time.sleep(0.05) or slow)
    d = await daemon_factory(routes={"default": {"targets": [{"model": PRIMARY}]}})
    async with async_client(d) as client:
        started = trio.current_time()
        await client.messages.create(model=PRIMARY, max_tokens=20, messages=ASK)
    assert trio.current_time() - started < 1


async def test_async_sdk_under_trio_on_the_unix_socket(daemon_factory, sim, autojump_clock):
    d = await daemon_factory(routes={"default": {"targets": [{"model": PRIMARY, "max_attempts": 2}]}})
    async with async_client(d, **{"x-sidecard-feature": "async-app"}) as client:
        raw = await client.messages.with_raw_response.create(model=PRIMARY, max_tokens=50, messages=ASK)
        message = await raw.parse()
        async with client.messages.stream(model=PRIMARY, max_tokens=50, messages=ASK) as stream:
            text = await stream.get_final_text()
        counted = await client.messages.count_tokens(model=PRIMARY, messages=ASK)
    assert message.content[0].text and raw.headers["x-sidecard-served-by"] == f"anthropic:{PRIMARY}"
    assert text == message.content[0].text  # the simulator answers a request the same way each time
    assert counted.input_tokens > 0
    assert d.metrics.requests("ok", PRIMARY, "async-app").value == 2

    sim.set_fault("*", Fault(status=529))
    before = sim.stats_total()["requests"]
    async with async_client(d, max_retries=2) as client:  # the SDK may retry, but x-should-retry: false stops it
        with pytest.raises(anthropic.APIStatusError) as failed:
            await client.messages.create(model=PRIMARY, max_tokens=50, messages=ASK)
        with pytest.raises(anthropic.NotFoundError) as missing:
            await client.messages.count_tokens(model=PRIMARY, messages=ASK, extra_headers={"x-sidecard-prompt": "nope"})
    assert failed.value.status_code == 529 and failed.value.response.headers["x-should-retry"] == "false"
    assert failed.value.body["error"]["sidecard_code"] == "upstream_unavailable"
    assert sim.stats_total()["requests"] - before == 2  # sidecard's two attempts, none from the SDK
    assert missing.value.response.headers["x-sidecard-error-code"] == "prompt_not_found"


async def test_a_count_that_met_a_529_is_retried_by_the_sdk(daemon_factory, sim, autojump_clock):
    """A count tries each target once and waits for none: on a one-model route a single 529 reached the app, with
    x-should-retry: false, so neither sidecard nor the SDK retried it."""
    d = await daemon_factory(routes={"default": {"targets": [{"model": PRIMARY}]}})
    sim.set_fault(PRIMARY, Fault(status=529, count=1))
    async with async_client(d, max_retries=2) as client:
        counted = await client.messages.count_tokens(model=PRIMARY, messages=ASK)
    assert counted.input_tokens > 0 and sim.stats_total()["count_tokens"] == 2


# ---------------------------------------------------------------------- what the face shares with the socket


async def test_a_deadline_header_that_expires_is_a_504_with_deadline_exceeded(daemon_factory, sim, autojump_clock):
    d = await daemon_factory(routes={"default": {"targets": [{"model": PRIMARY}]}})
    sim.set_fault("*", Fault(latency_ms=10_000))
    async with async_client(d, **{"x-sidecard-deadline-ms": "250"}) as client:
        started = trio.current_time()
        with pytest.raises(anthropic.InternalServerError) as expired:
            await client.messages.create(model=PRIMARY, max_tokens=50, messages=ASK)
    assert trio.current_time() - started == pytest.approx(0.25, abs=0.01)  # at the deadline, not the 10 s answer
    err = expired.value
    assert err.status_code == 504 and err.response.headers["x-sidecard-error-code"] == "deadline_exceeded"
    assert err.response.headers["x-should-retry"] == "false"
    assert err.body["error"] == {"type": "api_error", "message": err.body["error"]["message"], "sidecard_code": "deadline_exceeded",
                                 "retryable": True}


async def test_a_cache_hit_is_marked_in_headers_and_in_the_streams_last_delta(daemon, sim, autojump_clock):
    cold = {"temperature": 0}  # only answers at temperature 0 are cached by default
    async with async_client(daemon) as client:
        answers = [await client.messages.with_raw_response.create(model=PRIMARY, max_tokens=50, messages=ASK, extra_body=cold)
                   for _ in range(2)]
        contents = [(await raw.parse()).content for raw in answers]
        events = [event async for event in await client.messages.create(
            model=PRIMARY, max_tokens=50, messages=ASK, extra_body=cold, stream=True)]
    assert [raw.headers["x-sidecard-cached"] for raw in answers] == ["false", "true"]
    assert contents[1] == contents[0]
    delta = next(event for event in events if event.type == "message_delta")
    assert delta.model_extra["sidecard"]["cached"] == "true"
    assert sim.stats_total()["requests"] == 1  # one upstream call for three answers


async def test_an_exceeded_budget_is_a_429_the_sdk_does_not_retry(daemon_factory, sim, autojump_clock):
    d = await daemon_factory(budgets=[{"scope": "global", "window": "day", "hard_usd": 0.001}])
    async with async_client(d, max_retries=2) as client:
        await client.messages.create(model=PRIMARY, max_tokens=50, messages=ASK)  # spends past the budget
        calls = sim.stats_total()["requests"]
        with pytest.raises(anthropic.RateLimitError) as refused:
            await client.messages.create(model=PRIMARY, max_tokens=50, messages=ASK)
    headers = refused.value.response.headers
    assert refused.value.status_code == 429 and headers["x-sidecard-error-code"] == "budget_exceeded"
    assert headers["x-should-retry"] == "false" and int(headers["retry-after"]) > 0
    assert sim.stats_total()["requests"] == calls  # refused before any upstream call, and not retried


@pytest.mark.parametrize(
    ("field", "value", "hint"),
    [
        ("feature", "billing", "(x-sidecard-feature)"),
        ("deadline_ms", 5000, "(x-sidecard-deadline-ms)"),
        ("version", 2, "(x-sidecard-prompt-version)"),
        ("op", "ping", "not a Messages API field"),
        ("id", 7, "not a Messages API field"),
    ],
)
async def test_sidecard_options_in_the_body_are_refused_naming_the_header(daemon, sim, field, value, hint):
    """The body is the Messages API's: sidecard's options there would never reach the API, and an SDK user who
    put one in `extra_body` expects it to work or to be told, not to be silently reinterpreted."""
    async with async_client(daemon) as client:
        with pytest.raises(anthropic.BadRequestError) as refused:
            await client.messages.create(model=PRIMARY, max_tokens=50, messages=ASK, extra_body={field: value})
    assert f"body field {field!r} is not a Messages API field" in str(refused.value) and hint in str(refused.value)
    assert sim.stats_total()["requests"] == 0


async def test_unknown_body_fields_still_pass_through_to_the_api(daemon, sim):
    async with async_client(daemon) as client:
        await client.messages.create(model=PRIMARY, max_tokens=50, messages=ASK, extra_body={"top_k": 5, "service_tier": "auto"})
    assert sim.calls[-1].body["top_k"] == 5 and sim.calls[-1].body["service_tier"] == "auto"


async def test_a_broken_stream_is_an_error_to_the_sdk_never_a_short_answer(daemon, sim):
    sim.set_fault("*", Fault(reset_after_events=6))

    def call():
        with sync_client(daemon) as client:
            try:
                with client.messages.stream(model=PRIMARY, max_tokens=100, messages=ASK) as stream:
                    for _ in stream.text_stream:
                        pass
                    return stream.get_final_message()
            except anthropic.APIError as exc:
                return exc

    assert isinstance(await in_thread(call), anthropic.APIError)


def test_the_http_socket_opens_to_the_app_sockets_group_unless_set():
    from sidecard.config import from_mapping

    assert from_mapping({"server": {"socket_group": "sidecard-clients"}}).http.socket_group == "sidecard-clients"
    assert from_mapping({"server": {"socket_group": "apps"}, "http": {"socket_group": "sdk-apps"}}).http.socket_group == "sdk-apps"
    assert from_mapping({}).http.socket_group is None  # the daemon's own group, as for the app socket


def test_the_http_face_listens_on_loopback_only():
    from sidecard.config import ConfigError, from_mapping

    with pytest.raises(ConfigError, match="loopback only"):
        from_mapping({"http": {"address": "0.0.0.0:8788"}})
