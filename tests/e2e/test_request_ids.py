"""Every reply to a request the engine began names it, failures too: sidecard's id (`x-sidecard-request-id`, the
frame's `request_id`) and, when an upstream answered, the provider's (`request-id`, `upstream_request_id`), the
same two its log line has. So an app ties a failed call to its log line, and quotes the provider's id in a ticket.
The real daemon over its sockets, the official SDK on the HTTP face, the simulated upstream with faults."""

import anthropic
import pytest

from sidecard.sim import Fault
from tests.e2e.test_httpface import async_client
from tests.harness import admin, connect, stream_frame

PRIMARY, FALLBACK = "claude-sonnet-4-6", "claude-haiku-4-5-20251001"
ASK = [{"role": "user", "content": "Which request was this?"}]
ONE_TARGET = {"default": {"targets": [{"model": PRIMARY, "max_attempts": 1}]}}


def logged(capture_log) -> dict:
    """The last request's log line."""
    return capture_log.events("request")[-1]


# ---------------------------------------------------------------------- the HTTP face, through the official SDK


async def test_an_upstream_refusal_gives_the_sdk_the_providers_request_id(daemon_factory, sim, capture_log, autojump_clock):
    d = await daemon_factory(routes=ONE_TARGET)
    sim.set_fault("*", Fault(status=400))
    async with async_client(d) as client:
        with pytest.raises(anthropic.BadRequestError) as refused:
            await client.messages.create(model=PRIMARY, max_tokens=50, messages=ASK)
    err, line = refused.value, logged(capture_log)
    assert line["outcome"] == "invalid_request" and line["upstream_request_id"].startswith("req_sim_")
    assert err.request_id == line["upstream_request_id"]  # the SDK's own attribute, from `request-id`
    assert err.response.headers["x-sidecard-request-id"] == line["request_id"]
    assert err.body["request_id"] == line["upstream_request_id"]  # where the API's own error body has it


async def test_an_outage_names_the_last_answer_the_provider_gave(daemon_factory, sim, capture_log, autojump_clock):
    d = await daemon_factory(routes={"default": {"targets": [{"model": PRIMARY, "max_attempts": 1}, {"model": FALLBACK}]}})
    sim.set_fault("*", Fault(status=529))
    async with async_client(d) as client:
        with pytest.raises(anthropic.APIStatusError) as failed:
            await client.messages.create(model=PRIMARY, max_tokens=50, messages=ASK)
    err, line = failed.value, logged(capture_log)
    assert err.status_code == 529 and err.response.headers["x-sidecard-error-code"] == "upstream_unavailable"
    assert err.request_id == line["upstream_request_id"] and err.request_id.startswith("req_sim_")
    assert err.response.headers["x-sidecard-request-id"] == line["request_id"]


async def test_sidecards_own_deadline_names_the_request_and_the_answer_before_it(daemon_factory, sim, capture_log, autojump_clock):
    """The primary answers 529, the fallback never answers: sidecard's 504 still names the provider's 529."""
    d = await daemon_factory(routes={"default": {"targets": [{"model": PRIMARY, "max_attempts": 1}, {"model": FALLBACK}]}})
    sim.set_fault(PRIMARY, Fault(status=529))
    sim.set_fault(FALLBACK, Fault(hang=True))
    async with async_client(d, **{"x-sidecard-deadline-ms": "2000"}) as client:
        with pytest.raises(anthropic.InternalServerError) as expired:
            await client.messages.create(model=PRIMARY, max_tokens=50, messages=ASK)
    err, line = expired.value, logged(capture_log)
    assert err.status_code == 504 and line["outcome"] == "deadline_exceeded"
    assert err.response.headers["x-sidecard-request-id"] == line["request_id"]
    assert err.request_id == line["upstream_request_id"] and err.request_id.startswith("req_sim_")


async def test_a_refusal_before_any_upstream_call_names_the_request_alone(daemon_factory, sim, capture_log, autojump_clock):
    d = await daemon_factory(budgets=[{"scope": "global", "window": "day", "hard_usd": 0.001}])
    async with async_client(d) as client:
        with pytest.raises(anthropic.RateLimitError) as refused:  # its worst case is over the budget
            await client.messages.create(model=PRIMARY, max_tokens=1000, messages=ASK)
    err, line = refused.value, logged(capture_log)
    assert line["outcome"] == "budget_exceeded" and "upstream_request_id" not in line
    assert err.response.headers["x-sidecard-request-id"] == line["request_id"]
    assert err.request_id is None and "request_id" not in err.body


async def test_a_stream_broken_after_its_start_names_the_providers_stream(daemon, sim, capture_log, autojump_clock):
    sim.set_fault("*", Fault(reset_after_events=6))
    async with async_client(daemon) as client:
        with pytest.raises(anthropic.APIStatusError) as broken:
            async with client.messages.stream(model=PRIMARY, max_tokens=100, messages=ASK) as stream:
                async for _ in stream.text_stream:
                    pass
    err, line = broken.value, logged(capture_log)
    assert line["outcome"] == "upstream_error" and line["upstream_request_id"].startswith("req_sim_")
    # The head named both before the first event; the `error` event names the provider's stream again.
    assert err.response.headers["x-sidecard-request-id"] == line["request_id"]
    assert err.request_id == err.body["request_id"] == line["upstream_request_id"]


async def test_count_tokens_names_the_request_and_the_providers_count(daemon_factory, sim, capture_log, autojump_clock):
    d = await daemon_factory(routes=ONE_TARGET)
    async with async_client(d) as client:
        raw = await client.messages.with_raw_response.count_tokens(model=PRIMARY, messages=ASK)
        line = logged(capture_log)
        sim.set_fault("*", Fault(status=400))
        with pytest.raises(anthropic.BadRequestError) as refused:
            await client.messages.count_tokens(model=PRIMARY, messages=ASK)
    assert (await raw.parse()).input_tokens > 0
    assert raw.headers["x-sidecard-request-id"] == line["request_id"]
    assert raw.headers["request-id"] == line["upstream_request_id"] and raw.headers["request-id"].startswith("req_sim_")
    err, line = refused.value, logged(capture_log)
    assert err.request_id == line["upstream_request_id"] and err.response.headers["x-sidecard-request-id"] == line["request_id"]


async def test_a_malformed_request_names_no_request(daemon, sim, autojump_clock):
    """Refused before the engine began a request: there is no id to give, and none is made up."""
    async with async_client(daemon) as client:
        with pytest.raises(anthropic.BadRequestError) as refused:
            await client.messages.create(model=PRIMARY, max_tokens=50, messages=ASK, extra_body={"deadline_ms": 5})
    assert "x-sidecard-request-id" not in refused.value.response.headers and refused.value.request_id is None


# ---------------------------------------------------------------------- the app socket


async def test_an_error_frame_names_the_request_and_the_providers_answer(daemon_factory, sim, capture_log, autojump_clock):
    d = await daemon_factory(routes=ONE_TARGET)
    sim.set_fault("*", Fault(status=429, should_retry=False, retry_after_s=30))
    reply = await (await connect(d)).complete("rate-limited")
    line = logged(capture_log)
    assert not reply["ok"] and reply["error"]["code"] == "rate_limited"
    assert reply["request_id"] == line["request_id"]
    assert reply["upstream_request_id"] == line["upstream_request_id"] and reply["upstream_request_id"].startswith("req_sim_")


async def test_an_error_frame_without_an_upstream_answer_names_the_request_alone(daemon, sim, capture_log, autojump_clock):
    """Refused in the request's first step (no upstream call), answered in the turn the frame was read."""
    reply = await (await connect(daemon)).call({"op": "complete", "id": 4, "prompt": "no-such-prompt", "vars": {}})
    line = logged(capture_log)
    assert reply["error"]["code"] == "prompt_not_found" and reply["request_id"] == line["request_id"]
    assert "upstream_request_id" not in reply


async def test_a_frame_refused_before_a_request_began_has_no_request_id(daemon, sim, autojump_clock):
    client = await connect(daemon)
    await client.send_raw(b'{"op": "complete", "id": 5, "messages": [}\n')
    reply = await client.reply(5)
    assert reply == {"id": 5, "error": reply["error"], "ok": False} and reply["error"]["code"] == "bad_frame"


async def test_a_partial_stream_names_the_providers_stream(daemon, sim, capture_log, autojump_clock):
    sim.set_fault("*", Fault(reset_after_events=6))
    events, last = await stream_frame(await connect(daemon), {"op": "complete", "messages": ASK})
    line = logged(capture_log)
    assert last["partial"] and last["request_id"] == events[0]["request_id"] == line["request_id"]
    assert last["upstream_request_id"] == events[0]["upstream_request_id"] == line["upstream_request_id"]


async def test_count_tokens_frames_name_the_request_and_the_providers_count(daemon_factory, sim, capture_log, autojump_clock):
    d = await daemon_factory(routes=ONE_TARGET)
    client = await connect(d)
    counted = await client.call({"op": "count_tokens", "messages": ASK})
    line = logged(capture_log)
    assert counted["ok"] and counted["request_id"] == line["request_id"]
    assert counted["upstream_request_id"] == line["upstream_request_id"] and counted["upstream_request_id"].startswith("req_sim_")
    sim.set_fault("*", Fault(status=400))
    refused = await client.call({"op": "count_tokens", "messages": ASK})
    line = logged(capture_log)
    assert refused["error"]["code"] == "invalid_request" and refused["request_id"] == line["request_id"]
    assert refused["upstream_request_id"] == line["upstream_request_id"]


async def test_requests_that_share_one_failed_call_each_name_their_own(daemon_factory, sim, capture_log, autojump_clock):
    """Identical requests in flight share the leader's upstream call and its error: each reply still names its own
    request, not the leader's."""
    d = await daemon_factory(routes=ONE_TARGET)
    sim.set_fault("*", Fault(status=400, latency_ms=100))
    client = await connect(d)
    frame = {"op": "complete", "messages": ASK, "temperature": 0}  # cacheable, so coalesced
    ids = [await client.send(frame) for _ in range(3)]
    replies = [await client.reply(i) for i in ids]
    assert [r["error"]["code"] for r in replies] == ["invalid_request"] * 3
    assert sorted(r["request_id"] for r in replies) == sorted(line["request_id"] for line in capture_log.events("request"))
    assert len({r["request_id"] for r in replies}) == 3


async def test_a_refused_submit_names_the_request_it_refused(daemon_factory, sim, capture_log, autojump_clock):
    d = await daemon_factory(options={"jobs_store_in_thread": False}, jobs={"enabled": True})
    assert (await admin(d, {"op": "kill", "scope": "feature:reports"}))["ok"]
    reply = await (await connect(d)).call({"op": "submit", "messages": ASK, "by": "2h", "feature": "reports"})
    line = logged(capture_log)
    assert reply["error"]["code"] == "ai_disabled" and reply["request_id"] == line["request_id"]
