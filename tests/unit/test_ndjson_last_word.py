"""The drain's last word on the app socket is never written after a frame cut part-way."""

from __future__ import annotations

import socket
from types import SimpleNamespace

import trio

from sidecard.faces.ndjson import _Connection
from sidecard.policies.buffers import BufferBudget


async def test_no_last_word_follows_a_frame_cut_part_way():
    ours, theirs = trio.socket.socketpair()
    ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    server = SimpleNamespace(access=SimpleNamespace(settings=SimpleNamespace(enabled=False)),
                             config=SimpleNamespace(max_frame_bytes=1 << 20), budget=BufferBudget(1 << 20))
    connection = _Connection(server, trio.SocketStream(ours))  # type: ignore[arg-type]
    frame = b'{"id":1,"ok":true,"text":"' + b"x" * 500_000 + b'"}\n'
    rest = connection._write_now(frame)  # the client reads slowly: part of it goes, the writer owes the rest
    assert rest and connection.mid_frame
    received = await theirs.recv(1 << 20)  # room again, and the drain's grace ends: the writer was cut
    await connection._last_word(2, None)
    with trio.move_on_after(0.1):
        while chunk := await theirs.recv(1 << 20):
            received += chunk
    assert frame.startswith(received)  # the cut frame's start, nothing glued to it (the client sees the close)
    ours.close()
    theirs.close()
