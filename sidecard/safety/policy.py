"""The data policy for what leaves the host: refuse, scrub, restore, and pin to providers and regions.

A request falls under its feature's policy and its route's policy; both apply. Kinds refused or scrubbed by
either are refused or scrubbed, the answer is restored only if both allow it, and a target must satisfy the
pins of both. Pinning is a filter over the route's targets: a pinned request with no allowed target fails
typed (`policy_refused`); it never falls through to a forbidden provider, whatever happens to the allowed ones.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Sequence
from typing import NamedTuple

from ..config import Target
from .scrub import Placeholders, Scrubber
from .settings import DataPolicy, DataSettings


class PolicyRefusal(NamedTuple):
    """Why a request may not leave the host (the error code `policy_refused`). `rules` name the policy rules that acted; `message` is safe to send
    to the client (it names kinds and providers, never the data)."""

    rules: tuple[str, ...]
    message: str


class CompiledPolicy(NamedTuple):
    label: str  # "feature:NAME" or "route:NAME", for rule names
    settings: DataPolicy
    refuser: Scrubber | None
    providers: frozenset[str]
    regions: tuple[str, ...]


def compile_policy(label: str, policy: DataPolicy) -> CompiledPolicy:
    refuser = Scrubber(policy.refuse, policy.patterns) if policy.refuse else None
    return CompiledPolicy(label, policy, refuser, frozenset(policy.providers), tuple(policy.regions))


def pin_problem(policy: CompiledPolicy, target: Target) -> str | None:
    """Why `policy` forbids `target`, or None."""
    if policy.providers and target.provider not in policy.providers:
        return f"provider {target.provider} is not allowed (only {', '.join(sorted(policy.providers))})"
    if policy.regions and not (target.region and any(fnmatch.fnmatchcase(target.region, r) for r in policy.regions)):
        where = f"region {target.region}" if target.region else "a target without a region"
        return f"{where} is not allowed (only {', '.join(policy.regions)})"
    return None


class Outbound:
    """The data rules for one request."""

    __slots__ = ("policies", "restore", "_scrubber")

    def __init__(self, policies: Sequence[CompiledPolicy]) -> None:
        self.policies = tuple(policies)
        self.restore = all(p.settings.restore for p in self.policies)
        # One scrubber for all the policies: one pass, so no placeholder is ever scrubbed again.
        kinds = [kind for p in self.policies for kind in p.settings.scrub]
        custom = {k: v for p in self.policies for k, v in p.settings.patterns.items()}
        self._scrubber = Scrubber(kinds, custom) if kinds else None

    @property
    def pinned(self) -> bool:
        return any(p.providers or p.regions for p in self.policies)

    def refused(self, texts: Sequence[str]) -> PolicyRefusal | None:
        """A refusal when the request carries a kind a policy forbids."""
        for policy in self.policies:
            if policy.refuser is not None and (kinds := policy.refuser.forbidden(texts)):
                return PolicyRefusal(tuple(f"{policy.label}:refuse:{k}" for k in kinds),
                                     f"the request carries data this {policy.label.split(':')[0]} may not send"
                                     f" ({', '.join(kinds)})")
        return None

    def scrub(self, texts: Sequence[str]) -> tuple[list[str], Placeholders]:
        """`texts` with every kind either policy scrubs replaced by placeholders, and the mapping that restores them."""
        if self._scrubber is None:
            return list(texts), Placeholders()
        return self._scrubber.scrub(texts)

    def allowed_targets(self, targets: Iterable[Target]) -> list[Target] | PolicyRefusal:
        """The targets every pin allows, in route order; a refusal naming the first pin when none is."""
        targets = list(targets)
        allowed = [t for t in targets if self.permits(t)]
        if allowed or not targets:
            return allowed
        for policy in self.policies:
            if problem := pin_problem(policy, targets[0]):
                return PolicyRefusal((f"{policy.label}:pin",), f"no target this {policy.label.split(':')[0]} may use:"
                                                                f" {problem}")
        raise AssertionError("unreachable: a target no pin forbids is allowed")

    def permits(self, target: Target) -> bool:
        """Checked again before every attempt, so no later step (an override, a fallback) can reach past a pin."""
        return all(pin_problem(policy, target) is None for policy in self.policies)


class DataPolicies:
    """Every configured policy, compiled once at load; `for_request` picks a request's (None: no policy)."""

    def __init__(self, settings: DataSettings) -> None:
        self._features = {name: compile_policy(f"feature:{name}", p) for name, p in settings.features.items()}
        self._routes = {name: compile_policy(f"route:{name}", p) for name, p in settings.routes.items()}
        self._outbound: dict[tuple[str | None, str | None], Outbound] = {}

    def for_request(self, *, feature: str | None, route: str | None) -> Outbound | None:
        # Keyed by configured names only, so labels a client makes up cannot grow the cache.
        key = (feature if feature in self._features else None, route if route in self._routes else None)
        if key == (None, None):
            return None
        if (outbound := self._outbound.get(key)) is None:
            policies = [table[name] for table, name in zip((self._features, self._routes), key, strict=True) if name is not None]
            outbound = self._outbound[key] = Outbound(policies)
        return outbound

    def route_problem(self, route: str, targets: Sequence[Target]) -> str | None:
        """For the config check: a route whose own pins forbid every one of its targets can never answer."""
        outbound = self.for_request(feature=None, route=route)
        if outbound is not None and isinstance(refusal := outbound.allowed_targets(targets), PolicyRefusal):
            return f"data.routes.{route}: {refusal.message}"
        return None
