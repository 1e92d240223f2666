"""The durable record of spend: the ledger's snapshot, kept in a file beside the daemon (I/O; the ledger is pure)."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Final, Protocol, TypeVar

import msgspec
import trio

from ..durable import replace_file, set_aside
from .spend import Budget, SpendLedger

FINAL_FLUSH_S: Final = 5.0  # how long a stopping daemon waits for the last write


class Snapshotting(Protocol):
    """What a store keeps: its state as bytes, and a count of its changes (written only when it moved)."""

    @property
    def revision(self) -> int: ...

    def snapshot(self) -> bytes: ...


S = TypeVar("S", bound=Snapshotting)


class SpendStore:
    """Durable spend: a snapshot (the ledger's; in fleet mode also the gate's record of what the store did not
    count) written atomically (temp file, fsync, rename, directory fsync, mode 0600) at most every
    `flush_interval_s`, and only when it changed.

    A crash loses at most the spend of the last `flush_interval_s` (plus the write in progress): after a
    restart, budgets may let that much more through. A corrupt or unreadable file is moved aside
    (`<path>.corrupt-<unix time>`) and reported, never a crash; spend then starts from zero.
    """

    def __init__(self, path: str, *, flush_interval_s: float = 1.0, on_error: Callable[[str], object] | None = None) -> None:
        """`on_error` hears about a failing write (once, until a write succeeds again)."""
        if flush_interval_s <= 0:
            raise ValueError("flush_interval_s must be positive")
        self.path = Path(path)
        self.flush_interval_s = flush_interval_s
        self.on_error = on_error
        self.writes = 0
        self.write_failures = 0
        self.last_error: str | None = None
        self._written = -1  # the ledger revision on disk

    def load(self, budgets: list[Budget]) -> tuple[SpendLedger, str | None]:
        """The saved spend (sync, called once at start): (ledger, None), or (empty ledger, what went wrong)."""
        return self.load_with(lambda data: SpendLedger(budgets) if data is None else SpendLedger.restore(budgets, data))

    def load_with(self, restore: Callable[[bytes | None], S]) -> tuple[S, str | None]:
        """What RESTORE makes of the saved bytes (None: no file yet), sync, once at start: (it, None); of a file it
        cannot read or use (`msgspec.MsgspecError`, `ValueError`), (`restore(None)`, what went wrong)."""
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            data = None
        except OSError as exc:
            return restore(None), self._problem(f"unreadable ({exc.strerror})")
        try:
            kept = restore(data)
        except (msgspec.MsgspecError, ValueError) as exc:
            return restore(None), self._problem(f"corrupt ({exc})")
        self._written = kept.revision
        return kept, None

    def _problem(self, what: str) -> str:
        moved = set_aside(self.path, time.time()) or "nowhere (it could not be moved)"
        return f"spend file {self.path} is {what}: moved to {moved}; spend starts from zero"

    async def run(self, ledger: Snapshotting, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Own the flushes until cancelled; on cancellation, flush once more (shielded, bounded)."""
        task_status.started()
        try:
            while True:
                await trio.sleep(self.flush_interval_s)
                await self.flush(ledger)
        finally:
            with trio.move_on_after(FINAL_FLUSH_S, shield=True):
                await self.flush(ledger, abandon_on_cancel=True)

    async def flush(self, ledger: Snapshotting, *, abandon_on_cancel: bool = False) -> None:
        """Write the snapshot if it changed since the last write, in a worker thread."""
        revision = ledger.revision
        if revision == self._written:
            return
        data = ledger.snapshot()
        try:
            await trio.to_thread.run_sync(replace_file, self.path, data, abandon_on_cancel=abandon_on_cancel)
        except OSError as exc:
            self.write_failures += 1
            error = f"could not write {self.path}: {exc.strerror or exc}"
            if error != self.last_error and self.on_error is not None:
                self.on_error(error)
            self.last_error = error
            return
        self._written = revision
        self.writes += 1
        self.last_error = None
