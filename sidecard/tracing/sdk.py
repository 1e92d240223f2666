"""The tracer that records: OpenTelemetry SDK spans, a bounded batch processor thread, OTLP/JSON export.

Imported only when `[tracing] enabled = true` (by `tracer.open_tracer`): the SDK adds about 15 ms to start-up.
Resource attributes beyond the service's come from the SDK's standard `OTEL_RESOURCE_ATTRIBUTES`.

The current span is kept in a context variable of ours rather than in OpenTelemetry's global context: Trio
copies context variables into every task it starts, which is exactly the parenting a hedge race needs, and
nothing here depends on another library's notion of "current". (The Anthropic SDK's own span per call stays
off, `open_telemetry=False` on its clients: the attempt span here covers the call with sidecard's view of it.)

The batch processor is the SDK's `BatchSpanProcessor`: ending a span appends it to a bounded deque (the oldest
span is dropped when it is full, with a warning in the log); a worker thread encodes and sends batches, off
the Trio loop. Its CPU is the process's all the same: `bench/tracing.py` measures both.
"""

from __future__ import annotations

from collections.abc import Mapping
from contextvars import ContextVar
from typing import Any, Final

import trio
from opentelemetry import trace as trace_api
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
from opentelemetry.trace import NonRecordingSpan, SpanContext, SpanKind, Status, StatusCode, TraceFlags, TraceState

from .. import __version__
from . import attributes as a
from .otlp import OtlpJsonExporter
from ..config import TracingSettings
from .traceparent import TraceParent
from .tracer import NO_SPAN, AttributeValue, Span, Step, Tracer

_SCOPE: Final = "sidecard"
_STEP_NAMES: Final = {"cache": "sidecard.cache", "render": "sidecard.render", "guardrails": "sidecard.guardrails",
                      "quality": "sidecard.quality"}
_current: ContextVar[_SdkSpan | None] = ContextVar("sidecard_tracing_span", default=None)


class _SdkSpan(Span):
    __slots__ = ("_context", "_failed", "_span", "_token")

    def __init__(self, span: trace_api.Span) -> None:
        self._span = span
        self._context: Any = None  # an OpenTelemetry Context holding this span, made when a child first needs it
        self._token: Any = None
        self._failed = False

    @property
    def recording(self) -> bool:  # type: ignore[override]
        return self._span.is_recording()

    @property
    def trace_id(self) -> str | None:
        return "%032x" % self._span.get_span_context().trace_id

    def traceparent(self) -> str | None:
        context = self._span.get_span_context()
        return "00-%032x-%016x-%02x" % (context.trace_id, context.span_id, context.trace_flags & 0xFF)

    def otel_context(self) -> Any:
        if self._context is None:
            self._context = trace_api.set_span_in_context(self._span)
        return self._context

    def __enter__(self) -> Span:
        self._token = _current.set(self)
        return self

    def __exit__(self, exc_type: object, exc: BaseException | None, tb: object) -> None:
        if exc is not None and not self._failed:
            if isinstance(exc, trio.Cancelled):
                self._span.set_attribute(a.CANCELLED, True)
            else:
                self.fail(type(exc).__name__)
        if self._token is not None:
            try:
                _current.reset(self._token)
            except ValueError:
                pass  # entered in another context (a task that has since gone): nothing of ours to restore here
            self._token = None
        self.end()

    def set(self, key: str, value: AttributeValue | None) -> None:
        if value is not None:
            self._span.set_attribute(key, value)

    def update(self, attributes: Mapping[str, AttributeValue | None]) -> None:
        self._span.set_attributes({k: v for k, v in attributes.items() if v is not None})

    def usage(self, *, input_tokens: int, output_tokens: int, cache_read_tokens: int = 0, cache_write_tokens: int = 0) -> None:
        self._span.set_attributes({
            a.USAGE_INPUT: input_tokens + cache_read_tokens + cache_write_tokens,
            a.USAGE_OUTPUT: output_tokens,
            a.USAGE_CACHE_READ: cache_read_tokens,
            a.USAGE_CACHE_WRITE: cache_write_tokens,
        })

    def fail(self, error_type: str, message: str | None = None) -> None:
        self._failed = True
        self._span.set_attribute(a.ERROR_TYPE, error_type)
        self._span.set_status(Status(StatusCode.ERROR, message))

    def end(self) -> None:
        if self._span.is_recording():
            self._span.end()


def _kept(attributes: dict[str, AttributeValue | None]) -> dict[str, AttributeValue]:
    return {k: v for k, v in attributes.items() if v is not None}


class SdkTracer(Tracer):
    enabled = True

    def __init__(self, settings: TracingSettings, *, exporter: Any = None) -> None:
        """`exporter`: a `SpanExporter` in place of the OTLP/JSON one (tests, benches)."""
        resource = Resource.create({"service.name": settings.service_name, "service.version": __version__})
        self._provider = TracerProvider(
            resource=resource, sampler=ParentBased(TraceIdRatioBased(settings.sample_ratio)),
            shutdown_on_exit=False,  # `aclose` shuts it down, bounded; an exit hook could wait 30 s on a dead collector
        )
        self.exporter = exporter if exporter is not None else OtlpJsonExporter(
            settings.endpoint, headers=settings.headers, timeout_s=settings.export_timeout_s
        )
        self._provider.add_span_processor(BatchSpanProcessor(
            self.exporter,
            max_queue_size=settings.max_queue_spans,
            schedule_delay_millis=settings.schedule_delay_s * 1000,
            max_export_batch_size=settings.max_batch_spans,
            export_timeout_millis=settings.export_timeout_s * 1000,
        ))
        self._tracer = self._provider.get_tracer(_SCOPE, __version__)
        self.started = 0  # recording spans started

    def _start(self, name: str, kind: SpanKind, attributes: dict[str, AttributeValue], context: Any) -> _SdkSpan:
        span = self._tracer.start_span(name, context=context, kind=kind, attributes=attributes)
        if span.is_recording():
            self.started += 1
        return _SdkSpan(span)

    def _parent_context(self, parent: Span | None) -> Any:
        parent = parent if parent is not None else _current.get()
        return parent.otel_context() if isinstance(parent, _SdkSpan) else None

    def request(
        self,
        *,
        model: str,
        face: str,
        operation: str = "chat",
        feature: str | None = None,
        route: str | None = None,
        prompt: str | None = None,
        version: str | None = None,
        user: str | None = None,
        stream: bool = False,
        parent: TraceParent | None = None,
        tracestate: str | None = None,
    ) -> Span:
        context = None
        if parent is not None:
            state = TraceState.from_header([tracestate]) if tracestate else None
            remote = SpanContext(parent.trace_id, parent.span_id, is_remote=True, trace_flags=TraceFlags(parent.flags),
                                 trace_state=state)
            context = trace_api.set_span_in_context(NonRecordingSpan(remote))
        attributes = _kept({
            a.OPERATION: operation, a.REQUEST_MODEL: model, a.FACE: face, a.FEATURE: feature or None,
            a.ROUTE: route or None, a.PROMPT_NAME: prompt, a.PROMPT_VERSION: version, a.USER: user,
            a.REQUEST_STREAM: stream or None,
        })
        return self._start(f"{operation} {model}", SpanKind.SERVER, attributes, context)

    def attempt(
        self,
        *,
        provider: str,
        model: str,
        number: int,
        hedge: bool = False,
        fallback: bool = False,
        retry_reason: str | None = None,
        server: tuple[str, int] | None = None,
        parent: Span | None = None,
    ) -> Span:
        attributes = _kept({
            a.OPERATION: a.CHAT, a.PROVIDER: a.PROVIDERS.get(provider, provider), a.REQUEST_MODEL: model,
            a.TARGET: f"{provider}:{model}", a.ATTEMPT: number, a.HEDGE: hedge or None, a.FALLBACK: fallback or None,
            a.RETRY_REASON: retry_reason,
            a.SERVER_ADDRESS: server[0] if server else None, a.SERVER_PORT: server[1] if server else None,
        })
        return self._start(f"{a.CHAT} {model}", SpanKind.CLIENT, attributes, self._parent_context(parent))

    def step(self, name: Step, attributes: Mapping[str, AttributeValue | None] | None = None, *, parent: Span | None = None) -> Span:
        return self._start(
            _STEP_NAMES[name], SpanKind.INTERNAL, _kept(dict(attributes)) if attributes else {}, self._parent_context(parent)
        )

    def current(self) -> Span:
        span = _current.get()
        return NO_SPAN if span is None else span

    def stats(self) -> dict[str, int]:
        exporter = self.exporter
        return {
            "started": self.started,
            "exported": getattr(exporter, "exported", 0),
            "failed": getattr(exporter, "failed", 0),
            "failed_batches": getattr(exporter, "failed_batches", 0),
        }

    def force_flush(self, timeout_s: float = 10.0) -> bool:
        return self._provider.force_flush(int(timeout_s * 1000))

    async def aclose(self, timeout_s: float = 5.0) -> None:
        with trio.move_on_after(timeout_s, shield=True):
            await trio.to_thread.run_sync(self._shutdown, abandon_on_cancel=True)

    def _shutdown(self) -> None:
        stop = getattr(self.exporter, "stop_retrying", None)
        if stop is not None:
            stop()  # the final export gets one try: the daemon is stopping
        self._provider.shutdown()
