"""The drain's last word reaches a request in a hedge race too (its nursery is cancelled as a group)."""

from __future__ import annotations

import anthropic
import trio

from sidecard.sim import Fault
from tests.e2e.test_httpface import ASK, FALLBACK, PRIMARY, async_client
from tests.harness import connect


HEDGED = {"default": {"targets": [{"model": PRIMARY, "hedge_after_ms": 1000, "timeout_s": 60},
                                  {"model": FALLBACK, "timeout_s": 60}]}}


async def test_a_hedged_request_the_drain_stops_gets_its_503_too(daemon_factory, sim, capture_log, autojump_clock):
    """A request in a hedge race (RouteWalker._hedged's nursery) is cancelled as a BaseExceptionGroup of Cancelled,
    which `except trio.Cancelled` in HttpFace.handle (and Engine._run) did not catch: there was no 503, the
    connection dropped, and the log said `internal`."""
    d = await daemon_factory(server={"drain_grace_s": 3}, routes=HEDGED)
    sim.set_fault("*", Fault(latency_ms=20_000))
    failures: list[BaseException] = []
    async with async_client(d) as client:

        async def plain() -> None:
            try:
                await client.messages.create(model=PRIMARY, max_tokens=50, messages=ASK)
            except anthropic.APIError as exc:
                failures.append(exc)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(plain)
            await sim.wait_for_calls(2)  # the primary and its hedge
            d.shutdown()
    assert [e["outcome"] for e in capture_log.events("request")] == ["shutting_down"]
    [refused] = failures
    assert isinstance(refused, anthropic.InternalServerError) and refused.status_code == 503, repr(refused)


async def test_a_hedged_request_the_drain_stops_gets_shutting_down_on_the_socket(daemon_factory, sim, capture_log, mock_clock):
    d = await daemon_factory(server={"drain_grace_s": 5}, routes=HEDGED)
    sim.set_fault("*", Fault(hang=True))
    client = await connect(d)
    request_id = await client.send({"op": "complete", "messages": [{"role": "user", "content": "forever"}]})
    await sim.wait_for_calls(1)
    mock_clock.jump(1.5)
    await sim.wait_for_calls(2)
    d.shutdown()
    await trio.testing.wait_all_tasks_blocked()
    mock_clock.jump(5)
    try:
        reply = await client.reply(request_id)
    except EOFError:  # the daemon closed the connection without the request's last frame
        reply = None
    assert [e["outcome"] for e in capture_log.events("request")] == ["shutting_down"]
    assert reply is not None and reply["error"]["code"] == "shutting_down", reply
