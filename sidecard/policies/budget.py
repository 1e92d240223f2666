"""Retry budget (Finagle / Linkerd style): retries and hedges may add only a fraction of request volume.

Every request deposits `ratio` of a token, every retry or hedge withdraws one. A floor of
`min_per_s` retries per second keeps a quiet daemon able to retry at all. Counts live in time buckets
over a sliding window, so the budget forgets an old burst. This is what stops every sidecar in a fleet
from multiplying a provider's bad minute.
"""

from __future__ import annotations

import math


class RetryBudget:
    def __init__(self, *, ratio: float = 0.2, min_per_s: float = 1.0, window_s: float = 10.0, buckets: int = 10) -> None:
        if not 0 <= ratio <= 1 or min_per_s < 0 or window_s <= 0 or buckets < 1:
            raise ValueError("invalid retry budget parameters")
        self.ratio = ratio
        self.min_per_s = min_per_s
        self.window_s = window_s
        self._bucket_s = window_s / buckets
        self._deposits = [0] * buckets
        self._withdrawals = [0] * buckets
        self._epoch = [-1] * buckets  # which time slot each bucket currently holds

    def _slot(self, now: float) -> int:
        epoch = math.floor(now / self._bucket_s)
        i = epoch % len(self._epoch)
        if self._epoch[i] != epoch:
            self._epoch[i] = epoch
            self._deposits[i] = 0
            self._withdrawals[i] = 0
        return i

    def balance(self, now: float) -> float:
        oldest = math.floor(now / self._bucket_s) - len(self._epoch) + 1
        deposits = withdrawals = 0
        for i, epoch in enumerate(self._epoch):
            if epoch >= oldest:
                deposits += self._deposits[i]
                withdrawals += self._withdrawals[i]
        return deposits * self.ratio + self.min_per_s * self.window_s - withdrawals

    def deposit(self, now: float) -> None:
        """One request arrived."""
        self._deposits[self._slot(now)] += 1

    def try_withdraw(self, now: float) -> bool:
        """Spend one retry or hedge if the budget allows it."""
        if self.balance(now) < 1:
            return False
        self._withdrawals[self._slot(now)] += 1
        return True
