"""An async client for the sidecard daemon, for asyncio and Trio alike (through anyio).

    from sidecard_client.aio import AsyncClient      # or: from sidecard_client import AsyncClient

    async def main():
        async with AsyncClient() as sc:
            reply = await sc.complete([{"role": "user", "content": "Hello"}], feature="greeting")
            print(reply.text)
            async for frame in sc.stream([{"role": "user", "content": "Tell me more"}]):
                ...

    asyncio.run(main())   # or trio.run(main), or anyio.run(main, backend=...)

The same typed API as the blocking `Client` (`Completion`, `Usage`, the `SidecardError` family), over one
connection that many tasks share: requests are pipelined, replies matched by id by a single reader task, and
after the connection breaks the waiting requests fail with `ConnectionLost` and the next call reconnects.

Structured concurrency: the reader task needs an owner, so an `AsyncClient` works only inside
`async with AsyncClient(...) as client:` (the block is the reader's task group; calls outside it raise
`RuntimeError`). Leaving the block closes the connection and fails what is still waiting with
`ConnectionLost`.

Needs `anyio` (`pip install 'sidecard-client[anyio]'`); `import sidecard_client` alone never imports it.
"""

from __future__ import annotations

import itertools
import json
import math
from typing import Any, AsyncIterator, Dict, List, Optional, Tuple

try:
    import anyio
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "sidecard_client.aio needs anyio: pip install 'sidecard-client[anyio]' (the blocking Client does not)"
    ) from exc

from ._client import Completion, Usage, complete_request, encode_frame, default_socket_path, feedback_frame, request_frame, submit_frame, wait_frame
from ._errors import BadRequest, ConnectionLost, SidecardError, Timeout, from_frame

__all__ = ["AsyncClient", "Completion", "Usage", "default_socket_path"]

_RECEIVE_BYTES = 65536
_SEND_TIMEOUT_S = 30.0  # a frame that cannot be written in this long means the connection is unusable
_CANCEL_WAIT_S = 1.0  # how long a caller that gave up waits for its turn to send `cancel`
_EVENTS = ("start", "block", "delta")


class _Pending:
    __slots__ = ("done", "frame", "error", "send", "receive")

    def __init__(self, streaming: bool) -> None:
        self.done = anyio.Event()
        self.frame: Optional[Dict[str, Any]] = None
        self.error: Optional[SidecardError] = None
        # A streaming request's event frames, in order; closing `send` marks the end.
        self.send: Any = None
        self.receive: Any = None
        if streaming:
            self.send, self.receive = anyio.create_memory_object_stream(math.inf)

    def finish(self) -> None:
        self.done.set()
        if self.send is not None:
            self.send.close()


class _Connection:
    """One socket, the requests waiting on it, and a lock that keeps frames whole."""

    def __init__(self, stream: Any) -> None:
        self.stream = stream
        self.pending: Dict[int, _Pending] = {}
        self.send_lock = anyio.Lock()
        self.closed = False


class AsyncClient:
    """A connection to the daemon shared by many tasks; use it as `async with AsyncClient() as client:`.

    `timeout` is the client-side wait for a reply (or, for a stream, for each event); None waits for the
    request's own deadline: `complete(deadline_ms=...)` waits that long plus 5 s. `max_frame_bytes` raises
    this connection's frame limit with a `hello` frame (for large images and documents), sent again on every
    reconnect.
    """

    def __init__(
        self,
        path: Optional[str] = None,
        *,
        timeout: Optional[float] = None,
        connect_timeout: float = 5.0,
        max_frame_bytes: Optional[int] = None,
    ) -> None:
        self.path = path or default_socket_path()
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self.max_frame_bytes = max_frame_bytes
        self._ids = itertools.count(1)
        self._conn: Optional[_Connection] = None
        self._connect_lock: Any = None
        self._tg: Any = None

    # -- lifetime

    async def __aenter__(self) -> "AsyncClient":
        if self._tg is not None:
            raise RuntimeError("this AsyncClient is already open")
        self._connect_lock = anyio.Lock()
        tg = anyio.create_task_group()
        await tg.__aenter__()
        self._tg = tg
        return self

    async def __aexit__(self, exc_type: Any, exc: Optional[BaseException], tb: Any) -> Optional[bool]:
        tg, self._tg = self._tg, None
        with anyio.CancelScope(shield=True):
            await self.aclose()
        tg.cancel_scope.cancel()
        try:
            return await tg.__aexit__(exc_type, exc, tb)
        except BaseException as raised:
            # The reader never raises, so a group here only wraps the block's own exception: give that back as
            # it was raised, not inside an ExceptionGroup.
            inner = getattr(raised, "exceptions", None)
            if exc is None or not inner or len(inner) != 1 or inner[0] is not exc:
                raise
            context = exc.__context__
            try:
                raise exc
            finally:
                exc.__context__ = context

    async def aclose(self) -> None:
        """Close the connection; requests waiting on it fail with `ConnectionLost`. A later call (inside the
        `async with` block) opens a new connection."""
        conn, self._conn = self._conn, None
        if conn is not None:
            await self._broken(conn, "the client closed the connection")

    # -- operations

    async def ping(self) -> Dict[str, Any]:
        return await self.request({"op": "ping"})

    async def complete(
        self,
        messages: Optional[List[Dict[str, Any]]] = None,
        *,
        system: Any = None,
        model: Optional[str] = None,
        max_tokens: Optional[int] = None,
        temperature: Optional[float] = None,
        stop_sequences: Optional[List[str]] = None,
        metadata: Optional[Dict[str, Any]] = None,
        feature: Optional[str] = None,
        user: Optional[str] = None,
        deadline_ms: Optional[int] = None,
        route: Optional[str] = None,
        timeout: Optional[float] = None,
        **fields: Any,
    ) -> Completion:
        """Ask for a completion; returns a `Completion` or raises a `SidecardError` subclass.

        Extra keyword arguments are sent as frame fields as-is (`tools`, `prompt`, `vars`, `cache`, newer
        protocol fields, ...).
        """
        named = {"messages": messages, "system": system, "model": model, "max_tokens": max_tokens,
                 "temperature": temperature, "stop_sequences": stop_sequences, "metadata": metadata, "feature": feature,
                 "user": user, "deadline_ms": deadline_ms, "route": route}  # fmt: skip
        frame, timeout = complete_request(named, fields, timeout, self.timeout)
        return Completion.from_frame(await self.request(frame, timeout=timeout))

    async def stream(
        self, messages: Optional[List[Dict[str, Any]]] = None, *, timeout: Optional[float] = None, **fields: Any
    ) -> AsyncIterator[Dict[str, Any]]:
        """Stream an answer: yields event frames (`start`, `block`, `delta`), then the `done` frame.

        Takes what `complete` takes (as keywords). A failure raises a `SidecardError`; after the first token it
        is a `PartialAnswer` whose `text` is what was streamed so far. `timeout` bounds the wait for each frame.
        To leave the loop early, iterate inside `async with contextlib.aclosing(client.stream(...)) as frames:`
        so the generator is closed at once (Trio warns about one left to the garbage collector); the stream's
        later frames are then dropped, and the connection stays usable.
        """
        frame = request_frame("complete", messages, fields, stream=True)
        request_id, conn, pending = await self._submit(frame, streaming=True)
        wait = timeout if timeout is not None else self.timeout
        try:
            while True:
                try:
                    with anyio.fail_after(wait):
                        event = await pending.receive.receive()
                except anyio.EndOfStream:
                    break
                except TimeoutError:
                    raise Timeout("timeout", f"no stream event within {wait} s", True) from None
                yield event
            if pending.error is not None:
                raise pending.error
            final = pending.frame or {}
            if final.get("ok") is False:
                raise from_frame(final.get("error") or {}, final)
            yield final
        finally:
            await self._give_up(conn, request_id)  # (a loop left early, a timeout: the daemon stops the answer)
            pending.send.close()
            pending.receive.close()

    async def count_tokens(
        self, messages: Optional[List[Dict[str, Any]]] = None, *, timeout: Optional[float] = None, **fields: Any
    ) -> int:
        """The request's input tokens, counted by the API; takes what `complete` takes."""
        frame = request_frame("count_tokens", messages, fields)
        return int((await self.request(frame, timeout=timeout))["input_tokens"])

    async def feedback(
        self,
        request_id: str,
        *,
        score: Optional[float] = None,
        thumbs: Optional[str] = None,
        signal: Optional[str] = None,
        label: Optional[str] = None,
        comment: Optional[str] = None,
        timeout: Optional[float] = None,
    ) -> Dict[str, Any]:
        """Feedback on an answer; see `Client.feedback`."""
        given = {"score": score, "thumbs": thumbs, "signal": signal, "label": label, "comment": comment}
        return await self.request(feedback_frame(request_id, given), timeout=timeout)

    async def submit(self, messages: Optional[List[Dict[str, Any]]] = None, *, by: Any, webhook: Optional[str] = None,
                     timeout: Optional[float] = None, **fields: Any) -> Dict[str, Any]:
        """Hand sidecard a job (see `Client.submit`); returns the job at once."""
        return (await self.request(submit_frame(by, webhook, None, messages, fields), timeout=timeout))["jobs"][0]  # type: ignore[no-any-return]

    async def submit_many(self, jobs: List[Dict[str, Any]], *, by: Any, webhook: Optional[str] = None,
                          timeout: Optional[float] = None) -> List[Dict[str, Any]]:
        """Several jobs at once (all accepted or none); the jobs, in order."""
        return (await self.request(submit_frame(by, webhook, jobs, None, {}), timeout=timeout))["jobs"]  # type: ignore[no-any-return]

    async def job(self, job_id: str, *, timeout: Optional[float] = None) -> Dict[str, Any]:
        """The job as it is now."""
        return (await self.request({"op": "job", "job": job_id}, timeout=timeout))["job"]  # type: ignore[no-any-return]

    async def wait(self, job_id: str, wait_s: float = 30.0, *, timeout: Optional[float] = None) -> Dict[str, Any]:
        """The job once it has finished, or as it is after WAIT_S seconds."""
        frame, timeout = wait_frame(job_id, wait_s, timeout)
        return (await self.request(frame, timeout=timeout))["job"]  # type: ignore[no-any-return]

    async def request(self, frame: Dict[str, Any], *, timeout: Optional[float] = None) -> Dict[str, Any]:
        """Send one frame (an `id` is assigned) and wait for its reply frame; raises on an error frame."""
        request_id, conn, pending = await self._submit(frame)
        wait = timeout if timeout is not None else self.timeout
        try:
            with anyio.fail_after(wait):
                await pending.done.wait()
        except TimeoutError:
            raise Timeout("timeout", f"no reply within {wait} s", True) from None
        finally:
            await self._give_up(conn, request_id)  # (a timeout, a cancelled caller: the daemon stops it too)
        return _outcome(pending)

    # -- sending

    async def _submit(self, frame: Dict[str, Any], *, streaming: bool = False) -> Tuple[int, _Connection, _Pending]:
        conn = await self._connected()
        request_id = next(self._ids)
        pending = _Pending(streaming)
        conn.pending[request_id] = pending
        try:
            await self._send(conn, {"id": request_id, **frame})
        except BaseException:
            conn.pending.pop(request_id, None)
            if pending.send is not None:
                pending.send.close()
                pending.receive.close()
            raise
        return request_id, conn, pending

    async def _send(self, conn: _Connection, frame: Dict[str, Any]) -> None:
        data = encode_frame(frame)
        async with conn.send_lock:
            if conn.closed:
                raise ConnectionLost("connection_lost", "the connection to the daemon closed", True)
            # Once a frame is started it must be finished, or the stream is corrupt: cancelling the caller
            # does not interrupt a write, and a write that cannot finish in time breaks the connection.
            failure: Optional[str] = None
            with anyio.move_on_after(_SEND_TIMEOUT_S, shield=True) as scope:
                try:
                    await conn.stream.send(data)
                except (OSError, anyio.BrokenResourceError, anyio.ClosedResourceError) as exc:
                    failure = f"cannot send to {self.path}: {exc or type(exc).__name__}"
            if scope.cancelled_caught:
                failure = f"cannot send to {self.path}: no progress in {_SEND_TIMEOUT_S} s"
        if failure is not None:
            await self._broken(conn, failure)
            raise ConnectionLost("connection_lost", failure, True)

    async def _give_up(self, conn: _Connection, request_id: int) -> None:
        """The caller stopped waiting: forget the request and, if the daemon is still at it, send `cancel` so that
        it stops (and its upstream call with it). Best-effort, and brief even when the caller is cancelled."""
        if conn.pending.pop(request_id, None) is None or conn.closed:
            return  # answered, or gone with its connection
        with anyio.move_on_after(_CANCEL_WAIT_S, shield=True):
            try:
                await self._send(conn, {"op": "cancel", "id": request_id})
            except ConnectionLost:
                pass

    # -- connection

    async def _connected(self) -> _Connection:
        if self._tg is None:
            raise RuntimeError("use AsyncClient as `async with AsyncClient(...) as client:` (its reader task needs an owner)")
        conn = self._conn
        if conn is not None and not conn.closed:
            return conn
        async with self._connect_lock:
            conn = self._conn
            if conn is not None and not conn.closed:
                return conn
            try:
                with anyio.fail_after(self.connect_timeout):
                    stream = await anyio.connect_unix(self.path)
            except TimeoutError:
                raise ConnectionLost("connection_lost", f"cannot connect to {self.path}: timed out", True) from None
            except OSError as exc:
                raise ConnectionLost("connection_lost", f"cannot connect to {self.path}: {exc}", True) from None
            conn = _Connection(stream)
            self._tg.start_soon(self._read_loop, conn)
            if self.max_frame_bytes is not None:
                await self._hello(conn)
            self._conn = conn
            return conn

    async def _hello(self, conn: _Connection) -> None:
        """Raise the new connection's frame limit before anything else is sent on it."""
        request_id = next(self._ids)
        pending = _Pending(False)
        conn.pending[request_id] = pending
        try:
            await self._send(conn, {"op": "hello", "id": request_id, "max_frame_bytes": self.max_frame_bytes})
            with anyio.fail_after(self.connect_timeout):
                await pending.done.wait()
            _outcome(pending)
        except BaseException as exc:
            with anyio.CancelScope(shield=True):
                await self._broken(conn, "hello failed")
            if isinstance(exc, TimeoutError):
                raise ConnectionLost("connection_lost", f"no reply to hello within {self.connect_timeout} s", True) from None
            if isinstance(exc, SidecardError) and not isinstance(exc, ConnectionLost):
                raise BadRequest(exc.code, f"hello refused: {exc.message}", exc.retryable, exc.retry_after_ms) from None
            raise
        finally:
            conn.pending.pop(request_id, None)

    async def _read_loop(self, conn: _Connection) -> None:
        buffer = bytearray()
        scanned = 0  # bytes of `buffer` known to hold no newline
        reason = "the daemon closed the connection"
        try:
            while True:
                try:
                    chunk = await conn.stream.receive(_RECEIVE_BYTES)
                except anyio.EndOfStream:
                    break
                buffer += chunk
                start = 0
                while True:
                    newline = buffer.find(b"\n", max(start, scanned))
                    if newline < 0:
                        break
                    line = bytes(buffer[start:newline])
                    start = newline + 1
                    if line.strip():
                        self._deliver(conn, json.loads(line))
                del buffer[:start]
                scanned = len(buffer)
        except anyio.get_cancelled_exc_class():
            reason = "the client closed the connection"
            raise
        except anyio.ClosedResourceError:
            reason = "the client closed the connection"
        except (OSError, ValueError, anyio.BrokenResourceError) as exc:
            reason = f"connection to the daemon failed: {exc or type(exc).__name__}"
        finally:
            with anyio.CancelScope(shield=True):
                await self._broken(conn, reason)

    def _deliver(self, conn: _Connection, frame: Any) -> None:
        if not isinstance(frame, dict):
            return
        request_id = frame.get("id")
        if frame.get("event") in _EVENTS:
            pending = conn.pending.get(request_id)
            if pending is not None and pending.send is not None:
                try:
                    pending.send.send_nowait(frame)
                except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                    pass  # the caller stopped reading this stream
            return
        # An error frame with `id: null` (a frame too broken to carry an id) cannot be matched to a request.
        pending = conn.pending.pop(request_id, None)
        if pending is not None:
            pending.frame = frame
            pending.finish()

    async def _broken(self, conn: _Connection, reason: str) -> None:
        """Fail every request waiting on `conn` and close it; the next call opens a new connection."""
        if conn.closed:
            return
        conn.closed = True
        if self._conn is conn:
            self._conn = None
        waiting, conn.pending = conn.pending, {}
        for pending in waiting.values():
            pending.error = ConnectionLost("connection_lost", reason, True)
            pending.finish()
        try:
            await conn.stream.aclose()
        except Exception:  # noqa: BLE001 - closing a broken socket may fail; it is closed either way
            pass


def _outcome(pending: _Pending) -> Dict[str, Any]:
    if pending.error is not None:
        raise pending.error
    assert pending.frame is not None
    if pending.frame.get("ok") is False:
        raise from_frame(pending.frame.get("error") or {}, pending.frame)
    return pending.frame
