"""Concurrency limits per upstream target: how many calls may be in flight at once.

A limit sees one sample per finished call: when it ended (`now`), how long it took (`rtt_s`), how many calls
were in flight when it started (itself included) and whether the provider dropped it (429, 529, timeout).
`StaticLimit` never moves; `AIMDLimit` and `GradientLimit` adapt, in the manner of TCP congestion control as
Netflix's concurrency-limits applies it to RPC: the limit is a congestion window.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Final, Protocol

WARMUP_SAMPLES: Final = 10  # the gradient's long-term rtt is a plain mean until it has this many samples


class ConcurrencyLimit(Protocol):
    @property
    def limit(self) -> int: ...

    def on_sample(self, now: float, rtt_s: float, in_flight: int, dropped: bool) -> None: ...


def _check_bounds(initial: int, min_limit: int, max_limit: int) -> None:
    if not 1 <= min_limit <= initial <= max_limit:
        raise ValueError("a concurrency limit needs 1 <= min_limit <= initial <= max_limit")


class StaticLimit:
    """A limit that never changes."""

    def __init__(self, limit: int) -> None:
        _check_bounds(limit, limit, limit)
        self._limit = limit

    @property
    def limit(self) -> int:
        return self._limit

    def on_sample(self, now: float, rtt_s: float, in_flight: int, dropped: bool) -> None:
        pass


class AIMDLimit:
    """Additive increase, multiplicative decrease.

    A call that succeeds while at least half the limit was in flight raises the limit by one (with less in
    flight the limit is not what holds traffic back, so success proves nothing). A drop, or an rtt above
    `timeout_s`, multiplies it by `backoff`, rounding down. Like TCP, it backs off once per
    congestion event: a drop from a call that started before the last decrease saw the same congestion, so
    a burst of 429s that all hit the calls in flight costs one decrease, not one per call.
    """

    def __init__(
        self, initial: int, *, min_limit: int = 1, max_limit: int = 1000, backoff: float = 0.9, timeout_s: float | None = None
    ) -> None:
        _check_bounds(initial, min_limit, max_limit)
        if not 0 < backoff < 1:
            raise ValueError("backoff must be between 0 and 1")
        self.min_limit = min_limit
        self.max_limit = max_limit
        self.backoff = backoff
        self.timeout_s = timeout_s
        self._limit = initial
        self._decreased_at = -math.inf

    @property
    def limit(self) -> int:
        return self._limit

    def on_sample(self, now: float, rtt_s: float, in_flight: int, dropped: bool) -> None:
        if dropped or (self.timeout_s is not None and rtt_s > self.timeout_s):
            if now - rtt_s < self._decreased_at:
                return
            self._limit = max(self.min_limit, int(self._limit * self.backoff))  # rounded down: at least one less
            self._decreased_at = now
        elif 2 * in_flight >= self._limit:
            self._limit = min(self.max_limit, self._limit + 1)


class GradientLimit:
    """Gradient2-style: compares the long-term rtt (the baseline) with the latest one.

    gradient = clamp(tolerance * long_rtt / rtt, 0.5, 1): 1 while the rtt stays within `tolerance` times the
    baseline, lower as calls start to queue at the provider. Each sample moves the estimate a `smoothing`
    share of the way to `estimate * gradient + queue_size(limit)`, so with a flat rtt the limit grows by the
    queue allowance and under rising rtt it settles where the allowance balances the gradient. The baseline
    is an exponential average over `long_window` samples; when it is more than twice the latest rtt (load has
    passed) it decays faster, so the limit recovers instead of waiting for the average to catch up.

    A drop aims at half the estimate, without the queue allowance, so a run of drops drives the limit down to
    `min_limit`. Its rtt is not measured: a 429 comes back fast and would read as an idle provider. Successful calls made with less than half the limit in flight update the rtts
    but not the limit (app-limited: the limit was not being tested).
    """

    def __init__(
        self,
        initial: int,
        *,
        min_limit: int = 1,
        max_limit: int = 1000,
        smoothing: float = 0.2,
        tolerance: float = 1.5,
        long_window: int = 600,
        queue_size: Callable[[int], int] | None = None,
    ) -> None:
        _check_bounds(initial, min_limit, max_limit)
        if not 0 < smoothing <= 1 or tolerance < 1 or long_window < 1:
            raise ValueError("a gradient limit needs 0 < smoothing <= 1, tolerance >= 1 and long_window >= 1")
        self.min_limit = min_limit
        self.max_limit = max_limit
        self.smoothing = smoothing
        self.tolerance = tolerance
        self.queue_size = queue_size or (lambda limit: 4)  # Gradient2's default allowance
        self._decay = 2 / (long_window + 1)
        self._estimate = float(initial)
        self._samples = 0
        self.long_rtt = 0.0

    @property
    def limit(self) -> int:
        return int(self._estimate)

    def on_sample(self, now: float, rtt_s: float, in_flight: int, dropped: bool) -> None:
        if dropped:
            target = self._estimate * 0.5
        else:
            self._measure(rtt_s)
            if in_flight < self._estimate / 2:
                return
            gradient = 1.0 if rtt_s <= 0 else max(0.5, min(1.0, self.tolerance * self.long_rtt / rtt_s))
            target = self._estimate * gradient + self.queue_size(int(self._estimate))
        estimate = self._estimate * (1 - self.smoothing) + target * self.smoothing
        self._estimate = max(float(self.min_limit), min(float(self.max_limit), estimate))

    def _measure(self, rtt_s: float) -> None:
        if self._samples < WARMUP_SAMPLES:
            self._samples += 1
            self.long_rtt += (rtt_s - self.long_rtt) / self._samples
        else:
            self.long_rtt += (rtt_s - self.long_rtt) * self._decay
        if self.long_rtt > 2 * rtt_s:
            self.long_rtt *= 0.9
