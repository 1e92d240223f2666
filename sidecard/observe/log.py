"""JSON log lines, one object per line.

Callers pass only fields that are safe to log; user text goes through `Redactor` first. Library logging
(`logging` records from the SDK, trio, ...) is routed here too, so every line on stderr is JSON.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from typing import Any, Final

import msgspec
import trio

from .redact import Redactor

LEVELS: Final = {"debug": 10, "info": 20, "warning": 30, "error": 40}
_encoder: Final = msgspec.json.Encoder()


class _Timestamps:
    """ISO 8601 UTC with milliseconds; the date and time of day are formatted once a second, the whole stamp once
    a millisecond (a busy daemon writes several lines in one)."""

    __slots__ = ("second", "prefix", "millisecond", "stamp")

    def __init__(self) -> None:
        self.second = self.millisecond = -1
        self.prefix = self.stamp = ""

    def __call__(self, now: float) -> str:
        millisecond = int(now * 1000)
        if millisecond == self.millisecond:
            return self.stamp
        seconds = int(now)
        if seconds != self.second:
            self.second = seconds
            self.prefix = time.strftime("%Y-%m-%dT%H:%M:%S.", time.gmtime(seconds))
        self.millisecond = millisecond
        self.stamp = f"{self.prefix}{int((now - seconds) * 1000):03d}Z"
        return self.stamp


class JsonLog:
    """Writes events as JSON lines through `write`; `redactor` masks free text from libraries."""

    def __init__(
        self,
        write: Callable[[bytes], object],
        *,
        level: str = "info",
        redactor: Redactor | None = None,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self._write = write
        self._threshold = LEVELS[level]
        self.redactor = redactor or Redactor()
        self._wall_clock = wall_clock
        self._timestamp = _Timestamps()

    def enabled(self, level: str) -> bool:
        return LEVELS[level] >= self._threshold

    def event(self, event: str, level: str = "info", /, **fields: Any) -> None:
        record = self.record(event, level)
        if record is not None:
            record.update(fields)
            self.write(record)

    def record(self, event: str, level: str = "info") -> dict[str, Any] | None:
        """A line's first fields, for a caller that adds many more itself and then `write`s it; None when LEVEL is
        not logged."""
        if LEVELS[level] < self._threshold:
            return None
        return {"ts": self._timestamp(self._wall_clock()), "level": level, "event": event}

    def write(self, record: dict[str, Any]) -> None:
        try:
            self._write(_encoder.encode(record) + b"\n")
        except (OSError, ValueError):
            pass  # a broken log destination must never fail a request

    def debug(self, event: str, /, **fields: Any) -> None:
        self.event(event, "debug", **fields)

    def info(self, event: str, /, **fields: Any) -> None:
        self.event(event, "info", **fields)

    def warning(self, event: str, /, **fields: Any) -> None:
        self.event(event, "warning", **fields)

    def error(self, event: str, /, **fields: Any) -> None:
        self.event(event, "error", **fields)

    def internal_error(self, where: str, exc: BaseException, /, client_id: object = None, **fields: Any) -> None:
        """A bug: the exception's type, the line that raised it, its message through the redaction layer (cut
        short: it may quote what a client sent), and the client's id of the request it cost, if it had one."""
        if isinstance(client_id, str):
            client_id = client_id[:64]
        self.event(
            "internal_error", "error", where=where, exception=_exception_name(exc), at=_origin(exc), id=client_id,
            message=self.redactor.exception(exc), **fields,
        )


def open_destination(destination: str) -> Callable[[bytes], object]:
    """`stderr`, or a file path opened for appending (created 0600: logs are operational data)."""
    if destination == "stderr":
        fd = sys.stderr.fileno()
    else:
        fd = os.open(destination, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)

    def write(line: bytes) -> None:
        os.write(fd, line)

    return write


class LineBatcher:
    """Collects log lines and writes them together, from `run()` (a background task), at most `interval_s` after
    the first of a batch: one write for many lines, none on a request's path. A batch over `max_bytes` is
    written at once, so memory stays bounded. Before `run()` starts and after it ends, each line is written as it
    comes (start-up failures, the last lines of a drain). A line from another thread (a library logging from its
    worker, as watchfiles does on every change) is handed to the loop's thread."""

    def __init__(self, write: Callable[[bytes], object], *, interval_s: float = 0.02, max_bytes: int = 1 << 16) -> None:
        self._write = write
        self._interval_s = interval_s
        self._max_bytes = max_bytes
        self._lines: list[bytes] = []
        self._size = 0
        self._running = False
        self._pending = trio.Event()
        self._thread = 0  # the loop's, while running
        self._token: trio.lowlevel.TrioToken | None = None

    def __call__(self, line: bytes) -> None:
        if not self._running:
            self._write(line)
            return
        if threading.get_ident() != self._thread:
            try:
                self._token.run_sync_soon(self, line)  # type: ignore[union-attr]
            except trio.RunFinishedError:
                self._write(line)
            return
        lines = self._lines
        if not lines:
            self._pending.set()
        lines.append(line)
        self._size += len(line)
        if self._size >= self._max_bytes:
            self.flush()

    def flush(self) -> None:
        if self._lines:
            data = b"".join(self._lines)
            self._lines.clear()
            self._size = 0
            try:
                self._write(data)
            except (OSError, ValueError):
                pass  # a broken log destination must never fail the daemon

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        self._thread, self._token = threading.get_ident(), trio.lowlevel.current_trio_token()
        self._running = True
        task_status.started()
        try:
            while True:
                await self._pending.wait()
                self._pending = trio.Event()
                await trio.sleep(self._interval_s)
                self.flush()
        finally:
            self._running = False
            self.flush()


def _leaves(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for inner in exc.exceptions for leaf in _leaves(inner)]
    return [exc]


def _exception_name(exc: BaseException) -> str:
    """`KeyError`; for an exception group (a nursery's), `ExceptionGroup[KeyError, ValueError]`."""
    if isinstance(exc, BaseExceptionGroup):
        return f"{type(exc).__name__}[{', '.join(type(leaf).__name__ for leaf in _leaves(exc))}]"
    return type(exc).__name__


def _origin(exc: BaseException) -> str | None:
    """`file.py:123` where the (first) exception was raised."""
    tb = _leaves(exc)[0].__traceback__
    if tb is None:
        return None
    while tb.tb_next is not None:
        tb = tb.tb_next
    return f"{os.path.basename(tb.tb_frame.f_code.co_filename)}:{tb.tb_lineno}"


class _ToJsonLog(logging.Handler):
    def __init__(self, log: JsonLog) -> None:
        super().__init__()
        self._log = log

    def emit(self, record: logging.LogRecord) -> None:
        level = "debug" if record.levelno < 20 else "info" if record.levelno < 30 else "warning" if record.levelno < 40 else "error"
        if not self._log.enabled(level):
            return
        fields: dict[str, Any] = {"logger": record.name, "message": self._log.redactor.redact(record.getMessage(), keep_ips=True)}
        if record.exc_info and record.exc_info[1] is not None:
            fields["exception"] = type(record.exc_info[1]).__name__
        self._log.event("library_log", level, **fields)


def route_library_logging(log: JsonLog) -> None:
    root = logging.getLogger()
    for handler in list(root.handlers):
        if isinstance(handler, _ToJsonLog):
            root.removeHandler(handler)
    root.addHandler(_ToJsonLog(log))
    # The SDK logs request URLs and headers at debug level; never let that through.
    root.setLevel(logging.INFO)
    # httpx2 logs every request it sends at info: the request's own log line already says it, better.
    logging.getLogger("httpx2").setLevel(logging.WARNING)
