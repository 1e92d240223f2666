"""The Trio + h11 HTTP/1.1 server: framing, keep-alive, limits, failures, concurrency, Unix sockets."""

from __future__ import annotations

import functools
import json
import os
import socket

import h11
import pytest
import trio
import trio.testing

from sidecard.httpserver import (
    EVICT_IDLE_AFTER_S, EVICT_PARTIAL_AFTER_S, HttpRequest, Responder, SlowReader, render_head, serve_http, serve_tcp_http,
)


async def echo(request: HttpRequest, responder: Responder) -> None:
    """Answers with what it was sent; a few paths do something else."""
    if request.path == "/stream":
        await responder.start(200, [("content-type", "text/plain")])
        for part in (b"one ", b"", b"two ", b"three"):
            await responder.write(part)
        await responder.end()
    elif request.path == "/silent":
        pass
    elif request.path == "/fail":
        raise KeyError("secret detail")
    elif request.path == "/fail-midway":
        await responder.start(200, [])
        await responder.write(b"partial")
        raise KeyError("midway")
    elif request.path == "/twice":
        await responder.send(200, [], b"first")
        await responder.send(200, [], b"second")
    elif request.path == "/inject":
        await responder.send(200, [("x-bad", "a\r\nset-cookie: x")], b"")
    elif request.path.startswith("/abort"):
        await responder.abort(reset=request.query == "reset")
    elif request.path == "/also":
        responder.add_headers([("x-also", "1")])
        await responder.start(200, [("x-own", "2")])
        await responder.end()
    else:
        reply = {
            "method": request.method,
            "path": request.path,
            "query": request.query,
            "target": request.target,
            "agent": request.header("User-Agent"),
            "missing": request.header("x-missing"),
            "body": request.body.decode(),
            "tcp": request.tcp,
        }
        await responder.send(
            200, [(b"content-type", b"application/json"), ("x-served-by", "test")], json.dumps(reply).encode()
        )


class Client:
    """An h11 client on one connection."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.conn = h11.Connection(h11.CLIENT)

    async def request(
        self, method: str, target: str, headers: list[tuple[str, str]] | None = None, body: bytes = b""
    ) -> tuple[h11.Response, bytes]:
        head = [("host", "test"), *(headers or [])]
        if body or method == "POST":
            head.append(("content-length", str(len(body))))
        data = self.conn.send(h11.Request(method=method, target=target, headers=head))
        data += self.conn.send(h11.Data(data=body)) + self.conn.send(h11.EndOfMessage())
        await self.stream.send_all(data)
        return await self.response()

    async def response(self) -> tuple[h11.Response, bytes]:
        response, body = None, b""
        while True:
            event = self.conn.next_event()
            if event is h11.NEED_DATA:
                self.conn.receive_data(await self.stream.receive_some(65536))
            elif isinstance(event, h11.Response):
                response = event
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                assert response is not None
                if self.conn.our_state is h11.DONE and self.conn.their_state is h11.DONE:
                    self.conn.start_next_cycle()
                return response, body
            else:
                raise AssertionError(f"unexpected {event!r}")


def header(response: h11.Response, name: bytes) -> bytes | None:
    return dict(response.headers).get(name)


async def read_all(stream: trio.abc.Stream) -> bytes:
    data = b""
    while chunk := await stream.receive_some(65536):
        data += chunk
    return data


@pytest.fixture
async def serve(nursery):
    async def start(handler=echo, **options) -> tuple[str, int]:
        return await nursery.start(functools.partial(serve_tcp_http, handler, "127.0.0.1", 0, **options))

    return start


@pytest.fixture
async def address(serve) -> tuple[str, int]:
    return await serve()


@pytest.fixture
async def client(address):
    stream = await trio.open_tcp_stream(*address)
    yield Client(stream)
    await stream.aclose()


async def test_keep_alive_and_request_fields(client, address):
    assert address[0] == "127.0.0.1" and address[1] > 0
    response, body = await client.request("POST", "/echo?a=1&b=2", [("User-Agent", "t/1")], b"hello")
    assert response.status_code == 200 and response.reason == b"OK"
    assert header(response, b"content-length") == b"%d" % len(body) and header(response, b"x-served-by") == b"test"
    assert json.loads(body) == {
        "method": "POST", "path": "/echo", "query": "a=1&b=2", "target": "/echo?a=1&b=2",
        "agent": "t/1", "missing": None, "body": "hello", "tcp": True,
    }  # fmt: skip
    _, body = await client.request("GET", "/again")  # the same connection
    assert json.loads(body)["path"] == "/again"


async def test_headers_added_before_the_answer_go_with_it(client):
    response, _ = await client.request("GET", "/also")
    assert header(response, b"x-also") == b"1" and header(response, b"x-own") == b"2"


async def test_streaming_is_chunked(client):
    response, body = await client.request("GET", "/stream")
    assert header(response, b"transfer-encoding") == b"chunked" and body == b"one two three"
    response, body = await client.request("GET", "/stream")
    assert body == b"one two three"


async def test_http10_stream_ends_with_the_connection(address):
    stream = await trio.open_tcp_stream(*address)
    await stream.send_all(b"GET /stream HTTP/1.0\r\n\r\n")
    data = await read_all(stream)
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK") and b"chunked" not in head and b"connection: close" in head
    assert body == b"one two three"


async def test_head_has_no_body(client):
    response, body = await client.request("HEAD", "/x")
    assert int(header(response, b"content-length") or 0) > 0 and body == b""
    _, body = await client.request("GET", "/x")
    assert json.loads(body)["method"] == "GET"


async def test_pipelined_requests_are_answered_in_turn(address):
    stream = await trio.open_tcp_stream(*address)
    await stream.send_all(b"GET /a HTTP/1.1\r\nhost: t\r\n\r\nGET /b HTTP/1.1\r\nhost: t\r\nconnection: close\r\n\r\n")
    data = await read_all(stream)
    assert data.count(b"HTTP/1.1 200 OK") == 2 and data.index(b'"/a"') < data.index(b'"/b"')
    assert data.count(b"connection: close") == 1


async def test_connection_close_is_honoured(client):
    response, _ = await client.request("GET", "/x", [("connection", "close")])
    assert header(response, b"connection") == b"close"
    assert await client.stream.receive_some() == b""


async def test_expect_100_continue(address):
    stream = await trio.open_tcp_stream(*address)
    await stream.send_all(b"POST /up HTTP/1.1\r\nhost: t\r\ncontent-length: 4\r\nexpect: 100-continue\r\n\r\n")
    assert await stream.receive_some() == b"HTTP/1.1 100 Continue\r\n\r\n"
    await stream.send_all(b"data")
    assert b'"body": "data"' in await stream.receive_some()
    await stream.aclose()


async def test_bodies_over_the_limit_get_413(serve):
    address = await serve(max_body_bytes=10)
    stream = await trio.open_tcp_stream(*address)
    await stream.send_all(b"POST / HTTP/1.1\r\nhost: t\r\ncontent-length: 1000000\r\n\r\n" + b"x" * 5000)
    data = await read_all(stream)  # refused before the body is read, and closed
    assert data.startswith(b"HTTP/1.1 413 ") and b"connection: close" in data
    stream = await trio.open_tcp_stream(*address)
    await stream.send_all(
        b"POST / HTTP/1.1\r\nhost: t\r\ntransfer-encoding: chunked\r\n\r\n8\r\n12345678\r\n8\r\n12345678\r\n"
    )
    assert (await read_all(stream)).startswith(b"HTTP/1.1 413 ")
    client = Client(await trio.open_tcp_stream(*address))
    _, body = await client.request("POST", "/", body=b"0123456789")  # exactly the limit
    assert json.loads(body)["body"] == "0123456789"


async def test_malformed_requests_get_400_and_a_close(address):
    for garbage in (b"NOT HTTP AT ALL\r\n\r\n", b"GET / HTTP/1.1\r\nbad header\r\n\r\n", b"GET / HTTP/1.1\r\n\r\n"):
        stream = await trio.open_tcp_stream(*address)
        await stream.send_all(garbage)  # (the last lacks Host, which HTTP/1.1 requires)
        data = await read_all(stream)
        assert data.startswith(b"HTTP/1.1 400 Bad Request\r\n") and data.endswith(b"\r\n\r\nBad Request\n")


async def test_handler_failures_are_a_bare_500(serve):
    errors: list[Exception] = []
    address = await serve(on_error=errors.append)
    client = Client(await trio.open_tcp_stream(*address))
    response, body = await client.request("GET", "/silent")  # no answer: a 500, and the connection lives on
    assert response.status_code == 500
    response, _ = await client.request("GET", "/x")
    assert response.status_code == 200
    response, body = await client.request("GET", "/fail")
    assert response.status_code == 500 and b"secret" not in body and b"KeyError" not in body
    assert header(response, b"connection") == b"close" and await client.stream.receive_some() == b""
    assert [type(e) for e in errors] == [KeyError]

    for path in ("/fail-midway", "/twice", "/inject"):
        stream = await trio.open_tcp_stream(*address)
        await stream.send_all(b"GET %b HTTP/1.1\r\nhost: t\r\n\r\n" % path.encode())
        data = await read_all(stream)
        assert b"set-cookie" not in data and b"second" not in data
    assert data.startswith(b"HTTP/1.1 500 ")  # the injection was refused before anything was sent
    assert [type(e) for e in errors] == [KeyError, KeyError, RuntimeError, ValueError]


async def test_abort(address):
    stream = await trio.open_tcp_stream(*address)
    await stream.send_all(b"GET /abort?reset HTTP/1.1\r\nhost: t\r\n\r\n")
    with pytest.raises(trio.BrokenResourceError):  # ECONNRESET
        await stream.receive_some()
    stream = await trio.open_tcp_stream(*address)
    await stream.send_all(b"GET /abort HTTP/1.1\r\nhost: t\r\n\r\n")
    assert await stream.receive_some() == b""


async def test_idle_connections_are_closed(serve, autojump_clock):
    address = await serve(idle_timeout_s=30)
    client = Client(await trio.open_tcp_stream(*address))
    await client.request("GET", "/x")
    start = trio.current_time()
    assert await client.stream.receive_some() == b""
    assert trio.current_time() - start == pytest.approx(30, abs=0.5)
    stream = await trio.open_tcp_stream(*address)
    await stream.send_all(b"GET /x HTTP/1.1\r\nhost: t\r\n")  # a request that never completes
    assert await stream.receive_some() == b""


async def test_a_client_that_reads_nothing_for_the_write_timeout_is_cut_off(serve, autojump_clock):
    """Its handler's write raises SlowReader (a BrokenResourceError: it stops as if the client had gone) and the
    connection ends; a client that reads, however slowly the answer comes, is not cut."""
    outcome: list[str] = []

    async def flood(request: HttpRequest, responder: Responder) -> None:
        await responder.start(200, [])
        try:
            for _ in range(100_000 if request.path == "/flood" else 3):
                await responder.write(b"x" * 1024)
                if request.path == "/slow":
                    await trio.sleep(20)
        except SlowReader as slow:
            outcome.append(f"slow {slow.timeout_s:g}")
            raise
        outcome.append("done")

    address = await serve(flood, write_timeout_s=10)
    stalled = await trio.open_tcp_stream(*address)
    stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    await stalled.send_all(b"GET /flood HTTP/1.1\r\nhost: t\r\n\r\n")
    with trio.fail_after(60):
        while not outcome:
            await trio.sleep(1)
    assert outcome == ["slow 10"]
    received = await read_all(stalled)  # what the kernel held, then the end: a cut response, never a whole one
    assert received.startswith(b"HTTP/1.1 200 OK") and not received.endswith(b"0\r\n\r\n")
    client = Client(await trio.open_tcp_stream(*address))
    _, body = await client.request("GET", "/slow")  # 40 s for three writes, each taken at once
    assert body == b"x" * 3072 and outcome == ["slow 10", "done"]


async def test_a_slow_handler_blocks_only_its_own_connection(serve):
    release = trio.Event()

    async def handler(request: HttpRequest, responder: Responder) -> None:
        if request.path == "/slow":
            await release.wait()
        await responder.send(200, [], request.path.encode())

    address = await serve(handler)
    slow = Client(await trio.open_tcp_stream(*address))
    fast = Client(await trio.open_tcp_stream(*address))
    async with trio.open_nursery() as nursery:
        answers: list[bytes] = []

        async def ask(client: Client, path: str) -> None:
            answers.append((await client.request("GET", path))[1])

        nursery.start_soon(ask, slow, "/slow")
        await trio.testing.wait_all_tasks_blocked()
        await ask(fast, "/fast")
        assert answers == [b"/fast"]
        release.set()
    assert answers == [b"/fast", b"/slow"]


async def test_unix_socket_listener(nursery, short_tmp):
    path = os.path.join(short_tmp, "http.sock")
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    await sock.bind(path)
    sock.listen()
    await nursery.start(serve_http, echo, [trio.SocketListener(sock)])
    client = Client(await trio.open_unix_socket(path))
    response, body = await client.request("POST", "/unix", body=b"over a unix socket")
    assert response.status_code == 200 and json.loads(body)["body"] == "over a unix socket"
    assert json.loads(body)["tcp"] is False  # (no browser reaches a Unix socket: the HTTP face checks Host on TCP alone)
    _, body = await client.request("GET", "/stream")
    assert body == b"one two three"
    stream = await trio.open_unix_socket(path)
    await stream.send_all(b"GET /abort?reset HTTP/1.1\r\nhost: t\r\n\r\n")  # no RST on a Unix socket: just a close
    assert await stream.receive_some() == b""


def test_render_head():
    head = render_head(529, [("retry-after", "1"), (b"content-length", b"0")])
    assert head == b"HTTP/1.1 529 \r\nretry-after: 1\r\ncontent-length: 0\r\n\r\n"
    with pytest.raises(ValueError):
        render_head(200, [("x", "a\nb")])


# ---------------------------------------------------------------- hostile framing (issue 15)


async def test_content_length_with_transfer_encoding_is_refused_and_nothing_is_smuggled(address):
    stream = await trio.open_tcp_stream(*address)
    smuggled = b"GET /smuggled HTTP/1.1\r\nhost: t\r\n\r\n"
    await stream.send_all(
        b"POST /a HTTP/1.1\r\nhost: t\r\ncontent-length: %d\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n%b"
        % (5 + len(smuggled), smuggled)
    )
    data = await read_all(stream)  # one answer, then the connection is closed
    assert data.startswith(b"HTTP/1.1 400 ") and data.count(b"HTTP/1.1") == 1 and b"smuggled" not in data


async def test_the_head_limit_is_for_the_whole_head_however_it_is_split(address):
    stream = await trio.open_tcp_stream(*address)
    await stream.send_all(b"GET /big HTTP/1.1\r\nhost: t\r\n")
    for _ in range(25):  # 100 KB of headers, 4 KB at a time: every read is small, the head is not
        await stream.send_all(b"x-pad: " + b"p" * 4000 + b"\r\n")
    await stream.send_all(b"\r\n")
    assert (await read_all(stream)).startswith(b"HTTP/1.1 431 ")
    client = Client(await trio.open_tcp_stream(*address))  # a head just under the limit is fine
    response, _ = await client.request("GET", "/fits", [("x-pad", "p" * 60_000)])
    assert response.status_code == 200


async def test_a_pipelined_head_counts_what_came_with_the_previous_request(address):
    stream = await trio.open_tcp_stream(*address)
    second = b"GET /b HTTP/1.1\r\nhost: t\r\nx-pad: " + b"p" * 40_000
    await stream.send_all(b"GET /a HTTP/1.1\r\nhost: t\r\n\r\n" + second)
    await stream.send_all(b"p" * 40_000 + b"\r\n\r\n")  # the second head is 80 KB in all
    data = await read_all(stream)
    assert data.startswith(b"HTTP/1.1 200 ") and b"HTTP/1.1 431 " in data


async def test_connections_over_the_cap_wait_for_a_free_slot(serve):
    address = await serve(max_connections=2)
    first, second = Client(await trio.open_tcp_stream(*address)), Client(await trio.open_tcp_stream(*address))
    for client in (first, second):
        assert (await client.request("GET", "/x"))[0].status_code == 200
    third = Client(await trio.open_tcp_stream(*address))  # in the kernel's backlog, not yet accepted
    async with trio.open_nursery() as nursery:
        answered = trio.Event()

        async def ask() -> None:
            await third.request("GET", "/third")
            answered.set()

        nursery.start_soon(ask)
        await trio.testing.wait_all_tasks_blocked()
        assert not answered.is_set()
        await first.stream.aclose()  # a slot frees: the third is accepted and answered
    assert answered.is_set()



def still_open(stream: trio.SocketStream) -> bool:
    """Whether the server has kept the connection (nothing to read on it yet), without waiting."""
    try:
        return os.read(stream.socket.fileno(), 1 << 16) != b""
    except BlockingIOError:
        return True


async def newcomer_answered(address, mock_clock, after_s: float = EVICT_IDLE_AFTER_S) -> bool:
    """A request on a new connection, at the cap: not answered at once; then, AFTER_S on (an idle keep-alive's
    patience unless said), whether it was."""
    newcomer = Client(await trio.open_tcp_stream(*address))
    answered = trio.Event()
    async with trio.open_nursery() as nursery:

        async def ask() -> None:
            await newcomer.request("GET", "/newcomer")
            answered.set()

        nursery.start_soon(ask)
        await trio.testing.wait_all_tasks_blocked()
        assert not answered.is_set()
        mock_clock.jump(after_s)
        await trio.testing.wait_all_tasks_blocked()
        nursery.cancel_scope.cancel()
    return answered.is_set()


async def test_at_the_cap_a_connection_trickling_its_request_gives_its_slot_to_a_newcomer(serve, mock_clock):
    """1,100 half-sent heads held a local server's 1,024 connections, and a real request waited out the 30 s idle
    timeout (a fresh-clone trial)."""
    address = await serve(max_connections=3, idle_timeout_s=3600)
    idle = Client(await trio.open_tcp_stream(*address))
    assert (await idle.request("GET", "/first"))[0].status_code == 200  # idle longest, but not part-way through
    slow = [await trio.open_tcp_stream(*address) for _ in range(2)]
    for stream in slow:
        await stream.send_all(b"GET /slow HTTP/1.1\r\nhost: t\r\nx-pad: ")
    assert await newcomer_answered(address, mock_clock)
    assert [still_open(stream) for stream in [idle.stream, *slow]] == [True, False, True]  # the longest trickling


async def test_at_the_cap_a_connection_that_sent_nothing_since_it_connected_goes_as_soon_as_a_slow_one(serve, mock_clock):
    """A connection that sends nothing once accepted was taken for an idle keep-alive and kept a second: 4,300 of
    them on the HTTP face's 1,024 slots held an SDK call 3 s, not the 0.3 s docs/http.md says (third fresh-clone
    trial). A client sends its request as it connects; only one that has sent a request may wait for its next."""
    address = await serve(max_connections=2, idle_timeout_s=3600)
    kept = Client(await trio.open_tcp_stream(*address))
    assert (await kept.request("GET", "/x"))[0].status_code == 200
    silent = await trio.open_tcp_stream(*address)
    await trio.testing.wait_all_tasks_blocked()
    # The silent one is as suspect as a request trickling in: it goes after that patience, not a second.
    assert await newcomer_answered(address, mock_clock, after_s=EVICT_PARTIAL_AFTER_S)
    assert still_open(kept.stream) and not still_open(silent)  # the keep-alive, idle 0.1 s, stays


async def test_at_the_cap_the_longest_idle_keep_alive_gives_its_slot_to_a_newcomer(serve, mock_clock):
    address = await serve(max_connections=2, idle_timeout_s=3600)
    first, second = Client(await trio.open_tcp_stream(*address)), Client(await trio.open_tcp_stream(*address))
    for client in (first, second):
        assert (await client.request("GET", "/x"))[0].status_code == 200
    assert await newcomer_answered(address, mock_clock)
    assert not still_open(first.stream) and still_open(second.stream)

async def test_body_bytes_are_charged_to_the_shared_budget_and_given_back(serve):
    from sidecard.policies.buffers import BufferBudget

    budget = BufferBudget(1000)
    address = await serve(budget=budget)
    holder = await trio.open_tcp_stream(*address)
    await holder.send_all(b"POST /hold HTTP/1.1\r\nhost: t\r\ncontent-length: 900\r\n\r\n" + b"h" * 800)
    await trio.testing.wait_all_tasks_blocked()
    assert budget.used == 800
    stream = await trio.open_tcp_stream(*address)
    await stream.send_all(b"POST /over HTTP/1.1\r\nhost: t\r\ncontent-length: 300\r\n\r\n" + b"o" * 300)
    assert (await read_all(stream)).startswith(b"HTTP/1.1 503 ")
    await holder.send_all(b"h" * 100)
    assert b'"body": "' + b"h" * 900 in await holder.receive_some()
    assert budget.used == 0
    await holder.aclose()


async def test_refusals_can_be_rendered_by_the_server(serve):
    address = await serve(refusal=lambda status, request: (status, [("content-type", "application/json")], b'{"refused":%d}' % status))
    stream = await trio.open_tcp_stream(*address)
    await stream.send_all(b"BAD\r\n\r\n")
    data = await read_all(stream)
    assert data.startswith(b"HTTP/1.1 400 ") and b"content-type: application/json" in data
    assert data.endswith(b'\r\n\r\n{"refused":400}') and b"connection: close" in data


async def test_a_newcomer_takes_a_freed_slot_without_evicting_anyone(serve, mock_clock):
    """The acceptor, waiting for a knock with every slot taken, evicted someone even when a slot had freed
    meanwhile (a review)."""
    address = await serve(max_connections=2, idle_timeout_s=3600)
    first, second = Client(await trio.open_tcp_stream(*address)), Client(await trio.open_tcp_stream(*address))
    for client in (first, second):
        assert (await client.request("GET", "/x"))[0].status_code == 200
    await trio.testing.wait_all_tasks_blocked()  # the acceptor waits for a knock
    await first.stream.aclose()
    await trio.testing.wait_all_tasks_blocked()
    mock_clock.jump(2 * EVICT_IDLE_AFTER_S)  # the second has waited long enough to be evicted, were it needed
    newcomer = Client(await trio.open_tcp_stream(*address))
    assert (await newcomer.request("GET", "/new"))[0].status_code == 200
    assert still_open(second.stream)


async def test_a_request_begun_just_now_is_not_taken_for_a_slow_one(serve, mock_clock):
    """Part-way requests were ranked by how long the connection had waited, not by their first byte: a keep-alive
    idle for a while that had just begun to send went before a truly idle one (a review)."""
    address = await serve(max_connections=2, idle_timeout_s=3600)
    first, second = Client(await trio.open_tcp_stream(*address)), Client(await trio.open_tcp_stream(*address))
    for client in (first, second):
        assert (await client.request("GET", "/x"))[0].status_code == 200
    mock_clock.jump(2 * EVICT_IDLE_AFTER_S)
    await second.stream.send_all(b"POST /x HTTP/1.1\r\nhost: t\r\ncontent-length: 10\r\n\r\n12345")
    await trio.testing.wait_all_tasks_blocked()
    newcomer = Client(await trio.open_tcp_stream(*address))
    assert (await newcomer.request("GET", "/new"))[0].status_code == 200
    assert not still_open(first.stream) and still_open(second.stream)


async def test_a_write_cut_short_leaves_the_response_closed_to_any_last_word(autojump_clock):
    """A write cancelled part-way (a drain's end, a client gone) may have sent part of its bytes: nothing more may be
    written into that response (a last word would read as garbage), and the server ends the connection."""
    ours, theirs = trio.testing.lockstep_stream_pair()  # (each write waits for the reader)
    responder = Responder(ours, keep_alive=True, http11=True, head_only=False)
    assert responder.open and not responder.started
    async with trio.open_nursery() as nursery:
        nursery.start_soon(responder.start, 200, [])
        head = await theirs.receive_some()
        assert head.startswith(b"HTTP/1.1 200 ")
    assert responder.open and responder.started
    with trio.move_on_after(1) as cut:
        await responder.write(b"never read")
    assert cut.cancelled_caught and not responder.open
    with pytest.raises(RuntimeError):
        await responder.end()


@pytest.mark.parametrize(
    "headers",
    [
        [(b"x-bad", b"a\r\nset-cookie: x")],  # a whole line smuggled in, CRLF and all
        [("x-bad", "a\r\nset-cookie: x")],
        [(b"x-bad", b"a\nb")],
        [(b"x-bad", b"a\rb")],
        [(b"x-bad", b"a\0b")],
        [(b"x-ok", b"1"), (b"Content-Length", b"5")],  # the server frames the body itself
        [("transfer-encoding", "chunked")],
    ],
)
async def test_a_response_head_refuses_what_would_break_its_framing(headers):
    ours, theirs = trio.testing.memory_stream_pair()
    responder = Responder(ours, keep_alive=True, http11=True, head_only=False)
    with pytest.raises(ValueError):
        await responder.send(200, headers, b"body")
    assert not responder.started
    await ours.aclose()
    assert await theirs.receive_some() == b""  # nothing went out


async def test_a_response_head_as_given_in_bytes_or_str():
    ours, theirs = trio.testing.memory_stream_pair()
    responder = Responder(ours, keep_alive=True, http11=True, head_only=False)
    await responder.send(200, [(b"x-note", b"content-length: 3 is in a value"), ("x-text", "t")], b"ok")
    assert await theirs.receive_some() == (
        b"HTTP/1.1 200 OK\r\nx-note: content-length: 3 is in a value\r\nx-text: t\r\ncontent-length: 2\r\n\r\nok"
    )
    ours, theirs = trio.testing.memory_stream_pair()
    responder = Responder(ours, keep_alive=True, http11=True, head_only=False)
    await responder.send(200, [(b"x-a", b"1"), (b"Connection", b"close")], b"")
    assert await theirs.receive_some() == b"HTTP/1.1 200 OK\r\nx-a: 1\r\nconnection: close\r\ncontent-length: 0\r\n\r\n"
