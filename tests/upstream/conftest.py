"""A tiny h11 server for the pool and transport tests, with the misbehaviours they need.

Routes (by path): /json, /chunked, /close (Connection: close), /http10 (an HTTP/1.0 answer), /hang,
/reset (a reset mid-body), /truncate (EOF mid-body), /sse (three chunks a second apart, in trio time),
/slow (answers after 10 ms), /v1/messages and /model/<model>/invoke (a Messages API reply). Tests replace
or add handlers in `server.handlers`.
"""

from __future__ import annotations

import json
import socket
import struct
from collections.abc import Awaitable, Callable
from functools import partial

import h11
import pytest
import trio

from sidecard.upstream.pool import ConnectionPool, Origin

MESSAGE = {
    "id": "msg_1",
    "type": "message",
    "role": "assistant",
    "model": "claude-test",
    "content": [{"type": "text", "text": "hello"}],
    "stop_reason": "end_turn",
    "stop_sequence": None,
    "usage": {"input_tokens": 3, "output_tokens": 1},
}


class Exchange:
    """One request as the server saw it, and the means to answer it."""

    def __init__(self, stream: trio.SocketStream, conn: h11.Connection, request: h11.Request, body: bytes) -> None:
        self.stream = stream
        self.conn = conn
        self.method = request.method
        self.target = request.target
        self.path = request.target.split(b"?")[0]
        self.headers = dict(request.headers)
        self.body = body

    async def send(self, *events: h11.Event) -> None:
        """Send the events in one write."""
        await self.stream.send_all(b"".join(self.conn.send(e) or b"" for e in events))

    async def respond(self, status: int, body: bytes, headers: list[tuple[bytes, bytes]] | None = None) -> None:
        head = [(b"content-length", b"%d" % len(body)), *(headers or [])]
        await self.send(h11.Response(status_code=status, headers=head), h11.Data(data=body), h11.EndOfMessage())

    async def json(self, obj: object, status: int = 200, headers: list[tuple[bytes, bytes]] | None = None) -> None:
        await self.respond(status, json.dumps(obj).encode(), [(b"content-type", b"application/json"), *(headers or [])])

    def reset(self) -> None:
        """Close with a TCP reset."""
        self.stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.stream.socket.close()


Handler = Callable[[Exchange], Awaitable[None]]


async def _json(x: Exchange) -> None:
    await x.json({"ok": True, "path": x.target.decode()})


async def _chunked(x: Exchange) -> None:
    parts = [h11.Data(data=b"part%d;" % i) for i in range(3)]
    await x.send(h11.Response(status_code=200, headers=[]), *parts, h11.EndOfMessage())


async def _close(x: Exchange) -> None:
    await x.respond(200, b"bye", [(b"connection", b"close")])


async def _http10(x: Exchange) -> None:
    await x.stream.send_all(b"HTTP/1.0 200 OK\r\ncontent-length: 2\r\n\r\nok")
    while await x.stream.receive_some(65536):  # keep the connection open: closing it is the client's job
        pass


async def _hang(x: Exchange) -> None:
    await trio.sleep_forever()


async def _reset(x: Exchange) -> None:
    await x.send(h11.Response(status_code=200, headers=[(b"content-length", b"100")]), h11.Data(data=b"x" * 10))
    await trio.sleep(0.01)
    x.reset()


async def _truncate(x: Exchange) -> None:
    await x.send(h11.Response(status_code=200, headers=[(b"content-length", b"100")]), h11.Data(data=b"x" * 10))
    await x.stream.aclose()


async def _sse(x: Exchange) -> None:
    await x.send(h11.Response(status_code=200, headers=[(b"content-type", b"text/event-stream")]))
    for i in range(3):
        if i:
            await trio.sleep(1)
        await x.send(h11.Data(data=b"data: %d\n\n" % i))
    await x.send(h11.EndOfMessage())


async def _slow(x: Exchange) -> None:
    await trio.sleep(0.01)
    await x.respond(200, x.target)


async def _message(x: Exchange) -> None:
    await x.json(MESSAGE)


class Server:
    def __init__(self) -> None:
        self.port = 0
        self.accepted = 0  # connections accepted
        self.open = 0  # connections open now
        self.max_open = 0
        self.exchanges: list[Exchange] = []
        # a connection that has answered this many requests closes silently when the next one arrives
        self.drop_after: int | None = None
        # a connection closes (idle, unannounced) after answering this many requests
        self.close_after: int | None = None
        self.handlers: dict[bytes, Handler] = {
            b"/json": _json,
            b"/chunked": _chunked,
            b"/close": _close,
            b"/http10": _http10,
            b"/hang": _hang,
            b"/reset": _reset,
            b"/truncate": _truncate,
            b"/sse": _sse,
            b"/slow": _slow,
            b"/v1/messages": _message,
        }

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def origin(self) -> Origin:
        return Origin("http", "127.0.0.1", self.port)

    async def handle(self, stream: trio.SocketStream) -> None:
        self.accepted += 1
        self.open += 1
        self.max_open = max(self.max_open, self.open)
        conn = h11.Connection(h11.SERVER)
        try:
            served = 0
            while True:
                exchange = await self._read_request(stream, conn)
                if exchange is None or served == self.drop_after:
                    return
                self.exchanges.append(exchange)
                path = exchange.path
                handler = self.handlers.get(path) or (_message if path.startswith(b"/model/") else _json)
                await handler(exchange)
                served += 1
                if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE or served == self.close_after:
                    return
                conn.start_next_cycle()
        except (trio.BrokenResourceError, trio.ClosedResourceError, h11.ProtocolError):
            pass
        finally:
            self.open -= 1
            await trio.aclose_forcefully(stream)

    @staticmethod
    async def _read_request(stream: trio.SocketStream, conn: h11.Connection) -> Exchange | None:
        request: h11.Request | None = None
        body = bytearray()
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(await stream.receive_some(65536))
            elif type(event) is h11.Request:
                request = event
            elif type(event) is h11.Data:
                body += event.data
            elif type(event) is h11.EndOfMessage:
                assert request is not None
                return Exchange(stream, conn, request, bytes(body))
            else:  # ConnectionClosed
                return None


async def start_server(nursery: trio.Nursery) -> Server:
    server = Server()
    listeners = await nursery.start(partial(trio.serve_tcp, server.handle, 0, host="127.0.0.1"))
    server.port = listeners[0].socket.getsockname()[1]
    return server


@pytest.fixture
async def server(nursery: trio.Nursery) -> Server:
    return await start_server(nursery)


@pytest.fixture
def make_server(nursery: trio.Nursery) -> Callable[[], Awaitable[Server]]:
    """For tests that need a second origin."""
    return partial(start_server, nursery)


@pytest.fixture
async def pool():
    pool = ConnectionPool(max_connections=8)
    yield pool
    await pool.aclose()
