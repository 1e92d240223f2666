"""The tracing sink: a finished request as spans, built once from its `Finished` record and its marks.

Spans (names and attributes: `tracing.attributes`, the GenAI semantic conventions where they define one):

- the request, kind SERVER, named `chat {model}` (`count_tokens {model}` for a count), the child of the app's
  span when it sent a `traceparent`: face, feature, route, prompt and version, the user's pseudonym, cache
  outcome, outcome, tokens, cost, time to the first token;
- `sidecard.render`, when the request used a versioned prompt: planning and rendering it;
- `sidecard.cache`, when the response cache was looked in: the lookup, with its outcome;
- `sidecard.guardrails`, when output guardrails checked the whole answer (a stream's: its end): their outcome
  and the rules that found something (names, never what they matched); the request span carries the caller's
  app identity and what the injection detector and the data policy did;
- one per upstream attempt, kind CLIENT, named `chat {model}`, from the moment it queued for a slot: target,
  attempt number, queue wait, outcome, the failure it retries (`sidecard.retry_reason`), hedge (the racers of
  a hedge are siblings, both children of the request) and fallback, cancelled (a lost hedge).

Timestamps: the engine's clock, moved onto the wall clock at the request's end.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final

from ..observe.redact import pseudonym
from ..protocol import ApiComplete, ApiCountTokens
from ..tracing import attributes as a
from ..tracing.spans import CLIENT, INTERNAL, SERVER, SpanData
from .types import Finished

if TYPE_CHECKING:
    from ..tracing.recorder import Recorder  # (imports the exporter: only with tracing on)

_NOT_FAILED: Final = frozenset({"ok", "cancelled", "degraded"})


class TraceSpans:
    def __init__(self, recorder: Recorder, *, user_salt: bytes, clock: Callable[[], float]) -> None:
        self.recorder = recorder
        self.user_salt = user_salt
        self._clock = clock

    def __call__(self, finished: Finished) -> None:
        trace = finished.trace
        marks = trace.marks
        if marks is None:
            return
        if finished.completion is not None:
            finished.completion.trace_id = marks.trace_id_hex
        if not marks.sampled:
            return
        offset = time.time_ns() - int(self._clock() * 1e9)  # engine clock -> wall clock, in integer ns

        def ns(t: float) -> int:
            return offset + int(t * 1e9)

        plan = trace.plan
        trace_id, request_span, ids = marks.trace_id, marks.span_id, self.recorder.ids
        attributes = self._request_attributes(finished)
        failed = a.ERROR_TYPE in attributes
        name = f"{attributes[a.OPERATION]} {attributes[a.REQUEST_MODEL]}"
        spans = [SpanData(trace_id, request_span, marks.parent_id, name, SERVER, ns(trace.started),
                          ns(trace.started + finished.latency_s), attributes, failed, bool(marks.parent_id))]
        version = plan.version if plan is not None else None
        if version is not None and marks.planned:
            spans.append(SpanData(trace_id, ids.span_id(), request_span, "sidecard.render", INTERNAL, ns(trace.started),
                                  ns(marks.planned), {a.PROMPT_NAME: version.name, a.PROMPT_VERSION: str(version.version)}))
        if marks.looked_up:
            spans.append(SpanData(trace_id, ids.span_id(), request_span, "sidecard.cache", INTERNAL, ns(marks.planned),
                                  ns(marks.looked_up), {a.CACHE: "hit" if trace.cache_result == "hit" else "miss"}))
        if marks.guarded:
            spans.append(SpanData(trace_id, ids.span_id(), request_span, "sidecard.guardrails", INTERNAL,
                                  ns(marks.guard_from), ns(marks.guard_to), _guardrail_attributes(finished)))
        first = (plan.route.targets[0].provider, plan.route.targets[0].model) if plan is not None and plan.route.targets else None
        previous: str | None = None  # the outcome of the attempt before (a hedge races it rather than retrying it)
        for index, queued, started, ended, hedge in marks.attempts:
            attempt = trace.attempts[index]
            outcome = attempt.outcome
            span_attributes: dict[str, Any] = {
                a.OPERATION: a.CHAT, a.PROVIDER: a.PROVIDERS.get(attempt.provider, attempt.provider),
                a.REQUEST_MODEL: attempt.model, a.TARGET: f"{attempt.provider}:{attempt.model}", a.ATTEMPT: index + 1,
                a.QUEUE_WAIT_S: round(started - queued, 6), a.OUTCOME: outcome,
            }
            if hedge:
                span_attributes[a.HEDGE] = True
            elif previous is not None:
                span_attributes[a.RETRY_REASON] = previous
            if first is not None and (attempt.provider, attempt.model) != first:
                span_attributes[a.FALLBACK] = True
            attempt_failed = outcome not in _NOT_FAILED
            if attempt_failed:
                span_attributes[a.ERROR_TYPE] = outcome
            elif outcome == "cancelled":
                span_attributes[a.CANCELLED] = True
            if not hedge:
                previous = outcome
            spans.append(SpanData(trace_id, ids.span_id(), request_span, f"{a.CHAT} {attempt.model}", CLIENT, ns(queued),
                                  ns(ended), span_attributes, attempt_failed))
        self.recorder.submit(spans)

    def _request_attributes(self, finished: Finished) -> dict[str, Any]:
        trace = finished.trace
        request, plan, bill = trace.request, trace.plan, trace.bill
        first_model = plan.route.targets[0].model if plan is not None and plan.route.targets else ""
        attributes: dict[str, Any] = {
            a.OPERATION: "count_tokens" if finished.counting else a.CHAT,
            a.REQUEST_MODEL: request.model or first_model,
            a.FACE: "internal" if trace.internal else ("http" if isinstance(request, (ApiComplete, ApiCountTokens)) else "ndjson"),
            a.FEATURE: trace.feature,  # (as metrics and the log count it: bounded)
            a.OUTCOME: finished.outcome,
            a.REQUEST_ID: trace.request_id,
        }
        if finished.model:
            attributes[a.RESPONSE_MODEL] = finished.model
        if plan is not None:
            attributes[a.ROUTE] = plan.route_name
            if plan.version is not None:
                attributes[a.PROMPT_NAME] = plan.version.name
                attributes[a.PROMPT_VERSION] = str(plan.version.version)
        if request.user is not None:
            attributes[a.USER] = pseudonym(request.user, self.user_salt)
        if request.stream:
            attributes[a.REQUEST_STREAM] = True
            if trace.ttft_ms is not None:
                attributes[a.RESPONSE_TTFC] = trace.ttft_ms / 1000
        if trace.cache_result is not None:
            attributes[a.CACHE] = trace.cache_result
        if bill.spent_on is not None:
            usage = bill.usage
            attributes[a.USAGE_INPUT] = usage.input_tokens + usage.cache_read_input_tokens + usage.cache_creation_input_tokens
            attributes[a.USAGE_OUTPUT] = usage.output_tokens
            if usage.cache_read_input_tokens:
                attributes[a.USAGE_CACHE_READ] = usage.cache_read_input_tokens
            if usage.cache_creation_input_tokens:
                attributes[a.USAGE_CACHE_WRITE] = usage.cache_creation_input_tokens
            attributes[a.COST_USD] = bill.cost_usd
        completion = finished.completion
        if completion is not None and completion.stop_reason:
            attributes[a.RESPONSE_FINISH_REASONS] = (completion.stop_reason,)
        if finished.outcome not in _NOT_FAILED:
            attributes[a.ERROR_TYPE] = finished.outcome
        if (safety := trace.safety) is not None:
            _safety_attributes(safety, attributes)
        return attributes


def _safety_attributes(safety: Any, attributes: dict[str, Any]) -> None:
    """The caller's app and what the injection detector and the data policy did (`engine.safety.Marks`)."""
    if safety.identity.app is not None:
        attributes[a.APP] = safety.identity.name
    if safety.injection:
        attributes[a.INJECTION_RULES] = tuple(safety.injection)
        attributes[a.INJECTION_SCORE] = safety.injection_score
    if safety.policy:
        attributes[a.POLICY_RULES] = tuple(safety.policy)


_ACTIONS: Final = ("retry", "redact", "flag")  # strongest first, after block


def _guardrail_attributes(finished: Finished) -> dict[str, Any]:
    """The guardrails' outcome (block when the answer was blocked, else their strongest action) and rules."""
    rules = tuple(finished.trace.safety.guardrails) if finished.trace.safety is not None else ()
    actions = {rule.rsplit(":", 1)[-1] for rule in rules}
    outcome = "block" if finished.outcome == "output_blocked" else next((x for x in _ACTIONS if x in actions), "pass")
    attributes: dict[str, Any] = {a.GUARDRAILS_OUTCOME: outcome}
    if rules:
        attributes[a.GUARDRAILS_RULES] = rules
    return attributes
