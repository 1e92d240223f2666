"""Routes as configured, with the operator's runtime overrides on top (each with its own undo stack)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Final, Literal

import msgspec

from .config import Route, Target, target_problem
from .errors import Code, SidecardError

Provider = Literal["anthropic", "bedrock", "vertex"]
LISTED: Final = 10  # routes named in a "no route named" error (a config may have many)


class RouteTable:
    def __init__(self, base: dict[str, Route]) -> None:
        self.base = base
        # route name -> target lists set by operators, oldest first; the last one is in force
        self.overrides: dict[str, list[list[Target]]] = {}
        self._effective: dict[str, Route] = dict(base)

    def get(self, name: str) -> Route | None:
        return self._effective.get(name)

    def names(self) -> list[str]:
        return sorted(self._effective)

    def rebase(self, base: dict[str, Route]) -> list[str]:
        """A reloaded config: overrides stay on routes that still exist; returns the ones dropped."""
        self.base = base
        dropped = [name for name in self.overrides if name not in base]
        for name in dropped:
            del self.overrides[name]
        self._rebuild()
        return dropped

    def override(self, name: str, targets: list[Target]) -> tuple[list[Target], list[Target]]:
        before = self.require(name).targets
        if not targets:
            raise SidecardError(Code.BAD_REQUEST, "targets: at least one target is required")
        for target in targets:
            if problem := target_problem(target):
                raise SidecardError(Code.BAD_REQUEST, f"targets: {problem}")
        self.overrides.setdefault(name, []).append(list(targets))
        self._rebuild()
        return before, self._effective[name].targets

    def set_primary(self, name: str, model: str, provider: Provider | None = None) -> tuple[list[Target], list[Target]]:
        """Put `model` first; the rest of the chain stays behind it (without a duplicate of it)."""
        current = self.require(name).targets
        lead = msgspec.structs.replace(current[0], model=model, provider=provider or current[0].provider)
        rest = [t for t in current if (t.provider, t.model) != (lead.provider, lead.model)]
        return self.override(name, [lead, *rest])

    def rollback(self, name: str) -> tuple[list[Target], list[Target]]:
        before = self.require(name).targets
        stack = self.overrides.get(name)
        if not stack:
            raise SidecardError(Code.BAD_REQUEST, f"route {name!r} has no override to roll back")
        stack.pop()
        if not stack:
            del self.overrides[name]
        self._rebuild()
        return before, self._effective[name].targets

    def require(self, name: str) -> Route:
        """The route NAME as in force; else bad_request naming the routes there are (an operator's typo)."""
        route = self._effective.get(name)
        if route is None:
            raise no_route(name, self.names())
        return route

    def _rebuild(self) -> None:
        self._effective = {
            name: msgspec.structs.replace(route, targets=self.overrides[name][-1]) if name in self.overrides else route
            for name, route in self.base.items()
        }


def no_route(name: str, known: Iterable[str]) -> SidecardError:
    """bad_request for a route NAME that is not there, naming the routes that are (the first LISTED of them): a typo,
    a request's or an operator's, is seen at once. Route names are the operator's config, not secrets."""
    names = sorted(known)
    listed = ", ".join(names[:LISTED]) or "none"
    if len(names) > LISTED:
        listed += f", and {len(names) - LISTED} more"
    return SidecardError(Code.BAD_REQUEST, f"route: no route named {name[:80]!r} (routes: {listed})")


def target_names(targets: list[Target]) -> list[str]:
    return [f"{t.provider}:{t.model}" for t in targets]
