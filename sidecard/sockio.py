"""Reading a connected socket on the request path without trio's stream layers.

trio's `SocketStream.receive_some` tries a read, and when nothing is there waits and reads again; it also passes
through several layers of wrappers. A server that knows its client has just sent a whole request (and now awaits
the answer) knows the next read would fail: it waits for input first. The socket is non-blocking (trio made it
so); errors come out in trio's terms, as the stream's would.
"""

from __future__ import annotations

import os

import trio


async def receive(fd: int, size: int, *, wait_first: bool) -> bytes:
    """Up to SIZE bytes from the socket FD, b"" at EOF. `wait_first`: nothing can be there yet, so wait before
    reading (a failing read less); else read at once and yield (a client that never pauses starves no one)."""
    try:
        if not wait_first:
            await trio.lowlevel.checkpoint_if_cancelled()
            try:
                data = os.read(fd, size)
            except BlockingIOError:
                pass
            else:
                await trio.lowlevel.cancel_shielded_checkpoint()
                return data
        while True:
            await trio.lowlevel.wait_readable(fd)
            try:
                return os.read(fd, size)
            except BlockingIOError:
                pass
    except OSError as exc:
        raise trio.BrokenResourceError(f"the connection failed: {exc}") from exc
