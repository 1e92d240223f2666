from __future__ import annotations

import itertools
import json
import os
import queue
import socket
import threading
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Optional

from ._errors import BadRequest, ConnectionLost, SidecardError, Timeout, from_frame

_RECEIVE_BYTES = 65536


def default_socket_path() -> str:
    """`$SIDECARD_SOCKET`, else the daemon's default in the per-user runtime directory."""
    env = os.environ.get("SIDECARD_SOCKET")
    if env:
        return env
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    base = os.path.join(runtime, "sidecard") if runtime else f"/tmp/sidecard-{os.getuid()}"
    return os.path.join(base, "app.sock")


def default_admin_socket_path() -> str:
    """`$SIDECARD_ADMIN_SOCKET`, else `admin.sock` beside the app socket (the daemon's default)."""
    return os.environ.get("SIDECARD_ADMIN_SOCKET") or os.path.join(os.path.dirname(default_socket_path()), "admin.sock")


def complete_request(
    named: Dict[str, Any], fields: Dict[str, Any], timeout: Optional[float], default_timeout: Optional[float]
) -> "tuple[Dict[str, Any], Optional[float]]":
    """`complete`'s frame (the named arguments that were given, then any other fields as they are), and how long
    to wait for its reply: as asked, else the client's timeout, else the request's deadline plus a margin."""
    frame: Dict[str, Any] = {"op": "complete", **{k: v for k, v in named.items() if v is not None}, **fields}
    if timeout is None and default_timeout is None and named.get("deadline_ms") is not None:
        timeout = named["deadline_ms"] / 1000 + 5.0
    return frame, timeout


def request_frame(op: str, messages: Optional[List[Dict[str, Any]]], fields: Dict[str, Any], **given: Any) -> Dict[str, Any]:
    """A `stream` or `count_tokens` frame: the fields that were given, and the messages if any."""
    frame: Dict[str, Any] = {"op": op, **given, **{k: v for k, v in fields.items() if v is not None}}
    if messages is not None:
        frame["messages"] = messages
    return frame


def feedback_frame(request_id: str, given: Dict[str, Any]) -> Dict[str, Any]:
    """A feedback frame: the answer's `request_id` and the fields given (score, thumbs, signal, label, comment)."""
    return {"op": "feedback", "request_id": request_id, **{k: v for k, v in given.items() if v is not None}}


WAIT_MARGIN_S = 10.0  # a `wait`'s reply may take this long past the wait itself


def submit_frame(by: Any, webhook: Optional[str], jobs: Optional[List[Dict[str, Any]]], messages: Optional[List[Dict[str, Any]]],
                 fields: Dict[str, Any]) -> Dict[str, Any]:
    """A `submit` frame: one request (MESSAGES and FIELDS) or several (JOBS), to answer by BY."""
    frame = request_frame("submit", messages, fields, by=by)
    if webhook is not None:
        frame["webhook"] = webhook
    if jobs is not None:
        frame["jobs"] = jobs
    return frame


def encode_frame(frame: Dict[str, Any]) -> bytes:
    """One NDJSON line, or `BadRequest` for a value JSON cannot carry: NaN and infinities (not JSON, so the daemon could
    not read the frame, nor its id to answer it), a lone surrogate in a string, an object `json` cannot encode."""
    try:
        return json.dumps(frame, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode() + b"\n"
    except (TypeError, ValueError) as exc:  # (UnicodeEncodeError is a ValueError)
        raise BadRequest("bad_request", f"the request cannot be sent as JSON: {exc}", False) from None


def wait_frame(job_id: str, wait_s: float, timeout: Optional[float]) -> "tuple[Dict[str, Any], float]":
    """A `wait` frame, and how long to wait for its reply."""
    frame = {"op": "wait", "job": job_id, "timeout_ms": max(1, min(3_600_000, int(wait_s * 1000)))}
    return frame, timeout if timeout is not None else wait_s + WAIT_MARGIN_S


@dataclass
class Usage:
    input_tokens: int = 0
    output_tokens: int = 0
    cache_creation_input_tokens: int = 0
    cache_read_input_tokens: int = 0


@dataclass
class Completion:
    text: str
    content: List[Dict[str, Any]]
    model: str
    usage: Usage
    stop_reason: Optional[str]
    latency_ms: float
    cost_usd: float
    request_id: str
    upstream_request_id: Optional[str]
    served_by: Dict[str, str]
    attempts: int = 1
    fallback: bool = False
    degraded: bool = False
    cached: bool = False
    stale: bool = False
    prompt: Optional[str] = None
    prompt_version: Optional[int] = None
    ttft_ms: Optional[float] = None
    resumed: bool = False
    guardrails: Optional[List[str]] = None
    trace_id: Optional[str] = None  # the request's trace (sidecard's [tracing] on, or your traceparent)
    extra: Optional[Dict[str, Any]] = None  # the API's own fields sidecard does not model: container, stop_details
    raw: Dict[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def from_frame(cls, frame: Dict[str, Any]) -> "Completion":
        usage = frame.get("usage") or {}
        return cls(
            text=frame.get("text", ""),
            content=frame.get("content", []),
            model=frame.get("model", ""),
            usage=Usage(**{k: v for k, v in usage.items() if k in Usage.__dataclass_fields__}),
            stop_reason=frame.get("stop_reason"),
            latency_ms=frame.get("latency_ms", 0.0),
            cost_usd=frame.get("cost_usd", 0.0),
            request_id=frame.get("request_id", ""),
            upstream_request_id=frame.get("upstream_request_id"),
            served_by=frame.get("served_by", {}),
            attempts=frame.get("attempts", 1),
            fallback=frame.get("fallback", False),
            degraded=frame.get("degraded", False),
            cached=frame.get("cached", False),
            stale=frame.get("stale", False),
            prompt=frame.get("prompt"),
            prompt_version=frame.get("prompt_version"),
            ttft_ms=frame.get("ttft_ms"),
            resumed=frame.get("resumed", False),
            guardrails=frame.get("guardrails"),
            trace_id=frame.get("trace_id"),
            extra=frame.get("extra"),
            raw=frame,
        )


class _Pending:
    __slots__ = ("done", "frame", "error", "events")

    def __init__(self, streaming: bool = False) -> None:
        self.done = threading.Event()
        self.frame: Optional[Dict[str, Any]] = None
        self.error: Optional[SidecardError] = None
        # A streaming request's event frames, in order; None marks the end.
        self.events: Optional["queue.Queue[Optional[Dict[str, Any]]]"] = queue.Queue() if streaming else None


class Client:
    """A thread-safe connection to the daemon; reconnects on the next call after a failure.

    `max_frame_bytes` raises the connection's frame limit with a `hello` frame (for large images and
    documents), sent again on every reconnect."""

    def __init__(
        self,
        path: Optional[str] = None,
        *,
        timeout: Optional[float] = None,
        connect_timeout: float = 5.0,
        max_frame_bytes: Optional[int] = None,
    ) -> None:
        self.path = path or default_socket_path()
        self.timeout = timeout  # client-side wait for a reply; None: the request's deadline plus a margin
        self.connect_timeout = connect_timeout
        self.max_frame_bytes = max_frame_bytes
        # Re-entrant: a stream abandoned without being closed sends its `cancel` from the garbage collector, which
        # may run in this thread while it holds the lock.
        self._lock = threading.RLock()
        self._ids = itertools.count(1)
        self._sock: Optional[socket.socket] = None
        self._pending: Dict[Any, _Pending] = {}

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        with self._lock:
            sock, self._sock = self._sock, None
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()

    # -- operations

    def ping(self) -> Dict[str, Any]:
        return self.request({"op": "ping"})

    def stream(self, messages: Optional[List[Dict[str, Any]]] = None, *, timeout: Optional[float] = None, **fields: Any) -> Iterator[Dict[str, Any]]:
        """Stream an answer: yields event frames (`start`, `block`, `delta`), then the `done` frame.

        Takes what `complete` takes. A failure raises a `SidecardError`; after the first token it is a
        `PartialAnswer` whose `text` is what was streamed so far.
        """
        frame = request_frame("complete", messages, fields, stream=True)
        request_id, pending = self._submit(frame, streaming=True)
        assert pending.events is not None
        wait = timeout if timeout is not None else self.timeout
        try:
            while True:
                try:
                    event = pending.events.get(timeout=wait)
                except queue.Empty:
                    raise Timeout("timeout", f"no stream event within {wait} s", True) from None
                if event is None:
                    break
                yield event
        finally:
            self._give_up(request_id)  # (a loop left early, a timeout: the daemon stops the answer)
        if pending.error is not None:
            raise pending.error
        final = pending.frame or {}
        if final.get("ok") is False:
            raise from_frame(final.get("error") or {}, final)
        yield final

    def complete(
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

        Extra keyword arguments are sent as frame fields as-is (newer protocol fields, e.g. `prompt`).
        """
        named = {"messages": messages, "system": system, "model": model, "max_tokens": max_tokens,
                 "temperature": temperature, "stop_sequences": stop_sequences, "metadata": metadata, "feature": feature,
                 "user": user, "deadline_ms": deadline_ms, "route": route}  # fmt: skip
        frame, timeout = complete_request(named, fields, timeout, self.timeout)
        return Completion.from_frame(self.request(frame, timeout=timeout))

    def count_tokens(self, messages: Optional[List[Dict[str, Any]]] = None, *, timeout: Optional[float] = None, **fields: Any) -> int:
        """The request's input tokens, counted by the API; takes what `complete` takes."""
        frame = request_frame("count_tokens", messages, fields)
        return int(self.request(frame, timeout=timeout)["input_tokens"])

    def feedback(
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
        """Feedback on an answer (its `request_id`): one of `score`, `thumbs` ("up"/"down") or `signal`
        ("retry"/"abandoned"), with an optional `label` and `comment`. Raises `FeedbackRefused` for an unknown,
        expired or already scored request, `BadRequest` for a bad value."""
        given = {"score": score, "thumbs": thumbs, "signal": signal, "label": label, "comment": comment}
        return self.request(feedback_frame(request_id, given), timeout=timeout)

    def submit(self, messages: Optional[List[Dict[str, Any]]] = None, *, by: Any, webhook: Optional[str] = None,
               timeout: Optional[float] = None, **fields: Any) -> Dict[str, Any]:
        """Hand sidecard a job: the request (what `complete` takes) to answer by BY (seconds, a duration such as
        "6h", or an RFC 3339 time); returns the job (`id`, `state`, `deadline`, ...) at once. WEBHOOK: a URL the
        finished job is POSTed to (check it with `verify_webhook`)."""
        return self.request(submit_frame(by, webhook, None, messages, fields), timeout=timeout)["jobs"][0]  # type: ignore[no-any-return]

    def submit_many(self, jobs: List[Dict[str, Any]], *, by: Any, webhook: Optional[str] = None,
                    timeout: Optional[float] = None) -> List[Dict[str, Any]]:
        """Several jobs at once (all accepted or none), each a request's fields; the jobs, in order."""
        return self.request(submit_frame(by, webhook, jobs, None, {}), timeout=timeout)["jobs"]  # type: ignore[no-any-return]

    def job(self, job_id: str, *, timeout: Optional[float] = None) -> Dict[str, Any]:
        """The job as it is now: `state`, and once it has finished its `outcome` (or `error`)."""
        return self.request({"op": "job", "job": job_id}, timeout=timeout)["job"]  # type: ignore[no-any-return]

    def wait(self, job_id: str, wait_s: float = 30.0, *, timeout: Optional[float] = None) -> Dict[str, Any]:
        """The job once it has finished, or as it is after WAIT_S seconds (check its `state`)."""
        frame, timeout = wait_frame(job_id, wait_s, timeout)
        return self.request(frame, timeout=timeout)["job"]  # type: ignore[no-any-return]

    def request(self, frame: Dict[str, Any], *, timeout: Optional[float] = None) -> Dict[str, Any]:
        """Send one frame (an `id` is assigned) and wait for its reply frame; raises on an error frame."""
        request_id, pending = self._submit(frame)
        wait = timeout if timeout is not None else self.timeout
        if not pending.done.wait(wait):
            self._give_up(request_id)
            raise Timeout("timeout", f"no reply within {wait} s", True)
        if pending.error is not None:
            raise pending.error
        assert pending.frame is not None
        if pending.frame.get("ok") is False:
            raise from_frame(pending.frame.get("error") or {}, pending.frame)
        return pending.frame

    def _submit(self, frame: Dict[str, Any], *, streaming: bool = False) -> "tuple[int, _Pending]":
        request_id = next(self._ids)
        data = encode_frame({"id": request_id, **frame})
        pending = _Pending(streaming)
        with self._lock:
            sock = self._connected()
            self._pending[request_id] = pending
            try:
                sock.sendall(data)
            except OSError as exc:
                self._pending.pop(request_id, None)
                self._broken(sock, exc)
                raise ConnectionLost("connection_lost", f"cannot send to {self.path}: {exc}", True) from None
        return request_id, pending

    def _give_up(self, request_id: int) -> None:
        """The caller stopped waiting: forget the request and, if the daemon is still at it, send `cancel` so that
        it stops (and its upstream call with it). Best-effort: a broken connection has stopped it already."""
        with self._lock:
            if self._pending.pop(request_id, None) is None or self._sock is None:
                return  # answered, or gone with its connection
            try:
                self._sock.sendall(b'{"op":"cancel","id":%d}\n' % request_id)
            except OSError:
                pass  # the reader meets the same failure and fails the connection's other requests

    # -- connection

    def _connected(self) -> socket.socket:
        if self._sock is not None:
            return self._sock
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.connect_timeout)
        try:
            sock.connect(self.path)
            if self.max_frame_bytes is not None:
                self._hello(sock)
        except OSError as exc:
            sock.close()
            raise ConnectionLost("connection_lost", f"cannot connect to {self.path}: {exc}", True) from None
        except SidecardError:
            sock.close()
            raise
        sock.settimeout(None)
        self._sock = sock
        threading.Thread(target=self._read_loop, args=(sock,), name="sidecard-client-reader", daemon=True).start()
        return sock

    def _hello(self, sock: socket.socket) -> None:
        """Raise the new connection's frame limit before anything else is sent on it (no reader runs yet)."""
        hello = {"op": "hello", "id": next(self._ids), "max_frame_bytes": self.max_frame_bytes}
        sock.sendall(json.dumps(hello, separators=(",", ":")).encode() + b"\n")
        reply = b""
        while not reply.endswith(b"\n"):
            chunk = sock.recv(65536)
            if not chunk:
                raise ConnectionLost("connection_lost", "the daemon closed the connection during hello", True)
            reply += chunk
        frame = json.loads(reply)
        if frame.get("ok") is False:
            error = from_frame(frame.get("error") or {}, frame)
            raise BadRequest(error.code, f"hello refused: {error.message}", error.retryable, error.retry_after_ms)

    def _read_loop(self, sock: socket.socket) -> None:
        buffer = b""
        error: Exception = ConnectionLost("connection_lost", "the daemon closed the connection", True)
        try:
            while True:
                chunk = sock.recv(_RECEIVE_BYTES)
                if not chunk:
                    break
                buffer += chunk
                *lines, buffer = buffer.split(b"\n")
                for line in lines:
                    if line.strip():
                        self._deliver(json.loads(line))
        except (OSError, ValueError) as exc:
            error = ConnectionLost("connection_lost", f"connection to the daemon failed: {exc}", True)
        self._broken(sock, error)

    def _deliver(self, frame: Dict[str, Any]) -> None:
        event = frame.get("event")
        with self._lock:
            if event in ("start", "block", "delta"):
                pending = self._pending.get(frame.get("id"))
            else:
                pending = self._pending.pop(frame.get("id"), None)
        if pending is None:
            return
        if event in ("start", "block", "delta"):
            if pending.events is not None:
                pending.events.put(frame)
            return
        pending.frame = frame
        pending.done.set()
        if pending.events is not None:
            pending.events.put(None)

    def _broken(self, sock: socket.socket, error: Exception) -> None:
        """Fail every request waiting on `sock`; the next call opens a new connection."""
        with self._lock:
            if self._sock is sock:
                self._sock = None
                waiting, self._pending = self._pending, {}
            else:
                waiting = {}
        for pending in waiting.values():
            pending.error = error if isinstance(error, SidecardError) else ConnectionLost("connection_lost", str(error), True)
            pending.done.set()
            if pending.events is not None:
                pending.events.put(None)
        try:
            sock.close()
        except OSError:
            pass


class AdminClient:
    """The daemon's admin socket (what `sidecardctl` uses): one op per call, each on a connection of its own.

    `call("status")`, `call("kill", scope="feature:chat", reason="...")` return the reply frame (`result`, and
    `before`/`after` for a change); an error reply raises its `SidecardError` (the whole reply in `frame`), and a
    daemon that cannot be reached raises `ConnectionLost`. Only the daemon's own user, root, and the uids and
    gids its config allows may use the admin socket.
    """

    def __init__(self, path: Optional[str] = None, *, timeout: Optional[float] = 30.0) -> None:
        self.path = path or default_admin_socket_path()
        self.timeout = timeout

    def call(self, op: str, **fields: Any) -> Dict[str, Any]:
        with Client(self.path, timeout=self.timeout) as client:
            return client.request({"op": op, **fields})
