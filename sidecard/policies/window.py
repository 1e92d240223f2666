"""Two counts over a sliding time window, kept in a ring of time buckets (pure; `now` is passed in).

The window is `buckets` slots of `window_s / buckets` seconds each; a slot is reused, and its counts zeroed,
when time reaches it again, so an old burst leaves the window a slot at a time. A breaker counts calls and
failures in it, the retry budget deposits and withdrawals.
"""

from __future__ import annotations

import math


class Window:
    __slots__ = ("_bucket_s", "_epoch", "_first", "_second")

    def __init__(self, window_s: float, buckets: int) -> None:
        if window_s <= 0 or buckets < 1:
            raise ValueError("invalid window parameters")
        self._bucket_s = window_s / buckets
        self._epoch = [-1] * buckets  # which time slot each bucket currently holds
        self._first = [0] * buckets
        self._second = [0] * buckets

    def add(self, now: float, first: int, second: int) -> None:
        """Add to both counts of the slot for `now`."""
        epoch = math.floor(now / self._bucket_s)
        i = epoch % len(self._epoch)
        if self._epoch[i] != epoch:
            self._epoch[i], self._first[i], self._second[i] = epoch, 0, 0
        self._first[i] += first
        self._second[i] += second

    def totals(self, now: float) -> tuple[int, int]:
        """Both counts' sums over the window that ends at `now`."""
        oldest = math.floor(now / self._bucket_s) - len(self._epoch) + 1
        first = second = 0
        for i, epoch in enumerate(self._epoch):
            if epoch >= oldest:
                first += self._first[i]
                second += self._second[i]
        return first, second

    def clear(self) -> None:
        n = len(self._epoch)
        self._epoch, self._first, self._second = [-1] * n, [0] * n, [0] * n

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Window):
            return NotImplemented
        return (self._bucket_s, self._epoch, self._first, self._second) == (other._bucket_s, other._epoch, other._first, other._second)

    __hash__ = None  # type: ignore[assignment]  (mutable)
