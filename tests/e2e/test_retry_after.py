"""A provider's long retry-after, as the official SDK sees it on the HTTP face (its default 600 s timeout: a 570 s
deadline). Before the fix a plain call sat out the primary's `retry-after: 5` twice (10 s) before the fallback
answered, a stream 15 s; with every model asking for 30 s the SDK got its RateLimitError after about two minutes."""

import anthropic
import pytest
import trio

from sidecard.sim import Fault
from tests.e2e.test_httpface import ASK, FALLBACK, PRIMARY, async_client
from tests.harness import connect

ROUTES = {"default": {"targets": [{"model": PRIMARY}, {"model": FALLBACK}]}}


async def ask(client: anthropic.AsyncAnthropic, stream: bool, **headers: str) -> anthropic.types.Message:
    if not stream:
        return await client.messages.create(model=PRIMARY, max_tokens=50, messages=ASK, extra_headers=headers)
    async with client.messages.stream(model=PRIMARY, max_tokens=50, messages=ASK, extra_headers=headers) as events:
        return await events.get_final_message()


@pytest.mark.parametrize("stream", [False, True])
async def test_a_long_retry_after_on_the_primary_is_answered_by_the_fallback_at_once(daemon_factory, sim, autojump_clock, stream):
    d = await daemon_factory(routes=ROUTES)
    sim.set_fault(PRIMARY, Fault(status=429, retry_after_s=5))
    async with async_client(d) as client:
        started = trio.current_time()
        message = await ask(client, stream)
        assert message.model == FALLBACK and trio.current_time() - started < 0.1
        assert sim.calls_for(PRIMARY) == 1
        # The primary's retry-after holds it for the requests after: they go to the fallback without calling it.
        assert d.traffic.limits_status()["targets"][f"anthropic:{PRIMARY}"]["paused_for_s"] > 4
        message = await ask(client, stream)
        assert message.model == FALLBACK and trio.current_time() - started < 0.2
        assert sim.calls_for(PRIMARY) == 1


@pytest.mark.parametrize("stream", [False, True])
async def test_every_target_asking_for_a_long_wait_ends_at_once_with_rate_limited(daemon_factory, sim, autojump_clock, stream):
    d = await daemon_factory(routes=ROUTES)
    sim.set_fault("*", Fault(status=429, retry_after_s=30))
    async with async_client(d) as client:
        for calls in (2, 2):  # the second request finds both targets held: it calls neither
            started = trio.current_time()
            with pytest.raises(anthropic.RateLimitError) as limited:
                await ask(client, stream)
            assert trio.current_time() - started < 0.1 and sim.stats_total()["requests"] == calls
            err = limited.value
            assert err.response.headers["x-sidecard-error-code"] == "rate_limited"
            assert 29 <= int(err.response.headers["retry-after"]) <= 30
            # Retryable later, but not by the SDK on its own now: the app (or its job queue) decides when.
            assert err.response.headers["x-should-retry"] == "false" and err.body["error"]["retryable"] is True


async def test_a_model_asked_for_alone_waits_out_a_short_retry_after_but_not_a_long_one(daemon_factory, sim, autojump_clock):
    """`x-sidecard-model-fallback: false`: no other target to go to. A retry-after within `retry.max_retry_after_ms`
    (8 s) is waited out, once per retry; a longer one is the request's answer at once."""
    d = await daemon_factory(routes=ROUTES)
    sim.set_fault(PRIMARY, Fault(status=429, retry_after_s=5, count=1))
    alone = {"x-sidecard-model-fallback": "false"}
    async with async_client(d) as client:
        started = trio.current_time()
        message = await ask(client, False, **alone)
        assert message.model == PRIMARY and 5 <= trio.current_time() - started < 5.1
        sim.set_fault(PRIMARY, Fault(status=429, retry_after_s=30))
        started = trio.current_time()
        with pytest.raises(anthropic.RateLimitError) as limited:
            await ask(client, False, **alone)
        assert trio.current_time() - started < 0.1 and limited.value.response.headers["retry-after"] == "30"
    assert sim.calls_for(FALLBACK) == 0


async def test_on_the_socket_too(daemon_factory, sim, autojump_clock):
    """The second request finds the primary held (its 429 of 5 s) and draws the fallback's 429 of 30 s: it waits for
    the primary, which frees first and well within the deadline. Before, the walk never went back to an earlier
    target, and this test asserted `rate_limited` at once (with the primary's 5 s as retry_after_ms): an error where
    waiting would have answered."""
    d = await daemon_factory(routes=ROUTES)
    sim.set_fault(PRIMARY, Fault(status=429, retry_after_s=5, count=1))
    client = await connect(d)
    started = trio.current_time()
    reply = await client.complete("fallback, now", cache="bypass")
    assert reply["ok"] and reply["served_by"]["model"] == FALLBACK and trio.current_time() - started < 0.1
    sim.set_fault(FALLBACK, Fault(status=429, retry_after_s=30))
    reply = await client.complete("the primary is back first", cache="bypass")
    assert reply["ok"] and reply["served_by"]["model"] == PRIMARY and 4.9 <= trio.current_time() - started <= 5.1
    assert sim.calls_for(PRIMARY) == 2 and sim.calls_for(FALLBACK) == 2
    # Every target held past `retry.max_retry_after_ms` (8 s): told at once, with the sooner of the two waits.
    sim.set_fault(PRIMARY, Fault(status=429, retry_after_s=30))
    started = trio.current_time()
    reply = await client.complete("everyone waits", cache="bypass")
    assert reply["error"]["code"] == "rate_limited" and reply["error"]["retryable"] is True
    assert trio.current_time() - started < 0.1 and 24_000 <= reply["error"]["retry_after_ms"] <= 25_000  # the fallback's


WINDOWS = {**ROUTES, "fallback": {"targets": [{"model": FALLBACK}]}}


async def test_a_short_retry_after_is_waited_out_when_the_fallbacks_window_is_spent(daemon_factory, sim, autojump_clock):
    """The simulator counts each model in its own window, as the API does: the fallback's is spent (a request
    per minute), the primary's is not. Before, the primary's `retry-after: 5` sent the request to the fallback,
    held until its window's reset, and it ended `rate_limited` at once."""
    sim.set_limits(model=FALLBACK, requests_per_minute=1)
    d = await daemon_factory(routes=WINDOWS)
    client = await connect(d)
    assert (await client.complete("spends the fallback's minute", route="fallback", cache="bypass"))["ok"]
    sim.set_fault(PRIMARY, Fault(status=429, retry_after_s=5, count=1))
    started = trio.current_time()
    reply = await client.complete("worth the wait", cache="bypass")
    assert reply["ok"] and reply["served_by"]["model"] == PRIMARY and 4.9 <= trio.current_time() - started <= 5.1
    assert sim.calls_for(FALLBACK) == 1 and sim.stats_total()["throttled"] == 0  # never sent into its spent window


async def test_with_every_models_window_spent_the_request_waits_for_the_first_to_reset(daemon_factory, sim, autojump_clock):
    """The primary's window (5 s) resets long before the fallback's (a minute): the request waits for it instead of
    ending `rate_limited`, and draws no 429. Before, it ended `rate_limited` at once."""
    sim.set_limits(model=PRIMARY, requests_per_minute=1, window_s=5)
    sim.set_limits(model=FALLBACK, requests_per_minute=1)
    d = await daemon_factory(routes=WINDOWS)
    client = await connect(d)
    assert (await client.complete("spends the primary's window", cache="bypass"))["served_by"]["model"] == PRIMARY
    assert (await client.complete("spends the fallback's", route="fallback", cache="bypass"))["ok"]
    started = trio.current_time()
    reply = await client.complete("waits for the primary's reset", cache="bypass")
    waited = trio.current_time() - started
    assert reply["ok"] and reply["served_by"]["model"] == PRIMARY and 0 < waited <= 7, waited
    assert sim.calls_for(PRIMARY) == 2 and sim.calls_for(FALLBACK) == 1 and sim.stats_total()["throttled"] == 0
