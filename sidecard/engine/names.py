"""Names a request chooses that become state, bounded: its `feature`, and a model no route has.

Each becomes metric series, log fields, usage rows, quality-monitor, feedback, rate-limit and budget keys, and (a
model) breakers and admission queues, so a client choosing a new one on every request would grow them without
end. A name the operator chose (the config's, a kill switch's, an experiment's; a model on a route) always
passes; up to a limit of others pass too; past it:

- a feature is counted under `OTHER`: the request is served as ever, and only its accounting is pooled. The label
  is bookkeeping, so refusing the request would turn a metrics limit into an outage of the app's unnamed features;
  the series stay as bounded either way. (The request keeps its own name for what looks it up: access globs,
  kill switches, the audit trail, the cache's flush filter.)
- a model is refused (`bad_request`): it decides what is called, so there is nothing to pool it under. A model the
  upstream does not know (404) gives its slot back and its state is forgotten, so garbage names cannot hold the
  slots; a reload gives back the slots of models the upstream has never answered.

A known name costs a request one set lookup.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Final

from ..config import Config
from ..errors import Code, SidecardError
from ..observe.log import JsonLog
from ..protocol import Attempt
from ..safety.settings import SafetySettings
from .types import called

OTHER: Final = "_other"  # the feature of requests past requests.max_named_features
_GLOB: Final = frozenset("*?[")
_ANSWERED: Final = frozenset({"ok", "batch"})  # attempt outcomes that are an answer from the model


def configured_features(config: Config, safety: SafetySettings) -> frozenset[str]:
    """Every feature the config names: its own settings, scopes of rate limits, budgets, quality, review, fleet
    failure modes, experiments and shadows, the safety tables, and exact names in access and audit lists."""
    names = {"default", OTHER, *config.features, *config.quality.features}
    scopes = [*(limit.scope for limit in config.rate_limits), *(budget.scope for budget in config.budgets), *config.review.rates]
    if config.fleet is not None:
        scopes.extend(config.fleet.on_failure)
    names.update(scope[len("feature:"):] for scope in scopes if scope.startswith("feature:") and scope != "feature:*")
    names.update(named.feature for named in (*config.experiments, *config.shadows) if named.feature is not None)
    names.update(*(table.features for table in (safety.guardrails, safety.injection, safety.data)))
    globs = [*(pattern for app in safety.access.apps.values() for pattern in app.features), *safety.audit.features]
    names.update(pattern for pattern in globs if not _GLOB.intersection(pattern))
    return frozenset(names)


class FeatureNames:
    """The feature a request is accounted under (`label`)."""

    def __init__(self, *, log: JsonLog, named: Callable[[str], bool]) -> None:
        """`named`: whether operator state names a feature (a kill switch, an experiment), read for new names only."""
        self.log = log
        self.named = named
        self.seen: set[str] = set()  # every feature accounted under its own name: the one lookup a request makes
        self.slots: set[str] = set()  # of them, those no configuration names (at most `limit`)
        self.limit = 0
        self._warned = False

    def configure(self, config: Config, safety: SafetySettings) -> None:
        """Names the config now has stop holding a slot; a new limit applies to names from now on (none is
        forgotten: its series, usage rows and keys go on)."""
        configured = configured_features(config, safety)
        self.slots -= configured
        self.seen |= configured
        self.limit = config.requests.max_named_features
        self._warned = False  # (reached again under the new config: said again)

    def label(self, feature: str) -> str:
        return feature if feature in self.seen else self._new(feature)

    def _new(self, feature: str) -> str:
        if self.named(feature):
            self.seen.add(feature)
            return feature
        if len(self.slots) < self.limit:
            self.slots.add(feature)
            self.seen.add(feature)
            return feature
        if not self._warned:
            self._warned = True
            self.log.warning("feature_limit_reached", limit=self.limit, counted_as=OTHER,
                             hint="name the app's features in the config ([features.NAME]), or raise requests.max_named_features")
        return OTHER


class NamedModels:
    """The models requests name (`admit`), and what each request's end says about them (`ended`)."""

    def __init__(self) -> None:
        self.seen: set[str] = set()  # models admitted: the one lookup a request naming a model makes
        self.off_route: set[str] = set()  # of them, those no route had: each holds one of `limit` slots
        self.answered: set[str] = set()  # of those, the ones the upstream has answered

    def admit(self, model: str, on_a_route: Callable[[str], bool], limit: int) -> None:
        """Admit a model a request names for the first time: any model a route has; up to LIMIT others, then
        `bad_request`."""
        if not on_a_route(model):
            if len(self.off_route) >= limit:
                raise SidecardError(
                    Code.BAD_REQUEST,
                    f"model: {model[:100]!r} is on no route, and {limit} such models have been named already "
                    "(requests.max_named_models): put it on a route, or raise the limit",
                )
            self.off_route.add(model)
        self.seen.add(model)

    def ended(self, model: str, attempts: Iterable[Attempt], on_a_route: Callable[[str], bool]) -> bool:
        """A request that named MODEL (admitted) is over. True when MODEL now holds no slot, so that what it made
        (breakers, queues, series) is to be forgotten and the request accounted under no model: the upstream
        refused it as unknown here (and no target answered it), the request never called it and nothing ever
        answered it (a cache miss, a refusal, a kill switch: else such requests would hold every slot without one
        call), or it was given back while this request was on its way."""
        if model not in self.off_route:
            return model not in self.seen and not on_a_route(model)
        made_a_call = not_found = False
        for attempt in attempts:
            if attempt.model != model:
                continue
            outcome = attempt.outcome
            if outcome in _ANSWERED or outcome.startswith("stream_broken"):  # (a broken stream answered first)
                self.answered.add(model)
                return False
            not_found = not_found or outcome == "404"
            made_a_call = made_a_call or called(attempt)
        if not_found or not (made_a_call or model in self.answered):
            self.release([model])
            return True
        return False

    def release(self, models: Iterable[str]) -> None:
        for model in models:
            self.off_route.discard(model)
            self.seen.discard(model)
            self.answered.discard(model)

    def reconfigure(self, on_a_route: Callable[[str], bool]) -> list[str]:
        """A reload: a model a route now has holds no slot; those the upstream never answered give theirs back
        (returned, for their state to be forgotten)."""
        self.off_route = {model for model in self.off_route if not on_a_route(model)}
        unanswered = sorted(self.off_route - self.answered)
        self.release(unanswered)
        return unanswered
