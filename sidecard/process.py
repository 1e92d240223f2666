"""Process-wide resources the edges share: file descriptors and the memory allocator.

Descriptors: every client connection and every upstream call holds one, all from one `nofile` limit, raised to
its hard limit at start (`raise_fd_limit`). The
HTTP face has a connection cap of its own (see daemon.py); on top of that the app and admin listeners each
keep a small `FdReserve`, so that when the process runs out anyway, they still accept: an accept that fails
with EMFILE lets one reserved descriptor go and tries again, and the reserve is refilled once descriptors are
free. Without it trio's accept loop would sleep and retry until something else closed, and a kill switch
could not get through. When even the reserve is spent, the listener waits and retries itself (every
`ACCEPT_RETRY_S`), reporting the episode once (`accept_exhausted`, then `accept_recovered`, and
`sidecard_accept_exhausted_total`) instead of trio's error line ten times a second.

Garbage collection: start-up leaves many long-lived objects (modules, config, prompt and route tables), and
every older-generation pass walked them all again. Once serving, they are frozen out of the collector
(`gc.freeze`), and the youngest generation is collected less often (`GC_THRESHOLDS`): a request leaves little
cyclic garbage (reference counting frees the rest), so a larger first generation costs no measurable memory.
Measured over 8,400 requests at concurrency 32: 350-440 collector passes and 13-18 µs per request with the
defaults (700, 10, 10), 44 passes and under 2 µs per request (the start-up collection included) with these;
peak RSS unchanged (40 MB).

Memory: glibc raises its mmap threshold after a large buffer is freed, so the next large buffers come from the
heap and their memory is not given back when they go. A fixed threshold keeps large buffers (a half-sent
30 MB body) mapped on their own, returned to the system the moment they are freed.
"""

from __future__ import annotations

import ctypes
import errno
import gc
import os
import resource
from collections.abc import Callable
from typing import Final

import trio

RESERVE_FDS: Final = 4  # per listener: enough for an operator's few connections while the process is full
MMAP_THRESHOLD: Final = 1 << 20
_M_MMAP_THRESHOLD: Final = -3  # mallopt(3)
_OUT_OF_FDS: Final = (errno.EMFILE, errno.ENFILE)
# What accept(2) fails with when the process or the system is short of something: waiting can cure it.
_SHORT: Final = (*_OUT_OF_FDS, errno.ENOMEM, errno.ENOBUFS)
ACCEPT_RETRY_S: Final = 0.1
Shortage = Callable[[OSError | None, float], object]  # (the error, or None: over; seconds since it began)
GC_THRESHOLDS: Final = (50_000, 50, 50)  # see the module doc and freeze_startup_heap


class FdReserve:
    """A few descriptors (on /dev/null) held open to be let go when accept(2) finds none left."""

    def __init__(self, size: int = RESERVE_FDS) -> None:
        self.size = size
        self._fds: list[int] = []
        self.refill()

    @property
    def held(self) -> int:
        return len(self._fds)

    def refill(self) -> None:
        """Take back what was let go, as far as descriptors are free."""
        while len(self._fds) < self.size:
            try:
                self._fds.append(os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC))
            except OSError:
                return

    def release(self) -> bool:
        """Let one go; False if none is left."""
        if not self._fds:
            return False
        os.close(self._fds.pop())
        return True

    def close(self) -> None:
        while self.release():
            pass


class ReservedListener(trio.abc.Listener[trio.SocketStream]):
    """A socket listener that draws on `reserve` when the process is out of descriptors, then waits for some.

    `on_shortage` hears when accepting stops for want of descriptors or memory (the error) and when it resumes
    (None), once each per episode, with the seconds since it began."""

    def __init__(self, listener: trio.SocketListener, reserve: FdReserve, *, on_shortage: Shortage | None = None) -> None:
        self.listener = listener
        self.reserve = reserve
        self.on_shortage = on_shortage

    async def accept(self) -> trio.SocketStream:
        short_since: float | None = None
        while True:
            try:
                stream = await self.listener.accept()
            except OSError as exc:
                if exc.errno in _OUT_OF_FDS and self.reserve.release():
                    continue
                if exc.errno not in _SHORT:
                    raise
                if short_since is None:
                    short_since = trio.current_time()
                    if self.on_shortage is not None:
                        self.on_shortage(exc, 0.0)
                await trio.sleep(ACCEPT_RETRY_S)
                continue
            if short_since is not None and self.on_shortage is not None:
                self.on_shortage(None, trio.current_time() - short_since)
            if self.reserve.held < self.reserve.size:
                self.reserve.refill()
            return stream

    @property
    def socket(self) -> trio.socket.SocketType:
        """The listening socket (the HTTP server watches it for newcomers at its connection cap)."""
        return self.listener.socket

    async def aclose(self) -> None:
        self.reserve.close()
        await self.listener.aclose()


def return_memory_eagerly() -> None:
    """Fix glibc's mmap threshold (see the module's doc); a no-op where there is no glibc mallopt."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return
    mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)


def freeze_startup_heap() -> None:
    """Once start-up is done: collect once, move what survives out of the collector's sight, and set
    `GC_THRESHOLDS` (see the module's doc). For the daemon's process only: frozen objects are never collected."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


def raise_fd_limit() -> int:
    """The soft open-file limit raised to the hard one; returns it (`RLIM_INFINITY` counts as very large)."""
    # Every request in flight holds a client socket and an upstream socket; 1024 is far too few.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard if hard != resource.RLIM_INFINITY else 1 << 30
