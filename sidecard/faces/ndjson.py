"""The app socket: NDJSON frames in, typed requests to the engine, reply frames out (stream events as frames of
their own, then a `done` frame).

Each connection has a reader (frames → request tasks), a writer (one bounded outbox, batched writes) and
its request tasks, all in one nursery: a client that goes away cancels exactly its own requests. A reply
finds the outbox empty most of the time: it is then written at once from its request's task, non-blocking,
and only what the socket does not take goes through the outbox (a task switch and two checkpoints less per
request; the writer keeps the order, the batching and the slow-reader timeout). Bad input
costs the client one error frame, never the connection's other requests or the daemon; a bug met while
handling a frame is an `internal` error frame and one log line, and at worst closes that one connection.
"""

from __future__ import annotations

import os
import select
import socket
import struct
from typing import TYPE_CHECKING, Any, Final

import msgspec
import trio

from .. import __version__
from ..config import ServerConfig
from ..engine import CANCELLED_BY_CLIENT, STOPPED, PartialAnswer
from ..errors import Code, SidecardError
from ..framing import NEED_DATA, Frame, FrameDecoder
from ..observe.log import JsonLog
from ..observe.metrics import Metrics
from ..policies.buffers import BufferBudget
from ..protocol import (
    BadFrame,
    Cancel,
    Complete,
    Completion,
    Feedback,
    Hello,
    HelloReply,
    JobOp,
    JobReply,
    JobsReply,
    JobGet,
    JobWait,
    Ping,
    Pong,
    RequestId,
    salvage_head_id,
    Submit,
    decode_request,
    encode_frame,
    error_frame,
    partial_error_frame,
    salvage_id,
)
from ..streaming import OWN_FIELDS, BlockStart, Delta, Ending, StreamEvent, StreamStart
from ..safety.access import ANYONE, AccessControl, Identity
from ..sockio import receive
from ..engine.types import Trace
from .base import DRAINING, LAST_WORD_S, Answer, Face, named

if TYPE_CHECKING:
    from ..engine import Engine
    from ..engine.jobs import JobDesk
    from ..jobs.store import JobView
    from ..loop.feedback import FeedbackDesk
    from ..engine.types import Emit

RECEIVE_BYTES: Final = 65536
OUTBOX_FRAMES: Final = 256
BATCH_BYTES: Final = 256 * 1024


async def wait_peer_closed(sock: trio.socket.SocketType) -> None:
    """Return when the peer has fully closed its end (not merely shut down its writing half).

    After EOF a socket stays readable, so readiness cannot tell "client half-closed and awaits replies"
    (what `socat` does) from "client is gone". EPOLLHUP can: it is reported once both directions are shut.
    """
    poller = select.epoll()
    try:
        poller.register(sock.fileno(), 0)  # HUP and ERR are always reported
        await trio.lowlevel.wait_readable(poller.fileno())
    finally:
        poller.close()


def _peer_ids(stream: trio.SocketStream) -> tuple[int | None, int | None]:
    """The peer's uid and gid (SO_PEERCRED); (None, None) where the socket cannot tell."""
    try:
        _, uid, gid = struct.unpack("3i", stream.socket.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))
    except (OSError, AttributeError):
        return None, None
    return uid, gid


class AppServer(Face):
    def __init__(
        self, engine: Engine, *, config: ServerConfig, metrics: Metrics, log: JsonLog, budget: BufferBudget | None = None,
        access: AccessControl | None = None,
        feedback: FeedbackDesk | None = None,
        jobs: JobDesk | None = None,
    ) -> None:
        super().__init__(engine, access, feedback, jobs)
        self.config = config
        self.metrics = metrics
        self.log = log
        self.budget = budget  # incomplete frames, shared with the HTTP face
        # Ordered by when each last sent a frame, so that at the cap the one idle longest gives way to a newcomer.
        self._connections: dict[_Connection, None] = {}

    @property
    def connections(self) -> int:
        return len(self._connections)

    async def handle(self, stream: trio.SocketStream) -> None:
        """serve_listeners handler: owns the stream until the connection ends."""
        async with stream:
            if self.draining or (len(self._connections) >= self.config.max_connections and not self._evict_idlest()):
                await _send_quietly(stream, self._refusal())
                return
            connection = _Connection(self, stream)
            self._connections[connection] = None
            self.metrics.connections.inc()
            try:
                with self.busy:  # a drain waits for the connection to close
                    await connection.run()
            except Exception as exc:  # a bug must cost this connection, never the accept loop or the daemon
                self.log.internal_error("connection", exc)
            finally:
                connection.decoder.close()
                self._connections.pop(connection, None)
                self.metrics.connections.dec()

    def _evict_idlest(self) -> bool:
        """At the cap, close the connection idle longest (nothing in flight) for a newcomer: an app that leaks its
        connections must not lock every other app out. The clients reconnect on their next call."""
        for connection in self._connections:
            if not connection.busy and not connection.evicted:
                connection.evict()
                self.metrics.connections_evicted.inc()
                return True
        return False

    def heard_from(self, connection: _Connection) -> None:
        if self._connections.pop(connection, 0) is None:  # (to the end: the most recently used)
            self._connections[connection] = None

    def _refusal(self) -> bytes:
        if self.draining:
            err = DRAINING
        else:
            err = SidecardError(Code.OVERLOADED, "too many connections", retry_after_ms=100)
        self.metrics.frames_rejected(err.code).inc()
        return encode_frame(error_frame(None, err))

    def drain(self) -> None:
        """Stop taking requests: each connection finishes what it has in flight, then closes."""
        super().drain()
        for connection in list(self._connections):
            connection.on_drain()


class _Connection:
    def __init__(self, server: AppServer, stream: trio.SocketStream) -> None:
        self.server = server
        self.stream = stream
        self.caller = server.access.for_peer(*_peer_ids(stream)) if server.access.settings.enabled else ANYONE
        self.decoder = FrameDecoder(server.config.max_frame_bytes, server.budget)
        self.outbox_send, self.outbox_receive = trio.open_memory_channel[bytes](OUTBOX_FRAMES)
        self.queued = 0  # frames in the outbox or being written by the writer: while any, no direct write
        self.mid_frame = False  # part of a frame is on the wire, its rest not yet: nothing else may be written
        self.fd = stream.socket.fileno()
        # What a `cancel` frame stops, by the id it names: a whole answer's trace, else the request's own scope.
        self.in_flight: dict[RequestId, Trace | trio.CancelScope] = {}
        self.nursery: trio.Nursery | None = None
        self.reader_scope = trio.CancelScope()
        self.done_reading = False
        self.evicted = False

    @property
    def busy(self) -> bool:
        return bool(self.in_flight)

    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            self.nursery = nursery
            nursery.start_soon(self._writer)
            with self.reader_scope:
                await self._read()
            self.done_reading = True
            if self.busy:
                # EOF may be a half-close (the client awaits its replies) or the client vanished.
                nursery.start_soon(self._cancel_on_hangup)
            else:
                self.outbox_send.close()

    def on_drain(self) -> None:
        if not self.busy:
            self.reader_scope.cancel()

    def evict(self) -> None:
        self.evicted = True
        self.reader_scope.cancel()  # (the writer then flushes what is queued and ends the connection)

    def _work_done(self) -> None:
        if self.busy:
            return
        if self.done_reading:
            self.outbox_send.close()  # the writer flushes what is queued, then ends the connection
        elif self.server.draining:
            self.reader_scope.cancel()

    # -- reading

    async def _read(self) -> None:
        data = b"\n"  # (a new client has sent nothing yet)
        while True:
            try:  # after a whole frame the client most likely awaits its reply: wait for input before reading
                data = await receive(self.fd, RECEIVE_BYTES, wait_first=data.endswith(b"\n"))
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                data = b""
            self.decoder.receive_data(data)
            while True:
                event = self.decoder.next_event()
                if event is NEED_DATA:
                    break
                if isinstance(event, Frame):
                    self.server.heard_from(self)
                    try:
                        reply = self._dispatch(event.data)
                    except Exception as exc:
                        reply = self._internal(salvage_id(event.data), exc, "frame")
                elif event.over_budget:
                    reply = self._rejection(
                        None,
                        SidecardError(
                            Code.OVERLOADED, "the daemon holds too much incomplete input right now", retry_after_ms=100
                        ),
                    )
                else:
                    reply = self._rejection(
                        salvage_head_id(event.head),  # (so that the client's call hears of it, not its timeout)
                        SidecardError(
                            Code.FRAME_TOO_LARGE,
                            f"frame of {event.size} bytes is over the limit of {self.decoder.max_frame_bytes}",
                        ),
                    )
                if reply is not None:
                    await self._reply(reply)
            if not data:
                return

    def _dispatch(self, frame: bytes) -> bytes | None:
        """Start a request, or return the reply the reader owes at once (pong, hello, a rejection)."""
        try:
            request = decode_request(frame)
        except BadFrame as bad:
            return self._rejection(bad.request_id, bad.error)
        if isinstance(request, Ping):
            return encode_frame(Pong(request.id, __version__))
        server = self.server
        if isinstance(request, Hello):
            if request.max_frame_bytes is not None:
                self.decoder.max_frame_bytes = min(request.max_frame_bytes, server.config.max_frame_bytes_ceiling)
            return encode_frame(HelloReply(request.id, __version__, self.decoder.max_frame_bytes))
        if isinstance(request, Cancel):
            if (scope := self.in_flight.get(request.id)) is not None:
                scope.cancel()  # (one no longer in flight has ended already: nothing to say)
            return None
        if (forbidden := server.refused(self.caller)) is not None:
            return self._rejection(request.id, forbidden)
        if isinstance(request, Feedback):
            taken = server.take_feedback(request)
            return encode_frame(error_frame(request.id, taken) if isinstance(taken, SidecardError) else taken)
        if server.draining:
            return self._rejection(request.id, DRAINING)
        if request.id in self.in_flight:
            return self._rejection(request.id, SidecardError(Code.BAD_REQUEST, "id: a request with this id is already in flight"))
        if len(self.in_flight) >= server.config.max_inflight_per_connection:
            return self._rejection(
                request.id,
                SidecardError(Code.OVERLOADED, "too many requests in flight on this connection", retry_after_ms=100),
            )
        begun = None if isinstance(request, _JOB_OPS) else server.begin(request, self.caller)  # type: ignore[arg-type]
        if isinstance(begun, (Completion, SidecardError)):
            return reply_frame(request, begun)  # type: ignore[arg-type]
        # A whole answer (its first step done: planned) is stopped through its trace, in the engine's scope (one
        # scope per request less); other requests (a stream, a token count, a job op) run in a scope of their own.
        stop = None if begun is not None and begun.plan is not None else trio.CancelScope()
        self.in_flight[request.id] = begun if stop is None else stop  # type: ignore[assignment]
        assert self.nursery is not None
        self.nursery.start_soon(self._serve, request, stop, begun)
        return None

    def _rejection(self, request_id: RequestId | None, err: SidecardError) -> bytes:
        self.server.metrics.frames_rejected(err.code).inc()
        return encode_frame(error_frame(request_id, err))

    def _internal(self, request_id: RequestId | None, exc: Exception, where: str) -> bytes:
        """A bug: the client gets a typed error, the log gets its type, where, and the request's id."""
        self.server.log.internal_error(where, exc, request_id)
        return encode_frame(error_frame(request_id, SidecardError(Code.INTERNAL, "internal error")))

    async def _reply(self, frame: bytes) -> None:
        """Queue a reply from the reader. With the outbox full the reader waits here, so a client that writes
        without reading is not read either: the kernel's socket buffer pushes back on it, and the writer's
        timeout ends it if it never reads. Nothing on a connection grows past the outbox and its requests."""
        if self.queued == 0 and not (frame := self._write_now(frame)):
            return
        try:
            self.outbox_send.send_nowait(frame)
            self.queued += 1
        except trio.WouldBlock:
            await self._queue(frame)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass

    async def _send(self, frame: bytes) -> None:
        if self.queued == 0 and not (frame := self._write_now(frame)):
            return
        await self._queue(frame)

    async def _queue(self, frame: bytes) -> None:
        try:
            self.queued += 1
            await self.outbox_send.send(frame)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self.queued -= 1
        except BaseException:
            self.queued -= 1
            raise

    def _write_now(self, frame: bytes) -> bytes:
        """Write what the socket takes now (nothing is queued before it); returns the rest, for the writer. A
        failed write leaves the frame whole: the writer meets the same failure and handles it."""
        try:
            written = os.write(self.fd, frame)
        except OSError:  # would block, or the client is gone
            return frame
        if written < len(frame):
            self.mid_frame = bool(written)  # (the writer sends the rest)
        return frame[written:]

    # -- requests

    async def _serve(self, request: Complete | JobOp, stop: trio.CancelScope | None, begun: Trace | None) -> None:
        try:
            if stop is None:
                frame = await self._answer(request, begun)
            else:
                with stop:
                    frame = await self._answer(request, begun)
                if stop.cancelled_caught:  # the client's `cancel`: the request's last frame says so
                    frame = encode_frame(error_frame(request.id, named(CANCELLED_BY_CLIENT, begun)))
            await self._send(frame)
        finally:
            del self.in_flight[request.id]
            self._work_done()

    async def _answer(self, request: Complete | JobOp, begun: Trace | None) -> bytes:
        try:
            assert isinstance(self.caller, Identity)
            if isinstance(request, _JOB_OPS):
                return job_frame(request.id, await self.server.job(request, self.caller))
            emit = self._emitter(request.id) if request.stream else _unused
            return reply_frame(request, await self.server.answer(request, emit, self.caller, begun))
        except trio.Cancelled:
            if self.server.engine.stopped:  # (not the client's `cancel`, nor its leaving)
                await self._last_word(request.id, begun)
            raise
        except Exception as exc:
            return self._internal(request.id, exc, "request")

    def _emitter(self, request_id: RequestId) -> Emit:
        """How a stream's events reach this connection: a frame each, as they come."""

        async def emit(event: StreamEvent) -> None:
            if not isinstance(event, Ending):  # (the `done` frame's `extra` has its fields)
                await self._send(encode_event(request_id, event))

        return emit

    async def _last_word(self, request_id: RequestId, begun: Trace | None) -> None:
        """The drain's grace period ran out on this request: tell the client, briefly and best-effort; not after a
        frame the cancel cut part-way (the client would read the two as one garbled line: it sees the close)."""
        if self.mid_frame:
            return
        frame = encode_frame(error_frame(request_id, named(STOPPED, begun)))
        with trio.CancelScope(shield=True), trio.move_on_after(LAST_WORD_S):
            try:
                await self.stream.send_all(frame)
            except (trio.BrokenResourceError, trio.ClosedResourceError, trio.BusyResourceError):
                pass

    async def _cancel_on_hangup(self) -> None:
        await wait_peer_closed(self.stream.socket)
        self.server.metrics.clients_cut("client_gone").inc()
        assert self.nursery is not None
        self.nursery.cancel_scope.cancel()

    # -- writing

    async def _writer(self) -> None:
        """Writes queued frames, batched; when the outbox closes, everything is flushed and the connection ends."""
        timeout = self.server.config.client_write_timeout_s
        assert self.nursery is not None
        async with self.outbox_receive:
            async for frame in self.outbox_receive:
                batch = [frame]
                size = len(frame)
                while size < BATCH_BYTES:
                    try:
                        more = self.outbox_receive.receive_nowait()
                    except (trio.WouldBlock, trio.EndOfChannel):
                        break
                    batch.append(more)
                    size += len(more)
                reason = None
                with trio.move_on_after(timeout) as write:
                    try:
                        self.mid_frame = True  # (until the whole batch is out: a cancel may cut it anywhere)
                        await self.stream.send_all(b"".join(batch) if len(batch) > 1 else frame)
                        self.mid_frame = False
                    except (trio.BrokenResourceError, trio.ClosedResourceError):
                        reason = "client_gone"
                self.queued -= len(batch)
                if write.cancelled_caught:
                    reason = "slow_reader"
                    self.server.log.warning("client_disconnected", reason=reason, timeout_s=timeout)
                if reason is not None:
                    self.server.metrics.clients_cut(reason).inc()
                    self.nursery.cancel_scope.cancel()  # its requests go with it
                    return
        self.nursery.cancel_scope.cancel()  # all answered: stop the hang-up watch


def reply_frame(request: Complete, answer: Answer) -> bytes:
    """The frame that ends a request: its answer (a stream's `done`), token count or error."""
    if isinstance(answer, Completion):
        frame = encode_frame(answer)
        return b'{"event":"done",' + frame[1:] if request.stream else frame
    if isinstance(answer, PartialAnswer):
        return encode_frame(partial_error_frame(request.id, answer, answer.text))
    if isinstance(answer, SidecardError):
        return encode_frame(error_frame(request.id, answer))
    return encode_frame(answer)


_JOB_OPS: Final = (Submit, JobGet, JobWait)


def job_frame(request_id: RequestId, answer: list[JobView] | JobView | SidecardError) -> bytes:
    """The frame that answers a job op: the jobs a submit accepted, the job, or the error."""
    if isinstance(answer, SidecardError):
        return encode_frame(error_frame(request_id, answer))
    if isinstance(answer, list):
        return encode_frame(JobsReply(request_id, answer))
    return encode_frame(JobReply(request_id, answer))


async def _unused(event: StreamEvent) -> None:  # pragma: no cover (only a stream emits)
    raise AssertionError("not a stream")


_encoder: Final = msgspec.json.Encoder()


def encode_event(request_id: RequestId, event: StreamEvent) -> bytes:
    """A stream's event as its frame: `{"id": ..., "event": "start" | "block" | "delta" | "ping", ...}`."""
    frame: dict[str, Any]
    if isinstance(event, Delta):
        frame = {"id": request_id, "event": "delta", "index": event.index, "type": event.kind}
        if event.field == OWN_FIELDS:  # a delta sidecard does not model: its fields beside the frame's, none in place of one
            for key, value in event.piece.items():
                frame.setdefault(key, value)
        else:
            frame[event.field] = event.piece
    elif isinstance(event, BlockStart):
        frame = {"id": request_id, "event": "block", "index": event.index, "block": event.block}
    elif isinstance(event, StreamStart):
        frame = {"id": request_id, "event": "start", "request_id": event.request_id, "model": event.model,
                 "served_by": event.served_by, "usage": event.usage, "upstream_request_id": event.upstream_request_id}
        if event.extra:
            frame["extra"] = event.extra
    else:
        frame = {"id": request_id, "event": "ping"}
    return _encoder.encode(frame) + b"\n"


async def _send_quietly(stream: trio.SocketStream, data: bytes) -> None:
    with trio.move_on_after(1.0):
        try:
            await stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
