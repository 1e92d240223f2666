"""Retry budget (Finagle / Linkerd style): retries and hedges may add only a fraction of request volume.

Every request deposits `ratio` of a token, every retry or hedge withdraws one. A floor of
`min_per_s` retries per second keeps a quiet daemon able to retry at all. Counts live in time buckets
over a sliding window, so the budget forgets an old burst. This is what stops every sidecar in a fleet
from multiplying a provider's bad minute.
"""

from __future__ import annotations

from .window import Window


class RetryBudget:
    def __init__(self, *, ratio: float = 0.2, min_per_s: float = 1.0, window_s: float = 10.0, buckets: int = 10) -> None:
        if not 0 <= ratio <= 1 or min_per_s < 0 or window_s <= 0 or buckets < 1:
            raise ValueError("invalid retry budget parameters")
        self.ratio = ratio
        self.min_per_s = min_per_s
        self.window_s = window_s
        self._window = Window(window_s, buckets)  # deposits, withdrawals

    def balance(self, now: float) -> float:
        deposits, withdrawals = self._window.totals(now)
        return deposits * self.ratio + self.min_per_s * self.window_s - withdrawals

    def deposit(self, now: float) -> None:
        """One request arrived."""
        self._window.add(now, 1, 0)

    def try_withdraw(self, now: float) -> bool:
        """Spend one retry or hedge if the budget allows it."""
        if self.balance(now) < 1:
            return False
        self._window.add(now, 0, 1)
        return True
