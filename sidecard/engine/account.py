"""Accounting: what a request cost, and what is told about it once it is over.

`charge` prices every upstream answer as it comes (a retried, resumed or broken one too) at its own model's price.
When a request ends, however it ends, `finish` hands one `Finished` record to each sink in turn: the request
metrics, the spend settlement with traffic control, the quality sample, the log line, and whatever else the
engine was given (a sink must not block or raise).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from ..config import Config, QualityConfig
from ..errors import Code, SidecardError
from ..observe.log import JsonLog
from ..observe.metrics import Metrics
from ..observe.redact import pseudonym
from ..pricing import PriceTable
from ..protocol import Completion, CountTokens, Message, TokenCount, Usage
from ..quality.checks import Sample
from ..quality.judge import JUDGE_PROMPT
from ..tracing.traceparent import parse as parse_traceparent
from ..traffic import Traffic
from .types import Finished, Trace, last_call

Sink = Callable[[Finished], None]


class Accounting:
    def __init__(
        self, config: Config, *, metrics: Metrics, sinks: Sequence[Sink], clock: Callable[[], float],
        model_ended: Callable[[str, Trace], bool] = lambda model, trace: False,
    ) -> None:
        """`model_ended`: told of each request that named a model (as planned), whether that model now holds no slot
        (`names.NamedModels.ended`): the request is then accounted under no model."""
        self.metrics = metrics
        self.sinks = list(sinks)
        self._clock = clock
        self.model_ended = model_ended
        self.configure(config)

    def configure(self, config: Config) -> None:
        self.prices = PriceTable(config.prices)

    def charge(self, trace: Trace, usage: Usage, model: str, *, price_multiplier: float = 1.0) -> None:
        """An upstream answer, paid for at its own model's price (times PRICE_MULTIPLIER: a batch's discount)."""
        cost = self.prices.cost(model, usage) * price_multiplier
        bill = trace.bill
        bill.usage.add(usage)
        bill.cost_usd += cost
        bill.spent_on = model
        feature, metrics = trace.feature, self.metrics
        metrics.tokens(feature, model, "input").inc(usage.input_tokens)
        metrics.tokens(feature, model, "output").inc(usage.output_tokens)
        if usage.cache_read_input_tokens:
            metrics.tokens(feature, model, "cache_read").inc(usage.cache_read_input_tokens)
        if usage.cache_creation_input_tokens:
            metrics.tokens(feature, model, "cache_write").inc(usage.cache_creation_input_tokens)
        if cost:
            metrics.cost(feature, model).inc(cost)

    def finish(self, trace: Trace, result: Completion | TokenCount | None, error: SidecardError | None) -> None:
        """The request is over: its reply gets its latency, and every sink its record."""
        latency_s = self._clock() - trace.started
        counting = isinstance(trace.request, CountTokens)
        # The model the request named, once admitted (a request refused before its plan is accounted under none).
        named = trace.plan.request.model if trace.plan is not None else None
        gone = named is not None and self.model_ended(named, trace)
        if isinstance(result, TokenCount):
            finished = Finished(trace, None, result, error, latency_s, "ok", _unless(gone, named, result.model), counting)
        elif result is not None:
            result.latency_ms = round(latency_s * 1000, 3)
            result.ttft_ms = trace.ttft_ms
            result.resumed = trace.resumed
            outcome = "degraded" if result.degraded else "ok"
            finished = Finished(trace, result, None, error, latency_s, outcome, _unless(gone, named, result.model) or "none", counting)
        else:
            model = _unless(gone, named, last.model if (last := last_call(trace.attempts)) is not None else named)
            outcome = error.code if error is not None else Code.INTERNAL
            finished = Finished(trace, None, None, error, latency_s, outcome, model if counting else (model or "none"), counting)
        for sink in self.sinks:
            sink(finished)


def _unless(gone: bool, named: str | None, model: str | None) -> str | None:
    """MODEL, or None when it is the named model that holds no slot now (nothing is kept under its name)."""
    return None if gone and model == named else model


# ---------------------------------------------------------------- the engine's own sinks


class RequestMetrics:
    """Requests by outcome, model and feature; their duration; per prompt version; cache lookups."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def __call__(self, finished: Finished) -> None:
        if finished.counting:
            return
        trace, metrics = finished.trace, self.metrics
        if trace.cache_result is not None:
            metrics.cache_requests(trace.cache_result).inc()
        outcome, model = finished.outcome, finished.model
        feature = trace.feature
        metrics.requests(outcome, model, feature).inc()
        metrics.request_seconds(feature).observe(finished.latency_s)
        version = trace.plan.version if trace.plan is not None else None
        if version is not None:
            labels = (version.name, str(version.version))
            metrics.prompt_requests(*labels, outcome).inc()
            metrics.prompt_seconds(*labels).observe(finished.latency_s)


class SpendSettlement:
    """Traffic control turns the request's reservation into what it spent, and corrects its token estimate."""

    def __init__(self, traffic: Traffic) -> None:
        self.traffic = traffic

    def __call__(self, finished: Finished) -> None:
        trace = finished.trace
        if trace.admission is None:
            return
        usage = trace.bill.usage
        used = usage.input_tokens + usage.output_tokens + usage.cache_creation_input_tokens
        self.traffic.settle(trace.admission, cost_usd=trace.bill.cost_usd, tokens_used=used)


class QualitySampling:
    """A fresh answer goes to quality monitoring (in the background); so does one that ended in `bad_output`."""

    def __init__(self, config: QualityConfig, submit: Callable[[Sample], None]) -> None:
        self.config = config
        self.submit = submit

    def __call__(self, finished: Finished) -> None:
        trace = finished.trace
        answer = finished.completion if finished.completion is not None else trace.rejected
        if trace.bill.spent_on is None or answer is None or answer.degraded:
            return
        self.submit(answer_sample(trace, answer, self.config))


def answer_sample(trace: Trace, answer: Completion, config: QualityConfig) -> Sample:
    """An answer as quality checks and the judge take it: the rendered question and system text beside it."""
    plan = trace.plan
    assert plan is not None
    version = plan.version
    system = plan.body.get("system")
    if isinstance(system, list):
        system = "\n".join(b.get("text", "") for b in system if isinstance(b, dict))
    scope = config.scope_for(plan.prompt, trace.feature)
    return Sample(
        feature=trace.feature, model=answer.model, prompt=plan.prompt,
        version=version.version if version is not None else None, canary=plan.canary,
        question=last_user_text(plan.body["messages"]), system=system, answer=answer.text,
        stop_reason=answer.stop_reason, output_problem=trace.output_problem,
        language=scope.language if scope is not None else None, request_id=trace.request_id, route=plan.route_name,
        trace=(marks.trace_id, marks.span_id, marks.flags) if (marks := trace.marks) is not None and marks.sampled else None,
    )


class RequestLog:
    """The one log line of a request (`request`): what it asked, where it went, what came of it and what it cost.
    Never the answer, nor more of the question than a redacted prefix."""

    def __init__(self, log: JsonLog, *, prefix_chars: int, user_salt: bytes) -> None:
        self.log = log
        self.prefix_chars = prefix_chars  # of the question, redacted
        self.user_salt = user_salt

    def __call__(self, finished: Finished) -> None:
        line = self.log.record("request")
        if line is None:
            return
        trace, completion = finished.trace, finished.completion
        request, plan = trace.request, trace.plan
        outcome, model = finished.outcome, finished.model
        latency_ms = completion.latency_ms if completion is not None else round(finished.latency_s * 1000, 3)
        attempts = trace.attempts  # (Structs: the log's encoder writes them as the objects they are)
        route = plan.route_name if plan is not None else None
        line["request_id"] = trace.request_id
        if finished.counting:
            tokens = finished.tokens
            line.update(
                op="count_tokens", feature=trace.feature, model=model, outcome=outcome, latency_ms=latency_ms, route=route,
                input_tokens=tokens.input_tokens if tokens is not None else None, attempts=attempts,
            )
            if trace.upstream_request_id:
                line["upstream_request_id"] = trace.upstream_request_id
            if (trace_id := _trace_id(trace)) is not None:
                line["trace_id"] = trace_id
            self.log.write(line)
            return
        line["feature"] = trace.feature
        if completion is not None:
            served = completion.served_by
            line["upstream_request_id"] = completion.upstream_request_id
            line["model"] = model
            line["served_by"] = f"{served.provider}:{served.model}"
            line["fallback"] = completion.fallback
            line["stop_reason"] = completion.stop_reason
        else:
            line["model"] = model
            if trace.upstream_request_id:
                line["upstream_request_id"] = trace.upstream_request_id
        bill = trace.bill
        line["outcome"] = outcome
        line["latency_ms"] = latency_ms
        line["input_tokens"] = bill.usage.input_tokens
        line["output_tokens"] = bill.usage.output_tokens
        line["cost_usd"] = round(bill.cost_usd, 8)
        line["route"] = route
        line["cache"] = trace.cache_result
        line["attempts"] = attempts
        version = plan.version if plan is not None else None
        if trace.internal:
            line["internal"] = True  # sidecard's own call: feature, prompt and version say which
            if trace.about:
                line.update(trace.about)
        elif version is None or version.name != JUDGE_PROMPT:
            # A judge's prompt quotes the answer under review, and answers are never logged.
            line["prompt_prefix"] = self.log.redactor.prefix(plan.first_text if plan is not None else "", self.prefix_chars)
        if version is not None:
            line["prompt"] = version.name
            line["prompt_version"] = version.version
            line["canary"] = plan.canary  # type: ignore[union-attr]
        if trace.killed_by is not None:
            line["killed_by"] = trace.killed_by
        if request.stream:
            line["stream"] = True
            line["ttft_ms"] = trace.ttft_ms
            line["resumed"] = trace.resumed
        if request.user is not None:
            line["user"] = pseudonym(request.user, self.user_salt)
        if trace.safety is not None:
            line.update(trace.safety.log_fields())  # rule names only, never what they matched
        if (trace_id := _trace_id(trace)) is not None:
            line["trace_id"] = trace_id
        self.log.write(line)


def _trace_id(trace: Trace) -> str | None:
    """The request's trace: its own with tracing on, else the app's (from its traceparent) if it sent one."""
    if trace.marks is not None:
        return trace.marks.trace_id_hex
    parent = parse_traceparent(trace.request.traceparent) if trace.request.traceparent is not None else None
    return parent.trace_id_hex if parent is not None else None


def last_user_text(messages: list[Message]) -> str:
    for message in reversed(messages):
        if message.role != "user":
            continue
        if isinstance(message.content, str):
            return message.content
        return "\n".join(b["text"] for b in message.content if b.get("type") == "text" and isinstance(b.get("text"), str))
    return ""
