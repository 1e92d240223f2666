"""One byte budget for input that is buffered but not yet a whole request, shared by every connection.

Each connection's own limit (the frame or body size) bounds what one client can make the daemon hold; this
bounds what all of them hold together, so many half-sent requests cannot take the daemon's memory. A
connection that would go over is refused (its request, not the daemon, pays), and every byte taken is given
back when the request completes or the connection ends.
"""

from __future__ import annotations


class BufferBudget:
    """At most `limit` bytes held at once; `take` refuses rather than exceed it."""

    __slots__ = ("limit", "used")

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError("a buffer budget needs limit >= 1")
        self.limit = limit
        self.used = 0

    def take(self, amount: int) -> bool:
        """Hold `amount` more bytes if they fit; False (and nothing taken) if they do not."""
        if self.used + amount > self.limit:
            return False
        self.used += amount
        return True

    def give(self, amount: int) -> None:
        """Return bytes taken earlier."""
        self.used -= amount
        if self.used < 0:
            raise ValueError("gave back more than was taken")
