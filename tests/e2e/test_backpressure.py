"""Backpressure on the app socket: a client that writes without reading is held back, alone."""

import tempfile

import msgspec
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from sidecard.faces.ndjson import OUTBOX_FRAMES
from sidecard.sim import Fault, Simulator
from tests.harness import LogCapture, connect, make_config, new_daemon

FLOOD_BYTES = 4 << 20  # far more than the kernel's socket buffers (~200 KiB each way) can hold


async def test_a_client_that_writes_and_never_reads_is_held_back(daemon_factory, mock_clock):
    d = await daemon_factory(server={"client_write_timeout_s": 5})
    flood = await trio.open_unix_socket(d.socket_path)
    sent = 0

    async def write_without_reading() -> None:
        nonlocal sent
        chunk = b"x\n" * 32768  # each line costs the daemon one error frame
        try:
            while sent < FLOOD_BYTES:
                await flood.send_all(chunk)
                sent += len(chunk)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass

    async with trio.open_nursery() as nursery:
        nursery.start_soon(write_without_reading)
        await trio.testing.wait_all_tasks_blocked(cushion=0.2)  # the daemon stopped reading, the writer is stuck
        assert 0 < sent < FLOOD_BYTES
        (connection,) = d.server._connections
        # What the connection holds in memory: frames in its outbox, tasks in its nursery.
        frames = connection.outbox_send.statistics().current_buffer_used
        tasks = len(connection.nursery.child_tasks)
        assert frames <= OUTBOX_FRAMES and tasks <= 1  # the writer task, and no queued sends
        other = await connect(d)
        assert (await other.call({"op": "ping"}))["ok"]
        mock_clock.jump(6)  # past client_write_timeout_s: the stuck client is cut off
        await trio.testing.wait_all_tasks_blocked(cushion=0.05)
        assert d.server.connections == 1
        nursery.cancel_scope.cancel()
    await flood.aclose()
    assert d.metrics.clients_cut("slow_reader").value == 1
    assert (await other.call({"op": "ping"}))["ok"]


async def test_requests_over_the_in_flight_limit_get_overloaded(daemon_factory, sim, mock_clock):
    sim.set_fault("*", Fault(latency_ms=1000))
    d = await daemon_factory(server={"max_inflight_per_connection": 3})
    client = await connect(d)
    ids = [await client.send({"op": "complete", "messages": [{"role": "user", "content": f"q{i}"}]}) for i in range(4)]
    over = await client.reply(ids[3])
    assert over["error"]["code"] == "overloaded" and over["error"]["retryable"] is True
    assert (await client.call({"op": "ping"}))["ok"]  # the connection still reads and answers
    await sim.wait_for_calls(3)
    mock_clock.jump(1)
    for i in ids[:3]:
        assert (await client.reply(i))["ok"]


async def _garbage_then_ping(garbage: bytes) -> None:
    """One example in its own daemon: garbage on one connection, then a ping on a second one."""
    with tempfile.TemporaryDirectory(prefix="sc-", dir="/tmp") as tmp:
        async with trio.open_nursery() as nursery:
            d = await nursery.start(new_daemon(make_config(tmp), Simulator(seed=1), LogCapture()).run)
            bad = await trio.open_unix_socket(d.socket_path)
            await bad.send_all(garbage)
            await bad.send_eof()
            received = b""
            with trio.fail_after(5):
                while chunk := await bad.receive_some(65536):  # answered, then closed cleanly
                    received += chunk
            for line in received.splitlines():
                frame = msgspec.json.decode(line)
                assert frame["ok"] is True or set(frame["error"]) >= {"code", "message", "retryable"}
            good = await connect(d)
            assert (await good.call({"op": "ping"}))["ok"]
            d.shutdown()


LINES = st.binary(max_size=512) | st.sampled_from([b"\n", b"{", b"}\n", b"\xff\n", b"[1]\n", b'{"op":"ping"}\n'])


@settings(max_examples=12, derandomize=True, deadline=None)
@given(garbage=st.lists(LINES, max_size=40).map(b"".join))
def test_garbage_on_one_connection_never_reaches_another(garbage):
    trio.run(_garbage_then_ping, garbage)
