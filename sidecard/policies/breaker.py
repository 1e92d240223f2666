"""A circuit breaker per upstream target.

Closed: calls flow; it opens when, over a sliding window with at least `min_volume` calls, the failure
rate reaches `failure_rate`, or after `consecutive_failures` in a row. A "busy" failure (the provider's
overloaded answer) counts toward the rate only: it says the target is up, and a storm of them across every
target would otherwise open every breaker by chance runs and leave a route nothing to try. Open: calls are refused at once, so a
dead target costs no timeout. After `cooldown_s` it turns half-open and lets at most `probes` calls through
at a time; `probes` successes close it, any failure opens it again.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum

from .window import Window


class State(Enum):
    CLOSED = 0
    HALF_OPEN = 1
    OPEN = 2


@dataclass(frozen=True, slots=True)
class BreakerSettings:
    failure_rate: float = 0.5
    min_volume: int = 20
    consecutive_failures: int = 5
    window_s: float = 30.0
    cooldown_s: float = 15.0
    probes: int = 1
    buckets: int = 10


class Breaker:
    def __init__(self, settings: BreakerSettings = BreakerSettings()) -> None:
        self.settings = settings
        self.state = State.CLOSED
        self.opened_at = -math.inf
        self._streak = 0  # consecutive failures while closed
        self._probes_out = 0
        self._probe_successes = 0
        self._window = Window(settings.window_s, settings.buckets)  # calls, failures

    def _reset_window(self) -> None:
        self._window.clear()
        self._streak = 0

    # -- decisions

    def retry_after(self, now: float) -> float:
        """Seconds until an open breaker lets a probe through (0 when not open)."""
        if self.state is not State.OPEN:
            return 0.0
        return max(0.0, self.opened_at + self.settings.cooldown_s - now)

    def would_allow(self, now: float) -> bool:
        """Whether `allow` would let a call through now (without taking a probe)."""
        if self.state is State.CLOSED:
            return True
        if self.state is State.OPEN:
            return now >= self.opened_at + self.settings.cooldown_s and self.settings.probes > 0
        return self._probes_out < self.settings.probes

    def allow(self, now: float) -> tuple[bool, State | None]:
        """May a call go to this target now? Returns (allowed, new state if this call changed it).

        An allowed call must be followed by exactly one `record()` or `release()`.
        """
        if not self.would_allow(now):
            return False, None
        transition = None
        if self.state is State.OPEN:  # (its cooldown is over: a probe goes)
            self.state = transition = State.HALF_OPEN
            self._probes_out = self._probe_successes = 0
        if self.state is State.HALF_OPEN:
            self._probes_out += 1
        return True, transition

    def release(self) -> None:
        """An allowed call ended without a verdict (cancelled, or the caller's own error)."""
        if self.state is State.HALF_OPEN and self._probes_out:
            self._probes_out -= 1

    def record(self, now: float, *, success: bool, busy: bool = False) -> State | None:
        """Count an allowed call's outcome (`busy`: a failure that does not extend the run of failures in a row);
        returns the new state if it changed."""
        if self.state is State.HALF_OPEN:
            self._probes_out = max(0, self._probes_out - 1)
            if not success:
                return self._open(now)
            self._probe_successes += 1
            if self._probe_successes >= self.settings.probes:
                self.state = State.CLOSED
                self._reset_window()
                return State.CLOSED
            return None
        if self.state is State.OPEN:
            return None  # a call that started before the breaker opened
        self._window.add(now, 1, 0 if success else 1)
        if success:
            self._streak = 0
        elif not busy:
            self._streak += 1
        if success:
            return None
        if self._streak >= self.settings.consecutive_failures:
            return self._open(now)
        calls, failures = self._window.totals(now)
        if calls >= self.settings.min_volume and failures >= self.settings.failure_rate * calls:
            return self._open(now)
        return None

    def force_open(self, now: float) -> State | None:
        """Open at once: the target is misconfigured (401/403), so waiting for a failure rate is pointless."""
        if self.state is State.OPEN:
            self.opened_at = now
            return None
        return self._open(now)

    def _open(self, now: float) -> State:
        self.state = State.OPEN
        self.opened_at = now
        self._probes_out = self._probe_successes = 0
        self._reset_window()
        return State.OPEN
