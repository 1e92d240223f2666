"""Tracing: OpenTelemetry spans for every request and attempt, off by default and free when off.

`open_tracer(settings)` gives `OFF` (no spans, no OpenTelemetry import) or the SDK-backed tracer.
"""

from ..config import TracingSettings
from .traceparent import TraceParent, parse as parse_traceparent
from .tracer import NO_SPAN, OFF, Span, Tracer, open_tracer

__all__ = ["NO_SPAN", "OFF", "Span", "TraceParent", "Tracer", "TracingSettings", "open_tracer", "parse_traceparent"]
