"""Kill switches: an operator turns AI off (or degrades it) globally, for a feature, or for a prompt.

Pure: the caller passes `now` (the daemon's monotonic clock). The most specific switch wins:
`prompt:X` over `feature:X` over `global`.
"""

from __future__ import annotations

import re
from typing import Final, Literal, Union

import msgspec

SCOPE: Final = re.compile(r"^(global|feature:[A-Za-z0-9_.:-]{1,64}|prompt:[A-Za-z0-9_.:-]{1,64})$")
Mode = Literal["error", "static", "cached"]


class KillSwitch(msgspec.Struct, kw_only=True):
    scope: str
    mode: Mode = "error"
    text: Union[str, None] = None  # the answer for `static`, and for `cached` when nothing is cached
    reason: Union[str, None] = None
    expires_at: Union[float, None] = None  # daemon clock; None: until unkilled
    set_at: float = 0.0

    def expired(self, now: float) -> bool:
        return self.expires_at is not None and now >= self.expires_at


def validate_scope(scope: str) -> str:
    if not SCOPE.match(scope):
        raise ValueError(f"scope {scope!r}: expected global, feature:NAME or prompt:NAME")
    return scope


class KillSwitches:
    def __init__(self) -> None:
        self._switches: dict[str, KillSwitch] = {}

    def set(self, switch: KillSwitch) -> KillSwitch | None:
        """Install a switch; returns the one it replaced in that scope."""
        validate_scope(switch.scope)
        previous = self._switches.get(switch.scope)
        self._switches[switch.scope] = switch
        return previous

    def clear(self, scope: str) -> KillSwitch | None:
        return self._switches.pop(scope, None)

    def active(self, now: float) -> list[KillSwitch]:
        self._expire(now)
        return sorted(self._switches.values(), key=lambda s: s.scope)

    def match(self, feature: str, prompt: str | None, now: float) -> KillSwitch | None:
        if not self._switches:
            return None
        self._expire(now)
        if prompt is not None and (hit := self._switches.get(f"prompt:{prompt}")):
            return hit
        return self._switches.get(f"feature:{feature}") or self._switches.get("global")

    def _expire(self, now: float) -> None:
        for scope in [s for s, k in self._switches.items() if k.expired(now)]:
            del self._switches[scope]
