"""The `[safety]` table checked against the rest of the config, and compiled once for the request path.

`check` is the one validation, run by `sidecard check-config`, at start and at every reload: a malformed table,
a route it names that does not exist, or a route whose own pins forbid every target is refused with the key
named. `SafetyRules` holds what the request path reads: compiled guardrails, data policies, injection scopes.
"""

from __future__ import annotations

from typing import Final, NamedTuple

from ..config import Config, ConfigError
from .guardrails import Guardrails
from .policy import DataPolicies
from .settings import InjectionScope, JudgeCheck, SafetySettings, parse

_JUDGE_LATER: Final = "judge checks are not run by this version; use the quality judge ([quality]) meanwhile"


def check(config: Config, where: str = "<config>") -> SafetySettings:
    """The config's `[safety]` settings; `ConfigError` naming the key when they cannot be used."""
    try:
        settings = parse(config.safety)
        for key, route in settings.route_references():
            if route not in config.routes:
                raise ValueError(f"safety.{key}: no route named {route!r}")
        for kind in ("prompts", "features", "routes"):
            for name, scope in getattr(settings.guardrails, kind).items():
                for i, found in enumerate(scope.checks):
                    if isinstance(found, JudgeCheck):
                        raise ValueError(f"safety.guardrails.{kind}.{name}.checks[{i}]: {_JUDGE_LATER}")
        policies = DataPolicies(settings.data)
        for name in settings.data.routes:
            route = config.routes.get(name)
            if route is None:
                raise ValueError(f"safety.data.routes.{name}: no route named {name!r}")
            if problem := policies.route_problem(name, route.targets):
                raise ValueError(f"safety.{problem}")
        for name, app in settings.access.apps.items():
            if app.rate_limit is not None or app.budget is not None:
                key = "rate_limit" if app.rate_limit is not None else "budget"
                raise ValueError(f"safety.access.apps.{name}.{key}: per-app limits are not enforced by this version; "
                                 "use [[rate_limits]] and [[budgets]] on the app's features")
    except ValueError as exc:
        raise ConfigError(f"config error in {where}: {exc}") from None
    return settings


class SafetyRules(NamedTuple):
    settings: SafetySettings
    guardrails: Guardrails
    data: DataPolicies

    @classmethod
    def build(cls, settings: SafetySettings) -> SafetyRules:
        return cls(settings, Guardrails(settings.guardrails), DataPolicies(settings.data))

    def injection_scope(self, prompt: str | None, feature: str) -> InjectionScope | None:
        """A prompt's own scope, else its feature's."""
        injection = self.settings.injection
        if prompt is not None and prompt in injection.prompts:
            return injection.prompts[prompt]
        return injection.features.get(feature)

    def scopes(self, prompt: str | None, feature: str, route: str) -> list[str]:
        """The guardrail and data-policy scopes a request falls under, e.g. ["guardrails.features.support"]: part
        of its cache key, so an answer checked or scrubbed under some rules only answers requests under the same."""
        guardrails, data = self.settings.guardrails, self.settings.data
        found = [f"guardrails.{kind}.{name}" for kind, table, name in (
            ("prompts", guardrails.prompts, prompt), ("features", guardrails.features, feature), ("routes", guardrails.routes, route))
            if name is not None and name in table]
        found.extend(f"data.{kind}.{name}" for kind, table, name in (("features", data.features, feature), ("routes", data.routes, route))
                     if name in table)
        return found

    def delimited(self, prompt: str) -> list[str]:
        scope = self.settings.injection.prompts.get(prompt)
        return scope.delimit if scope is not None else []
