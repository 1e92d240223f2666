"""The connection when the store fails: stopped, slowed (DEBUG SLEEP), frozen, restarted. Every operation
returns within its timeout with a typed error, the breaker opens and closes, and nothing is left behind.

Time is `mock_clock` (it moves only when a test jumps it): an operation stuck on a sleeping server times out
exactly at its deadline, and one refused at once takes no time at all.
"""

from __future__ import annotations

import math
import select
import socket

import pytest
import trio
from trio.testing import wait_all_tasks_blocked

from sidecard.fleet import scripts
from sidecard.fleet.connection import Connection, ReplyError, check_hello, new_reader
from sidecard.fleet.errors import StoreDataError, StoreError, StoreTimeout, StoreUnavailable
from sidecard.fleet.devserver import LocalStore
from sidecard.fleet.health import FleetHealth, Hooks
from sidecard.fleet.keys import Keys
from sidecard.fleet.scripts import Admit, Admitted, BudgetCheck, RateCheck, RequestPath, Settle
from sidecard.fleet.pubsub import Subscriber
from sidecard.fleet.settings import BreakerSettings, FleetSettings, parse_url

TIMEOUT = 0.005
T0 = 1_773_480_000.0


async def timed(clock, operation):
    """Run `operation()`; once everything waits (on the store), move time to the operation's deadline.
    Returns (virtual seconds taken, result or the store error)."""
    started = trio.current_time()
    outcome = {}

    async def attempt():
        try:
            outcome["result"] = await operation()
        except StoreError as exc:
            outcome["result"] = exc
        outcome["at"] = trio.current_time()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(attempt)
        await wait_all_tasks_blocked()
        if "at" not in outcome:
            clock.jump(TIMEOUT)
    return outcome["at"] - started, outcome["result"]


async def reconnected(connection, clock):
    """Until the connection is back. The reconnect loop sleeps its backoff in virtual time and connects in real
    time, so the clock jumps only after a moment in which nothing moved."""
    clock.autojump_threshold = 0.25
    try:
        with trio.fail_after(60):
            await connection.wait_connected()
    finally:
        clock.autojump_threshold = math.inf


def recorder():
    events = []
    hooks = Hooks(on_up=lambda: events.append("up"), on_down=lambda reason: events.append(f"down: {reason}"))
    return events, FleetHealth(hooks)


async def test_a_slow_store_costs_each_operation_its_timeout_until_the_breaker_skips_it(connect, private_store, mock_clock):
    events, health = recorder()
    connection = await connect(private_store, op_timeout_s=TIMEOUT, health=health,
                               breaker=BreakerSettings(consecutive_failures=3, cooldown_s=1.0))
    assert await connection.call("PING") == b"PONG"
    private_store.slow(1.0)  # long enough for a loaded machine to send the three operations inside it
    for _ in range(3):
        elapsed, result = await timed(mock_clock, lambda: connection.call("PING"))
        assert (elapsed, type(result)) == (pytest.approx(TIMEOUT), StoreTimeout)
    elapsed, result = await timed(mock_clock, lambda: connection.call("PING"))
    assert (elapsed, type(result)) == (0, StoreUnavailable) and "breaker" in str(result)
    assert not health.up
    await trio.to_thread.run_sync(private_store.command, "PING")  # the server is awake again
    mock_clock.jump(1.0)  # the breaker's cooldown: the next operation is its probe
    assert await connection.call("PING") == b"PONG"
    assert health.up
    assert events == ["up", "down: the store's breaker opened after failures (timeout)", "up"]


async def test_a_timeout_states_the_operations_own_timeout(connect, private_store, mock_clock):
    # An operator command waits up to a second: its error says so, not the request path's op_timeout_ms (the
    # reply to `sidecardctl kill` on a slow store said "within 5 ms" after a second).
    connection = await connect(private_store, op_timeout_s=TIMEOUT)
    private_store.slow(2.0)
    outcome = {}

    async def command():
        try:
            await connection.call("PING", op="state", timeout_s=1.0)
        except StoreTimeout as exc:
            outcome["error"], outcome["at"] = str(exc), trio.current_time()

    started = trio.current_time()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(command)
        await wait_all_tasks_blocked()
        mock_clock.jump(TIMEOUT)
        await wait_all_tasks_blocked()
        assert not outcome  # the request path's timeout is not this operation's
        mock_clock.jump(1.0)
    assert outcome == {"error": "state: no answer from the store within 1000 ms", "at": pytest.approx(started + 1.0 + TIMEOUT)}
    elapsed, result = await timed(mock_clock, lambda: connection.call("PING"))
    assert str(result) == "call: no answer from the store within 5 ms"


async def test_a_frozen_store_under_concurrent_traffic_delays_nobody_beyond_the_timeout(connect, private_store, mock_clock):
    connection = await connect(private_store, op_timeout_s=TIMEOUT, breaker=BreakerSettings(consecutive_failures=3))
    path = RequestPath(connection, Keys("frozen"))
    private_store.pause()
    try:
        results = []

        async def request(i):
            op = Admit(T0, rates=[RateCheck("global", "requests", 10.0, 100.0)], reservation_id=f"r{i}")
            started = trio.current_time()
            try:
                await path.admit(op)
            except StoreError as exc:
                results.append((trio.current_time() - started, type(exc)))

        async with trio.open_nursery() as nursery:
            for i in range(32):
                nursery.start_soon(request, i)
            await wait_all_tasks_blocked()
            mock_clock.jump(TIMEOUT)
        assert results == [(pytest.approx(TIMEOUT), StoreTimeout)] * 32  # all were in flight before the breaker could open
        for _ in range(5):  # now open: refused at once
            elapsed, result = await timed(mock_clock, lambda: path.admit(Admit(T0)))
            assert (elapsed, type(result)) == (0, StoreUnavailable)
    finally:
        private_store.resume()



async def test_a_reply_unread_at_the_deadline_is_the_stores_answer_in_time(connect, private_store, mock_clock):
    """On a busy daemon the reader task may run only after an operation's deadline has passed: the store answered
    in time, so the operation takes its reply, and the breaker hears of no failure (under load, the fleet had
    flapped down and up every second, its limits falling back to local shares)."""
    events, health = recorder()
    connection = await connect(private_store, op_timeout_s=TIMEOUT, health=health,
                               breaker=BreakerSettings(consecutive_failures=1))
    outcomes = []

    async def ping():
        try:
            outcomes.append(await connection.call("PING"))
        except StoreError as exc:
            outcomes.append(exc)

    for _ in range(20):  # the reader and the operation's timeout run in the same scheduler pass, in either order
        private_store.pause()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(ping)
            await wait_all_tasks_blocked()  # the PING is sent, unanswered
            private_store.resume()
            # Nothing of ours runs until the reply is in the socket (a busy loop, not back at its reader yet).
            assert select.select([connection._fd], [], [], 10)[0]
            mock_clock.jump(TIMEOUT)
    assert outcomes == [b"PONG"] * 20
    assert events == ["up"] and health.up

async def test_a_stopped_store_refuses_at_once_and_a_restarted_one_is_used_again(connect, private_store, mock_clock):
    events, health = recorder()
    # A connect far slower than the jumping clock's: `reconnected` must land on the backoff, not on its deadline.
    connection = await connect(private_store, op_timeout_s=TIMEOUT, health=health, connect_timeout_s=1e6)
    path = RequestPath(connection, Keys("restart"))
    assert isinstance(await path.admit(Admit(T0, rates=[RateCheck("global", "requests", 1.0, 1.0)])), Admitted)
    private_store.stop()
    await wait_all_tasks_blocked()  # the connection saw it close
    for _ in range(3):
        elapsed, result = await timed(mock_clock, lambda: path.admit(Admit(T0)))
        assert (elapsed, type(result)) == (0, StoreUnavailable)
    assert not connection.connected and not health.up
    private_store.start()  # empty: it kept nothing, not even our scripts
    await reconnected(connection, mock_clock)
    assert isinstance(await path.admit(Admit(T0, rates=[RateCheck("global", "requests", 1.0, 1.0)])), Admitted)
    assert health.up and connection.connects == 2
    assert [e.split(":")[0] for e in events] == ["up", "down", "up"]  # one report per outage, however many retries


async def test_a_store_down_for_hours_is_still_retried_and_used_again_when_it_returns(connect, private_store, mock_clock):
    _, health = recorder()
    connection = await connect(private_store, op_timeout_s=TIMEOUT, health=health)
    private_store.stop()
    attempts = 0
    while attempts < 1200:  # past 2**1024: the backoff's exponent no longer fits in a float
        mock_clock.jump(2.0)  # the reconnection backoff's cap: one attempt per jump
        await wait_all_tasks_blocked()
        attempts += 1
    assert not health.up
    private_store.start()
    await reconnected(connection, mock_clock)
    assert health.up and await connection.call("PING") == b"PONG"


async def test_a_script_the_server_forgot_is_sent_whole(connect):
    connection = await connect()
    path = RequestPath(connection, Keys("flushed"))
    await connection.call("SCRIPT", "FLUSH")
    assert await connection.call("SCRIPT", "EXISTS", scripts.REQUEST.sha) == [0]
    assert isinstance(await path.admit(Admit(T0)), Admitted)  # NOSCRIPT, then EVAL, within the one deadline


async def test_background_writes_go_with_the_next_operation_and_each_hears_its_own_reply(connect, store_server):
    """Nobody waits for a background write: its bytes go out with the next operation's (one write, one wake-up),
    and the reader hands each one its own reply. One meeting garbage is a data error of its own, the others are
    applied, and scripts the server forgot are sent whole."""
    connection = await connect()
    keys = Keys("batched")
    path = RequestPath(connection, keys)
    budget = BudgetCheck("global", "day", 10.0)
    store_server.command("SET", keys.budget("day", "feature:x"), "garbage")
    await connection.call("SCRIPT", "FLUSH")
    replies: list = []
    for call in (path.settle_script(Settle(T0, "", 1.0, [budget])),
                 path.settle_script(Settle(T0, "", 1.0, [BudgetCheck("feature:x", "day", 10.0)])),
                 path.cache_put_script("k1", b"answer", now=T0, stored_at=T0, expires_at=T0 + 60, stale_until=T0 + 120)):
        assert connection.run_script_later(*call, replies.append)
    assert replies == [] and store_server.command("EXISTS", keys.cache("k1")) == 0  # waiting for company
    assert await connection.call("PING") == b"PONG"  # carries them; the forgotten scripts go again at once
    assert await connection.call("PING") == b"PONG"
    assert len(replies) == 3 and isinstance(replies[1], StoreDataError) and replies[2] == 1
    assert scripts.settle_result(Settle(T0, "", 1.0, [budget]), replies[0]).spent_usd == [1.0]
    assert store_server.command("HGET", keys.budget("day", "global"), "spent") == b"1"


async def test_a_background_write_with_no_operation_to_carry_it_goes_on_its_own(connect, store_server):
    connection = await connect()
    replies: list = []
    assert connection.run_script_later(*RequestPath(connection, Keys("alone")).settle_script(Settle(T0, "", 0.0)), replies.append)
    with trio.fail_after(5):
        while not replies:
            await trio.sleep(0.001)
    assert replies == [[]]


async def test_an_admission_answered_too_late_is_given_back(connect, private_store, mock_clock, store_server):
    """The caller went on locally; the reservation and the bucket's take it made late must not linger."""
    connection = await connect(private_store, op_timeout_s=TIMEOUT)
    keys = Keys("late")
    path = RequestPath(connection, keys)
    budget = BudgetCheck("global", "day", 1.0)
    limit = RateCheck("global", "requests", 1.0, 1.0)
    private_store.pause()
    op = Admit(T0, rates=[limit], budgets=[budget], estimate_usd=0.9, reservation_id="late-1", reservation_ttl_s=600,
               cache_key="k", cache_mode="lead", lease_token="me:1")
    elapsed, result = await timed(mock_clock, lambda: path.admit(op))
    assert (elapsed, type(result)) == (pytest.approx(TIMEOUT), StoreTimeout)
    private_store.resume()  # it runs the admission now, for nobody
    await connection.call("PING")  # the late reply has come in: its undo is queued before the next operation
    await connection.call("PING")
    assert private_store.command("ZCARD", keys.reservations) == 0
    assert private_store.command("EXISTS", keys.lease("k")) == 0
    again = await path.admit(Admit(T0, rates=[limit], budgets=[budget], estimate_usd=0.9, reservation_id="r2"))
    assert again == Admitted("none", 0, [scripts.Usage(0.0, 0.0)])  # the bucket's take was given back too


async def test_a_store_that_is_down_at_start_does_not_hold_up_the_start(connect, short_tmp, mock_clock):
    events, health = recorder()
    absent = LocalStore(short_tmp)  # never started
    connection = await connect(absent, op_timeout_s=TIMEOUT, health=health)  # returns after the first attempt
    for _ in range(3):
        mock_clock.jump(2.0)
        await wait_all_tasks_blocked()
    elapsed, result = await timed(mock_clock, lambda: connection.call("PING"))
    assert (elapsed, type(result)) == (0, StoreUnavailable) and "cannot connect" in str(result)
    assert len(events) == 1 and events[0].startswith("down: cannot connect to unix://")


async def test_credentials_are_used_and_never_shown(connect, private_store):
    private_store.command("CONFIG", "SET", "requirepass", "hunter2-secret")
    path = private_store.socket_path
    for url, refusal in ((f"unix://{path}", "NOAUTH"), (f"unix://:wrong-guess@{path}", "WRONGPASS")):
        events, health = recorder()
        connection = await connect(url=url, health=health)
        with pytest.raises(StoreUnavailable, match="cannot connect") as refused:
            await connection.call("PING")
        assert refusal in events[0] and refusal in str(refused.value)
        assert "wrong-guess" not in events[0] + str(refused.value) + str(connection.address) + repr(connection.address)
    connection = await connect(url=f"unix://:hunter2-secret@{path}")
    assert await connection.call("PING") == b"PONG"
    assert "hunter2" not in str(connection.address) + repr(connection.address)


def test_a_server_older_than_7_is_refused_by_name():
    with pytest.raises(StoreUnavailable, match="version 6.2.14: fleet mode needs Redis or Valkey 7"):
        check_hello([b"OK", b"# Server\r\nredis_version:6.2.14\r\n"])
    with pytest.raises(StoreUnavailable, match="refused the connection: WRONGPASS"):
        check_hello([ReplyError("WRONGPASS invalid username-password pair"), b"redis_version:7.2.0\r\n"])
    check_hello([b"OK", b"# Server\r\nredis_version:7.0.15\r\n"])


async def test_health_hooks_hear_latency_errors_and_fallbacks(connect, private_store, mock_clock):
    heard = []
    health = FleetHealth(Hooks(on_latency=lambda op, s: heard.append(("latency", op)), on_error=lambda op, kind: heard.append((kind, op)),
                               on_fallback=lambda what: heard.append(("fallback", what))))
    connection = await connect(private_store, op_timeout_s=TIMEOUT, health=health)
    await connection.call("PING", op="ping")
    private_store.pause()
    try:
        elapsed, result = await timed(mock_clock, lambda: connection.call("PING", op="ping"))
        assert isinstance(result, StoreTimeout)
        health.fallback("limits")  # what a caller does on that error
    finally:
        private_store.resume()
    assert heard == [("latency", "ping"), ("timeout", "ping"), ("fallback", "limits")]
    assert health.errors == {("ping", "timeout"): 1} and health.fallbacks == {"limits": 1}


async def test_a_connection_and_a_subscriber_from_the_fleet_settings(nursery, store_server):
    fleet = FleetSettings(url=store_server.url, namespace="app", instance="web-1", op_timeout_ms=500)
    connection = Connection.from_settings(fleet, scripts=scripts.ALL)
    assert (connection.name, connection.op_timeout_s) == ("sidecard:app:web-1", 0.5)
    await nursery.start(connection.run)
    subscriber = Subscriber.from_settings(fleet)
    heard = trio.Event()
    subscriber.on("{app}:state", lambda data: heard.set())
    await nursery.start(subscriber.run)
    assert subscriber.subscribed
    assert await connection.call("PUBLISH", "{app}:state", "1") == 1
    with trio.fail_after(5):
        await heard.wait()


async def fake_store(path: str, answer: bytes, *, task_status=trio.TASK_STATUS_IGNORED):
    """A server that says hello like Redis 7, then answers every command with `answer`."""
    sock = trio.socket.socket(trio.socket.AF_UNIX)
    await sock.bind(path)
    sock.listen()

    async def serve(stream):
        reader = new_reader()
        async for data in stream:
            reader.feed(data)
            while (command := reader.gets()) is not False:
                if command[0] == b"CLIENT":
                    await stream.send_all(b"+OK\r\n")
                elif command[0] == b"INFO":
                    info = b"# Server\r\nredis_version:7.0.0\r\n"
                    await stream.send_all(b"$%d\r\n%s\r\n" % (len(info), info))
                else:
                    await stream.send_all(answer)

    await trio.serve_listeners(serve, [trio.SocketListener(sock)], task_status=task_status)


@pytest.mark.parametrize("answer, why", [
    (b"?not resp\r\n", "Protocol error"),
    (b"+OK\r\n+one more nobody asked for\r\n", "a reply nobody asked for"),
])
async def test_a_server_speaking_garbage_costs_a_reconnect_not_a_crash(nursery, short_tmp, answer, why, mock_clock):
    path = f"{short_tmp}/fake.sock"
    await nursery.start(fake_store, path, answer)
    events, health = recorder()
    connection = Connection(parse_url(f"unix://{path}"), op_timeout_s=TIMEOUT, health=health, connect_timeout_s=1e6)
    await nursery.start(connection.run)
    for _ in range(2):
        try:
            await connection.call("PING")
        except StoreUnavailable:
            pass  # the garbage was the answer: the caller goes on locally
        await wait_all_tasks_blocked()  # the connection read the garbage and dropped itself
        await reconnected(connection, mock_clock)
    assert connection.connects == 3
    assert events[1].startswith("down: lost the connection") and why in events[1]


async def test_rediss_speaks_tls_to_the_store(nursery, short_tmp):
    with LocalStore(short_tmp, tls=True) as store:
        assert store.url.startswith("rediss://localhost:")
        connection = Connection(parse_url(store.url), tls_ca_file=store.ca_file, scripts=scripts.ALL, op_timeout_s=5.0)
        await nursery.start(connection.run)
        path = RequestPath(connection, Keys("tls"))
        assert isinstance(await path.admit(Admit(T0, rates=[RateCheck("global", "requests", 1.0, 1.0)])), Admitted)
        untrusted = Connection(parse_url(store.url), op_timeout_s=5.0)  # the system's CAs do not know this one
        await nursery.start(untrusted.run)
        with pytest.raises(StoreUnavailable, match="cannot connect.*(CERTIFICATE_VERIFY_FAILED|certificate verify failed)"):
            await untrusted.call("PING")


async def test_replies_taken_at_a_deadline_never_pass_a_chunk_the_reader_holds(mock_clock):
    """The reader used to read a chunk and yield before handing it over; an operation past its deadline then read
    the next chunk and fed it first, and replies went to each other's operations (a review found it: B got C's
    reply, C timed out). Three replies, the first two exactly one read each, C's deadline passing in that pass."""

    def bulk(tag: bytes, total: int) -> bytes:  # a RESP bulk string of exactly TOTAL bytes
        n = next(n for n in range(total, 0, -1) if len(b"$%d\r\n" % n) + n + 2 == total)
        return b"$%d\r\n" % n + tag * n + b"\r\n"

    async def get(connection: Connection, got: dict, key: str, timeout_s: float) -> None:
        try:
            got[key] = (await connection.call("GET", key, timeout_s=timeout_s))[:1]
        except StoreError as exc:
            got[key] = type(exc)

    class Paired(Connection):
        def __init__(self, sock: socket.socket) -> None:
            super().__init__(parse_url("unix:///unused"), op_timeout_s=10)
            self._sock = sock

        async def _connect(self):
            return trio.SocketStream(trio.socket.from_stdlib_socket(self._sock)), new_reader()

    for _ in range(40):  # the reader and C's deadline run in one scheduler pass, in either order
        server, ours = socket.socketpair()
        server.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
        ours.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        connection, got = Paired(ours), {}
        async with trio.open_nursery() as nursery:
            await nursery.start(connection.run)
            for key, timeout_s in (("A", 10), ("B", 10), ("C", 1)):
                nursery.start_soon(get, connection, got, key, timeout_s)
                await wait_all_tasks_blocked()
            server.setblocking(True)
            server.recv(1 << 20)
            server.sendall(bulk(b"A", 65536) + bulk(b"B", 65536) + b"$1\r\nC\r\n")
            mock_clock.jump(2)
            await wait_all_tasks_blocked()
            nursery.cancel_scope.cancel()
        server.close()
        assert got["A"] == b"A" and got["B"] == b"B" and got["C"] in (b"C", StoreTimeout), got
