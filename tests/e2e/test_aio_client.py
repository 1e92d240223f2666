"""`sidecard_client.aio.AsyncClient` against the real daemon, on Trio (beside the daemon) and under asyncio.run."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from contextlib import aclosing

import anyio
import pytest
import trio

import sidecard_client as sc
from sidecard.sim import Fault
from sidecard_client.aio import AsyncClient
from tests.harness import until_idle

PRIMARY, FALLBACK = "claude-sonnet-4-6", "claude-haiku-4-5-20251001"


def ask(text):
    return [{"role": "user", "content": text}]


async def on_asyncio(fn, *args):
    """Run `fn(*args)` on a fresh asyncio loop in a worker thread (the test's own loop is Trio's)."""
    return await trio.to_thread.run_sync(lambda: asyncio.run(fn(*args)))


async def test_complete_returns_a_typed_result(daemon):
    async with AsyncClient(daemon.socket_path) as client:
        reply = await client.complete(ask("[[sim:say:hello async]]"), feature="clients", deadline_ms=5000)
        assert isinstance(reply, sc.Completion) and reply.text == "hello async"
        assert reply.usage.output_tokens > 0 and reply.served_by["model"] == PRIMARY and reply.request_id
        assert (await client.ping())["ok"] is True
        assert isinstance(await client.count_tokens(ask("count these words")), int)
        with pytest.raises(sc.BadRequest):  # (json.dumps would write NaN, which the daemon cannot read)
            await client.complete(ask("x"), temperature=float("nan"))
    assert sc.AsyncClient is AsyncClient


async def scenario(path: str) -> dict:
    """A little of everything, for one backend: pipelining from many tasks, a stream, typed errors."""
    out: dict = {}
    async with AsyncClient(path, timeout=10) as client:
        texts: dict[int, str] = {}

        async def one(i):
            texts[i] = (await client.complete(ask(f"[[sim:say:reply {i}]]"))).text

        async with anyio.create_task_group() as tg:
            for i in range(50):
                tg.start_soon(one, i)
        out["pipelined"] = texts == {i: f"reply {i}" for i in range(50)}
        out["one_connection"] = client._conn is not None and client._conn.stream is not None
        frames = [f async for f in client.stream(ask("stream this"))]
        out["events"] = [f.get("event") for f in frames]
        out["joined"] = "".join(f["text"] for f in frames if f.get("event") == "delta") == frames[-1]["text"]
        try:
            await client.complete(ask("x"), max_tokens=0)
        except sc.BadRequest as exc:
            out["error"] = (exc.code, exc.retryable)
    return out


@pytest.mark.parametrize("backend", ["trio", "asyncio"])
async def test_the_same_code_runs_on_trio_and_asyncio(daemon, backend):
    out = await (scenario(daemon.socket_path) if backend == "trio" else on_asyncio(scenario, daemon.socket_path))
    assert out["pipelined"] and out["one_connection"]
    assert out["events"][0] == "start" and out["events"][-1] == "done" and "delta" in out["events"]
    assert out["joined"]
    assert out["error"] == ("bad_request", False)


async def test_pipelined_replies_are_matched_by_id_whatever_their_order(daemon, sim):
    sim.set_fault(PRIMARY, Fault(latency_ms=150))
    order = []
    async with AsyncClient(daemon.socket_path) as client:

        async def call(model, text):
            reply = await client.complete(ask(f"[[sim:say:{text}]]"), model=model)
            order.append(text)
            assert reply.text == text and reply.served_by["model"] == model

        async with trio.open_nursery() as nursery:
            nursery.start_soon(call, PRIMARY, "slow")
            await trio.sleep(0)
            nursery.start_soon(call, FALLBACK, "fast")
    assert order == ["fast", "slow"]
    assert sim.calls_for(PRIMARY) == 1 and sim.calls_for(FALLBACK) == 1


async def test_a_broken_stream_raises_partial_answer_with_the_text_so_far(daemon, sim):
    sim.set_fault("*", Fault(reset_after_events=6))
    got = []
    async with AsyncClient(daemon.socket_path) as client:
        with pytest.raises(sc.PartialAnswer) as info:
            async for frame in client.stream(ask("break"), route="default"):
                got.append(frame)
        sim.clear_faults()
        assert (await client.ping())["ok"]  # the connection is still fine
    assert info.value.text and info.value.text == "".join(f.get("text", "") for f in got if f.get("event") == "delta")
    assert info.value.code == "upstream_error" and info.value.retryable


async def test_leaving_a_stream_early_stops_its_answer_and_keeps_the_connection_usable(daemon, sim, capture_log):
    sim.set_fault(PRIMARY, Fault(stall_after_events=6))  # (the answer would go on until the stall timeout)
    async with AsyncClient(daemon.socket_path) as client:
        async with aclosing(client.stream(ask("[[sim:long]]"))) as frames:
            async for frame in frames:
                if frame.get("event") == "delta":
                    break
        await until_idle(daemon, sim)  # the client's `cancel` stopped it, upstream call included
        assert capture_log.events("request")[-1]["outcome"] == "cancelled"
        reply = await client.complete(ask("[[sim:say:after]]"), model=FALLBACK)
        assert reply.text == "after"
        assert not client._conn.pending


async def test_timeout_and_cancellation_stop_the_request_and_leave_the_connection_usable(daemon, sim, capture_log):
    sim.set_fault(PRIMARY, Fault(hang=True))
    async with AsyncClient(daemon.socket_path) as client:
        with pytest.raises(sc.Timeout) as info:
            await client.complete(ask("hang"), model=PRIMARY, timeout=0.2)
        assert info.value.retryable
        with trio.move_on_after(0.1) as scope:
            await client.complete(ask("hang again"), model=PRIMARY)
        assert scope.cancelled_caught
        conn = client._conn
        await until_idle(daemon, sim)  # both calls given up on were cancelled in the daemon too
        assert [e["outcome"] for e in capture_log.events("request")] == ["cancelled", "cancelled"]
        assert (await client.complete(ask("[[sim:say:fine]]"), model=FALLBACK)).text == "fine"
        assert client._conn is conn and not conn.pending


async def test_errors_are_typed(daemon, sim):
    async with AsyncClient(daemon.socket_path) as client:
        with pytest.raises(sc.BadRequest) as info:
            await client.complete(prompt="no-such-prompt")
        assert info.value.code == "prompt_not_found"
        with pytest.raises(sc.CacheMiss):
            await client.complete(ask("never cached"), cache="only")
        sim.set_fault("*", Fault(status=529, should_retry=False, retry_after_s=3))
        with pytest.raises(sc.Unavailable) as info:
            await client.complete(ask("down"))
        assert info.value.code == "upstream_unavailable" and info.value.retryable and info.value.retry_after_ms == 3000
        sim.set_fault("*", Fault(status=400))
        with pytest.raises(sc.InvalidRequest):
            await client.count_tokens(ask("x"))


async def test_connection_errors_are_typed(short_tmp):
    async with AsyncClient(f"{short_tmp}/missing.sock") as client:
        with pytest.raises(sc.ConnectionLost):
            await client.ping()


async def test_a_client_must_be_used_in_async_with(daemon):
    client = AsyncClient(daemon.socket_path)
    with pytest.raises(RuntimeError, match="async with"):
        await client.ping()
    async with client:
        assert (await client.ping())["ok"]
    with pytest.raises(RuntimeError):
        await client.ping()


async def test_an_exception_in_the_block_comes_out_as_itself(daemon):
    with pytest.raises(ValueError, match="mine"):
        async with AsyncClient(daemon.socket_path) as client:
            await client.ping()
            raise ValueError("mine")


async def test_aclose_fails_waiting_requests_and_the_next_call_reconnects(daemon, sim):
    sim.set_fault(PRIMARY, Fault(hang=True))
    async with AsyncClient(daemon.socket_path) as client:
        failures = []

        async def waiting():
            try:
                await client.complete(ask("hang"), model=PRIMARY)
            except sc.ConnectionLost as exc:
                failures.append(exc)

        async with trio.open_nursery() as nursery:
            for _ in range(3):
                nursery.start_soon(waiting)
            await sim.wait_for_calls(3)
            first = client._conn
            await client.aclose()
        assert len(failures) == 3 and all(f.retryable for f in failures)
        assert (await client.ping())["ok"] and client._conn is not first


async def test_a_connection_broken_by_the_daemon_fails_its_requests_then_reconnects(short_tmp):
    """A stand-in daemon that hangs up on the first connection mid-request, then answers pings."""
    path = f"{short_tmp}/fake.sock"
    connections = []

    async def serve(stream):
        connections.append(stream)
        buffer = b""
        async with stream:
            while chunk := await stream.receive_some(65536):
                buffer += chunk
                *lines, buffer = buffer.split(b"\n")
                for line in lines:
                    if len(connections) == 1:
                        return  # hang up without answering
                    request = json.loads(line)
                    await stream.send_all(json.dumps({"id": request["id"], "ok": True, "version": "fake"}).encode() + b"\n")

    sock = trio.socket.socket(trio.socket.AF_UNIX)
    await sock.bind(path)
    sock.listen()
    listener = trio.SocketListener(sock)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(trio.serve_listeners, serve, [listener])
        async with AsyncClient(path) as client:
            with pytest.raises(sc.ConnectionLost):
                await client.ping()
            assert (await client.ping())["version"] == "fake"
            assert len(connections) == 2
        nursery.cancel_scope.cancel()


async def test_max_frame_bytes_is_said_again_on_every_connection(daemon):
    big = "x" * 1_200_000
    async with AsyncClient(daemon.socket_path, max_frame_bytes=4 << 20) as client:
        assert (await client.request({"op": "ping", "padding": big}))["ok"]
        await client.aclose()
        assert (await client.request({"op": "ping", "padding": big}))["ok"]
    async with AsyncClient(daemon.socket_path, max_frame_bytes=10) as client:
        with pytest.raises(sc.BadRequest, match="hello refused"):
            await client.ping()


def test_importing_the_package_does_not_import_anyio():
    code = "import sys, sidecard_client; from sidecard_client import *; assert 'anyio' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
