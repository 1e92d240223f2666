"""Edges where a request could keep what it took: a half-open breaker's probe cancelled while queued, two
hedged streams opening in the same instant, and a malformed content block met while estimating tokens."""

import trio

from sidecard.engine.stream import StreamLeg
from sidecard.policies.breaker import State
from sidecard.sim import Fault
from tests.e2e.test_api import stream
from tests.harness import connect

PRIMARY, FALLBACK = "claude-sonnet-4-6", "claude-haiku-4-5-20251001"


async def test_a_probe_cancelled_in_the_queue_gives_the_half_open_breaker_its_probe_back(daemon_factory, sim, autojump_clock):
    d = await daemon_factory(
        routes={"default": {"targets": [{"model": PRIMARY, "timeout_s": 5, "max_attempts": 1}]}},
        breaker={"consecutive_failures": 1, "cooldown_s": 1},
        retry={"max_retry_after_ms": 60_000},  # the probe queues for the provider's 20 s rather than be told to come back
    )
    client = await connect(d)
    sim.set_fault(PRIMARY, Fault(status=500, count=1))
    assert (await client.complete("opens the breaker", cache="bypass"))["ok"] is False
    await trio.sleep(2)  # half-open from here
    sim.set_fault(PRIMARY, Fault(status=429, retry_after_s=20, count=1))
    assert (await client.complete("a probe that pauses the queue", cache="bypass"))["ok"] is False
    leaving = await connect(d)
    await leaving.send({"op": "complete", "messages": [{"role": "user", "content": "queued probe"}], "cache": "bypass",
                        "deadline_ms": 60000})
    await trio.sleep(1)  # the next probe waits out the pause in the queue...
    assert d.traffic.queue(d.control.state.routes.get("default").targets[0]).queued == 1
    await leaving.aclose()  # ...until its client goes away
    await trio.sleep(30)
    breaker, _ = d.engine.walker.breaker(d.control.state.routes.get("default").targets[0])
    assert breaker.state is State.HALF_OPEN and breaker.allow(trio.current_time())[0]
    breaker.release()
    assert (await client.complete("served again", cache="bypass"))["ok"]


async def test_hedged_streams_opening_in_the_same_instant_release_both_slots_and_charge_both(
    daemon_factory, sim, autojump_clock, monkeypatch
):
    d = await daemon_factory(routes={"default": {"targets": [
        {"model": PRIMARY, "timeout_s": 10, "hedge_after_ms": 100}, {"model": FALLBACK, "timeout_s": 10}]}})
    real, opened, both = StreamLeg.call, [], trio.Event()

    async def in_one_instant(leg, plan, target, body, timeout):
        result = await real(leg, plan, target, body, timeout)
        opened.append(result)
        if len(opened) == 2:
            both.set()  # the first is woken with its result: the second's win can no longer cancel it
        else:
            await both.wait()
        return result

    monkeypatch.setattr(StreamLeg, "call", in_one_instant)
    sim.set_fault(PRIMARY, Fault(latency_ms=300, count=1))
    _, final = await stream(await connect(d), "race", cache="bypass")
    assert final["event"] == "done" and len(opened) == 2
    assert final["usage"]["input_tokens"] == 2  # the provider billed the stream that lost as well
    for target in d.control.state.routes.get("default").targets:
        assert d.traffic.queue(target).stats()["in_flight"] == 0


async def test_malformed_content_blocks_reach_the_api_instead_of_an_internal_error(daemon, sim):
    client = await connect(daemon)
    for content in (
        [{"type": "document", "source": "not an object"}],
        [{"type": "tool_result", "tool_use_id": "t1", "content": 5}],
        [{"type": "document", "source": {"type": "content", "content": 7}}],
    ):
        reply = await client.call({"op": "complete", "messages": [{"role": "user", "content": content}], "cache": "bypass"})
        assert reply["ok"] or reply["error"]["code"] != "internal", reply
