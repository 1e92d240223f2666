"""Tracing: spans for every request and attempt to an OTLP/HTTP collector, off by default and free when off.

`spans.py` holds what the engine notes on a traced request (`SpanMarks`) and the spans' plain form
(`SpanData`); `recorder.py` queues and exports them (imported only with tracing on); `otlp.py` is the HTTP
transport; `traceparent.py` reads the W3C header; `attributes.py` names the attributes.
"""

from ..config import TracingSettings
from .traceparent import TraceParent, parse as parse_traceparent

__all__ = ["TraceParent", "TracingSettings", "parse_traceparent"]
