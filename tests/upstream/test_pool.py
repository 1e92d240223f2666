"""ConnectionPool against a real h11 server on loopback (see conftest.py for its routes)."""

from __future__ import annotations

import contextlib
from functools import partial
import json
import random
import socket

import pytest
import trio
import trio.testing

from sidecard.upstream import pool as pool_module
from sidecard.upstream.pool import (
    ConnectionPool,
    ConnectError,
    ConnectTimeout,
    LocalProtocolError,
    PoolTimeout,
    ReadError,
    ReadTimeout,
    RemoteProtocolError,
    TransportError,
    Origin,
)

IDLE = {"open": 0, "idle": 0, "waiting": 0}


async def fetch(pool, server, path=b"/json", method=b"GET", headers=(), body=b"", **kwargs) -> bytes:
    response = await pool.request(server.origin, method, path, list(headers), body, **kwargs)
    return await response.read()


def gate(server, path=b"/gate") -> trio.Event:
    """A route that answers once the returned event is set."""
    event = trio.Event()

    async def handler(x):
        await event.wait()
        await x.respond(200, x.target)

    server.handlers[path] = handler
    return event


def test_origin_from_url():
    assert Origin.from_url("https://api.anthropic.com") == Origin("https", "api.anthropic.com", 443)
    assert Origin.from_url("HTTP://Example.COM/v1?x") == Origin("http", "example.com", 80)
    assert Origin.from_url("http://127.0.0.1:8080") == Origin("http", "127.0.0.1", 8080)
    with pytest.raises(ValueError):
        Origin.from_url("ftp://example.com")


async def test_keep_alive_reuses_one_connection(server, pool):
    for i in range(5):
        response = await pool.request(
            server.origin, b"POST", b"/json?i=%d" % i, [(b"Content-Type", b"application/json")], b"{}"
        )
        assert (response.status, response.header(b"Content-Type")) == (200, b"application/json")
        assert json.loads(await response.read()) == {"ok": True, "path": f"/json?i={i}"}
    assert server.accepted == 1
    assert pool.stats == {"open": 1, "idle": 1, "waiting": 0}
    first = server.exchanges[0]
    assert first.headers[b"host"] == f"127.0.0.1:{server.port}".encode()
    assert (first.headers[b"content-length"], first.body) == (b"2", b"{}")
    await fetch(pool, server)
    assert b"content-length" not in server.exchanges[-1].headers  # a GET without a body


async def test_chunked_response(server, pool):
    for _ in range(2):
        response = await pool.request(server.origin, b"GET", b"/chunked", [], b"")
        assert response.header(b"transfer-encoding") == b"chunked"
        assert await response.read() == b"part0;part1;part2;"
    assert server.accepted == 1


@pytest.mark.parametrize(
    "path, headers",
    [(b"/close", []), (b"/http10", []), (b"/json", [(b"connection", b"close")])],
    ids=["server-close", "http-1.0", "client-close"],
)
async def test_connection_close_is_not_pooled(server, pool, path, headers):
    for _ in range(2):
        await fetch(pool, server, path, headers=headers)
        assert pool.stats == IDLE
    await trio.testing.wait_all_tasks_blocked()
    assert (server.accepted, server.open) == (2, 0)


async def test_connection_limit(server):
    pool = ConnectionPool(max_connections=3)
    done = []

    async def one(i: int) -> None:
        assert await fetch(pool, server, b"/slow?%d" % i) == b"/slow?%d" % i
        done.append(i)

    async with trio.open_nursery() as nursery:
        for i in range(20):
            nursery.start_soon(one, i)
        await trio.testing.wait_all_tasks_blocked()
        assert pool.stats == {"open": 3, "idle": 0, "waiting": 17}
    assert sorted(done) == list(range(20))
    # Finished connections were handed to waiters, never closed and reopened.
    assert (server.accepted, server.max_open) == (3, 3)
    assert pool.stats == {"open": 3, "idle": 3, "waiting": 0}
    await pool.aclose()


async def test_waiters_are_served_in_order(server):
    pool = ConnectionPool(max_connections=1)
    release = gate(server)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(fetch, pool, server, b"/gate")
        for i in range(5):
            await trio.testing.wait_all_tasks_blocked()
            nursery.start_soon(fetch, pool, server, b"/json?%d" % i)
        await trio.testing.wait_all_tasks_blocked()
        assert pool.stats == {"open": 1, "idle": 0, "waiting": 5}
        release.set()
    assert [x.target for x in server.exchanges] == [b"/gate"] + [b"/json?%d" % i for i in range(5)]
    assert server.accepted == 1


async def test_limit_is_shared_across_origins(server, make_server):
    other = await make_server()
    pool = ConnectionPool(max_connections=1)
    with trio.fail_after(5):
        for s in (server, other, server):  # an idle connection elsewhere gives way
            await fetch(pool, s)
        assert pool.stats == {"open": 1, "idle": 1, "waiting": 0}
        release = gate(server)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(fetch, pool, server, b"/gate")
            await trio.testing.wait_all_tasks_blocked()
            nursery.start_soon(fetch, pool, other)  # waits, then gets the slot of the closed connection
            await trio.testing.wait_all_tasks_blocked()
            assert pool.stats == {"open": 1, "idle": 0, "waiting": 1}
            release.set()
    assert (server.accepted, other.accepted) == (2, 2)
    assert pool.stats == {"open": 1, "idle": 1, "waiting": 0}


async def test_stale_connection_is_retried_once(server, pool, monkeypatch):
    attempts = spy_exchanges(monkeypatch)
    server.drop_after = 1  # each connection silently drops its second request
    for _ in range(3):
        assert json.loads(await fetch(pool, server, method=b"POST", body=b"{}"))["ok"]
    assert attempts == [False, True, False, True, False]  # reused attempts failed, fresh ones succeeded
    assert (server.accepted, len(server.exchanges)) == (3, 3)
    assert pool.stats == {"open": 1, "idle": 1, "waiting": 0}


async def test_fresh_connection_failure_is_an_error(server, pool):
    server.drop_after = 0
    with pytest.raises(RemoteProtocolError, match="without sending a response"):
        await fetch(pool, server)
    assert server.accepted == 1  # not retried
    assert pool.stats == IDLE


async def test_connection_closed_while_idle_is_not_reused(server, pool, monkeypatch):
    attempts = spy_exchanges(monkeypatch)
    server.close_after = 1
    await fetch(pool, server)
    await trio.testing.wait_all_tasks_blocked()  # the server's FIN arrives
    await fetch(pool, server)
    assert attempts == [False, False]  # caught at checkout, so never tried
    assert server.accepted == 2


async def test_a_response_sent_on_an_idle_connection_is_never_the_next_requests_answer(nursery):
    # A misbehaving server (or proxy) answers a request twice: the second answer, arriving while the connection is
    # idle, must not become the next request's (that connection is given up; the next request gets a fresh one).
    accepted = []

    async def answers_twice(stream):
        accepted.append(stream)
        data = b""
        with contextlib.suppress(trio.BrokenResourceError):  # (the pool resets the connection it gives up)
            while chunk := await stream.receive_some(65536):
                data += chunk
                while b"\r\n\r\n" in data:
                    _, _, data = data.partition(b"\r\n\r\n")
                    await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nanswer")
                    await trio.sleep(0.01)
                    await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nstray")

    listeners = await nursery.start(partial(trio.serve_tcp, answers_twice, 0, host="127.0.0.1"))
    origin = Origin("http", "127.0.0.1", listeners[0].socket.getsockname()[1])
    pool = ConnectionPool()
    for _ in range(2):
        response = await pool.request(origin, b"GET", b"/", [], b"")
        assert await response.read() == b"answer"
        await trio.sleep(0.1)  # the stray answer arrives while the connection is idle
    assert len(accepted) == 2
    await pool.aclose()


async def test_idle_timeout(server, mock_clock):
    pool = ConnectionPool(idle_timeout_s=30)
    await fetch(pool, server)
    mock_clock.jump(29)
    await fetch(pool, server)
    assert server.accepted == 1
    mock_clock.jump(31)
    await fetch(pool, server)
    assert server.accepted == 2
    assert pool.stats == {"open": 1, "idle": 1, "waiting": 0}
    await pool.aclose()


async def burst(pool, server, n: int) -> None:
    """N requests in flight at once (each on its own connection), all answered together."""
    release = gate(server)
    async with trio.open_nursery() as nursery:
        for _ in range(n):
            nursery.start_soon(fetch, pool, server, b"/gate")
        await trio.testing.wait_all_tasks_blocked()
        release.set()


async def test_a_burst_keeps_every_connection_it_opened(server):
    pool = ConnectionPool()  # the default keeps up to max_connections idle (it used to keep 512 per origin)
    await burst(pool, server, 520)
    assert pool.stats == {"open": 520, "idle": 520, "waiting": 0}  # for the next burst: no connects
    await pool.aclose()


def spy_closes(monkeypatch) -> list[str]:
    """The name of the task that closes each connection."""
    closers: list[str] = []
    close = pool_module._Conn.close

    def spy(self):
        closers.append(trio.lowlevel.current_task().name)
        close(self)

    monkeypatch.setattr(pool_module._Conn, "close", spy)
    return closers


async def test_surplus_connections_are_closed_off_the_reply_path(server, monkeypatch):
    closers = spy_closes(monkeypatch)
    pool = ConnectionPool(max_idle_per_origin=2)
    async with trio.open_nursery() as nursery:
        await nursery.start(pool.run)
        await burst(pool, server, 10)
        assert pool.stats == {"open": 2, "idle": 2, "waiting": 0}
        await trio.testing.wait_all_tasks_blocked()
        assert server.open == 2
        nursery.cancel_scope.cancel()
    assert len(closers) == 8 and all(name.endswith("ConnectionPool.run") for name in closers)
    await pool.aclose()


async def test_expired_connections_are_closed_in_the_background(server, mock_clock, monkeypatch):
    closers = spy_closes(monkeypatch)
    pool = ConnectionPool(idle_timeout_s=30)
    async with trio.open_nursery() as nursery:
        await nursery.start(pool.run)
        await burst(pool, server, 200)
        mock_clock.jump(29)
        await trio.testing.wait_all_tasks_blocked()
        assert pool.stats["idle"] == 200
        mock_clock.jump(30)  # no request comes: the housekeeping task closes them, in batches
        await trio.testing.wait_all_tasks_blocked()
        assert pool.stats == IDLE and server.open == 0
        assert await fetch(pool, server) and pool.stats == {"open": 1, "idle": 1, "waiting": 0}
        nursery.cancel_scope.cancel()
    assert len(closers) == 200 and all(name.endswith("ConnectionPool.run") for name in closers)
    await pool.aclose()


async def test_connect_refused():
    with socket.socket() as s:  # a port with nobody listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    pool = ConnectionPool()
    with pytest.raises(ConnectError, match=f"cannot connect to 127.0.0.1:{port}"):
        await pool.request(Origin("http", "127.0.0.1", port), b"GET", b"/", [], b"")
    assert pool.stats == IDLE


async def test_connect_timeout(autojump_clock, monkeypatch):
    async def never(*args: object, **kwargs: object) -> None:
        await trio.sleep_forever()

    monkeypatch.setattr(trio, "open_tcp_stream", never)
    pool = ConnectionPool(connect_timeout_s=3)
    start = trio.current_time()
    with pytest.raises(ConnectTimeout):
        await pool.request(Origin("https", "example.com", 443), b"GET", b"/", [], b"")
    assert trio.current_time() - start == 3
    assert pool.stats == IDLE


async def test_read_timeout(server, pool, autojump_clock):
    with pytest.raises(ReadTimeout):
        await fetch(pool, server, b"/hang", read_timeout=5)
    assert pool.stats == IDLE


async def test_read_timeout_bounds_each_receive(server, pool, autojump_clock):
    # /sse takes 2 s in all, with 1 s between chunks
    assert await fetch(pool, server, b"/sse", read_timeout=1.5) == b"data: 0\n\ndata: 1\n\ndata: 2\n\n"
    response = await pool.request(server.origin, b"GET", b"/sse", [], b"", read_timeout=0.5)
    with pytest.raises(ReadTimeout):
        await response.read()
    assert pool.stats == IDLE


async def test_reset_mid_body(server, pool):
    response = await pool.request(server.origin, b"GET", b"/reset", [], b"")
    with pytest.raises(ReadError):
        await response.read()
    assert pool.stats == IDLE


async def test_truncated_body(server, pool):
    response = await pool.request(server.origin, b"GET", b"/truncate", [], b"")
    with pytest.raises(RemoteProtocolError, match="complete message body"):
        await response.read()
    assert pool.stats == IDLE


async def test_streaming_yields_chunks_as_they_arrive(server, pool, autojump_clock):
    response = await pool.request(server.origin, b"GET", b"/sse", [], b"", read_timeout=2)
    start = trio.current_time()
    seen = [(trio.current_time() - start, chunk) async for chunk in response.aiter_bytes()]
    assert seen == [(0, b"data: 0\n\n"), (1, b"data: 1\n\n"), (2, b"data: 2\n\n")]
    assert pool.stats == {"open": 1, "idle": 1, "waiting": 0}  # the chunked body ended cleanly: reusable


async def test_cancel_mid_body_closes_the_connection(server, pool, autojump_clock):
    response = await pool.request(server.origin, b"GET", b"/sse", [], b"")
    chunks = []
    with trio.move_on_after(0.5):
        async for chunk in response.aiter_bytes():
            chunks.append(chunk)
    assert chunks == [b"data: 0\n\n"]
    assert pool.stats == IDLE
    await trio.sleep(5)  # the server's next write fails
    assert server.open == 0
    await response.aclose()  # harmless
    assert await fetch(pool, server) and server.accepted == 2


async def test_cancel_while_waiting_for_a_connection(server, autojump_clock):
    pool = ConnectionPool(max_connections=1)
    release = gate(server)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(fetch, pool, server, b"/gate")
        await trio.testing.wait_all_tasks_blocked()
        with trio.move_on_after(1):
            await fetch(pool, server)
        with pytest.raises(PoolTimeout):
            await fetch(pool, server, pool_timeout=1)
        assert pool.stats == {"open": 1, "idle": 0, "waiting": 0}
        nursery.start_soon(fetch, pool, server, b"/json?last")
        await trio.testing.wait_all_tasks_blocked()
        release.set()  # the abandoned waiters are skipped: the last one gets the connection
    assert [x.target for x in server.exchanges] == [b"/gate", b"/json?last"]
    assert pool.stats == {"open": 1, "idle": 1, "waiting": 0}


async def test_turn_granted_as_the_waiter_gives_up(server, autojump_clock):
    async def hold(pool: ConnectionPool) -> None:
        with pytest.raises(ReadTimeout):
            await fetch(pool, server, b"/hang", read_timeout=1)  # frees its slot at t=1

    for _ in range(20):  # which of the two runs first at t=1 is up to trio's scheduler
        pool = ConnectionPool(max_connections=1)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(hold, pool)
            await trio.testing.wait_all_tasks_blocked()
            with trio.move_on_after(1):  # the waiter gives up at t=1 too: the slot must not get lost
                await fetch(pool, server)
        assert pool.stats == IDLE


async def test_cancel_mid_request_frees_the_slot(server, autojump_clock):
    pool = ConnectionPool(max_connections=1)
    with trio.move_on_after(1):
        await fetch(pool, server, b"/hang")
    assert pool.stats == IDLE
    assert await fetch(pool, server)


async def test_aclose_response_before_reading(server, pool, autojump_clock):
    response = await pool.request(server.origin, b"GET", b"/json", [], b"")
    await response.aclose()  # the body had already arrived: the connection is reusable
    assert pool.stats == {"open": 1, "idle": 1, "waiting": 0}
    response = await pool.request(server.origin, b"GET", b"/sse", [], b"")
    await response.aclose()  # the rest is still to come: closed
    assert pool.stats == IDLE
    assert server.accepted == 1


async def test_aclose_response_while_another_task_reads(server, pool, autojump_clock):
    response = await pool.request(server.origin, b"GET", b"/sse", [], b"")

    async def reader() -> None:
        with pytest.raises(ReadError):
            await response.read()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(reader)
        await trio.testing.wait_all_tasks_blocked()
        await response.aclose()
    assert pool.stats == IDLE  # released once, not twice


async def test_invalid_requests_raise_and_leak_nothing(server, pool):
    with pytest.raises(LocalProtocolError):
        await fetch(pool, server, headers=[(b"bad name", b"x")])
    with pytest.raises(LocalProtocolError):  # a body longer than declared
        await fetch(pool, server, method=b"POST", headers=[(b"content-length", b"1")], body=b"abc")
    assert pool.stats == IDLE


async def test_aclose_pool(server):
    pool = ConnectionPool()
    await fetch(pool, server)
    await pool.aclose()
    assert pool.stats == IDLE
    await trio.testing.wait_all_tasks_blocked()
    assert server.open == 0
    with pytest.raises(RuntimeError, match="closed"):
        await fetch(pool, server)


async def test_no_slot_leaks_under_mixed_failures(server, autojump_clock):
    pool = ConnectionPool(max_connections=4)
    rng = random.Random(7)
    paths = [b"/json", b"/chunked", b"/close", b"/reset", b"/truncate", b"/hang", b"/sse", b"/slow"]

    async def one() -> None:
        with trio.move_on_after(rng.choice([0.5, 3])), contextlib.suppress(TransportError):
            await fetch(pool, server, rng.choice(paths), read_timeout=2)

    peak = 0

    async def watch() -> None:
        nonlocal peak
        while True:
            peak = max(peak, pool.stats["open"])
            await trio.sleep(0.25)  # coarse: each autojump costs 5 ms of real time

    async with trio.open_nursery() as nursery:
        nursery.start_soon(watch)
        async with trio.open_nursery() as requests:
            for _ in range(100):
                requests.start_soon(one)
        nursery.cancel_scope.cancel()
    stats = pool.stats
    assert stats["waiting"] == 0 and stats["open"] == stats["idle"]
    assert peak == 4


def spy_exchanges(monkeypatch) -> list[bool]:
    """Record, for each attempt on a connection, whether the connection was a reused one."""
    attempts: list[bool] = []
    exchange = ConnectionPool._exchange

    async def spy(self, conn, *args):
        attempts.append(conn.reused)
        return await exchange(self, conn, *args)

    monkeypatch.setattr(ConnectionPool, "_exchange", spy)
    return attempts
