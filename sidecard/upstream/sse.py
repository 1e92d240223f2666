"""Server-sent events, sans-I/O: feed bytes, take (event, data) pairs out.

Only what the Messages API uses: `event:` and `data:` lines, blank-line terminated, comments ignored.
"""

from __future__ import annotations

class SSEDecoder:
    def __init__(self) -> None:
        self._buffer = b""
        self._event = b""
        self._data: list[bytes] = []

    def feed(self, chunk: bytes) -> list[tuple[str, bytes]]:
        """Every complete event in `chunk` (with what was buffered before it)."""
        self._buffer += chunk
        events: list[tuple[str, bytes]] = []
        while True:
            newline = self._buffer.find(b"\n")
            if newline < 0:
                return events
            line = self._buffer[:newline].rstrip(b"\r")
            self._buffer = self._buffer[newline + 1 :]
            if not line:
                if self._data or self._event:
                    events.append((self._event.decode(), b"\n".join(self._data)))
                self._event, self._data = b"", []
            elif line.startswith(b"data:"):
                value = line[5:]
                self._data.append(value[1:] if value.startswith(b" ") else value)
            elif line.startswith(b"event:"):
                self._event = line[6:].strip()
            # `id:`, `retry:` and `:comment` lines carry nothing the Messages API uses
