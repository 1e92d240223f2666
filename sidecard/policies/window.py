"""Counts over a sliding time window, kept in a ring of time buckets (pure; `now` is passed in).

The window is `buckets` slots of `window_s / buckets` seconds each; a slot is reused, and its counts zeroed,
when time reaches it again, so an old burst leaves the window a slot at a time. Each slot holds one count per
counter (a breaker counts calls and failures, the retry budget deposits and withdrawals).
"""

from __future__ import annotations

import math


class Window:
    __slots__ = ("_bucket_s", "_counts", "_epoch")

    def __init__(self, window_s: float, buckets: int, counters: int) -> None:
        if window_s <= 0 or buckets < 1 or counters < 1:
            raise ValueError("invalid window parameters")
        self._bucket_s = window_s / buckets
        self._epoch = [-1] * buckets  # which time slot each bucket currently holds
        self._counts = [[0] * buckets for _ in range(counters)]

    def add(self, now: float, *amounts: int) -> None:
        """Add AMOUNTS (one per counter, in order) to the slot for `now`."""
        epoch = math.floor(now / self._bucket_s)
        i = epoch % len(self._epoch)
        if self._epoch[i] != epoch:
            self._epoch[i] = epoch
            for counts in self._counts:
                counts[i] = 0
        for counts, amount in zip(self._counts, amounts):
            counts[i] += amount

    def totals(self, now: float) -> list[int]:
        """Each counter's sum over the window that ends at `now`."""
        oldest = math.floor(now / self._bucket_s) - len(self._epoch) + 1
        live = [i for i, epoch in enumerate(self._epoch) if epoch >= oldest]
        return [sum(counts[i] for i in live) for counts in self._counts]

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Window):
            return NotImplemented
        return (self._bucket_s, self._epoch, self._counts) == (other._bucket_s, other._epoch, other._counts)

    __hash__ = None  # type: ignore[assignment]  (mutable)

    def clear(self) -> None:
        self._epoch = [-1] * len(self._epoch)
        for counts in self._counts:
            counts[:] = [0] * len(counts)
