"""A Trio-native HTTP/1.1 client connection pool; responses parsed by httptools (llhttp).

Every upstream call goes through here (the fast path directly, the SDK through `TrioTransport`), so the hot
path stays lean: no logging, no scans over waiters. A request's head is rendered and checked once
(`prepare`; the fast path keeps its own), so a call costs one concatenation and one send. Plain connections
are non-blocking stdlib sockets: a send or receive that can go at once does, and only a socket that would
block waits through `trio.lowlevel.wait_readable` / `wait_writable` (TLS goes through `trio.SSLStream`).

- Keep-alive connections per origin, reused LIFO (the warmest first); idle ones expire after
  `idle_timeout_s` and are checked for a server-side close before reuse. Every connection opened is kept
  (unless `max_idle_per_origin` says otherwise): a burst pays its connects once, not again for each burst.
- At most `max_connections` open at once (idle ones included). A request over the limit waits in a FIFO
  queue; a finished connection is handed straight to the first waiter (or closed to free its slot for a
  waiter on another origin), so a wake-up is O(1) and newcomers cannot overtake.
- Failures are this module's `TransportError` types (named after httpx2's, which the SDK path maps them
  to at its edge), so importing the pool costs no HTTP library; a reused connection that fails before any
  byte of the response is retried once on a fresh one.
- A connection that did not finish its exchange cleanly (error, cancellation, early close, `Connection:
  close`, HTTP/1.0) is closed, never reused; its slot is released on every path. Closing is synchronous
  (the socket is dropped, TLS without close_notify, as HTTP clients do), so it needs no shielding.
- Healthy connections the pool gives up (expired, surplus) are closed by `run()`, its housekeeping task,
  in batches, so no request or reply waits while thousands of sockets close; without `run()` they are
  closed where they are given up.

A `PoolResponse` holds its connection until the body is read to the end or `aclose()` is called: callers
must do one or the other, or the connection's slot is lost.

Over 500 lines on purpose: the per-origin queues, the connection slots and the exchange share the invariants
above (a slot released on every path), which are easiest to check in one file.
"""

from __future__ import annotations

import ipaddress
import math
import re
import select
import socket
import ssl
from collections import deque
from collections.abc import AsyncIterator
from typing import Final, NamedTuple
from urllib.parse import urlsplit

import httptools
import trio

from ..scopes import timeout_scope

_RECEIVE_BYTES: Final = 65536
_DEFAULT_PORTS: Final = {"http": 80, "https": 443}
_BODILESS: Final = frozenset((b"GET", b"HEAD", b"OPTIONS", b"TRACE"))
_CLOSE_BATCH: Final = 64  # sockets closed between two checkpoints of the housekeeping task
# What a request may carry (RFC 9110): a token for a method or a header name; no control character but HTAB
# in a value (so no header can be smuggled in); no whitespace or control character in the target.
_TOKEN: Final = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_BAD_VALUE: Final = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]|^[ \t]|[ \t]$")
_BAD_TARGET: Final = re.compile(rb"[\x00-\x20\x7f]")
_HEAD, _BODY, _DONE = range(3)  # where a response stands


class TransportError(Exception):
    """A request failed below HTTP: connecting, sending, receiving, or the exchange's framing."""


class TransportTimeout(TransportError):
    """A transport step took longer than its timeout."""


class ConnectError(TransportError):
    pass


class ReadError(TransportError):
    pass


class WriteError(TransportError):
    pass


class RemoteProtocolError(TransportError):
    """The server broke HTTP/1.1 (or hung up without an answer)."""


class LocalProtocolError(TransportError):
    """The request itself is not valid HTTP/1.1 (a bad header, a body longer than declared)."""


class ConnectTimeout(TransportTimeout):
    pass


class ReadTimeout(TransportTimeout):
    pass


class WriteTimeout(TransportTimeout):
    pass


class PoolTimeout(TransportTimeout):
    """Every one of `max_connections` was busy for longer than the request's `pool_timeout`."""


class Origin(NamedTuple):
    """Where a request goes; the key of a pool's keep-alive connections."""

    scheme: str  # "http" | "https"
    host: str
    port: int

    @classmethod
    def from_url(cls, url: str) -> Origin:
        parts = urlsplit(url)  # lowercases the scheme and the host
        if parts.scheme not in _DEFAULT_PORTS or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {url!r}")
        return cls(parts.scheme, parts.hostname, parts.port or _DEFAULT_PORTS[parts.scheme])


class _Stale(Exception):
    """A reused connection failed before any byte of the response arrived: the server had closed it."""


class _Site:
    """Per-origin state."""

    __slots__ = ("origin", "host_header", "family", "idle")

    def __init__(self, origin: Origin) -> None:
        self.origin = origin
        # An IP address needs no resolving and has one address to try: connect to it directly (a third of
        # open_tcp_stream's CPU, which matters when a burst opens thousands). None: a name, resolved each time.
        try:
            self.family: int | None = socket.AF_INET6 if ipaddress.ip_address(origin.host).version == 6 else socket.AF_INET
        except ValueError:
            self.family = None
        host = f"[{origin.host}]" if ":" in origin.host else origin.host  # IPv6 literal
        if origin.port != _DEFAULT_PORTS[origin.scheme]:
            host = f"{host}:{origin.port}"
        self.host_header = host.encode("idna")
        # Idle connections, oldest on the left: reuse from the right, expire from the left.
        self.idle: deque[_Conn] = deque()


class _Conn:
    """One connection, and the parser's callbacks for the response on it (httptools calls them as it parses)."""

    __slots__ = (
        "site", "sock", "tls", "parser", "reused", "idle_since", "state", "informational", "stray", "closing",
        "status", "reason", "headers", "body", "framed", "keep_alive", "no_body", "readiness",
    )

    def __init__(self, site: _Site, sock: socket.socket, tls: trio.SSLStream[trio.SocketStream] | None) -> None:
        self.site = site
        self.sock = sock  # non-blocking; under `tls` when there is one
        self.tls = tls
        self.parser = httptools.HttpResponseParser(self)
        # Asked before reuse. A poll, not a peek: a recv on TCP also sends the ACK it had delayed, a packet that
        # otherwise rides on the next request (several µs a request on loopback).
        self.readiness = select.poll()
        self.readiness.register(sock, select.POLLIN | select.POLLRDHUP)
        self.reused = False
        self.idle_since = 0.0
        self.begin(False, False)

    def begin(self, closing: bool, no_body: bool) -> None:
        """Ready for the next exchange; `closing`: the request said `Connection: close`; `no_body`: a HEAD."""
        self.no_body = no_body
        self.state = _HEAD
        self.informational = False  # parsing a 1xx response, which the real one follows
        self.stray = False  # the server sent more than one response: not reusable
        self.closing = closing
        self.status = 0
        self.reason = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.body: deque[bytes] = deque()
        self.framed = False  # Content-Length or Transfer-Encoding; else the body ends with the connection
        self.keep_alive = False

    def close(self) -> None:
        # Synchronous: usable on cancellation and error paths without a shield. Wakes any task blocked on it.
        if self.sock.fileno() != -1:
            trio.lowlevel.notify_closing(self.sock)
            self.sock.close()
        self.body.clear()  # (now: this and its parser hold each other, garbage the daemon collects rarely)

    # -- parser callbacks

    def on_message_begin(self) -> None:
        if self.state is _DONE:
            self.stray = True

    def on_status(self, reason: bytes) -> None:
        self.reason += reason  # may come in pieces

    def on_header(self, name: bytes, value: bytes) -> None:
        name = name.lower()
        if name == b"content-length" or name == b"transfer-encoding":
            self.framed = True
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        if status < 200:
            self.informational = True
            self.reason = b""
            self.headers = []
            self.framed = False
        else:
            self.status = status
            if self.state is _HEAD:
                self.state = _BODY
                if self.no_body:  # the parser would wait for the body the headers announce: not reusable
                    self.state = _DONE

    def on_body(self, body: bytes) -> None:
        if self.state is _BODY:
            self.body.append(body)

    def on_message_complete(self) -> None:
        if self.informational:
            self.informational = False
        elif self.state is _BODY:
            self.state = _DONE
            parser = self.parser
            self.keep_alive = parser.should_keep_alive() and parser.get_http_version() == "1.1"

    # -- I/O

    def feed(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            raise RemoteProtocolError("the server switched protocols") from None
        except httptools.HttpParserError as exc:
            raise RemoteProtocolError(f"malformed response: {exc}") from None

    def end_of_body(self) -> None:
        """The server closed the connection: the end of a body delimited that way, else an error."""
        if self.state is _BODY and not self.framed and self.status not in (204, 304):
            self.state = _DONE
            self.keep_alive = False
        elif self.state is not _DONE:
            raise RemoteProtocolError("peer closed connection without sending complete message body")

    async def send(self, data: bytes, timeout: float | None) -> None:
        if self.tls is not None:
            with timeout_scope(timeout):
                await self.tls.send_all(data)
                return
            raise WriteTimeout("timed out sending the request")
        sock = self.sock
        try:
            sent = sock.send(data)
        except BlockingIOError:
            sent = 0
        while sent < len(data):  # a body larger than the socket's buffer
            with timeout_scope(timeout):
                await trio.lowlevel.wait_writable(sock)
                try:
                    sent += sock.send(memoryview(data)[sent:])
                except BlockingIOError:
                    pass
                continue
            raise WriteTimeout("timed out sending the request")

    async def receive(self, timeout: float | None, *, wait_first: bool = False) -> bytes:
        """One receive, b"" at EOF; `timeout` bounds this wait alone. `wait_first`: no data can be there yet (the
        request has just gone), so wait for it rather than try (a failing recv call less)."""
        try:
            if self.tls is not None:
                with timeout_scope(timeout):
                    return await self.tls.receive_some(_RECEIVE_BYTES)
                raise ReadTimeout("timed out waiting for the server")
            sock = self.sock
            if not wait_first:
                try:
                    return sock.recv(_RECEIVE_BYTES)
                except BlockingIOError:
                    pass
            with timeout_scope(timeout):
                while True:
                    await trio.lowlevel.wait_readable(sock)
                    try:
                        return sock.recv(_RECEIVE_BYTES)
                    except BlockingIOError:
                        pass
            raise ReadTimeout("timed out waiting for the server")
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise ReadError(_describe(exc, "the connection failed")) from exc

    def is_idle_and_open(self) -> bool:
        """Nothing to read on an idle connection: else EOF, a reset or stray bytes, and the server is done with it."""
        try:
            return not self.readiness.poll(0)  # readable (data or EOF), hung up or failed: done with it
        except OSError:
            return False


class PreparedRequest(NamedTuple):
    """A request head rendered and checked once, for any number of requests (`ConnectionPool.prepare`)."""

    site: _Site
    head: bytes  # the request line and headers, without the framing header and the blank line
    bodiless: bool  # a GET, HEAD...: no Content-Length when there is no body
    declared: int | None  # a Content-Length the caller set
    chunked: bool  # the caller set `Transfer-Encoding: chunked`
    closing: bool  # the caller set `Connection: close`
    no_body: bool  # HEAD: the response has no body, whatever its headers say


class _Waiter:
    __slots__ = ("site", "event", "granted", "conn", "abandoned")

    def __init__(self, site: _Site) -> None:
        self.site = site
        self.event = trio.Event()
        self.granted = False  # woken without a grant: the pool closed
        self.conn: _Conn | None = None  # a connection handed over, or None with a slot to open one
        self.abandoned = False  # timed out or cancelled: skipped when its turn comes

    def grant(self, conn: _Conn | None) -> None:
        self.granted = True
        self.conn = conn
        self.event.set()


class ConnectionPool:
    def __init__(
        self,
        *,
        max_connections: int = 4096,
        max_idle_per_origin: int | None = None,
        idle_timeout_s: float = 30.0,
        connect_timeout_s: float = 10.0,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        """`max_idle_per_origin` None keeps every connection opened (up to `max_connections`) until it expires.
        `ssl_context` gets ALPN `http/1.1` set on it; the default is the system's, created on first use."""
        if max_connections < 1:
            raise ValueError("max_connections must be at least 1")
        self._max_connections = max_connections
        self._max_idle_per_origin = max_connections if max_idle_per_origin is None else max_idle_per_origin
        self._idle_timeout_s = idle_timeout_s
        self._connect_timeout_s = connect_timeout_s
        self._ssl_context = ssl_context
        if ssl_context is not None:
            ssl_context.set_alpn_protocols(["http/1.1"])
        self._sites: dict[Origin, _Site] = {}
        self._open = 0  # connections open or being opened: each holds one of max_connections slots
        self._idle = 0
        self._waiters: deque[_Waiter] = deque()
        self._waiting = 0  # waiters not abandoned
        self._closed = False
        # Connections given up while `run()` is running: it closes them. None: close them where given up.
        self._retired: list[_Conn] | None = None
        self._retired_wakeup = trio.Event()

    @property
    def stats(self) -> dict[str, int]:
        """Connections open (or opening), idle among them, and requests waiting for a connection."""
        return {"open": self._open, "idle": self._idle, "waiting": self._waiting}

    async def request(
        self,
        origin: Origin,
        method: bytes,
        target: bytes,
        headers: list[tuple[bytes, bytes]],
        body: bytes,
        *,
        read_timeout: float | None = None,
        write_timeout: float | None = None,
        pool_timeout: float | None = None,
    ) -> PoolResponse:
        """Send a request and read the response head; then read the body or `aclose()` the response.

        `target` is the path and query. Host is added unless `headers` has it, and Content-Length unless
        `headers` frames the body itself or the method is a bodiless one (GET, HEAD...) with no body.
        `read_timeout` bounds each receive, `write_timeout` the send, `pool_timeout` the wait for a
        connection when `max_connections` are busy; None is no limit. The connect timeout is the pool's.
        """
        return await self.send(
            self.prepare(origin, method, target, headers), body,
            read_timeout=read_timeout, write_timeout=write_timeout, pool_timeout=pool_timeout,
        )

    def prepare(
        self, origin: Origin, method: bytes, target: bytes, headers: list[tuple[bytes, bytes]]
    ) -> PreparedRequest:
        """A request head checked and rendered once, to `send` with any number of bodies. An invalid method,
        target or header raises `LocalProtocolError`."""
        site = self._sites.get(origin)
        if site is None:
            site = self._sites[origin] = _Site(origin)
        return _prepare(site, method, target, headers)

    async def send(
        self,
        prepared: PreparedRequest,
        body: bytes,
        *,
        read_timeout: float | None = None,
        write_timeout: float | None = None,
        pool_timeout: float | None = None,
    ) -> PoolResponse:
        """`request` with a head from `prepare`."""
        if self._closed:
            raise RuntimeError("the connection pool is closed")
        data = _render(prepared, body)
        site = prepared.site
        conn = self._take_idle(site)
        if conn is None:
            conn = await self._acquire(site, pool_timeout)
        if conn is not None:
            try:
                return await self._exchange(conn, prepared, data, read_timeout, write_timeout)
            except _Stale:
                pass  # the slot stays ours: retry once on a fresh connection
        conn = await self._connect(site)
        return await self._exchange(conn, prepared, data, read_timeout, write_timeout)

    async def aclose(self) -> None:
        """Close the idle connections and fail waiting requests; later requests raise RuntimeError.

        Connections in use are closed when their response ends.
        """
        self._closed = True
        while (waiter := self._next_waiter()) is not None:
            waiter.event.set()
        for site in self._sites.values():
            while site.idle:
                site.idle.pop().close()
                self._open -= 1
        self._idle = 0
        self._close_retired()
        await trio.lowlevel.checkpoint()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Housekeeping for the pool's lifetime: closes idle connections as they expire and the connections
        the request path gives up, in batches between checkpoints. Cancel it to stop; what is left is closed."""
        self._retired = []
        task_status.started()
        try:
            while True:
                with trio.move_on_after(self._idle_timeout_s / 2):
                    await self._retired_wakeup.wait()
                self._retired_wakeup = trio.Event()
                expired = trio.current_time() - self._idle_timeout_s
                for site in self._sites.values():
                    idle = site.idle
                    while idle and idle[0].idle_since <= expired:
                        self._idle -= 1
                        self._retired.append(idle.popleft())
                        self._release_slot()
                retired = self._retired
                while retired:
                    batch = retired[-_CLOSE_BATCH:]
                    del retired[-_CLOSE_BATCH:]
                    for conn in batch:
                        conn.close()
                    await trio.lowlevel.checkpoint()
        finally:
            self._close_retired()
            self._retired = None

    def _retire(self, conn: _Conn) -> None:
        """Close a healthy connection off the request path (its slot is the caller's business)."""
        retired = self._retired
        if retired is None:
            conn.close()
            return
        if not retired:
            self._retired_wakeup.set()
        retired.append(conn)

    def _close_retired(self) -> None:
        if self._retired:
            for conn in self._retired:
                conn.close()
            self._retired.clear()

    # ------------------------------------------------------------ exchange

    async def _exchange(
        self, conn: _Conn, prepared: PreparedRequest, data: bytes, read_timeout: float | None, write_timeout: float | None
    ) -> PoolResponse:
        """Send the request and read the response head. On failure `conn` is closed and its slot released,
        except for `_Stale`, where the caller keeps the slot for its retry."""
        conn.begin(prepared.closing, prepared.no_body)
        received = False  # any byte of the response
        try:
            try:
                await conn.send(data, write_timeout)
            except (OSError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                if conn.reused:
                    raise _Stale from None
                raise WriteError(_describe(exc, "sending the request failed")) from exc
            while conn.state is _HEAD:
                try:
                    chunk = await conn.receive(read_timeout, wait_first=not received)
                except ReadError:
                    if conn.reused and not received:
                        raise _Stale from None
                    raise
                if not chunk:
                    if received:
                        raise RemoteProtocolError("the server disconnected before the end of the response head")
                    if conn.reused:
                        raise _Stale
                    raise RemoteProtocolError("the server disconnected without sending a response")
                received = True
                conn.feed(chunk)
            return PoolResponse(self, conn, read_timeout)
        except _Stale:
            conn.close()
            raise
        except BaseException:
            self._discard(conn)
            raise

    def _finish(self, conn: _Conn) -> None:
        """The response ended: keep the connection if both sides allow it (not `Connection: close`, not
        HTTP/1.0), else close it."""
        if conn.state is not _DONE or not conn.keep_alive or conn.closing or conn.stray or conn.no_body:
            self._discard(conn)
            return
        conn.reused = True
        self._checkin(conn)

    def _checkin(self, conn: _Conn) -> None:
        """A reusable connection: to the first waiter, else to the idle list (or closed if that is full)."""
        if self._closed:
            self._discard(conn)
            return
        waiter = self._next_waiter()
        if waiter is not None:
            if waiter.site is conn.site:
                waiter.grant(conn)
            else:  # free the slot for the other origin
                self._retire(conn)
                waiter.grant(None)
            return
        idle = conn.site.idle
        if len(idle) >= self._max_idle_per_origin:
            self._retire(conn)
            self._open -= 1
            return
        conn.idle_since = trio.current_time()
        idle.append(conn)
        self._idle += 1

    # ------------------------------------------------------------ connections and slots

    def _take_idle(self, site: _Site) -> _Conn | None:
        idle = site.idle
        if not idle:
            return None
        expired = trio.current_time() - self._idle_timeout_s
        while idle and idle[0].idle_since <= expired:  # usually done already by run()
            self._idle -= 1
            self._retire(idle.popleft())
            self._release_slot()
        while idle:
            conn = idle.pop()
            self._idle -= 1
            if conn.is_idle_and_open():
                return conn
            self._discard(conn)
        return None

    async def _acquire(self, site: _Site, timeout: float | None) -> _Conn | None:
        """A slot to open a connection (None) or a connection handed over by a finishing request."""
        if not self._waiting:
            if self._open < self._max_connections:
                self._open += 1
                return None
            if self._idle:
                self._evict_idle()  # its slot becomes ours
                return None
        waiter = _Waiter(site)
        self._waiters.append(waiter)
        self._waiting += 1
        try:
            with trio.move_on_after(math.inf if timeout is None else timeout):
                await waiter.event.wait()
        except BaseException:
            # A turn can be granted between our cancellation and our resumption: pass it on.
            if waiter.event.is_set():
                self._give_back(waiter)
            else:
                self._abandon(waiter)
            raise
        if not waiter.event.is_set():
            self._abandon(waiter)
            raise PoolTimeout("timed out waiting for a connection")
        if not waiter.granted:
            raise RuntimeError("the connection pool is closed")
        return waiter.conn

    def _abandon(self, waiter: _Waiter) -> None:
        waiter.abandoned = True  # left in the queue, skipped when its turn comes: no O(n) removal
        self._waiting -= 1

    def _give_back(self, waiter: _Waiter) -> None:
        if not waiter.granted:
            return
        if waiter.conn is None:
            self._release_slot()
        else:
            self._checkin(waiter.conn)

    def _evict_idle(self) -> None:
        """Close the oldest idle connection of some origin; the caller takes over its slot."""
        for site in self._sites.values():
            if site.idle:
                self._retire(site.idle.popleft())
                self._idle -= 1
                return

    async def _connect(self, site: _Site) -> _Conn:
        """Open a connection on a slot already held; the slot is released if this fails."""
        host, port = site.origin.host, site.origin.port
        sock: socket.socket | None = None
        try:
            with trio.move_on_after(self._connect_timeout_s):
                if site.family is None:
                    tcp = await trio.open_tcp_stream(host, port)  # SocketStream sets TCP_NODELAY itself
                    sock = socket.socket(fileno=tcp.socket.detach())
                    sock.setblocking(False)
                else:
                    sock = socket.socket(site.family, socket.SOCK_STREAM)
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    await trio.socket.from_stdlib_socket(sock).connect((host, port))  # (sets it non-blocking)
                if site.origin.scheme != "https":
                    return _Conn(site, sock, None)
                tcp = trio.SocketStream(trio.socket.from_stdlib_socket(sock))
                tls = trio.SSLStream(tcp, self._tls(), server_hostname=host, https_compatible=True)
                await tls.do_handshake()
                return _Conn(site, sock, tls)
            raise ConnectTimeout(f"timed out connecting to {host}:{port}")
        except BaseException as exc:
            if sock is not None:
                trio.lowlevel.notify_closing(sock)
                sock.close()
            self._release_slot()
            if isinstance(exc, (OSError, trio.BrokenResourceError)):  # refused, unreachable, DNS, TLS
                raise ConnectError(_describe(exc, f"cannot connect to {host}:{port}")) from exc
            raise

    def _tls(self) -> ssl.SSLContext:
        if self._ssl_context is None:
            self._ssl_context = ssl.create_default_context()
            self._ssl_context.set_alpn_protocols(["http/1.1"])
        return self._ssl_context

    def _discard(self, conn: _Conn) -> None:
        conn.close()
        self._release_slot()

    def _release_slot(self) -> None:
        waiter = self._next_waiter()
        if waiter is None:
            self._open -= 1
        else:
            waiter.grant(None)

    def _next_waiter(self) -> _Waiter | None:
        waiters = self._waiters
        while waiters:
            waiter = waiters.popleft()
            if not waiter.abandoned:
                self._waiting -= 1
                return waiter
        return None


class PoolResponse:
    """A response whose body is still on the wire.

    Read it with `read()` or `aiter_bytes()` (which also iterates the response itself); reaching the end
    returns the connection to the pool. `aclose()` gives up on the rest: the connection is closed unless
    the whole body has already arrived.
    """

    __slots__ = ("status", "reason", "headers", "_pool", "_conn", "_read_timeout")

    def __init__(self, pool: ConnectionPool, conn: _Conn, read_timeout: float | None) -> None:
        self.status: int = conn.status
        self.reason: bytes = conn.reason
        self.headers: list[tuple[bytes, bytes]] = conn.headers  # names lowercased
        self._pool = pool
        self._conn: _Conn | None = conn
        self._read_timeout = read_timeout

    def header(self, name: bytes) -> bytes | None:
        """The first value of header `name`, or None."""
        name = name.lower()
        for key, value in self.headers:
            if key == name:
                return value
        return None

    async def read(self) -> bytes:
        """The whole (rest of the) body."""
        chunks: list[bytes] = []
        while (chunk := await self._next()) is not None:
            chunks.append(chunk)
        return b"".join(chunks)

    def aiter_bytes(self) -> AsyncIterator[bytes]:
        """The body in chunks as they arrive; `read_timeout` applies to each wait."""
        return self

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self

    async def __anext__(self) -> bytes:
        chunk = await self._next()
        if chunk is None:
            raise StopAsyncIteration
        return chunk

    async def aclose(self) -> None:
        conn = self._conn
        if conn is None:
            return
        self._conn = None
        # The rest of the body may already be buffered (a short or empty body): then the connection is reusable.
        if conn.state is _DONE:
            self._pool._finish(conn)
        else:
            self._pool._discard(conn)

    async def _next(self) -> bytes | None:
        """The next piece of body, or None at its end (the connection then goes back to the pool)."""
        conn = self._conn
        if conn is None:
            return None
        try:
            while not conn.body:
                if conn.state is _DONE:
                    break
                chunk = await conn.receive(self._read_timeout)
                if chunk:
                    conn.feed(chunk)
                else:
                    conn.end_of_body()
            else:
                return conn.body.popleft()  # a piece as the parser delivered it (a chunk of a chunked body)
        except BaseException:
            if self._conn is conn:  # else aclose() from another task already gave it up
                self._conn = None
                self._pool._discard(conn)
            raise
        if self._conn is conn:
            self._conn = None
            self._pool._finish(conn)
        return None


def _prepare(site: _Site, method: bytes, target: bytes, headers: list[tuple[bytes, bytes]]) -> PreparedRequest:
    if not _TOKEN.fullmatch(method):
        raise LocalProtocolError(f"invalid method {method!r}")
    if not target or _BAD_TARGET.search(target):
        raise LocalProtocolError(f"invalid request target {target!r}")
    has_host = chunked = closing = False
    declared: int | None = None
    lines = [b"%s %s HTTP/1.1\r\n" % (method, target)]
    for name, value in headers:
        if not _TOKEN.fullmatch(name):
            raise LocalProtocolError(f"invalid header name {name!r}")
        if _BAD_VALUE.search(value):
            raise LocalProtocolError(f"invalid value for header {name.decode('latin-1')!r}")
        key = name.lower()
        if key == b"host":
            has_host = True
        elif key == b"content-length":
            if declared is not None or not value.isdigit():
                raise LocalProtocolError("invalid Content-Length")
            declared = int(value)
        elif key == b"transfer-encoding":
            if value.lower() != b"chunked":
                raise LocalProtocolError(f"unsupported Transfer-Encoding {value!r}")
            chunked = True
        elif key == b"connection":
            closing = closing or b"close" in value.lower()
        lines.append(b"%s: %s\r\n" % (name, value))
    if declared is not None and chunked:
        raise LocalProtocolError("both Content-Length and Transfer-Encoding")
    if not has_host:
        lines.insert(1, b"host: %s\r\n" % site.host_header)
    return PreparedRequest(site, b"".join(lines), method in _BODILESS, declared, chunked, closing, method == b"HEAD")


def _render(prepared: PreparedRequest, body: bytes) -> bytes:
    """The bytes of one request: the head, its framing and the body."""
    if prepared.chunked:
        return prepared.head + (b"\r\n%x\r\n%s\r\n0\r\n\r\n" % (len(body), body) if body else b"\r\n0\r\n\r\n")
    if prepared.declared is not None:
        if prepared.declared != len(body):
            raise LocalProtocolError(f"a body of {len(body)} bytes, declared as {prepared.declared}")
        return prepared.head + b"\r\n" + body
    if not body and prepared.bodiless:
        return prepared.head + b"\r\n"
    return prepared.head + b"content-length: %d\r\n\r\n" % len(body) + body


def _describe(exc: BaseException, what: str) -> str:
    """`what` and the underlying error (trio wraps OSError and SSLError; a failed connect wraps a group)."""
    cause = exc.__cause__ or exc
    if isinstance(cause, BaseExceptionGroup) and len(cause.exceptions) == 1:
        cause = cause.exceptions[0]
    text = str(cause)
    return f"{what}: {text}" if text else what
