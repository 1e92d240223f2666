"""Every kind of answer a request can get, made in one place: fresh from the upstream, from the cache (a hit, a
stale answer when every target failed, a coalesced follower's copy of its leader's), the static fallback, a kill
switch's; and the checks and the cache write that follow a fresh one.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Final

import msgspec

from ..cache import CachedAnswer, Entry, ResponseCache, pack
from ..config import Config
from ..errors import Code, SidecardError
from ..killswitch import KillSwitch
from ..observe.metrics import Metrics
from ..prompts.output import output_problem
from ..protocol import Completion, ServedBy, Usage
from ..upstream.client import UpstreamReply
from .types import Trace
from .walk import TargetHealth

_encoder: Final = msgspec.json.Encoder()


class Answers:
    def __init__(
        self,
        config: Config,
        *,
        metrics: Metrics,
        cache: ResponseCache | None = None,
        on_cache_store: Callable[[str, Entry], None] | None = None,
        clock: Callable[[], float],
    ) -> None:
        self.config = config
        self.metrics = metrics
        self.cache = cache
        self.on_cache_store = on_cache_store  # a persistent store keeps what the cache keeps
        self._clock = clock

    # ------------------------------------------------------------------ fresh

    def fresh(self, trace: Trace, reply: UpstreamReply, model: str, served: TargetHealth) -> Completion:
        """An upstream answer (usage: everything the request paid for so far)."""
        plan = trace.plan
        assert plan is not None
        lead = plan.route.targets[0]
        fallback = (served.target.provider, served.target.model) != (lead.provider, lead.model)
        if fallback:
            self.metrics.fallbacks(plan.route_name, *served.labels).inc()
        message = reply.message
        bill = trace.bill
        return Completion(
            id=trace.request.id,
            text=reply.text,
            content=message.content,
            model=model,
            usage=msgspec.structs.replace(bill.usage),
            stop_reason=message.stop_reason,
            stop_sequence=message.stop_sequence,
            latency_ms=0.0,  # set by the accounting, once the request is over
            cost_usd=bill.cost_usd,
            upstream_request_id=reply.request_id,
            request_id=trace.request_id,
            served_by=ServedBy(served.target.provider, served.target.model),
            attempts=trace.upstream_attempts,
            fallback=fallback,
            **_prompt_fields(trace),
            extra=reply.extra or msgspec.UNSET,
        )

    def format_problem(self, trace: Trace, completion: Completion) -> str | None:
        """Why the answer breaks the prompt's declared output format (counted, and kept for the quality signal)."""
        version = trace.plan.version if trace.plan is not None else None
        assert version is not None
        problem = output_problem(completion.text, version.output)
        if problem is not None:
            trace.output_problem, trace.rejected = problem, completion
            self.metrics.prompt_bad_outputs(version.name, str(version.version)).inc()
        return problem

    def store(self, trace: Trace, completion: Completion) -> None:
        """Keep a fresh answer in the cache, under the plan's key; not one with a container (one conversation's
        code execution state, with its files: never to be handed to another request)."""
        plan = trace.plan
        assert self.cache is not None and plan is not None and plan.cache_key is not None
        if has_container(completion):
            return
        answer = CachedAnswer(
            completion.text,
            bytes(completion.content),
            completion.model,
            completion.usage,
            completion.stop_reason,
            completion.stop_sequence,
            completion.served_by,
            completion.upstream_request_id,
            completion.extra or None,
        )
        now = self._clock()
        entry = Entry(
            pack(answer),
            now,
            now + plan.cache_ttl_s,
            now + plan.cache_ttl_s + self.config.cache.stale_ttl_s,
            (trace.request.feature, plan.prompt),
        )
        evictions = self.cache.evictions
        if self.cache.put(plan.cache_key, entry) and self.on_cache_store is not None:
            self.on_cache_store(plan.cache_key, entry)
        self.metrics.cache_evictions.inc(self.cache.evictions - evictions)
        self.metrics.cache_entries.set(len(self.cache))
        self.metrics.cache_bytes.set(self.cache.bytes)

    # ------------------------------------------------------------------ without an upstream call

    def cached(self, trace: Trace, answer: CachedAnswer, *, stale: bool) -> Completion:
        return Completion(
            id=trace.request.id,
            text=answer.text,
            content=msgspec.Raw(answer.content),
            model=answer.model,
            usage=answer.usage,
            stop_reason=answer.stop_reason,
            stop_sequence=answer.stop_sequence,
            latency_ms=0.0,
            cost_usd=0.0,
            upstream_request_id=answer.upstream_request_id,
            request_id=trace.request_id,
            served_by=answer.served_by,
            attempts=trace.upstream_attempts,
            degraded=stale,
            cached=True,
            stale=stale,
            **_prompt_fields(trace),
            extra=answer.extra or msgspec.UNSET,
        )

    def shared(self, trace: Trace, leader: Completion) -> Completion:
        """A follower's copy of its leader's answer: nothing was spent on its behalf."""
        return msgspec.structs.replace(
            leader, id=trace.request.id, request_id=trace.request_id, cost_usd=0.0, attempts=0, cached=not leader.degraded
        )

    def degraded(self, trace: Trace) -> Completion | None:
        """When every target failed: a stale cached answer, else the static fallback, else None."""
        return self.stale(trace) or self.static_fallback(trace)

    def stale(self, trace: Trace, answer: CachedAnswer | None = None) -> Completion | None:
        """A stale cached answer (the local cache's, or ANSWER from elsewhere), or None."""
        plan = trace.plan
        assert plan is not None
        if answer is None and plan.cache_key is not None and self.cache is not None:
            hit = self.cache.get(plan.cache_key, self._clock(), allow_stale=True)
            answer = None if hit is None else hit.answer
        if answer is None:
            return None
        trace.cache_result = "stale"
        self.metrics.degraded(plan.route_name, "stale").inc()
        return self.cached(trace, answer, stale=True)

    def static_fallback(self, trace: Trace) -> Completion | None:
        """The feature's or route's static fallback text, or None."""
        text = self.fallback_text(trace)
        if text is None:
            return None
        assert trace.plan is not None
        self.metrics.degraded(trace.plan.route_name, "static").inc()
        return self.static(trace, text)

    def fallback_text(self, trace: Trace) -> str | None:
        """The static fallback: the feature's, else the route's, else None."""
        feature = self.config.features.get(trace.request.feature)
        if feature is not None and feature.static_fallback is not None:
            return feature.static_fallback
        return trace.plan.route.static_fallback if trace.plan is not None else None

    def killed(self, trace: Trace, switch: KillSwitch) -> Completion:
        """No upstream call for a request in a killed scope: the switch's error, static text or cached answer."""
        plan = trace.plan
        assert plan is not None
        self.metrics.killed(switch.scope, switch.mode).inc()
        trace.killed_by = switch.scope
        if switch.mode == "cached" and plan.cache_key is not None and self.cache is not None:
            hit = self.cache.get(plan.cache_key, trace.started, allow_stale=True)
            if hit is not None:
                trace.cache_result = "stale" if hit.stale else "hit"
                completion = self.cached(trace, hit.answer, stale=hit.stale)
                completion.degraded = True
                return completion
        if switch.mode != "error" and switch.text is not None:
            return self.static(trace, switch.text)
        raise disabled(switch)

    def static(self, trace: Trace, text: str) -> Completion:
        return Completion(
            id=trace.request.id,
            text=text,
            content=msgspec.Raw(_encoder.encode([{"type": "text", "text": text}])),
            model="static_fallback",
            usage=Usage(),
            stop_reason="end_turn",
            latency_ms=0.0,
            cost_usd=trace.bill.cost_usd,
            upstream_request_id=None,
            request_id=trace.request_id,
            served_by=ServedBy("sidecard", "static_fallback"),
            attempts=trace.upstream_attempts,
            fallback=True,
            degraded=True,
            **_prompt_fields(trace),
        )


def has_container(completion: Completion) -> bool:
    """Whether the answer names a code execution container: that conversation's alone (not cached, not shared)."""
    return isinstance(completion.extra, dict) and completion.extra.get("container") is not None


def disabled(switch: KillSwitch) -> SidecardError:
    reason = f": {switch.reason}" if switch.reason else ""
    return SidecardError(Code.AI_DISABLED, f"AI is switched off for {switch.scope}{reason}", retryable=False)


def _prompt_fields(trace: Trace) -> dict[str, Any]:
    version = trace.plan.version if trace.plan is not None else None
    if version is None:
        return {}
    return {"prompt": version.name, "prompt_version": version.version}
