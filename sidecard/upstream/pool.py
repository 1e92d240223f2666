"""A Trio-native HTTP/1.1 client connection pool on h11.

Every upstream call goes through here (the fast path directly, the SDK through `TrioTransport`), so the hot
path stays lean: no logging, no scans over waiters, few allocations beyond h11's own.

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

Over 500 lines on purpose: the per-origin queues, the connection slots and the h11 exchange share the invariants
above (a slot released on every path), which are easiest to check in one file.
"""

from __future__ import annotations

import ipaddress
import math
import socket
import ssl
from collections import deque
from collections.abc import AsyncIterator
from typing import Final, NamedTuple
from urllib.parse import urlsplit

import h11
import trio

_RECEIVE_BYTES: Final = 65536
_DEFAULT_PORTS: Final = {"http": 80, "https": 443}
_END: Final = h11.EndOfMessage()
_BODILESS: Final = frozenset((b"GET", b"HEAD", b"OPTIONS", b"TRACE"))
_CLOSE_BATCH: Final = 64  # sockets closed between two checkpoints of the housekeeping task


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
    __slots__ = ("site", "stream", "socket", "h11", "reused", "idle_since")

    def __init__(self, site: _Site, stream: trio.abc.Stream, socket: trio.socket.SocketType) -> None:
        self.site = site
        self.stream = stream
        self.socket = socket
        self.h11 = h11.Connection(h11.CLIENT)
        self.reused = False
        self.idle_since = 0.0

    def close(self) -> None:
        # Synchronous: usable on cancellation and error paths without a shield. Wakes any task blocked on it.
        self.socket.close()


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
        if self._closed:
            raise RuntimeError("the connection pool is closed")
        site = self._sites.get(origin)
        if site is None:
            site = self._sites[origin] = _Site(origin)
        head = _request_head(site, method, target, headers, body)
        conn = self._take_idle(site)
        if conn is None:
            conn = await self._acquire(site, pool_timeout)
        if conn is not None:
            try:
                return await self._exchange(conn, head, body, read_timeout, write_timeout)
            except _Stale:
                pass  # the slot stays ours: retry once on a fresh connection
        conn = await self._connect(site)
        return await self._exchange(conn, head, body, read_timeout, write_timeout)

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
        self, conn: _Conn, head: h11.Request, body: bytes, read_timeout: float | None, write_timeout: float | None
    ) -> PoolResponse:
        """Send the request and read the response head. On failure `conn` is closed and its slot released,
        except for `_Stale`, where the caller keeps the slot for its retry."""
        h = conn.h11
        received = False  # any byte of the response
        try:
            data = h.send(head)
            if body:
                data += h.send(h11.Data(data=body))
            data += h.send(_END)
            try:
                if write_timeout is None:
                    await conn.stream.send_all(data)
                else:
                    with trio.move_on_after(write_timeout) as scope:
                        await conn.stream.send_all(data)
                    if scope.cancelled_caught:
                        raise WriteTimeout("timed out sending the request")
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                if conn.reused:
                    raise _Stale from None
                raise WriteError(_describe(exc, "sending the request failed")) from exc
            while True:
                event = h.next_event()
                if event is h11.NEED_DATA:
                    try:
                        chunk = await _receive(conn.stream, read_timeout)
                    except ReadError:
                        if conn.reused and not received:
                            raise _Stale from None
                        raise
                    if not chunk and not received:
                        if conn.reused:
                            raise _Stale
                        raise RemoteProtocolError("the server disconnected without sending a response")
                    received = True
                    h.receive_data(chunk)  # type: ignore[arg-type]  # h11 takes any bytes-like
                elif type(event) is h11.Response:
                    return PoolResponse(self, conn, event, read_timeout)
                # else an informational (1xx) response: the real one follows
        except _Stale:
            conn.close()
            raise
        except h11.RemoteProtocolError as exc:
            self._discard(conn)
            raise RemoteProtocolError(str(exc)) from None
        except h11.LocalProtocolError as exc:  # e.g. a body longer than its Content-Length
            self._discard(conn)
            raise LocalProtocolError(str(exc)) from None
        except BaseException:
            self._discard(conn)
            raise

    def _finish(self, conn: _Conn) -> None:
        """The response ended: keep the connection if both sides allow it (not `Connection: close`, not
        HTTP/1.0), else close it."""
        h = conn.h11
        if h.our_state is not h11.DONE or h.their_state is not h11.DONE:
            self._discard(conn)
            return
        h.start_next_cycle()
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
            # Readable while idle means EOF, a reset or stray bytes: the server is done with it.
            if not conn.socket.is_readable():
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
        tcp: trio.SocketStream | None = None
        try:
            with trio.move_on_after(self._connect_timeout_s):
                if site.family is None:
                    tcp = await trio.open_tcp_stream(host, port)  # SocketStream sets TCP_NODELAY itself
                else:
                    tcp = await _connect_address(site.family, host, port)
                if site.origin.scheme != "https":
                    return _Conn(site, tcp, tcp.socket)
                tls = trio.SSLStream(tcp, self._tls(), server_hostname=host, https_compatible=True)
                await tls.do_handshake()
                return _Conn(site, tls, tcp.socket)
            raise ConnectTimeout(f"timed out connecting to {host}:{port}")
        except BaseException as exc:
            if tcp is not None:
                tcp.socket.close()
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

    def __init__(self, pool: ConnectionPool, conn: _Conn, head: h11.Response, read_timeout: float | None) -> None:
        self.status: int = head.status_code
        self.reason: bytes = head.reason
        self.headers: list[tuple[bytes, bytes]] = list(head.headers)  # names lowercased by h11
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
        chunks: list[bytearray] = []
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
        return bytes(chunk)

    async def aclose(self) -> None:
        conn = self._conn
        if conn is None:
            return
        self._conn = None
        # The rest of the body may already be buffered (a short or empty body): then the connection is reusable.
        h = conn.h11
        try:
            event = h.next_event()
            while type(event) is h11.Data:
                event = h.next_event()
        except h11.RemoteProtocolError:
            event = None
        if type(event) is h11.EndOfMessage:
            self._pool._finish(conn)
        else:
            self._pool._discard(conn)

    async def _next(self) -> bytearray | None:
        """The next piece of body, or None at its end (the connection then goes back to the pool)."""
        conn = self._conn
        if conn is None:
            return None
        h = conn.h11
        try:
            while True:
                event = h.next_event()
                if event is h11.NEED_DATA:
                    h.receive_data(await _receive(conn.stream, self._read_timeout))  # type: ignore[arg-type]
                elif type(event) is h11.Data:
                    return event.data  # type: ignore[return-value]  # h11 hands out bytearrays
                elif type(event) is h11.EndOfMessage:
                    break
                else:
                    raise RemoteProtocolError(f"unexpected {type(event).__name__} in the response body")
        except BaseException as exc:
            if self._conn is conn:  # else aclose() from another task already gave it up
                self._conn = None
                self._pool._discard(conn)
            if isinstance(exc, h11.RemoteProtocolError):  # includes EOF mid-body
                raise RemoteProtocolError(str(exc)) from None
            raise
        if self._conn is conn:
            self._conn = None
            self._pool._finish(conn)
        return None


def _request_head(
    site: _Site, method: bytes, target: bytes, headers: list[tuple[bytes, bytes]], body: bytes
) -> h11.Request:
    has_host = has_length = False
    for name, _ in headers:
        key = name.lower()
        if key == b"host":
            has_host = True
        elif key == b"content-length" or key == b"transfer-encoding":
            has_length = True
    if not has_host:
        headers = [(b"host", site.host_header), *headers]
    if not has_length and (body or method not in _BODILESS):
        headers = [*headers, (b"content-length", b"%d" % len(body))]
    try:
        return h11.Request(method=method, target=target, headers=headers)
    except h11.LocalProtocolError as exc:
        raise LocalProtocolError(str(exc)) from None


async def _connect_address(family: int, host: str, port: int) -> trio.SocketStream:
    sock = trio.socket.socket(family, socket.SOCK_STREAM)
    try:
        await sock.connect((host, port))
    except BaseException:
        sock.close()
        raise
    return trio.SocketStream(sock)


async def _receive(stream: trio.abc.Stream, timeout: float | None) -> bytes | bytearray:
    """One receive, b"" at EOF; `timeout` bounds this wait alone."""
    try:
        if timeout is None:
            return await stream.receive_some(_RECEIVE_BYTES)
        with trio.move_on_after(timeout):
            return await stream.receive_some(_RECEIVE_BYTES)
    except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
        raise ReadError(_describe(exc, "the connection failed")) from exc
    raise ReadTimeout("timed out waiting for the server")


def _describe(exc: BaseException, what: str) -> str:
    """`what` and the underlying error (trio wraps OSError and SSLError; a failed connect wraps a group)."""
    cause = exc.__cause__ or exc
    if isinstance(cause, BaseExceptionGroup) and len(cause.exceptions) == 1:
        cause = cause.exceptions[0]
    text = str(cause)
    return f"{what}: {text}" if text else what
