"""Per-prompt route switches on quality alerts (pure; `now` injected).

A prompt with `fallback_route_on_alert` moves to that route when one of its alerts fires. The switch holds while
any alert that caused it still fires. But the switched-away model then gets no samples, so its alerts cannot
resolve: the switch also ends `hold_s` after it began, and an operator can end it at once. Either way the caller
has the monitor re-measure the causing alerts on the original model (`QualityMonitor.remeasure`): still bad,
they fire again and switch again; recovered, they resolve.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .monitor import Key, label

Cause = tuple[Key, str]  # an alert: its key and signal


@dataclass(slots=True)
class Switch:
    prompt: str
    route: str
    since: float
    expires_at: float
    causes: set[Cause] = field(default_factory=set)  # the alerts holding it that still fire

    def describe(self, now: float) -> dict[str, Any]:
        return {
            "prompt": self.prompt, "route": self.route, "for_s": round(now - self.since, 3),
            "expires_in_s": round(max(0.0, self.expires_at - now), 3),
            "causes": sorted(f"{label(key)} {signal}" for key, signal in self.causes),
        }


class RouteSwitches:
    def __init__(self) -> None:
        self._active: dict[str, Switch] = {}

    def fire(self, prompt: str, cause: Cause, route: str, hold_s: float, now: float) -> Switch | None:
        """An alert of PROMPT fired: the new switch if this starts one (else it joins the running switch's causes)."""
        switch = self._active.get(prompt)
        if switch is not None:
            switch.causes.add(cause)
            return None
        switch = self._active[prompt] = Switch(prompt, route, now, now + hold_s, {cause})
        return switch

    def resolve(self, prompt: str, cause: Cause) -> Switch | None:
        """An alert of PROMPT resolved: the switch if that was its last cause (it has ended), else None."""
        switch = self._active.get(prompt)
        if switch is None or cause not in switch.causes:
            return None
        switch.causes.discard(cause)
        return None if switch.causes else self._active.pop(prompt)

    def end(self, prompt: str) -> Switch | None:
        """End PROMPT's switch now (an operator's call); None if there is none."""
        return self._active.pop(prompt, None)

    def expired(self, now: float) -> list[Switch]:
        """End and return the switches whose hold is over."""
        done = [s for s in self._active.values() if s.expires_at <= now]
        for switch in done:
            del self._active[switch.prompt]
        return done

    def route(self, prompt: str) -> str | None:
        """The route PROMPT is switched to, if it is."""
        switch = self._active.get(prompt)
        return None if switch is None else switch.route

    def next_expiry(self) -> float | None:
        return min((s.expires_at for s in self._active.values()), default=None)

    def active(self) -> list[Switch]:
        return sorted(self._active.values(), key=lambda s: s.prompt)

    def describe(self, now: float) -> list[dict[str, Any]]:
        return [s.describe(now) for s in self.active()]
