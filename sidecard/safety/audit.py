"""The audit trail: a durable, append-only record of each audited request and its answer, after redaction.

Layout: one directory (created 0700; an existing one must not be open to group or others), holding JSON-lines
files `audit-YYYYMMDDTHHMMSSZ-N.jsonl` (the UTC time the file was begun), each created 0600 with O_EXCL and
only ever appended to. A file is closed and a new one begun when it would pass `max_file_bytes` or is
`rotate_interval_s` old, and at every start (a file is never reopened). A closed file is deleted once the
file after it was begun more than `retention_days` ago, i.e. once every record in it is that old.

Durability (`fsync`): "batch" syncs after each batch the writer takes from its queue, so a crash loses at
most the batch being written (and what was still queued); "interval" syncs at most every
`fsync_interval_s` (and when the queue goes quiet); "never" leaves it to the OS. Each new file's directory
entry is synced as the file is created. A torn last line (power loss mid-write) is skipped by `export`.

The request path never waits: it offers records to an `AuditSink` (a bounded channel's send end; a full
queue drops the record and counts it). `run_writer`, a Trio task, takes them in batches, redacts and cuts
their texts, and writes off the event loop in a worker thread. On cancellation it writes what is queued
under a shielded, bounded flush.
"""

from __future__ import annotations

import calendar
import functools
import math
import os
import stat
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Final, Union

import msgspec
import trio

from ..observe.redact import Redactor
from .settings import AuditSettings

PREFIX: Final = "audit-"
SUFFIX: Final = ".jsonl"
_STAMP: Final = "%Y%m%dT%H%M%SZ"


class AuditRecord(msgspec.Struct, kw_only=True):
    """One request. Texts are redacted by the writer before they reach the disk. Every field is written (a missing
    `outcome` would not select as "ok")."""

    ts: float  # when the request finished, Unix seconds
    id: str  # the request id, as in the log lines (`request_id`)
    app: str = ""  # the caller's identity ("*" with access control off)
    user: Union[str, None] = None  # the request's user key, pseudonymised as in the logs
    face: str = ""  # "socket" or "http"
    feature: str = "default"
    route: Union[str, None] = None
    prompt: Union[str, None] = None
    version: Union[int, None] = None
    model: Union[str, None] = None
    outcome: str = "ok"  # "ok", or the error code the client got
    question: str = ""  # the last user text as sent (after scrubbing), redacted
    answer: str = ""  # as delivered (after guardrail masks), redacted
    guardrails: list[str] = []  # "check:action" for each guardrail finding
    injection: list[str] = []  # detector rules that fired
    injection_score: Union[float, None] = None
    policy: list[str] = []  # data-policy rules that acted (scrubbed or refused kinds, pins)
    input_tokens: int = 0
    output_tokens: int = 0
    latency_ms: Union[float, None] = None
    client_id: Union[str, None] = None  # the id the client gave the request (its frame's `id`)


_encoder: Final = msgspec.json.Encoder()
_decoder: Final = msgspec.json.Decoder(AuditRecord)


class AuditDirectoryError(Exception):
    """The audit directory or a file in it cannot be used safely; the message names the path."""


def file_start(name: str) -> float | None:
    """When the file `name` was begun, from its name; None for a name that is not an audit file's."""
    if not (name.startswith(PREFIX) and name.endswith(SUFFIX)):
        return None
    stamp = name[len(PREFIX):-len(SUFFIX)].partition("-")[0]
    try:
        return float(calendar.timegm(time.strptime(stamp, _STAMP)))
    except ValueError:
        return None


def audit_files(directory: str | os.PathLike[str]) -> list[tuple[float, Path]]:
    """The audit files in `directory`, oldest first."""
    found = []
    for path in Path(directory).iterdir():
        start = file_start(path.name)
        if start is not None:
            found.append((start, _sequence(path.name), path))
    return [(start, path) for start, _, path in sorted(found)]


def _sequence(name: str) -> int:
    tail = name[len(PREFIX):-len(SUFFIX)].partition("-")[2]
    return int(tail) if tail.isdigit() else 0


class AuditLog:
    """The file side, synchronous: the writer task calls it from a worker thread."""

    def __init__(self, directory: str, settings: AuditSettings, redactor: Redactor, *,
                 now: Callable[[], float] = time.time) -> None:
        self.directory = directory
        self.settings = settings
        self.redactor = redactor
        self.now = now
        self._fd: int | None = None
        self._opened_at = 0.0
        self._size = 0
        self._sequence = 0
        self.unsynced = False
        self.failed_records = 0  # lost to write errors (a full disk): counted, never raised to a request

    # -- opening and rotating

    def open(self) -> None:
        """Check (or create) the directory, prune expired files and begin a new file."""
        _secure_directory(self.directory)
        self.prune()
        self._begin()

    def _begin(self) -> None:
        now = self.now()
        stamp = time.strftime(_STAMP, time.gmtime(now))
        while True:
            self._sequence += 1
            path = os.path.join(self.directory, f"{PREFIX}{stamp}-{self._sequence}{SUFFIX}")
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
                break
            except FileExistsError:
                continue
        os.fchmod(fd, 0o600)  # whatever the umask
        _sync_directory(self.directory)
        self._fd, self._opened_at, self._size = fd, now, 0

    def _rotate_if_due(self, incoming: int) -> None:
        due = (self._size and self._size + incoming > self.settings.max_file_bytes) or \
            self.now() - self._opened_at >= self.settings.rotate_interval_s
        if due:
            self.close()
            self.prune()
            self._begin()

    def prune(self) -> list[Path]:
        """Delete closed files whose every record is older than the retention; returns what went."""
        horizon = self.now() - self.settings.retention_days * 86_400
        files = audit_files(self.directory)
        removed = []
        # A file's records are older than the start of the file after it; the newest file is never deleted.
        for (_, path), (next_start, _) in zip(files, files[1:], strict=False):
            if next_start < horizon:
                path.unlink(missing_ok=True)
                removed.append(path)
        return removed

    # -- writing

    def write(self, records: list[AuditRecord], *, sync: bool) -> None:
        """Redact, encode and append `records` as one write; fsync when `sync`."""
        if self._fd is None:
            raise RuntimeError("the audit log is not open")
        data = b"".join(_encoder.encode(self._redacted(r)) + b"\n" for r in records)
        self._rotate_if_due(len(data))
        view = memoryview(data)
        while view:
            written = os.write(self._fd, view)
            view = view[written:]
        self._size += len(data)
        self.unsynced = True
        if sync:
            self.sync()

    def sync(self) -> None:
        if self._fd is not None and self.unsynced:
            os.fsync(self._fd)
            self.unsynced = False

    def _redacted(self, record: AuditRecord) -> AuditRecord:
        limit = self.settings.max_text_chars
        return msgspec.structs.replace(record, question=self.redactor.prefix(record.question, limit),
                                       answer=self.redactor.prefix(record.answer, limit))

    def close(self) -> None:
        if self._fd is not None:
            try:
                self.sync()
            finally:
                os.close(self._fd)
                self._fd = None


def _secure_directory(directory: str) -> None:
    try:
        os.makedirs(directory, mode=0o700, exist_ok=True)
        info = os.lstat(directory)
    except OSError as exc:
        raise AuditDirectoryError(f"audit directory {directory}: {exc.strerror or exc}") from None
    if not stat.S_ISDIR(info.st_mode):
        raise AuditDirectoryError(f"audit directory {directory}: not a directory (a symlink is refused too)")
    if info.st_uid != os.getuid():
        raise AuditDirectoryError(f"audit directory {directory}: owned by uid {info.st_uid}, not by sidecard's user")
    if info.st_mode & 0o077:
        raise AuditDirectoryError(f"audit directory {directory}: mode {stat.S_IMODE(info.st_mode):04o} is open to "
                                  "group or others (use 0700)")


def _sync_directory(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ---------------------------------------------------------------- the request side and the writer task


class AuditSink:
    """What the request path holds: `offer` never waits and never fails."""

    __slots__ = ("_send", "dropped")

    def __init__(self, send: trio.MemorySendChannel[AuditRecord]) -> None:
        self._send = send
        self.dropped = 0  # the integration exports it as a counter

    def offer(self, record: AuditRecord) -> bool:
        try:
            self._send.send_nowait(record)
            return True
        except (trio.WouldBlock, trio.ClosedResourceError, trio.BrokenResourceError):
            self.dropped += 1
            return False


def channel(settings: AuditSettings) -> tuple[AuditSink, trio.MemoryReceiveChannel[AuditRecord]]:
    send, receive = trio.open_memory_channel[AuditRecord](settings.queue)
    return AuditSink(send), receive


async def run_writer(receive: trio.MemoryReceiveChannel[AuditRecord], log: AuditLog, *, batch_max: int = 256,
                     flush_timeout_s: float = 5.0, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    """Write records as they come until the channel closes or the task is cancelled.

    `log.open()` runs first, so a directory that cannot be used fails the start (`AuditDirectoryError`).
    On cancellation, what is queued is written and synced within `flush_timeout_s`, shielded.
    """
    await trio.to_thread.run_sync(log.open)
    task_status.started()
    mode = log.settings.fsync
    interval = log.settings.fsync_interval_s
    last_sync = trio.current_time()
    pending: list[AuditRecord] = []
    try:
        while True:
            wait = interval if mode == "interval" and log.unsynced else math.inf
            with trio.move_on_after(wait):
                try:
                    pending.append(await receive.receive())
                except trio.EndOfChannel:
                    break
            if not pending:  # the queue went quiet with unsynced records
                await trio.to_thread.run_sync(log.sync)
                last_sync = trio.current_time()
                continue
            while len(pending) < batch_max:
                try:
                    pending.append(receive.receive_nowait())
                except (trio.WouldBlock, trio.EndOfChannel):
                    break
            sync = mode == "batch" or (mode == "interval" and trio.current_time() - last_sync >= interval)
            try:
                await trio.to_thread.run_sync(functools.partial(log.write, pending, sync=sync))
            except OSError:
                log.failed_records += len(pending)
            pending = []  # no checkpoint between the write returning and this: a batch is never written twice
            if sync:
                last_sync = trio.current_time()
    finally:
        with trio.move_on_after(flush_timeout_s) as scope:
            scope.shield = True
            while True:
                try:
                    pending.append(receive.receive_nowait())
                except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
                    break
            final = pending

            def flush() -> None:
                try:
                    if final:
                        log.write(final, sync=True)
                except OSError:
                    log.failed_records += len(final)
                finally:
                    log.close()

            await trio.to_thread.run_sync(flush, abandon_on_cancel=True)


# ---------------------------------------------------------------- export


# A record is written after it is stamped, so a file can hold records from shortly before it was begun.
_LATE_S: Final = 3600.0


class Export:
    """Records between `since` and `until` (Unix seconds, inclusive; None: unbounded) as JSON lines, oldest
    file first. Lines that do not decode (a torn last line) are skipped and counted in `skipped`."""

    def __init__(self, directory: str, since: float | None = None, until: float | None = None) -> None:
        self.directory = directory
        self.since = -math.inf if since is None else since
        self.until = math.inf if until is None else until
        self.skipped = 0

    def __iter__(self) -> Iterator[bytes]:
        files = audit_files(self.directory)
        for i, (start, path) in enumerate(files):
            end = files[i + 1][0] if i + 1 < len(files) else math.inf
            if end < self.since:
                continue  # every record in this file is older than the range
            if start > self.until + _LATE_S:
                break
            with open(path, "rb") as f:
                for line in f:
                    try:
                        record = _decoder.decode(line)
                    except msgspec.DecodeError:
                        self.skipped += 1
                        continue
                    if self.since <= record.ts <= self.until:
                        yield line if line.endswith(b"\n") else line + b"\n"
