"""Is the fleet store usable right now, and what did its absence cost: `fleet_up`, fallbacks, errors, latency.

Hooks, not metrics: the daemon wires them to `sidecard_fleet_up` and friends, so this package imports no metrics
module. A down store is reported once per outage (`on_down` with the first reason; `down_reason` keeps the
latest), and its return once (`on_up`, which is also when state is resynced).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(slots=True)
class Hooks:
    on_up: Callable[[], object] | None = None
    on_down: Callable[[str], object] | None = None  # the reason, once per outage
    on_latency: Callable[[str, float], object] | None = None  # (operation, seconds) for answered operations
    on_error: Callable[[str, str], object] | None = None  # (operation, "timeout" | "unavailable" | "data")
    on_fallback: Callable[[str], object] | None = None  # (what fell back to local state: "limits", "cache", ...)


class FleetHealth:
    def __init__(self, hooks: Hooks | None = None) -> None:
        self.hooks = hooks or Hooks()
        self.up = False  # not yet: the first connection marks it up
        self.down_reason: str | None = None  # while down: the latest reason
        self.errors: Counter[tuple[str, str]] = Counter()
        self.fallbacks: Counter[str] = Counter()

    def mark_up(self) -> None:
        if self.up:
            return
        self.up, self.down_reason = True, None
        if self.hooks.on_up is not None:
            self.hooks.on_up()

    def mark_down(self, reason: str) -> None:
        reported = self.down_reason is not None
        self.up, self.down_reason = False, reason  # the latest: `sidecardctl status` says why it is down now
        if not reported and self.hooks.on_down is not None:
            self.hooks.on_down(reason)  # the outage is reported once

    def latency(self, operation: str, seconds: float) -> None:
        if self.hooks.on_latency is not None:
            self.hooks.on_latency(operation, seconds)

    def error(self, operation: str, kind: str) -> None:
        self.errors[operation, kind] += 1
        if self.hooks.on_error is not None:
            self.hooks.on_error(operation, kind)

    def fallback(self, what: str) -> None:
        """A caller used local state because the store did not answer."""
        self.fallbacks[what] += 1
        if self.hooks.on_fallback is not None:
            self.hooks.on_fallback(what)
