"""Planning, pure: a request, the config and the prompt store in, a `Plan` out.

The plan renders the prompt (if the request names one), builds the API body, picks the route (the request's own,
a prompt switched away by a quality alert, the prompt's, else the default), sets the deadline, estimates the
tokens the request can use, and decides whether its answer is cached and under which key. Nothing here waits or
touches the upstream; the prompt store picks a canary with its own seeded random source.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Final, Protocol

import msgspec

from ..cache import cache_key
from ..config import Config, Route
from ..errors import Code, SidecardError
from ..policies.hedge import hedge_for
from ..pricing import PriceTable
from ..prompts.files import PromptVersion
from ..prompts.registry import PromptStore
from ..protocol import Complete, Message
from ..routes import no_route
from ..safety import injection
from .names import NamedModels
from .types import Plan

_encoder: Final = msgspec.json.Encoder()
_IMAGE_TOKENS: Final = 1600  # what the API charges for a typical image; a binary document is counted the same


class RouteSource(Protocol):
    """Routes by name, operators' overrides included (`routes.RouteTable`)."""

    def get(self, name: str) -> Route | None: ...

    def names(self) -> list[str]: ...


# (experiment, arm, the request as the arm serves it), or None when no experiment takes the request.
ArmSource = Callable[[Complete], "tuple[str, str, Complete] | None"]
# (route name, request) -> (the rollout's role, "stable" or "candidate"; the model to lead the route with, None for
# the route as it is), or None when no rollout runs on the route.
RouteModelSource = Callable[[str, Complete], "tuple[str, str | None] | None"]


class Planner:
    def __init__(
        self,
        config: Config,
        prompts: PromptStore,
        routes: RouteSource,
        *,
        cache: bool,
        route_for_prompt: Callable[[str], str | None] | None = None,
        arms: ArmSource | None = None,
        route_models: RouteModelSource | None = None,
    ) -> None:
        """`cache`: whether there is a response cache; `route_for_prompt`: the route a prompt is switched to while
        its quality alert fires (control's quality remedies), if any; `arms`: the experiment arm serving a request
        (`loop.experiments.ExperimentBook.assign`), if any; `route_models`: the model a route's rollout gives a
        request (`ExperimentBook.route_model`), if any."""
        self.config = config
        self.prompts = prompts
        self.routes = routes
        self.cache = cache
        self.route_for_prompt = route_for_prompt
        # The variables a prompt renders as delimited data blocks (`[safety.injection.prompts]`), set by the engine.
        self.delimited: Callable[[str], list[str]] = lambda prompt: []
        # The guardrail and data-policy scopes a request falls under (prompt, feature, route), set by the engine.
        self.safety_scopes: Callable[[str | None, str, str], list[str]] = lambda prompt, feature, route: []
        self.arms = arms
        self.route_models = route_models
        self.models = NamedModels()  # the models requests named (those no route has bounded by requests.max_named_models)

    def plan(self, request: Complete, started: float, *, stream: bool = False, arm: tuple[str, str] | None = None) -> Plan:
        """The request's plan; raises `SidecardError` for a request that cannot be planned (`bad_request`,
        `prompt_not_found`). `arm`: the (experiment, arm) a job was assigned at submit, whose request is already
        as the arm serves it."""
        config = self.config
        if arm is not None:
            experiment, arm_name = arm
            return msgspec.structs.replace(self.plan(request, started, stream=stream), experiment=experiment, arm=arm_name)
        experiment = arm_name = None
        assigned = self.arms(request) if self.arms is not None else None
        if assigned is not None:  # served as if it had named the arm's version, model or route itself
            experiment, arm_name, request = assigned
        limits = config.requests
        deadline = started + min(request.deadline_ms or limits.default_deadline_ms, limits.max_deadline_ms) / 1000
        if stream:
            # A stream's deadline is for its first token; the whole stream is bounded by stream_max_duration_s.
            deadline = min(deadline, started + limits.stream_max_duration_s)
        system = request.system
        messages: list[Message] = request.messages
        max_tokens, temperature, stop_sequences = request.max_tokens, request.temperature, request.stop_sequences
        version = None
        canary = False
        if request.prompt is not None:
            if request.messages:
                raise SidecardError(Code.BAD_REQUEST, "messages: send either messages or a prompt, not both")
            if request.system is not None:
                raise SidecardError(Code.BAD_REQUEST, "system: a prompt brings its own system text")
            version, canary = self.prompts.resolve(request.prompt, version=request.version, sticky_key=request.user)
            values = {k: _var_text(v) for k, v in request.vars.items()}
            delimited = self.delimited(version.name)
            if delimited:
                # Injection defence: the variables as escaped data blocks, and the system prompt says what they are.
                system, messages = version.render(injection.delimit(values, delimited))
                system = injection.with_role(system)
            else:
                system, messages = version.render(values)
            max_tokens = max_tokens or version.max_tokens
            temperature = temperature if temperature is not None else version.temperature
            stop_sequences = stop_sequences if stop_sequences is not None else version.stop_sequences
        elif not request.messages:
            raise SidecardError(Code.BAD_REQUEST, "messages: at least one message is required")
        body: dict[str, Any] = {"max_tokens": max_tokens or limits.default_max_tokens, "messages": messages}
        if system is not None:
            body["system"] = system
        if temperature is not None:
            body["temperature"] = temperature
        if stop_sequences is not None:
            body["stop_sequences"] = stop_sequences
        if request.metadata is not None:
            body["metadata"] = request.metadata
        if request.passthrough:
            body.update(request.passthrough)
        headers = {"anthropic-beta": ",".join(request.betas)} if request.betas else {}
        route_name, route = self._route(request, version)
        rollout = None
        if self.route_models is not None and request.model is None:
            assigned = self.route_models(route_name, request)
            if assigned is not None:  # a rollout on this route: the role, and the candidate model leading
                rollout, model = assigned
                if model is not None:
                    lead = msgspec.structs.replace(route.targets[0], model=model)
                    rest = [t for t in route.targets if (t.provider, t.model) != (lead.provider, lead.model)]
                    route = msgspec.structs.replace(route, targets=[lead, *rest])
        key, ttl = self._cache_key(request, body, headers, route, version, route_name)
        return Plan(
            request, deadline, body, headers, route_name, route, version, version.name if version is not None else None,
            canary, key, ttl,
            estimated_tokens=estimate_input_tokens(system, messages, request.passthrough) + body["max_tokens"],
            first_text=_first_text(messages), experiment=experiment, arm=arm_name, rollout=rollout,
        )

    def reroute(self, plan: Plan, route_name: str, route: Route) -> Plan:
        """PLAN on another route (a soft budget's cheaper one): the whole route, a pinned model included; an answer
        from another model is cached under that model's key."""
        if plan.cache_key is None:
            return msgspec.structs.replace(plan, route_name=route_name, route=route)
        key, ttl = self._cache_key(plan.request, plan.body, plan.headers, route, plan.version, route_name)
        return msgspec.structs.replace(plan, route_name=route_name, route=route, cache_key=key, cache_ttl_s=ttl)

    def _route(self, request: Complete, version: PromptVersion | None) -> tuple[str, Route]:
        name = (
            request.route
            or (self.route_for_prompt(version.name) if version is not None and self.route_for_prompt is not None else None)
            or (version.route if version is not None else None)
            or self.config.requests.default_route
        )
        route = self.routes.get(name)
        if route is None:
            raise no_route(name, self.routes.names())
        if request.model:
            if request.model not in self.models.seen:
                self.models.admit(request.model, self.on_a_route, self.config.requests.max_named_models)
            # A named model leads. The route's other targets stay behind it as fallbacks, unless the request or the
            # route wants that model alone (its other providers' targets for the same model id still count).
            fallback = request.model_fallback if request.model_fallback is not None else route.model_fallback
            lead = msgspec.structs.replace(route.targets[0], model=request.model)
            rest = [
                t for t in route.targets
                if (t.provider, t.model) != (lead.provider, lead.model) and (fallback or t.model == request.model)
            ]
            if [lead, *rest] != route.targets:
                route = msgspec.structs.replace(route, targets=[lead, *rest])
        return name, route

    def on_a_route(self, model: str) -> bool:
        """Whether a route (operators' overrides included) has MODEL."""
        routes = self.routes
        return any(t.model == model for name in routes.names() for t in routes.get(name).targets)  # type: ignore[union-attr]

    def _cache_key(
        self, request: Complete, body: dict[str, Any], headers: dict[str, str], route: Route, version: PromptVersion | None,
        route_name: str,
    ) -> tuple[str | None, float]:
        """The key and TTL of the request's answer in the cache, or (None, 0) if it is not to be cached."""
        if not self.cache or request.cache == "bypass":
            return None, 0.0
        feature = self.config.features.get(request.feature)
        any_temperature = route.cache_any_temperature or (feature is not None and feature.cache_any_temperature)
        # No temperature means the API's default of 1.0: a fresh sample each time, so not an answer to keep.
        if body.get("temperature") != 0.0 and not any_temperature:
            return None, 0.0
        ttls = (
            version.cache_ttl_s if version is not None else None,
            feature.cache_ttl_s if feature is not None else None,
            route.cache_ttl_s,
        )
        ttl = next((t for t in ttls if t is not None), self.config.cache.ttl_s)
        if ttl <= 0:
            return None, 0.0
        parts = {k: v for k, v in body.items() if k != "metadata"}
        parts["model"] = route.targets[0].model
        if headers:
            parts["headers"] = headers  # a beta feature changes the answer
        if version is not None:
            parts["prompt"] = [version.name, version.version, version.digest]
        safety = self.safety_scopes(version.name if version is not None else None, request.feature, route_name)
        if safety:
            parts["safety"] = safety  # a guarded or scrubbed answer is never served to a request without those rules
        return cache_key(parts), ttl


def worst_cost_usd(plan: Plan, prices: PriceTable) -> float:
    """The most a request can cost: its route's dearest target, or a target and its hedge at once."""
    targets = plan.route.targets
    max_tokens = plan.body["max_tokens"]
    input_tokens = plan.estimated_tokens - max_tokens
    costs = []
    for target in targets:
        price = prices.price(target.model)
        costs.append(0.0 if price is None else (input_tokens * price.input + max_tokens * price.output) / 1e6)
    worst = max(costs)
    for index, target in enumerate(targets):
        if target.hedge_after_ms and (hedge := hedge_for(targets, index)) is not None:  # (most targets are not hedged)
            worst = max(worst, costs[index] + costs[hedge.partner])
    return worst


def estimate_input_tokens(system: Any, messages: list[Message], passthrough: dict[str, msgspec.Raw]) -> float:
    """About four characters a token: good enough to bound a request before the API counts it.

    Tool definitions and the other passed-through fields count at their JSON size."""
    chars, blocks = _content_size(system)
    for message in messages:
        more_chars, more_blocks = _content_size(message.content)
        chars += more_chars
        blocks += more_blocks
    chars += sum(len(raw) for raw in passthrough.values())
    return chars / 4 + blocks * _IMAGE_TOKENS


def _content_size(content: Any) -> tuple[int, int]:
    """(characters, images and binary documents) of a string or a list of content blocks."""
    if isinstance(content, str):
        return len(content), 0
    if not isinstance(content, list):  # malformed: the API's 400 says so, not an internal error here
        return 0, 0
    chars = blocks = 0
    for block in content:
        if not isinstance(block, dict):
            continue
        text = block.get("text")
        kind = block.get("type")
        if isinstance(text, str):
            chars += len(text)
            continue
        if kind == "image":
            blocks += 1
            continue
        if kind == "document":
            source = block.get("source")
            source = source if isinstance(source, dict) else {}
            if source.get("type") == "text":
                chars += len(str(source.get("data", "")))
            elif source.get("type") == "content":
                more_chars, more_blocks = _content_size(source.get("content"))
                chars += more_chars
                blocks += more_blocks
            else:
                blocks += 1  # a PDF, inline or by URL
            continue
        if kind == "tool_result":
            more_chars, more_blocks = _content_size(block.get("content"))
            chars += more_chars + len(str(block.get("tool_use_id", "")))
            blocks += more_blocks
            continue
        chars += len(_encoder.encode(block))  # tool calls, server tool results, future blocks: their JSON
    return chars, blocks


def _var_text(value: str | int | float | bool) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return value if isinstance(value, str) else str(value)


def _first_text(messages: list[Message]) -> str:
    for message in messages:
        if isinstance(message.content, str):
            return message.content
        for block in message.content:
            if block.get("type") == "text" and isinstance(block.get("text"), str):
                return block["text"]
    return ""
