"""Where quality alerts go: the log at once; a webhook and a command hook in the background.

`submit` never blocks or raises, so the request path can call it. Each background sink has its own bounded
queue and one worker, so events reach it in order, and a slow webhook never holds up the command hook; an event
that finds a queue full is dropped for that sink (`on_drop` is called once per dropped delivery).

The webhook gets a POST of the event as JSON (plus `"source": "sidecard"` and the key's parts), through the
project's own HTTP connection pool, with up to `webhook_retries` attempts each bounded by `webhook_timeout_s`:
connection failures, timeouts, 5xx and 429 are retried after a capped, jittered exponential backoff; other
statuses are final. The command gets the same JSON on stdin; its output is discarded, and a non-zero exit, a
failure to start or overrunning `command_timeout_s` is a failed delivery. `on_delivery(sink, ok)` reports every
delivery's outcome ("webhook" or "command").
"""

from __future__ import annotations

import random
import subprocess
from collections.abc import Awaitable, Callable
from typing import Any, Final
from urllib.parse import urlsplit

import msgspec
import trio

from .. import __version__
from ..upstream.pool import ConnectionPool, Origin, TransportError
from .monitor import AlertEvent

_HEADERS: Final = [(b"content-type", b"application/json"), (b"user-agent", f"sidecard/{__version__}".encode())]


def payload(event: AlertEvent | dict[str, Any]) -> bytes:
    """The event as the webhook and the command receive it (a dict: another kind of alert, e.g. a budget's)."""
    if isinstance(event, dict):
        return msgspec.json.encode({**event, "source": "sidecard"})
    data: dict[str, Any] = msgspec.to_builtins(event)
    data["prompt"], data["version"], data["model"] = event.key
    data["source"] = "sidecard"
    return msgspec.json.encode(data)


def _retryable(status: int) -> bool:
    return status == 429 or status >= 500


class _Sink:
    """One background destination: its queue and how to deliver to it."""

    def __init__(self, name: str, deliver: Callable[[bytes], Awaitable[bool]], queue_size: int) -> None:
        self.name = name
        self.deliver = deliver
        self.send: trio.MemorySendChannel[AlertEvent]
        self.receive: trio.MemoryReceiveChannel[AlertEvent]
        self.send, self.receive = trio.open_memory_channel(queue_size)


class AlertSinks:
    def __init__(
        self,
        *,
        log: Callable[[AlertEvent], None],
        webhook_url: str | None = None,
        webhook_retries: int = 5,
        webhook_timeout_s: float = 5.0,
        command: list[str] | None = None,
        queue_size: int = 100,
        on_drop: Callable[[], None] | None = None,
        on_delivery: Callable[[str, bool], None] | None = None,
        command_timeout_s: float = 10.0,
        backoff_s: float = 0.5,
        max_backoff_s: float = 30.0,
        rng: random.Random | None = None,
    ) -> None:
        """Raises ValueError for a webhook URL that is not http(s), an empty command or a bad size."""
        if queue_size < 1 or webhook_retries < 1:
            raise ValueError("queue_size and webhook_retries must be at least 1")
        if command is not None and not command:
            raise ValueError("command must name a program")
        self._log = log
        self._on_drop = on_drop
        self._on_delivery = on_delivery
        self._retries = webhook_retries
        self._timeout_s = webhook_timeout_s
        self._command = command
        self._command_timeout_s = command_timeout_s
        self._backoff_s = backoff_s
        self._max_backoff_s = max_backoff_s
        self._rng = rng or random.Random()
        self.dropped = 0
        self._sinks: list[_Sink] = []
        self._pool: ConnectionPool | None = None
        if webhook_url is not None:
            parts = urlsplit(webhook_url)
            self._origin = Origin.from_url(webhook_url)
            self._target = ((parts.path or "/") + (f"?{parts.query}" if parts.query else "")).encode()
            self._pool = ConnectionPool(max_connections=2, connect_timeout_s=webhook_timeout_s)
            self._sinks.append(_Sink("webhook", self._post, queue_size))
        if command is not None:
            self._sinks.append(_Sink("command", self._run_command, queue_size))

    def submit(self, event: AlertEvent | dict[str, Any]) -> None:
        """Log the event now and queue it for the webhook and the command; never blocks."""
        self._log(event)
        for sink in self._sinks:
            try:
                sink.send.send_nowait(event)
            except trio.WouldBlock:
                self.dropped += 1
                if self._on_drop is not None:
                    self._on_drop()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Deliver queued events until cancelled (returns at once when there is no webhook and no command)."""
        try:
            async with trio.open_nursery() as nursery:
                for sink in self._sinks:
                    nursery.start_soon(self._worker, sink)
                task_status.started()
        finally:
            if self._pool is not None:
                with trio.CancelScope(shield=True):
                    await self._pool.aclose()

    async def _worker(self, sink: _Sink) -> None:
        async for event in sink.receive:
            ok = await sink.deliver(payload(event))
            if self._on_delivery is not None:
                self._on_delivery(sink.name, ok)

    def _backoff(self, attempt: int) -> float:
        """Before retry ATTEMPT (1, 2...): doubling from `backoff_s`, capped, then jittered down by up to half."""
        delay = min(self._max_backoff_s, self._backoff_s * 2.0 ** (attempt - 1))
        return delay * (0.5 + self._rng.random() / 2)

    async def _post(self, body: bytes) -> bool:
        assert self._pool is not None
        for attempt in range(self._retries):
            if attempt:
                await trio.sleep(self._backoff(attempt))
            try:
                with trio.fail_after(self._timeout_s):
                    response = await self._pool.request(self._origin, b"POST", self._target, _HEADERS, body)
                    await response.read()
            except (TransportError, trio.TooSlowError):
                continue
            if not _retryable(response.status):
                return 200 <= response.status < 300
        return False

    async def _run_command(self, body: bytes) -> bool:
        assert self._command is not None
        with trio.move_on_after(self._command_timeout_s):
            try:
                done = await trio.run_process(
                    self._command, stdin=body, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False
                )
            except OSError:  # not found, not executable
                return False
            return done.returncode == 0
        return False
