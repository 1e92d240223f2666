"""The tracing facade the engine and the faces call: with tracing off, nothing at all.

`OFF` (the tracer when `[tracing] enabled = false`) hands out one shared `NO_SPAN` whose every method does
nothing: no span object is created, no OpenTelemetry module is imported, and a request pays a few method calls.
`open_tracer` imports the SDK-backed tracer (`tracing.sdk`) only when tracing is on.

Spans nest by task context: a span entered with `with` is the parent of the spans started in that task, and in
the tasks it starts (Trio gives each new task a copy of its spawner's context), so the attempts of a hedge
race, started in a nursery inside the request's span, are its children. Work that runs elsewhere (the quality
judge, in its own task) passes `parent=` instead.

    with tracer.request(model=..., face="ndjson", feature=..., parent=traceparent.parse(frame.traceparent)) as span:
        with tracer.step("cache"):
            ...
        with tracer.attempt(provider="anthropic", model=..., number=1) as attempt:
            ...
            attempt.usage(input_tokens=..., output_tokens=...)
        span.set(attributes.OUTCOME, "ok")
    log.info("request", trace_id=span.trace_id, ...)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Literal, Union

if TYPE_CHECKING:
    from ..config import TracingSettings
    from .traceparent import TraceParent

AttributeValue = Union[str, bool, int, float, Sequence[str], Sequence[int], Sequence[float], Sequence[bool]]
Step = Literal["cache", "render", "guardrails", "quality"]


class Span:
    """A span; this base class is the span that is not there (tracing off, or nothing to record)."""

    __slots__ = ()

    recording = False

    @property
    def trace_id(self) -> str | None:
        """The trace's id (32 hex digits) for the log line and the reply; None with tracing off."""
        return None

    def traceparent(self) -> str | None:
        """This span as a `traceparent` value (e.g. for a `traceresponse` header); None with tracing off."""
        return None

    def __enter__(self) -> Span:
        return self

    def __exit__(self, exc_type: object, exc: BaseException | None, tb: object) -> None:
        return None

    def set(self, key: str, value: AttributeValue | None) -> None:
        """Set one attribute; None sets nothing."""

    def update(self, attributes: Mapping[str, AttributeValue | None]) -> None:
        """Set several attributes; None values set nothing."""

    def usage(self, *, input_tokens: int, output_tokens: int, cache_read_tokens: int = 0, cache_write_tokens: int = 0) -> None:
        """Token counts as Anthropic reports them; recorded the GenAI conventions' way (input includes cached)."""

    def fail(self, error_type: str, message: str | None = None) -> None:
        """Mark the span failed: `error.type` (an error code, or an exception's class) and status ERROR.
        `message` must be safe to export (no user text)."""

    def end(self) -> None:
        """End the span now (`with` ends it on exit; ending twice is harmless)."""


NO_SPAN = Span()


class Tracer:
    """The tracer with tracing off (`OFF`); `tracing.sdk.SdkTracer` is the one that records."""

    enabled = False

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
        """The span of one request, from the face's point of view (kind SERVER), the child of `parent` (the
        app's `traceparent`) if given. `user` is the pseudonym the log line uses, never the raw key. With
        tracing off the log line can still name the app's trace: `span.trace_id or (parent and parent.trace_id_hex)`."""
        return NO_SPAN

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
        """The span of one upstream attempt (kind CLIENT), a child of the current span (or `parent`)."""
        return NO_SPAN

    def step(self, name: Step, attributes: Mapping[str, AttributeValue | None] | None = None, *, parent: Span | None = None) -> Span:
        """An internal step of a request: `sidecard.cache`, `sidecard.render` (prompt), `sidecard.guardrails`,
        `sidecard.quality`; a child of the current span (or `parent`)."""
        return NO_SPAN

    def current(self) -> Span:
        """The span entered last in this task (or the task that started it); NO_SPAN if none."""
        return NO_SPAN

    def stats(self) -> dict[str, int]:
        """Counters for metrics: spans started, exported and lost to failed exports; batches that failed."""
        return {"started": 0, "exported": 0, "failed": 0, "failed_batches": 0}

    def force_flush(self, timeout_s: float = 10.0) -> bool:
        """Export what has queued now (blocking: from Trio, run it in a thread). True when done in time."""
        return True

    async def aclose(self, timeout_s: float = 5.0) -> None:
        """Export what is left and stop; bounded by `timeout_s`, shielded."""


OFF = Tracer()


def open_tracer(settings: TracingSettings) -> Tracer:
    """`OFF` when tracing is disabled; else a tracer that exports to the collector (imports the SDK now)."""
    if not settings.enabled:
        return OFF
    from .sdk import SdkTracer

    return SdkTracer(settings)
