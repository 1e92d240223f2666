"""Newline-delimited framing, sans-I/O (like h11): feed bytes in, take frames out, with a size limit per frame
and an optional budget for the bytes of incomplete frames shared by every connection."""

from __future__ import annotations

from typing import Final

import msgspec

from .policies.buffers import BufferBudget


class Frame(msgspec.Struct, frozen=True):
    data: bytes


class Oversized(msgspec.Struct, frozen=True):
    """A frame longer than the limit, or one the shared buffer budget could not hold (`over_budget`); its
    bytes were skipped up to the next newline."""

    size: int
    over_budget: bool = False
    head: bytes = b""  # its first bytes (up to `HEAD_KEPT`), where a client writes the frame's `id`


HEAD_KEPT: Final = 4096


class NeedData:
    """Sentinel: no complete frame yet (compare with `is NEED_DATA`)."""

    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA: Final = NeedData()


class FrameDecoder:
    """Splits a byte stream into newline-terminated frames, enforcing a size limit.

    An oversized frame is skipped up to its newline without buffering it, and reported once as `Oversized`,
    so a client that sends too much loses only that frame. Blank lines are ignored. At end of input a final
    frame without its newline still counts.

    With a `budget`, the bytes of an incomplete frame are charged to it (shared by all connections); a frame
    that would take it over the limit is skipped the same way and reported as `Oversized(over_budget=True)`.
    `close()` gives back what is held.
    """

    def __init__(self, max_frame_bytes: int, budget: BufferBudget | None = None) -> None:
        if max_frame_bytes < 1:
            raise ValueError("max_frame_bytes must be at least 1")
        self.max_frame_bytes = max_frame_bytes
        self._buffer = bytearray()
        self._scanned = 0  # bytes of _buffer already known to hold no newline
        self._skipping = 0  # > 0 while discarding an oversized frame: bytes discarded so far
        self._over_budget = False  # the frame being skipped did not fit the budget (rather than the limit)
        self._head = b""  # the start of the frame being skipped
        self._head_kept = min(HEAD_KEPT, max_frame_bytes)  # (all there is of it, however the stream is split)
        self._budget = budget
        self._held = 0  # bytes charged to the budget
        self._eof = False

    def receive_data(self, data: bytes) -> None:
        """Feed bytes; `b""` means end of input."""
        if not data:
            self._eof = True
        elif self._skipping and not self._buffer:
            newline = data.find(b"\n")
            if newline < 0:
                self._skipping += len(data)
            else:
                self._skipping += newline
                self._buffer += data[newline:]  # keep the newline: it closes the oversized frame
        else:
            self._buffer += data

    @property
    def at_eof(self) -> bool:
        return self._eof

    def next_event(self) -> Frame | Oversized | NeedData:
        while True:
            if self._skipping:
                if not self._buffer:
                    if self._eof:
                        return self._finish_oversized()
                    return NEED_DATA
                del self._buffer[:1]  # the newline that ended it
                return self._finish_oversized()
            newline = self._buffer.find(b"\n", self._scanned)
            if newline < 0:
                too_large = len(self._buffer) > self.max_frame_bytes
                if too_large or not self._hold(len(self._buffer)):
                    self._over_budget = not too_large
                    self._head = bytes(self._buffer[: self._head_kept])
                    self._skipping = len(self._buffer)
                    self._buffer.clear()  # (frees its memory)
                    self._scanned = 0
                    self._hold(0)
                    continue
                self._scanned = len(self._buffer)
                if self._eof and self._buffer:
                    line = bytes(self._buffer)
                    self._buffer.clear()
                    self._scanned = 0
                    if line.strip():
                        return Frame(line)
                return NEED_DATA
            line = bytes(self._buffer[:newline])
            del self._buffer[: newline + 1]
            self._scanned = 0
            if len(line) > self.max_frame_bytes:
                return Oversized(len(line), head=line[: self._head_kept])
            if line.strip():
                return Frame(line)

    def close(self) -> None:
        """Give back what the budget holds for this connection (call once it has ended)."""
        self._buffer.clear()
        self._hold(0)

    def _hold(self, size: int) -> bool:
        """Charge the budget for `size` bytes of incomplete frame in all; False if that does not fit."""
        budget = self._budget
        if budget is None or size == self._held:
            return True
        if size > self._held and not budget.take(size - self._held):
            return False
        if size < self._held:
            budget.give(self._held - size)
        self._held = size
        return True

    def _finish_oversized(self) -> Oversized:
        size, self._skipping = self._skipping, 0
        over_budget, self._over_budget = self._over_budget, False
        head, self._head = self._head, b""
        return Oversized(size, over_budget, head)
