"""A lean HTTP/1.1 server on Trio and httptools (llhttp): the HTTP face, the simulated upstream, the metrics endpoint.

One task per connection, its requests answered in turn (keep-alive; pipelined requests wait their turn). A request body is read whole,
up to `max_body_bytes` (413 beyond). A handler answers through a `Responder`: whole (`send`, with
Content-Length) or streamed (`start`/`write`/`end`, chunked). A malformed request gets a 400 and the connection
is closed; a handler that fails or forgets to answer gives the peer a bare 500, never a traceback. A server
may render those refusals itself (`refusal`, given the request's headers as far as they were read), e.g. as its
API's error body.

Hostile input: the request head is limited to `MAX_HEAD_BYTES` in all (431), however it is split into reads (a
pipelined head counts the bytes that came with the previous request, its body excepted); a request with both
Content-Length and Transfer-Encoding is refused and its connection closed (RFC 9112 §6.1: the two framings
disagreeing is how requests are smuggled), as is an HTTP/1.1 request without Host; `max_connections` caps the
connections served at once (more wait in the listen backlog, holding no descriptor of ours, or take the slot of
a slow or idle connection, `_Waiting.evict`: a slowloris holds nothing for long); a shared `budget`
bounds the body bytes held for requests not yet fully received, across connections (503 for the one that would
exceed it); a client that takes no part of a response for `write_timeout_s` is cut off (`SlowReader`), so one that
stops reading cannot hold its request, and what the request holds, for the length of the answer.

llhttp (through httptools) parses requests, strictly: obsolete line folding and a bad header are refused (400),
and so is a Transfer-Encoding other than chunked (501: a coding we do not implement). It parses all it is fed, so requests a client pipelined in one read are queued
on the connection and answered in turn. Responses are written as raw bytes, at once from the handler's task
when the socket takes them (through `trio.SocketStream.send_all` only for what it does not).
"""

from __future__ import annotations

import functools
import http
import math
import os
import re
import select
import socket
import struct
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Final, NoReturn

import httptools
import trio

from .policies.buffers import BufferBudget
from .sockio import receive

Headers = Sequence[tuple[str, str]] | Sequence[tuple[bytes, bytes]]
ErrorHook = Callable[[Exception], None]
# A refusal's status and the refused request's headers read so far (whole ones: a head refused part-way has only
# those before the cut) -> the response to send instead: (status, headers, body); the server adds the framing.
Refusal = Callable[[int, Sequence[tuple[bytes, bytes]]], tuple[int, Headers, bytes]]

RECEIVE_BYTES: Final = 65536
MAX_HEAD_BYTES: Final = 64 * 1024
LINGER_S: Final = 1.0  # after refusing a request: how long to drain what the client still sends, so it reads our answer
# At the connection cap, a newcomer takes the slot of a connection whose request began this long ago and is still
# coming (a local client sends one in a few milliseconds), else of one idle this long between requests.
EVICT_PARTIAL_AFTER_S: Final = 0.1
EVICT_IDLE_AFTER_S: Final = 1.0
DEPARTED_CHECK_S: Final = 0.5  # how often the sockets of requests being handled are looked at for a client gone
_DEPARTED: Final = select.POLLRDHUP | select.POLLHUP | select.POLLERR
_UNSAFE: Final = re.compile(rb"[\r\n\0]")
_FRAMING: Final = frozenset({b"content-length", b"transfer-encoding"})
_READ_HERE: Final = frozenset({*_FRAMING, b"connection", b"host", b"expect"})  # request headers the server acts on
_NO_BODY: Final = frozenset({204, 304})
_CONTINUE: Final = b"HTTP/1.1 100 Continue\r\n\r\n"
_PEER_GONE: Final = (trio.BrokenResourceError, trio.ClosedResourceError)


class SlowReader(trio.BrokenResourceError):
    """The client took none of a response's bytes for the server's `write_timeout_s`: it stopped reading, and its
    connection is dropped. A `BrokenResourceError`, as when the client has gone: whatever was writing ends so."""

    def __init__(self, timeout_s: float) -> None:
        super().__init__(f"the client read nothing for {timeout_s:g} s")
        self.timeout_s = timeout_s


class HttpRequest:
    __slots__ = ("body", "headers", "method", "path", "query", "target", "tcp")

    def __init__(self, method: str, target: str, headers: list[tuple[bytes, bytes]], body: bytes, *, tcp: bool = False) -> None:
        self.method = method
        self.target = target
        self.path, _, self.query = target.partition("?")
        self.headers = headers  # names lowercased, in arrival order
        self.body = body
        self.tcp = tcp  # it came over a TCP socket, which a browser can reach (not a Unix socket, nor a TLS or test stream)

    def header(self, name: str) -> str | None:
        """The first value of header NAME (case-insensitive), or None."""
        wanted = name.lower().encode("latin-1")
        for key, value in self.headers:
            if key == wanted:
                return value.decode("latin-1")
        return None


_IDLE, _STREAMING, _DONE, _ABORTED = range(4)


class Responder:
    """Answers one request. Use either `send`, or `start`, `write`... and `end`; or `abort` at any time."""

    __slots__ = ("_also", "_fd", "_head_only", "_http11", "_keep_alive", "_state", "_stream", "_waiting", "_write_timeout_s")

    def __init__(
        self, stream: trio.abc.Stream, *, keep_alive: bool, http11: bool, head_only: bool, fd: int = -1,
        write_timeout_s: float = math.inf,
    ) -> None:
        self._stream = stream
        self._fd = fd  # the socket under `stream`, for writes that need no wait; -1: none (a TLS stream, a test's)
        self._write_timeout_s = write_timeout_s
        self._waiting = False
        self._keep_alive = keep_alive
        self._http11 = http11
        self._head_only = head_only
        self._state = _IDLE
        self._also: Headers = ()

    def add_headers(self, headers: Headers) -> None:
        """Headers for whatever response this request gets, added before it is given (a browser's CORS headers)."""
        self._also = [*self._also, *headers]  # type: ignore[list-item]

    @property
    def stream(self) -> trio.abc.Stream:
        """The raw connection, for fault injection; whoever writes to it directly must `abort` afterwards."""
        return self._stream

    @property
    def started(self) -> bool:
        """True once the status line is out: from then on only the body can report a failure."""
        return self._state != _IDLE

    @property
    def open(self) -> bool:
        """True while a response can still be given or ended: none sent yet, or a streamed one whose writes were whole."""
        return self._state == _IDLE or self._state == _STREAMING

    async def send(self, status: int, headers: Headers, body: bytes) -> None:
        """The whole response, with Content-Length."""
        self._check_unanswered()
        head = self._head(status, headers)
        self._state = _DONE
        if status in _NO_BODY:
            data = head + b"\r\n"
        else:
            data = head + b"content-length: %d\r\n\r\n" % len(body)
            if not self._head_only:
                data += body
        await self._write(data)

    async def start(self, status: int, headers: Headers) -> None:
        """Begin a streamed response: chunked, or delimited by closing the connection for an HTTP/1.0 client."""
        self._check_unanswered()
        if not self._http11:
            self._keep_alive = False  # the body ends when the connection does
        head = self._head(status, headers)
        self._state = _STREAMING
        await self._write(head + (b"transfer-encoding: chunked\r\n\r\n" if self._http11 else b"\r\n"))

    async def write(self, chunk: bytes) -> None:
        if self._state != _STREAMING:
            raise RuntimeError("write() before start() or after end()")
        if chunk and not self._head_only:
            await self._write(b"%x\r\n%b\r\n" % (len(chunk), chunk) if self._http11 else chunk)

    async def end(self) -> None:
        if self._state != _STREAMING:
            raise RuntimeError("end() before start() or after end()")
        self._state = _DONE
        if self._http11 and not self._head_only:
            await self._write(b"0\r\n\r\n")

    async def abort(self, *, reset: bool = True) -> None:
        """Drop the connection now; with `reset`, a TCP peer sees a reset (RST) rather than an orderly close."""
        self._state = _ABORTED
        stream = self._stream
        if (
            reset
            and isinstance(stream, trio.SocketStream)
            and stream.socket.family in (socket.AF_INET, socket.AF_INET6)
        ):
            stream.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        await trio.aclose_forcefully(stream)

    async def _write(self, data: bytes) -> None:
        """Write what the socket takes now, and the rest (or a failure) through the stream. While a write waits in
        `send_all`, none goes around it (a second writer meets trio's BusyResourceError, as before); one that waits
        `write_timeout_s` raises `SlowReader`."""
        if self._fd >= 0 and not self._waiting:
            try:
                written = os.write(self._fd, data)
            except OSError:  # would block, or the peer is gone: send_all waits, or says so in trio's terms
                written = 0
            if written == len(data):
                return
            data = data[written:]
        self._waiting = True
        try:
            with trio.move_on_after(self._write_timeout_s) as waited:
                await self._stream.send_all(data)
        except BaseException:
            self._state = _ABORTED  # (cancelled or failed) part of DATA may be out: the response is cut, the connection ends
            raise
        finally:
            self._waiting = False
        if waited.cancelled_caught:
            self._state = _ABORTED
            raise SlowReader(self._write_timeout_s)

    def _check_unanswered(self) -> None:
        if self._state != _IDLE:
            raise RuntimeError("this request was already answered")

    def _head(self, status: int, headers: Headers) -> bytes:
        if self._also:
            headers = [*headers, *self._also]  # type: ignore[list-item]
        lines = [_status_line(status)]
        for name, value in headers:
            if isinstance(name, str):
                name = name.encode("latin-1")
            if isinstance(value, str):
                value = value.encode("latin-1")
            lowered = name.lower()
            if lowered in _FRAMING:
                raise ValueError(f"the server sets {name!r} itself")
            if lowered == b"connection" and b"close" in value.lower():
                self._keep_alive = False
                continue
            lines.append(b"%b: %b\r\n" % (name, value))
        if not self._keep_alive:
            lines.append(b"connection: close\r\n")
        head = b"".join(lines)
        # Each line ends in the one CRLF written here: any other CR, LF (or a NUL) came in a name or value.
        if head.count(b"\n") != len(lines) or head.count(b"\r") != len(lines) or b"\0" in head:
            _encoded(headers)  # (raises, naming the header)
        return head


def render_head(status: int, headers: Headers) -> bytes:
    """A status line and header block, blank line included, for handlers that write raw bytes to `stream`."""
    return b"".join([_status_line(status), *(b"%b: %b\r\n" % pair for pair in _encoded(headers)), b"\r\n"])


@functools.cache
def _status_line(status: int) -> bytes:
    if not 200 <= status <= 599:
        raise ValueError(f"cannot answer with status {status}")
    try:
        reason = http.HTTPStatus(status).phrase
    except ValueError:
        reason = ""  # 529 and friends: the reason phrase is optional
    return f"HTTP/1.1 {status} {reason}\r\n".encode("ascii")


def _encoded(headers: Headers) -> list[tuple[bytes, bytes]]:
    pairs: list[tuple[bytes, bytes]] = []
    parts: list[bytes] = []
    for name, value in headers:
        if isinstance(name, str):
            name = name.encode("latin-1")
        if isinstance(value, str):
            value = value.encode("latin-1")
        pairs.append((name, value))
        parts += (name, value)
    if _UNSAFE.search(b" ".join(parts)):  # one search for all (then which one)
        unsafe = next(name for name, value in pairs if _UNSAFE.search(name) or _UNSAFE.search(value))
        raise ValueError(f"header {unsafe!r} contains CR, LF or NUL")
    return pairs


Handler = Callable[[HttpRequest, Responder], Awaitable[None]]


class _Refused(Exception):
    def __init__(self, status: int) -> None:
        super().__init__(status)
        self.status = status


class _Exchange:
    """A request as read, with what the answer needs to know about the client."""

    __slots__ = ("http11", "keep_alive", "request")

    def __init__(self, request: HttpRequest, keep_alive: bool, http11: bool) -> None:
        self.request = request
        self.keep_alive = keep_alive
        self.http11 = http11


class _Waiting:
    """The connections waiting for a request, the longest-waiting first, each by its IDLE scope.

    `run()` ends each one `idle_timeout_s` after it began to wait (all on one timer: the oldest is always the next
    to expire, so no deadline moves per request). At the connection cap, one of them gives its slot to a newcomer
    (`evict`), so that slow or idle connections (a local slowloris, a pool of idle keep-alives) cannot hold the
    server for `idle_timeout_s`: one part-way through its request, or silent since it connected, first, since no
    real client trickles its request or connects without sending one."""

    def __init__(self, idle_timeout_s: float) -> None:
        self._idle_timeout_s = idle_timeout_s
        self._since: dict[trio.CancelScope, tuple[float, _Incoming]] = {}  # (insertion order: oldest first)
        self._lot = trio.lowlevel.ParkingLot()

    def add(self, idle: trio.CancelScope, incoming: _Incoming) -> None:
        if not self._since:
            self._lot.unpark()
        self._since[idle] = (trio.current_time(), incoming)

    def remove(self, idle: trio.CancelScope) -> None:
        self._since.pop(idle, None)

    async def run(self) -> NoReturn:
        since = self._since
        while True:
            if not since:
                await self._lot.park()
                continue
            idle, (began, _) = next(iter(since.items()))
            expires = began + self._idle_timeout_s
            if trio.current_time() < expires:
                await trio.sleep_until(expires)  # (the oldest may have been served meanwhile: then look again)
            elif since.pop(idle, None) is not None:
                idle.cancel()

    def evict(self, now: float) -> bool:
        """End the connection whose turn it is: one whose request is still coming `EVICT_PARTIAL_AFTER_S` after its
        first byte, or that has sent nothing that long since it connected; else the longest idle between requests
        for `EVICT_IDLE_AFTER_S`; False if there is none."""
        chosen = longest_idle = None
        for idle, (since, incoming) in self._since.items():  # (oldest wait first)
            if incoming.started or not incoming.requested:
                if now - (incoming.began if incoming.started else since) >= EVICT_PARTIAL_AFTER_S:
                    chosen = idle
                    break
            elif longest_idle is None and now - since >= EVICT_IDLE_AFTER_S:
                longest_idle = idle
        chosen = chosen or longest_idle
        if chosen is None:
            return False
        del self._since[chosen]
        chosen.cancel()
        return True


class _Handling:
    """The connections whose request is being handled, each by its IDLE scope. One whose client has left (closed
    its end, or been reset) has that scope cancelled, which stops the handler (an upstream call whose answer
    nobody would read) and ends the connection. All are looked at together every `DEPARTED_CHECK_S`, in one
    poll, so a request costs no task, scope or syscall of its own. As in nginx, a client that shuts its sending
    side while it waits for the answer has left (HTTP clients do not half-close)."""

    def __init__(self) -> None:
        self._by_fd: dict[int, trio.CancelScope] = {}
        self._lot = trio.lowlevel.ParkingLot()

    def add(self, fd: int, idle: trio.CancelScope) -> None:
        if not self._by_fd:
            self._lot.unpark()
        self._by_fd[fd] = idle

    def remove(self, fd: int) -> None:
        self._by_fd.pop(fd, None)

    async def run(self) -> NoReturn:
        by_fd = self._by_fd
        while True:
            if not by_fd:
                await self._lot.park()
            await trio.sleep(DEPARTED_CHECK_S)
            poller = select.poll()
            for fd in by_fd:
                poller.register(fd, select.POLLRDHUP)
            for fd, events in poller.poll(0):
                if events & _DEPARTED and (idle := by_fd.pop(fd, None)) is not None:
                    idle.cancel()


class _Settings:
    __slots__ = ("budget", "handling", "max_body_bytes", "on_error", "refusal", "waiting", "write_timeout_s")

    def __init__(
        self, max_body_bytes: int, waiting: _Waiting, on_error: ErrorHook | None, budget: BufferBudget | None,
        refusal: Refusal, handling: _Handling, write_timeout_s: float = math.inf,
    ) -> None:
        self.max_body_bytes = max_body_bytes
        self.write_timeout_s = write_timeout_s
        self.handling = handling
        self.waiting = waiting
        self.on_error = on_error
        self.budget = budget
        self.refusal = refusal


class _Incoming:
    """The requests arriving on one connection: httptools' callbacks build them; whole ones queue in `ready`."""

    __slots__ = (
        "parser", "settings", "ready", "refused", "head_bytes", "fed_body", "upgraded", "started", "head_done", "url",
        "headers", "body", "held", "framings", "close", "host", "expect", "too_large", "began", "tcp", "requested",
    )

    def __init__(self, settings: _Settings, tcp: bool) -> None:
        self.parser = httptools.HttpRequestParser(self)
        self.settings = settings
        self.tcp = tcp
        self.ready: deque[_Exchange] = deque()
        self.refused: _Refused | None = None  # the request after those in `ready` is refused
        self.head_bytes = 0  # bytes read while this request's head was incomplete
        self.fed_body = 0  # body bytes in the data being fed
        self.upgraded = False  # the client asked to switch protocols: the connection ends after its requests
        self.held = 0  # body bytes charged to the budget
        self.requested = False  # a request came whole: from then on the client may wait between requests (keep-alive)
        self._next()

    def _next(self) -> None:
        self.started = self.head_done = False
        self.began = 0.0  # when its first byte came (for `_Waiting.evict`), once `started`
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.body = bytearray()  # one buffer, not a list of chunks: freed whole, its memory goes back at once
        self.framings = 0
        self.close = self.host = self.expect = self.too_large = False

    def feed(self, data: bytes) -> None:
        """Parse `data`; a request to refuse is `refused`, after the whole ones before it."""
        self.fed_body = 0
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self.upgraded = True
        except httptools.HttpParserCallbackError as exc:
            if not isinstance(exc.__context__, _Refused):
                raise
            self.refused = exc.__context__
        except httptools.HttpParserError:
            self.refused = _Refused(400)
        if self.started and not self.head_done:
            # A head begun after a request that ended in this data: count this data toward it, but for the body.
            self.head_bytes = max(self.head_bytes, len(data) - self.fed_body)

    def end(self) -> None:
        """The connection is over: the budget gets its bytes back and the buffers go now. (The parser and this
        object hold each other: left to the garbage collector, which the daemon runs rarely (`process.py`), a
        half-sent body's memory stayed until a collection came.)"""
        self.give_back()
        self.body = bytearray()
        self.ready.clear()

    def give_back(self) -> None:
        if self.held:
            self.settings.budget.give(self.held)  # type: ignore[union-attr]
            self.held = 0

    # -- parser callbacks

    def on_message_begin(self) -> None:
        self.started = True
        self.began = trio.current_time()

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        name = name.lower()
        value = value.strip(b" \t")
        if name in _READ_HERE:  # (most of an SDK's dozen headers are not: one lookup, not five comparisons)
            self._act_on(name, value)
        self.headers.append((name, value))

    def _act_on(self, name: bytes, value: bytes) -> None:
        if name == b"content-length":
            if not value.isdigit():
                raise _Refused(400)
            if int(value) > self.settings.max_body_bytes:
                self.too_large = True  # refused at the head's end, before a byte of the body: its refusal sees every header
            self.framings |= 1
        elif name == b"transfer-encoding":
            if value.lower() != b"chunked":
                raise _Refused(501)  # a coding we cannot undo (RFC 9112 §6.1), or chunked not last
            self.framings |= 2
        elif name == b"connection":
            self.close = self.close or b"close" in value.lower()
        elif name == b"host":
            self.host = True
        elif name == b"expect":
            self.expect = value.lower() == b"100-continue"

    def on_headers_complete(self) -> None:
        if self.framings == 3:
            raise _Refused(400)  # both framings: refused, and the connection closed
        if self.parser.get_http_version() == "1.1" and not self.host:
            raise _Refused(400)
        if self.too_large:
            raise _Refused(413)
        self.head_done = True

    def on_body(self, data: bytes) -> None:
        self.fed_body += len(data)
        if len(self.body) + len(data) > self.settings.max_body_bytes:
            raise _Refused(413)
        budget = self.settings.budget
        if budget is not None:
            if not budget.take(len(data)):
                raise _Refused(503)
            self.held += len(data)
        self.body += data

    def on_message_complete(self) -> None:
        parser = self.parser
        http11 = parser.get_http_version() == "1.1"
        request = HttpRequest(
            parser.get_method().decode("ascii"), self.url.decode("latin-1"), self.headers, bytes(self.body), tcp=self.tcp
        )
        self.ready.append(_Exchange(request, http11 and not self.close, http11))
        self.requested = True
        self.give_back()
        self.head_bytes = 0
        self._next()


async def _receive(stream: trio.abc.Stream, fd: int, size: int, wait_first: bool) -> bytes:
    """From the socket itself when there is one (`fd`), else through the stream (TLS, tests' memory streams)."""
    return await receive(fd, size, wait_first=wait_first) if fd >= 0 else await stream.receive_some(size)


async def _read_request(
    stream: trio.abc.Stream, incoming: _Incoming, settings: _Settings, idle: trio.CancelScope, fd: int
) -> _Exchange | None:
    """The next request whole, or None if the client closed; a client silent for `idle_timeout_s` has the
    connection's IDLE scope cancelled (`_Waiting`), which ends the connection (its handler never runs in it:
    a cancel that comes as the request completes ends the connection instead).

    The timeout covers the whole request, so a client trickling bytes cannot hold a connection forever.
    """
    ready = incoming.ready
    if ready:
        return ready.popleft()
    if incoming.refused is not None:
        raise incoming.refused
    if incoming.upgraded:
        return None
    continued = False
    # Nothing of this request read yet: the client most likely sent it after its last answer, so wait for it.
    wait_first = not incoming.started
    waiting = settings.waiting
    waiting.add(idle, incoming)
    try:
        while not ready:
            if incoming.head_done:
                if incoming.expect and not continued and not incoming.body:
                    continued = True
                    await stream.send_all(_CONTINUE)
                data = await _receive(stream, fd, RECEIVE_BYTES, wait_first)
            else:  # the head's limit is for all of it, however it is split into reads
                room = MAX_HEAD_BYTES - incoming.head_bytes
                if room <= 0:
                    raise _Refused(431)
                data = await _receive(stream, fd, min(room, RECEIVE_BYTES), wait_first)
                incoming.head_bytes += len(data)
            wait_first = False
            if not data:
                if incoming.started:
                    raise _Refused(400)  # the client went quiet mid-request
                return None
            incoming.feed(bytes(data))  # (a no-op on bytes)
            if not ready:
                if incoming.refused is not None:
                    raise incoming.refused
                if incoming.upgraded:
                    return None
        if idle.cancel_called:  # (too late, in the same pass: its scope stays cancelled, so the connection ends)
            return None
        return ready.popleft()
    finally:
        waiting.remove(idle)  # the handler's time is not idle time


def plain_refusal(status: int, request: Sequence[tuple[bytes, bytes]] = ()) -> tuple[int, Headers, bytes]:
    """The default refusal: the status's reason phrase as plain text."""
    return status, [(b"content-type", b"text/plain")], (_status_line(status)[13:-2] or b"error") + b"\n"


async def _refuse(stream: trio.abc.Stream, status: int, refusal: Refusal, request: Sequence[tuple[bytes, bytes]]) -> None:
    """An error, then close: after draining what the client is still sending, so it reads the answer instead
    of a reset (closing a socket with unread input sends RST). REQUEST: its headers, as far as they were read."""
    status, headers, body = refusal(status, request)
    framing = [(b"content-length", b"%d" % len(body)), (b"connection", b"close")]
    try:
        await stream.send_all(render_head(status, [*headers, *framing]) + body)
        if isinstance(stream, trio.abc.HalfCloseableStream):
            await stream.send_eof()
            with trio.move_on_after(LINGER_S):
                while await stream.receive_some(RECEIVE_BYTES):
                    pass
    except _PEER_GONE:
        pass


async def _serve_connection(stream: trio.abc.Stream, handler: Handler, settings: _Settings) -> None:
    on_error = settings.on_error
    sock = stream.socket if isinstance(stream, trio.SocketStream) else None
    fd = sock.fileno() if sock is not None else -1
    incoming = _Incoming(settings, sock is not None and sock.family != socket.AF_UNIX)
    idle = trio.CancelScope()
    handling = settings.handling
    try:
        with idle:  # cancelled when a request is awaited too long (`_read_request`), or its client left (`_Handling`)
            while True:
                try:
                    exchange = await _read_request(stream, incoming, settings, idle, fd)
                except _Refused as refused:
                    await _refuse(stream, refused.status, settings.refusal, incoming.headers)
                    return
                if exchange is None:
                    return
                request = exchange.request
                responder = Responder(
                    stream, keep_alive=exchange.keep_alive, http11=exchange.http11, head_only=request.method == "HEAD", fd=fd,
                    write_timeout_s=settings.write_timeout_s,
                )
                if fd >= 0:
                    handling.add(fd, idle)
                try:
                    await handler(request, responder)
                except Exception as exc:
                    if on_error is not None and not isinstance(exc, _PEER_GONE):  # (those are the peer leaving)
                        on_error(exc)
                    if responder._state == _IDLE:
                        await _refuse(stream, 500, settings.refusal, request.headers)
                    return
                finally:
                    handling.remove(fd)
                if responder._state == _ABORTED:
                    return
                if responder._state == _IDLE:
                    await responder.send(500, [(b"content-type", b"text/plain")], b"the handler did not answer\n")
                elif responder._state == _STREAMING:
                    await responder.end()
                if not responder._keep_alive or (incoming.upgraded and not incoming.ready):
                    return
    except _PEER_GONE:
        pass
    except Exception as exc:  # a bug here must cost one connection, not the server
        if on_error is not None:
            on_error(exc)
    finally:
        incoming.end()
        await trio.aclose_forcefully(stream)


class _Capped(trio.abc.Listener[trio.abc.Stream]):
    """Accepts only while a connection slot is free; the connection gives its slot back when it ends. With none
    free, a newcomer knocking ends a connection that has waited long enough for its request (`_Waiting`)."""

    def __init__(self, listener: trio.abc.Listener[trio.abc.Stream], slots: trio.Semaphore, waiting: _Waiting) -> None:
        self._listener = listener
        self._slots = slots
        self._waiting = waiting

    async def accept(self) -> trio.abc.Stream:
        sock = getattr(self._listener, "socket", None)
        while True:
            if self._slots.value == 0 and sock is not None:
                await trio.lowlevel.wait_readable(sock)  # a newcomer knocks
                if self._slots.value == 0:  # (none freed meanwhile)
                    self._waiting.evict(trio.current_time())  # its slot comes back as its task ends
            with trio.move_on_after(EVICT_PARTIAL_AFTER_S / 2):  # (then look again: one may have waited enough)
                await self._slots.acquire()
                break
        try:
            return await self._listener.accept()
        except BaseException:
            self._slots.release()
            raise

    async def aclose(self) -> None:
        await self._listener.aclose()


async def serve_http(
    handler: Handler,
    listeners: Sequence[trio.abc.Listener[trio.abc.Stream]],
    *,
    max_body_bytes: int = 32 << 20,
    idle_timeout_s: float = 75.0,
    write_timeout_s: float = math.inf,
    max_connections: int | None = None,
    budget: BufferBudget | None = None,
    refusal: Refusal = plain_refusal,
    on_error: ErrorHook | None = None,
    handler_nursery: trio.Nursery | None = None,
    task_status: trio.TaskStatus[list[trio.abc.Listener[trio.abc.Stream]]] = trio.TASK_STATUS_IGNORED,
) -> NoReturn:
    """Serve HTTP on LISTENERS (TCP or Unix sockets) until cancelled; `task_status.started` gets the listeners.

    `on_error` hears of handler exceptions (the peer only gets a 500), but for a broken or closed stream.
    Connections run in `handler_nursery` when given (so their owner can drain them), else in our own; so does the
    watch for clients that left (`_Handling`), which must outlive the accept loop while its owner drains them.
    `max_connections` caps connections across all LISTENERS: beyond it, new ones wait in the listen backlog, or
    take the slot of a slow or idle one (`_Waiting.evict`). A connection that waits
    `idle_timeout_s` for a request (all of it) is closed, and so is one that takes no part of a response for
    `write_timeout_s` (the handler's write raises `SlowReader`).
    """
    waiting = _Waiting(idle_timeout_s)
    settings = _Settings(max_body_bytes, waiting, on_error, budget, refusal, _Handling(), write_timeout_s)
    serving: list[trio.abc.Listener[trio.abc.Stream]] = list(listeners)
    slots = None if max_connections is None else trio.Semaphore(max_connections)
    if slots is not None:
        serving = [_Capped(listener, slots, waiting) for listener in serving]

    async def connection(stream: trio.abc.Stream) -> None:
        try:
            await _serve_connection(stream, handler, settings)
        finally:
            if slots is not None:
                slots.release()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(waiting.run)  # (while serving: a drain ends the connections itself)
        (handler_nursery or nursery).start_soon(settings.handling.run)
        await trio.serve_listeners(connection, serving, handler_nursery=handler_nursery, task_status=task_status)


async def serve_tcp_http(
    handler: Handler,
    host: str,
    port: int,
    *,
    task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED,
    **options: Any,
) -> NoReturn:
    """Serve on HOST:PORT (0 for any free port); `task_status.started` gets the bound (host, port). OPTIONS are
    `serve_http`'s."""
    listeners = await trio.open_tcp_listeners(port, host=host)
    bound_host, bound_port = listeners[0].socket.getsockname()[:2]
    task_status.started((bound_host, bound_port))  # already listening: early connections wait in the backlog
    await serve_http(handler, listeners, **options)
