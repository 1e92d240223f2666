"""One multiplexed connection to the store, shaped for the request path.

Any number of tasks share it: each operation's commands are packed (hiredis `pack_command`) and written at once
when the connection is idle, else queued for one writer task that sends whatever is queued in one write; one
reader task feeds what comes back to hiredis's `Reader` and hands each reply to the operation waiting for it,
in order (RESP replies come back in the order the commands were sent). So concurrent requests are pipelined on
one socket, and there is no pool to wait for.

The request path is protected three ways:
- every operation has a deadline (`op_timeout_s`): past it the caller gets `StoreTimeout` and goes on with
  local state; its reply, when it comes, is dropped (or handed to the operation's `on_late`, which can undo
  what the late operation did in the store);
- a breaker of its own (`policies.breaker`): after a few timeouts or a failure rate, operations are refused at
  once (`StoreUnavailable`) until a probe gets through after `cooldown_s`; an answer that is a data error
  (garbage under the namespace) is the store working, not failing, and does not count against it;
- while there is no connection, operations are refused at once; a background loop reconnects with jittered
  exponential backoff, loads the scripts, and only then takes operations again.

`run()` owns the connection (start it in a nursery); it reports `started` after the first attempt, connected or
not, so a store that is down never holds up the daemon's start.
"""

from __future__ import annotations

import hashlib
import os
import random
import ssl
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import hiredis
import trio

from ..policies.breaker import Breaker, State
from ..policies.breaker import BreakerSettings as PolicyBreakerSettings
from ..policies.retry import Backoff
from .errors import StoreDataError, StoreTimeout, StoreUnavailable
from .health import FleetHealth
from .settings import BreakerSettings, FleetSettings, StoreAddress

RECEIVE_BYTES: Final = 65536
RECONNECT_BACKOFF: Final = Backoff(base_s=0.05, cap_s=2.0)
# Scheduler passes a background write waits for an operation to go out with (so the writes of requests finishing
# together, and the admissions already under way, share one write). Passes, not time: a clock that stands still
# (tests) must not hold writes back.
LINGER_PASSES: Final = 2
MIN_MAJOR_VERSION: Final = 7
# The deadline of an operation off the request path (operator commands, resyncs, quality windows, the fleet's
# instances, budget reads): it may wait longer than `op_timeout_s`.
ADMIN_TIMEOUT_S: Final = 1.0
# Replies that say the server cannot serve now (not that our data is wrong): they count against the breaker.
UNAVAILABLE_PREFIXES: Final = (
    b"LOADING", b"BUSY", b"MASTERDOWN", b"READONLY", b"TRYAGAIN", b"CLUSTERDOWN", b"OOM", b"NOAUTH", b"NOPERM",
    b"WRONGPASS", b"MOVED", b"ASK", b"MISCONF",
)
Arg = bytes | str | int | float
Command = Sequence[Arg]


class ReplyError(Exception):
    """An error reply from the server (hiredis returns it as a value; nothing raises it directly)."""

    @property
    def text(self) -> bytes:
        return str(self.args[0]).encode() if self.args else b""


class ProtocolError(Exception):
    pass


def new_reader() -> hiredis.Reader:
    return hiredis.Reader(replyError=ReplyError, protocolError=ProtocolError)


def typed_error(reply: ReplyError, what: str) -> StoreUnavailable | StoreDataError:
    """An error reply as the error the caller acts on."""
    text = reply.text
    message = f"{what}: {text.decode(errors='replace')[:300]}"
    return StoreUnavailable(message) if text.startswith(UNAVAILABLE_PREFIXES) else StoreDataError(message)


@dataclass(frozen=True, slots=True)
class Script:
    """A Lua script run by its SHA1 (EVALSHA); loaded on every connect, and sent whole if the server lost it."""

    name: str
    source: bytes
    sha: str = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "sha", hashlib.sha1(self.source).hexdigest())


ScriptCall = tuple[Script, Sequence[Arg], Sequence[Arg]]  # a script, its keys, its arguments


def evalsha(script: Script, keys: Sequence[Arg], args: Sequence[Arg]) -> bytes:
    return hiredis.pack_command(("EVALSHA", script.sha, len(keys), *keys, *args))


def send_whole(script: Script, keys: Sequence[Arg], args: Sequence[Arg]) -> bytes:
    return hiredis.pack_command(("EVAL", script.source, len(keys), *keys, *args))


def _lost(reply: Any) -> bool:
    """The server does not have the script (restarted, or SCRIPT FLUSH): it must be sent whole."""
    return isinstance(reply, ReplyError) and reply.text.startswith(b"NOSCRIPT")


class _Waiter:
    """One operation's place in the reply queue."""

    __slots__ = ("abandoned", "count", "done", "error", "on_late", "replies")

    def __init__(self, count: int) -> None:
        self.count = count
        self.replies: list[Any] = []
        self.done = trio.Event()
        self.error: StoreUnavailable | None = None
        self.abandoned = False
        self.on_late: Callable[[list[Any] | StoreUnavailable], None] | None = None  # replies, or the lost connection


async def open_stream(address: StoreAddress, *, tls_ca_file: str | None = None) -> trio.abc.Stream:
    """A byte stream to the store (the caller bounds the time)."""
    if address.kind == "unix":
        return await trio.open_unix_socket(address.path)
    stream: trio.abc.Stream = await trio.open_tcp_stream(address.host, address.port)  # TCP_NODELAY is trio's default
    if address.kind == "tls":
        context = ssl.create_default_context(cafile=tls_ca_file)
        tls = trio.SSLStream(stream, context, server_hostname=address.host)
        try:
            await tls.do_handshake()
        except BaseException:
            await trio.aclose_forcefully(tls)
            raise
        stream = tls
    return stream


def hello(address: StoreAddress, name: str) -> list[Command]:
    """What a new connection says first: credentials, database, a name for CLIENT LIST, the server's version."""
    commands: list[Command] = []
    if address.password is not None:
        commands.append(("AUTH", address.username, address.password) if address.username else ("AUTH", address.password))
    if address.db:
        commands.append(("SELECT", address.db))
    commands.append(("CLIENT", "SETNAME", name))
    commands.append(("INFO", "server"))
    return commands


def check_hello(replies: list[Any]) -> None:
    """Raise `StoreUnavailable` if the handshake was refused or the server is too old."""
    for reply in replies[:-1]:
        if isinstance(reply, ReplyError):
            raise StoreUnavailable(f"the store refused the connection: {reply.text.decode(errors='replace')[:200]}")
    info = replies[-1]
    if isinstance(info, ReplyError) or not isinstance(info, bytes):
        raise StoreUnavailable("the store did not answer INFO server")
    for line in info.splitlines():
        if line.startswith(b"redis_version:"):
            version = line.partition(b":")[2].decode(errors="replace").strip()
            major = version.partition(".")[0]
            if not major.isdigit() or int(major) < MIN_MAJOR_VERSION:
                raise StoreUnavailable(f"the store is version {version}: fleet mode needs Redis or Valkey {MIN_MAJOR_VERSION} or later")
            return
    raise StoreUnavailable("the store did not say its version (INFO server has no redis_version)")


async def exchange(stream: trio.abc.Stream, reader: hiredis.Reader, commands: Sequence[Command]) -> list[Any]:
    """Send commands and read their replies, on a stream nothing else uses yet (the handshake)."""
    await stream.send_all(b"".join(hiredis.pack_command(tuple(c)) for c in commands))
    replies: list[Any] = []
    while len(replies) < len(commands):
        reply = reader.gets()
        if reply is False:
            data = await stream.receive_some(RECEIVE_BYTES)
            if not data:
                raise StoreUnavailable("the store closed the connection during the handshake")
            reader.feed(data)
        else:
            replies.append(reply)
    return replies


CONNECT_ERRORS: Final = (OSError, trio.TooSlowError, trio.BrokenResourceError, ssl.SSLError, ProtocolError, StoreUnavailable)


async def dial(
    address: StoreAddress, *, name: str, timeout_s: float, tls_ca_file: str | None = None, then: Sequence[Command] = ()
) -> tuple[trio.abc.Stream, hiredis.Reader, list[Any]]:
    """A connection that said hello, and the replies to `then` (all errors must be replies): raises one of
    `CONNECT_ERRORS` if the store cannot be reached, refuses us, or is too old."""
    reader = new_reader()
    with trio.fail_after(timeout_s):
        stream = await open_stream(address, tls_ca_file=tls_ca_file)
        try:
            commands = hello(address, name)
            replies = await exchange(stream, reader, [*commands, *then])
            check_hello(replies[: len(commands)])
            for reply in replies[len(commands) :]:
                if isinstance(reply, ReplyError):
                    raise StoreUnavailable(f"the store refused us: {reply.text.decode(errors='replace')[:200]}")
        except BaseException:
            await trio.aclose_forcefully(stream)
            raise
    return stream, reader, replies[len(commands) :]


async def keep_connected(
    session: Callable[[Callable[[], object]], Awaitable[bool]], backoff: Backoff, rng: random.Random,
    task_status: trio.TaskStatus[None],
) -> None:
    """Run `session(announce)` again and again: at once after a connection that served, after jittered
    exponential backoff after each failed attempt. `task_status.started()` at the first `announce()`."""
    announced = False

    def announce() -> None:
        nonlocal announced
        if not announced:
            announced = True
            task_status.started()

    failures = 0
    while True:
        failures = 0 if await session(announce) else failures + 1
        await trio.sleep(backoff.delay(failures, rng) if failures else 0)


def policy_breaker(settings: BreakerSettings) -> PolicyBreakerSettings:
    return PolicyBreakerSettings(
        failure_rate=settings.failure_rate, min_volume=settings.min_volume, consecutive_failures=settings.consecutive_failures,
        window_s=settings.window_s, cooldown_s=settings.cooldown_s,
    )


def describe(exc: BaseException) -> str:
    """An error as a short phrase for the log."""
    if isinstance(exc, trio.TooSlowError):
        return "timed out"
    if isinstance(exc, trio.BrokenResourceError) and exc.__cause__ is not None:
        return describe(exc.__cause__)  # trio's wrapper of the TLS error that says what went wrong
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__


class Connection:
    def __init__(
        self,
        address: StoreAddress,
        *,
        name: str = "sidecard",
        op_timeout_s: float = 0.005,
        connect_timeout_s: float = 1.0,
        tls_ca_file: str | None = None,
        breaker: BreakerSettings | None = None,
        backoff: Backoff = RECONNECT_BACKOFF,
        health: FleetHealth | None = None,
        scripts: Iterable[Script] = (),
        max_pending: int = 10_000,
        clock: Callable[[], float] = trio.current_time,
        rng: random.Random | None = None,
    ) -> None:
        self.address = address
        self.name = name
        self.op_timeout_s = op_timeout_s
        self.connect_timeout_s = connect_timeout_s
        self.tls_ca_file = tls_ca_file
        self.breaker = Breaker(policy_breaker(breaker or BreakerSettings()))
        self.health = health or FleetHealth()
        self.scripts = {s.sha: s for s in scripts}
        self.max_pending = max_pending
        self.connects = 0
        self._backoff = backoff
        self._clock = clock
        self._rng = rng or random.Random()
        self._connected = False
        self._down_reason = "not connected yet"
        self._pending: deque[_Waiter] = deque()
        self._out: list[bytes] = []
        self._writer_lot = trio.lowlevel.ParkingLot()
        self._deferred: list[bytes] = []  # background writes' bytes, sent with the next operation's
        self._deferred_lot = trio.lowlevel.ParkingLot()
        self._writing = False
        self._fd: int | None = None  # the socket of a plain (not TLS) connection, for direct writes and reads
        self._reader: hiredis.Reader | None = None
        self._session_scope: trio.CancelScope | None = None
        self._lost: list[str] = []  # why the connection was given up, when a direct read found it
        self._connected_lot = trio.lowlevel.ParkingLot()

    @classmethod
    def from_settings(
        cls, settings: FleetSettings, *, address: StoreAddress | None = None, health: FleetHealth | None = None,
        scripts: Iterable[Script] = (), **kwargs: Any,
    ) -> Connection:
        """`address`: the settings' own, already read (its password may come from a file)."""
        return cls(
            address or settings.address(), name=f"sidecard:{settings.namespace}:{settings.instance_name()}", op_timeout_s=settings.op_timeout_s,
            connect_timeout_s=settings.connect_timeout_ms / 1000, tls_ca_file=settings.tls_ca_file, breaker=settings.breaker,
            health=health, scripts=scripts, **kwargs,
        )

    @property
    def connected(self) -> bool:
        return self._connected

    @property
    def in_flight(self) -> int:
        """Replies the store owes this sidecar now (operations and background writes sent, not yet answered)."""
        return len(self._pending)

    async def wait_connected(self) -> None:
        """Until the connection is up (the caller bounds the wait)."""
        while not self._connected:
            await self._connected_lot.park()

    # ------------------------------------------------------------------ operations

    async def call(self, *args: Arg, op: str = "call", timeout_s: float | None = None) -> Any:
        """One command; an error reply raises its typed error."""
        allowed_s = self.op_timeout_s if timeout_s is None else timeout_s
        reply = (await self._roundtrip(op, hiredis.pack_command(args), 1, self._clock() + allowed_s, allowed_s))[0]
        if isinstance(reply, ReplyError):
            raise typed_error(reply, op)
        return reply

    async def pipeline(self, commands: Sequence[Command], *, op: str = "pipeline", timeout_s: float | None = None) -> list[Any]:
        """Several commands in one round trip; the first error reply raises its typed error."""
        frame = b"".join(hiredis.pack_command(tuple(c)) for c in commands)
        allowed_s = self.op_timeout_s if timeout_s is None else timeout_s
        replies = await self._roundtrip(op, frame, len(commands), self._clock() + allowed_s, allowed_s)
        for reply in replies:
            if isinstance(reply, ReplyError):
                raise typed_error(reply, op)
        return replies

    async def run_script(
        self, script: Script, keys: Sequence[Arg], args: Sequence[Arg], *,
        timeout_s: float | None = None, on_late: Callable[[list[Any] | StoreUnavailable], None] | None = None,
    ) -> Any:
        """EVALSHA, and EVAL if the server lost the script (a restart, SCRIPT FLUSH), within one deadline.

        `on_late` hears the reply of an operation that timed out or was cancelled, when it arrives.
        """
        allowed_s = self.op_timeout_s if timeout_s is None else timeout_s
        deadline = self._clock() + allowed_s
        reply = (await self._roundtrip(script.name, evalsha(script, keys, args), 1, deadline, allowed_s, on_late))[0]
        if _lost(reply):
            reply = (await self._roundtrip(script.name, send_whole(script, keys, args), 1, deadline, allowed_s, on_late))[0]
        if isinstance(reply, ReplyError):
            raise typed_error(reply, script.name)
        return reply

    def send_and_forget(self, script: Script, keys: Sequence[Arg], args: Sequence[Arg]) -> bool:
        """Queue a script whose reply nobody waits for (undoing a late operation); False if not connected."""
        if not self._connected:
            return False
        self._submit(evalsha(script, keys, args), 1).abandoned = True
        return True

    def run_script_later(self, script: Script, keys: Sequence[Arg], args: Sequence[Arg], on_reply: Callable[[Any], None]) -> bool:
        """A background write: nobody waits for it. Its bytes go with the next operation's (one write, one
        wake-up for both), or on their own after `LINGER_PASSES` scheduler passes if none comes; `on_reply` hears, from the reader, the
        reply, its typed error, or `StoreUnavailable` if the connection is lost first. A script the server lost is
        sent again whole. False, and nothing sent, while not connected or too busy."""

        def landed(replies: list[Any] | StoreUnavailable) -> None:
            if isinstance(replies, StoreUnavailable):
                on_reply(replies)
            elif _lost(replies[0]):  # sent again whole, at once
                if self._defer(send_whole(script, keys, args), landed):
                    self.send_deferred()
                else:
                    on_reply(StoreUnavailable(self._down_reason))
            elif isinstance(replies[0], ReplyError):
                on_reply(typed_error(replies[0], script.name))
            else:
                on_reply(replies[0])

        return self._defer(evalsha(script, keys, args), landed)

    def _defer(self, frame: bytes, on_late: Callable[[list[Any] | StoreUnavailable], None]) -> bool:
        if not self._connected or len(self._pending) >= self.max_pending:
            return False
        waiter = _Waiter(1)
        waiter.abandoned, waiter.on_late = True, on_late
        self._pending.append(waiter)  # its bytes go out before any later operation's: replies stay in order
        self._deferred.append(frame)
        if len(self._deferred) == 1:
            self._deferred_lot.unpark()
        return True

    def send_deferred(self) -> None:
        """The background writes waiting for company, now (the linger ran out, or a drain)."""
        if self._deferred:
            self._write(b"".join(self._deferred))
            self._deferred.clear()

    async def _roundtrip(
        self, op: str, frame: bytes, count: int, deadline: float, allowed_s: float,
        on_late: Callable[[list[Any] | StoreUnavailable], None] | None = None,
    ) -> list[Any]:
        """`allowed_s`: the operation's whole timeout, as its error states it (an operator command's is not the
        request path's `op_timeout_ms`)."""
        started = self._clock()
        allowed, transition = self.breaker.allow(started)
        if not allowed:
            self.health.error(op, "unavailable")
            raise StoreUnavailable("the store's breaker is open (it was slow or failing)")
        if not self._connected or len(self._pending) >= self.max_pending:
            self.breaker.release()
            self.health.error(op, "unavailable")
            raise StoreUnavailable(self._down_reason if not self._connected else "too many store operations waiting")
        waiter = self._submit(frame, count)
        try:
            with trio.move_on_at(deadline):
                await waiter.done.wait()
        except BaseException:  # cancelled by the caller: no verdict on the store
            self._abandon(waiter, on_late)
            self.breaker.release()
            raise
        if not waiter.done.is_set():
            self._take_replies()  # the store may have answered in time, and only our reader not run since
        now = self._clock()
        if not waiter.done.is_set():
            self._abandon(waiter, on_late)
            self._failed(op, now, "timeout")
            raise StoreTimeout(f"{op}: no answer from the store within {allowed_s * 1000:g} ms")
        if waiter.error is not None:
            self._failed(op, now, "unavailable")
            raise waiter.error
        for reply in waiter.replies:
            if isinstance(reply, ReplyError) and reply.text.startswith(UNAVAILABLE_PREFIXES):
                self._failed(op, now, "unavailable")
                raise typed_error(reply, op)
        if self.breaker.record(now, success=True) is State.CLOSED and self._connected:
            self.health.mark_up()
        self.health.latency(op, now - started)
        return waiter.replies

    def _submit(self, frame: bytes, count: int) -> _Waiter:
        waiter = _Waiter(count)
        if self._deferred:  # background writes ride along (their waiters are already ahead in the queue)
            self._deferred.append(frame)
            frame = b"".join(self._deferred)
            self._deferred.clear()
        self._write(frame)
        self._pending.append(waiter)
        return waiter

    def _write(self, frame: bytes) -> None:
        if self._fd is not None and not self._out and not self._writing:
            # Nothing unsent before it on a plain socket: write now, as far as the kernel takes it, and spare a
            # wake-up of the writer (operations waiting for replies do not matter: the bytes stay in order).
            # While the writer is busy, operations queue and it sends them together.
            try:
                frame = frame[os.write(self._fd, frame) :]
            except OSError:
                pass  # the writer meets the error and drops the connection
        if frame:
            self._out.append(frame)
            self._writer_lot.unpark()

    @staticmethod
    def _abandon(waiter: _Waiter, on_late: Callable[[list[Any] | StoreUnavailable], None] | None) -> None:
        waiter.abandoned = True
        waiter.on_late = on_late

    def _failed(self, op: str, now: float, kind: str) -> None:
        self.health.error(op, kind)
        if self.breaker.record(now, success=False) is State.OPEN:
            self.health.mark_down(f"the store's breaker opened after failures ({kind})")

    # ------------------------------------------------------------------ the connection's life

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Connect, serve, reconnect with backoff, until cancelled. `started` comes after the first attempt."""
        await keep_connected(self._session, self._backoff, self._rng, task_status)

    async def _session(self, announce: Callable[[], object]) -> bool:
        """One connection, from connect to loss: False if there was none."""
        connected = await self._connect()
        if isinstance(connected, str):
            self._down_reason = connected
            self.health.mark_down(connected)
            announce()
            return False
        stream, reader = connected
        try:
            self.connects += 1
            self._writing = False
            self._fd = stream.socket.fileno() if isinstance(stream, trio.SocketStream) else None
            self._reader = reader
            self._connected = True
            self._connected_lot.unpark_all()
            if self.breaker.state is not State.OPEN:
                self.health.mark_up()
            announce()
            lost = await self._serve(stream, reader)
            self._down_reason = f"lost the connection to {self.address}: {lost}"
            self.health.mark_down(self._down_reason)
            return True
        finally:
            self._connected = False
            self._fd = self._reader = None
            self._fail_pending(StoreUnavailable(f"lost the connection to {self.address}"))
            await trio.aclose_forcefully(stream)

    async def _connect(self) -> tuple[trio.abc.Stream, hiredis.Reader] | str:
        """A connection that said hello and loaded the scripts, or why there is none."""
        try:
            stream, reader, _ = await dial(
                self.address, name=self.name, timeout_s=self.connect_timeout_s, tls_ca_file=self.tls_ca_file,
                then=[("SCRIPT", "LOAD", s.source) for s in self.scripts.values()],
            )
        except CONNECT_ERRORS as exc:
            return f"cannot connect to {self.address}: {describe(exc)}"
        return stream, reader

    async def _serve(self, stream: trio.abc.Stream, reader: hiredis.Reader) -> str:
        lost: list[str] = []
        self._lost = lost
        async with trio.open_nursery() as nursery:
            self._session_scope = nursery.cancel_scope
            nursery.start_soon(self._write_loop, stream, nursery.cancel_scope, lost)
            nursery.start_soon(self._linger_loop)
            lost.append(await self._read_loop(stream, reader))
            nursery.cancel_scope.cancel()
        return lost[0]

    async def _write_loop(self, stream: trio.abc.Stream, scope: trio.CancelScope, lost: list[str]) -> None:
        try:
            while True:
                if not self._out:
                    await self._writer_lot.park()
                    continue
                data = b"".join(self._out) if len(self._out) > 1 else self._out[0]
                self._out.clear()
                self._writing = True
                await stream.send_all(data)
                self._writing = False
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            lost.append(describe(exc))
            scope.cancel()

    async def _linger_loop(self) -> None:
        """Background writes wait `LINGER_PASSES` scheduler passes for an operation to carry them; then they go
        on their own."""
        while True:
            if not self._deferred:
                await self._deferred_lot.park()
            for _ in range(LINGER_PASSES):
                await trio.lowlevel.checkpoint()
            self.send_deferred()

    async def _read_loop(self, stream: trio.abc.Stream, reader: hiredis.Reader) -> str:
        fd = self._fd
        try:
            if fd is not None:
                # A plain socket: read and hand over in one step, never holding bytes across a yield, so that an
                # operation past its deadline may read on (`_take_replies`) without taking replies out of order.
                while True:
                    await trio.lowlevel.wait_readable(fd)
                    if (lost := self._read_now(fd, reader)) is not None:
                        return lost
            while True:
                data = await stream.receive_some(RECEIVE_BYTES)
                if not data:
                    return "the store closed the connection"
                if (lost := self._hand_over(reader, data)) is not None:
                    return lost
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            return describe(exc)

    def _read_now(self, fd: int, reader: hiredis.Reader) -> str | None:
        """Everything the socket holds, handed over; why the connection is lost, if it is."""
        try:
            while data := os.read(fd, RECEIVE_BYTES):
                if (lost := self._hand_over(reader, data)) is not None:
                    return lost
        except BlockingIOError:
            return None
        except OSError as exc:
            return describe(exc)
        return "the store closed the connection"

    def _hand_over(self, reader: hiredis.Reader, data: bytes) -> str | None:
        """Each whole reply in DATA to the operation waiting for it, in order; why the connection is lost, if it is."""
        pending = self._pending
        reader.feed(data)
        try:
            while (reply := reader.gets()) is not False:
                if not pending:
                    return "a reply nobody asked for (protocol out of step)"
                waiter = pending[0]
                waiter.replies.append(reply)
                if len(waiter.replies) < waiter.count:
                    continue
                pending.popleft()
                if not waiter.abandoned:
                    waiter.done.set()
                elif waiter.on_late is not None:
                    waiter.on_late(waiter.replies)
        except ProtocolError as exc:
            return describe(exc)
        return None

    def _take_replies(self) -> None:
        """Read what the store has sent, now, rather than when the reader task next runs: on a busy daemon that
        can be after an operation's deadline, and the store must not be blamed for our own lateness. (A plain
        socket only; the reader task then finds nothing, or the rest, and goes on.)"""
        if self._fd is None or self._reader is None or self._lost:
            return
        if (lost := self._read_now(self._fd, self._reader)) is not None:
            self._lost.append(lost)
            assert self._session_scope is not None
            self._session_scope.cancel()

    def _fail_pending(self, error: StoreUnavailable) -> None:
        self._out.clear()
        self._deferred.clear()
        while self._pending:
            waiter = self._pending.popleft()
            waiter.error = error
            waiter.done.set()
            if waiter.abandoned and waiter.on_late is not None:
                waiter.on_late(error)

