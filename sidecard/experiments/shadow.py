"""Shadow traffic: which live requests to mirror to a candidate, within its budget, and how the two compare.

A shadow call copies a live request to a candidate model or prompt version off the request path: the user
gets the real answer whatever the shadow does, and the shadow counts against no user's limits, only against
its own budget. This module is the decision and the bookkeeping; the caller makes the call.

- `ShadowBudget.decide` mirrors a request with probability `share` while the current window's spend plus
  what is in flight and this request's estimate stays within `budget_usd`, and fewer than `max_in_flight`
  shadows are running. Windows are fixed spans of `window_s` on the injected clock; a spent window mirrors
  nothing until the next one starts. `settle` swaps the estimate for the actual cost.
- `ShadowComparison` keeps per-request pairs (real, shadow) per metric: both sides' statistics, and the
  differences (shadow - real), which the paired form of the sequential test (`stats.paired`) reads: the two
  answers to one request share its difficulty, so pairing needs far fewer requests than comparing two arms.
"""

from __future__ import annotations

import math
import random
from typing import Annotated

import msgspec

from . import stats
from .metric import Tally, metric
from .stats import DEFAULT_ALPHA, DEFAULT_MIN_SAMPLES, DEFAULT_TAU, Verdict

Fraction = Annotated[float, msgspec.Meta(ge=0.0, le=1.0)]


class ShadowSettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    share: Fraction = 0.05
    budget_usd: Annotated[float, msgspec.Meta(ge=0.0)] = 1.0  # per window
    window_s: Annotated[float, msgspec.Meta(gt=0)] = 3600.0
    max_in_flight: Annotated[int, msgspec.Meta(ge=1)] = 4


class Ticket(msgspec.Struct, frozen=True):
    """A mirrored request's reservation, handed back to `settle`."""

    window: int
    estimate_usd: float


class ShadowBudget:
    def __init__(self, settings: ShadowSettings) -> None:
        self.settings = settings
        self._window = -1
        self._spent = 0.0  # in the current window, settled and reserved
        self._in_flight = 0
        self.skipped_budget = 0  # requests the share picked that the budget refused, this window

    def decide(self, now: float, rng: random.Random, estimate_usd: float) -> Ticket | None:
        """Mirror this request? A ticket to settle when the shadow call ends, or None."""
        window = self._roll(now)
        if rng.random() >= self.settings.share or self._in_flight >= self.settings.max_in_flight:
            return None
        if self._spent + estimate_usd > self.settings.budget_usd:
            self.skipped_budget += 1
            return None
        self._spent += estimate_usd
        self._in_flight += 1
        return Ticket(window, estimate_usd)

    def settle(self, ticket: Ticket, actual_usd: float, now: float) -> None:
        """The shadow call ended (answered or failed) having cost `actual_usd`; a ticket from a window that has
        since closed leaves its reservation standing for it."""
        self._in_flight -= 1
        if self._roll(now) == ticket.window:
            self._spent += actual_usd - ticket.estimate_usd

    def status(self, now: float) -> dict[str, float | int | bool]:
        window = self._roll(now)
        budget = self.settings.budget_usd
        return {
            "spent_usd": self._spent,
            "remaining_usd": max(0.0, budget - self._spent),
            "exhausted": self.skipped_budget > 0,
            "in_flight": self._in_flight,
            "window_ends_at": (window + 1) * self.settings.window_s,
        }

    def _roll(self, now: float) -> int:
        window = math.floor(now / self.settings.window_s)
        if window != self._window:
            self._window, self._spent, self.skipped_budget = window, 0.0, 0
        return window


class ShadowComparison(msgspec.Struct, frozen=True):
    """Per metric: the real and the shadow answers' values, and their per-request differences (shadow - real).
    Mergeable like any `Tally`."""

    tally: Tally = Tally()

    def record(self, name: str, real: float, shadow: float) -> ShadowComparison:
        tally = self.tally.record("real", name, real).record("shadow", name, shadow)
        return ShadowComparison(tally.record("difference", name, shadow - real))

    def verdict(self, name: str, *, alpha: float = DEFAULT_ALPHA, tau: float = DEFAULT_TAU,
                min_samples: int = DEFAULT_MIN_SAMPLES) -> Verdict:
        """Is the shadow better or worse than the real answers on this metric (always-valid, paired)?"""
        known = metric(name)
        return stats.paired(self.tally.get("difference", name), alpha=alpha, tau=tau, min_samples=min_samples,
                            higher_is_better=known.higher_is_better, resolution=known.resolution)
