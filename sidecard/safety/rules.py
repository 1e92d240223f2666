"""The `[safety]` table checked against the rest of the config, and compiled once for the request path.

`check` is the one validation, run by `sidecard check-config`, at start and at every reload: a malformed table,
a route it names that does not exist, or a route whose own pins forbid every target is refused with the key
named. `SafetyRules` holds what the request path reads: compiled guardrails, data policies, injection scopes.
"""

from __future__ import annotations

import re
from typing import NamedTuple

import msgspec

from ..config import BudgetConfig, Config, ConfigError, RateLimit
from .guardrails import Guardrails
from .pii import compile_pattern
from .policy import DataPolicies
from .settings import InjectionScope, SafetySettings, parse

def check(config: Config, where: str = "<config>") -> SafetySettings:
    """The config's `[safety]` settings; `ConfigError` naming the key when they cannot be used."""
    try:
        settings = parse(config.safety)
        for key, route in settings.route_references():
            if route not in config.routes:
                raise ValueError(f"safety.{key}: no route named {route!r}")
        policies = DataPolicies(settings.data)
        for name in settings.data.routes:
            route = config.routes.get(name)
            if route is None:
                raise ValueError(f"safety.data.routes.{name}: no route named {name!r}")
            if problem := policies.route_problem(name, route.targets):
                raise ValueError(f"safety.{problem}")
        with_app_limits(config, settings)  # e.g. a [[budgets]] of scope app:NAME beside the app's own budget
    except ValueError as exc:
        raise ConfigError(f"config error in {where}: {exc}") from None
    return settings


def with_app_limits(config: Config, settings: SafetySettings) -> Config:
    """`config` with each app's own rate limit and budget added as `[[rate_limits]]` and `[[budgets]]` of scope
    `app:NAME`, which traffic control applies to that app's requests besides every other limit."""
    if not settings.access.enabled:
        return config
    limits = [RateLimit(scope=f"app:{name}", requests_per_minute=app.rate_limit.requests_per_minute,
                        tokens_per_minute=app.rate_limit.tokens_per_minute, burst_s=app.rate_limit.burst_s)
              for name, app in settings.access.apps.items() if app.rate_limit is not None]
    budgets = [BudgetConfig(scope=f"app:{name}", window=app.budget.window, soft_usd=app.budget.soft_usd,
                            hard_usd=app.budget.hard_usd)
               for name, app in settings.access.apps.items() if app.budget is not None]
    # Idempotent: a config that already has them (the engine checks the one the daemon runs) is returned as it is.
    limits = [limit for limit in limits if limit not in config.rate_limits]
    budgets = [budget for budget in budgets if budget not in config.budgets]
    if not (limits or budgets):
        return config
    scopes = {(b.scope, b.window) for b in config.budgets}
    for budget in budgets:
        if (budget.scope, budget.window) in scopes:
            raise ValueError(f"safety.access.apps.{budget.scope[4:]}.budget: [[budgets]] also has scope {budget.scope} "
                             f"per {budget.window}")
    return msgspec.structs.replace(config, rate_limits=[*config.rate_limits, *limits], budgets=[*config.budgets, *budgets])


class SafetyRules(NamedTuple):
    settings: SafetySettings
    guardrails: Guardrails
    data: DataPolicies

    @classmethod
    def build(cls, settings: SafetySettings) -> SafetyRules:
        return cls(settings, Guardrails(settings.guardrails), DataPolicies(settings.data))

    def named_patterns(self) -> dict[str, re.Pattern[str]]:
        """The data policy's own kinds (`patterns`), by name: the log's redactor masks them too."""
        data = self.settings.data
        return {name: compile_pattern(source, name)
                for policy in (*data.features.values(), *data.routes.values()) for name, source in policy.patterns.items()}

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
