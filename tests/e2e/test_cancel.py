"""A `cancel` frame stops one request in flight (and its upstream call), on a connection that stays in use: what a
client sends when its caller gives up (a stream abandoned mid-answer, a timeout, an abort signal)."""

import trio

from sidecard.sim import Fault
from tests.harness import connect, until_idle

HANG = {"op": "complete", "model": "claude-slow", "messages": [{"role": "user", "content": "hang"}]}


async def test_cancel_stops_one_request_and_its_upstream_call(daemon, sim, capture_log):
    sim.set_fault("claude-slow", Fault(hang=True))
    client = await connect(daemon)
    hung = await client.send(HANG)
    await sim.wait_for_calls(1)
    await client.send({"op": "cancel", "id": hung})

    reply = await client.reply(hung)
    await until_idle(daemon, sim)
    line = capture_log.events("request")[-1]
    assert reply == {"id": hung, "ok": False, "error": {"code": "cancelled", "message": "cancelled by the client", "retryable": False},
                     "request_id": line["request_id"]}
    assert line["outcome"] == "cancelled"
    assert (await client.complete("the connection is still in use"))["ok"]


async def test_cancel_leaves_the_connections_other_requests_alone(daemon, sim):
    sim.set_fault("claude-slow", Fault(hang=True))
    client = await connect(daemon)
    first, second = await client.send(HANG), await client.send(HANG)
    await sim.wait_for_calls(2)
    await client.send({"op": "cancel", "id": first})
    assert (await client.reply(first))["error"]["code"] == "cancelled"
    with trio.fail_after(5):
        while sim.stats_total()["in_flight"] != 1:
            await trio.sleep(0)
    assert daemon.engine.in_flight == 1
    await client.send({"op": "cancel", "id": second})
    assert (await client.reply(second))["error"]["code"] == "cancelled"


async def test_a_stream_cancelled_mid_answer_ends_with_cancelled(daemon, sim, autojump_clock):
    sim.set_fault("*", Fault(event_interval_ms=1000))
    client = await connect(daemon)
    request_id = await client.send({"op": "complete", "stream": True, "messages": [{"role": "user", "content": "a long answer"}]})
    while (frame := await client.reply(request_id)).get("event") != "delta":
        if frame.get("event") == "start":
            start = frame
    await client.send({"op": "cancel", "id": request_id})
    while (frame := await client.reply(request_id)).get("event") is not None:
        pass  # (frames already on their way)
    assert frame["error"]["code"] == "cancelled" and "partial" not in frame
    # Named as its start frame named it (it had neither id).
    assert (frame["request_id"], frame["upstream_request_id"]) == (start["request_id"], start["upstream_request_id"])
    await until_idle(daemon, sim, step=0.5)


async def test_a_token_count_cancelled_names_its_request(daemon, sim, capture_log):
    sim.set_fault("*", Fault(hang=True))
    client = await connect(daemon)
    counting = await client.send({"op": "count_tokens", "messages": [{"role": "user", "content": "how long?"}]})
    with trio.fail_after(5):
        while not sim.count_tokens_calls:
            await trio.sleep(0.01)
        await client.send({"op": "cancel", "id": counting})
        reply = await client.reply(counting)
    assert reply["error"]["code"] == "cancelled" and reply["request_id"] == capture_log.events("request")[-1]["request_id"]


async def test_a_cancel_in_the_same_write_stops_the_request_before_any_upstream_call(daemon, sim):
    client = await connect(daemon)
    await client.send_raw(
        b'{"op":"complete","id":"c","messages":[{"role":"user","content":"never mind"}],"cache":"bypass"}\n'
        b'{"op":"cancel","id":"c"}\n'
    )
    assert (await client.reply("c"))["error"]["code"] == "cancelled"
    assert sim.stats_total()["requests"] == 0


async def test_cancelling_what_is_not_in_flight_says_nothing(daemon, sim):
    client = await connect(daemon)
    done = await client.complete("answered already")
    await client.send({"op": "cancel", "id": done["id"]})
    await client.send({"op": "cancel", "id": "never-sent"})
    pong = await client.call({"op": "ping"})
    assert pong["ok"] and pong["id"] not in (done["id"], "never-sent")  # the next frame: no reply to either cancel
