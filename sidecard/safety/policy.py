"""The data policy for what leaves the host: refuse, scrub, restore, and pin to providers and regions.

A request falls under its feature's policy and its route's policy; both apply. Kinds refused or scrubbed by
either are refused or scrubbed, the answer is restored only if both allow it, and a target must satisfy the
pins of both. Pinning is a filter over the route's targets: a pinned request with no allowed target fails
typed (`policy_refused`); it never falls through to a forbidden provider, whatever happens to the allowed ones.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Sequence
from typing import Final, NamedTuple

from ..config import Target
from .scrub import Placeholders, Scrubber
from .settings import DataPolicy, DataSettings

POLICY_REFUSED: Final = "policy_refused"  # the error code integration adds to errors.Code


class PolicyRefusal(NamedTuple):
    """Why a request may not leave the host. `rules` name the policy rules that acted; `message` is safe to send
    to the client (it names kinds and providers, never the data)."""

    rules: tuple[str, ...]
    message: str


class CompiledPolicy(NamedTuple):
    label: str  # "feature:NAME" or "route:NAME", for rule names
    scrubber: Scrubber | None
    refuser: Scrubber | None
    restore: bool
    providers: frozenset[str]
    regions: tuple[str, ...]


def compile_policy(label: str, policy: DataPolicy) -> CompiledPolicy:
    return CompiledPolicy(
        label,
        Scrubber(policy.scrub, policy.patterns) if policy.scrub else None,
        Scrubber(policy.refuse, policy.patterns) if policy.refuse else None,
        policy.restore,
        frozenset(policy.providers),
        tuple(policy.regions),
    )


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

    __slots__ = ("policies",)

    def __init__(self, policies: Sequence[CompiledPolicy]) -> None:
        self.policies = tuple(policies)

    @property
    def restore(self) -> bool:
        return all(p.restore for p in self.policies)

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
        """`texts` with every scrubbed kind replaced by placeholders, and the one mapping that restores them."""
        mapping = Placeholders()
        out = list(texts)
        for policy in self.policies:
            if policy.scrubber is not None:
                out, mapping = policy.scrubber.scrub(out, mapping)
        return out, mapping

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

    def for_request(self, *, feature: str | None, route: str | None) -> Outbound | None:
        policies = [p for p in (self._features.get(feature or ""), self._routes.get(route or "")) if p is not None]
        return Outbound(policies) if policies else None

    def route_problem(self, route: str, targets: Sequence[Target]) -> str | None:
        """For the config check: a route whose own pins forbid every one of its targets can never answer."""
        outbound = self.for_request(feature=None, route=route)
        if outbound is not None and isinstance(refusal := outbound.allowed_targets(targets), PolicyRefusal):
            return f"data.routes.{route}: {refusal.message}"
        return None
