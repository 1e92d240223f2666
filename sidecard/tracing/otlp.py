"""Spans to an OTLP/HTTP collector as OTLP/JSON: the SDK's `SpanExporter`, run by its batch processor's thread.

Why not the SDK's own `opentelemetry-exporter-otlp-proto-http`: it brings `requests` and `protobuf` (about 130 ms
more import on top of the SDK's 20 ms, at daemon start) and encodes a span field by field through Python
protobuf objects (about 20 us per span, against about 5 us here with msgspec); see `bench/tracing.py`. OTLP/JSON
is part of the OTLP specification and every collector's OTLP/HTTP receiver takes it on the same `/v1/traces`.

The JSON follows the protobuf JSON mapping with OTLP's deviations (opentelemetry-proto `docs/specification.md`,
"JSON Protobuf Encoding"): trace and span ids are hex strings, enums are integers, field names lowerCamelCase;
64-bit integers are strings, as proto3 JSON writes them.

Transport: stdlib `http.client`, one keep-alive connection owned by the exporter thread (the project's Trio pool
lives on the event loop; reaching it from this thread would tie every export, and the final flush at shutdown,
to the loop's liveness). An export retries what OTLP says to retry (429, 502, 503, 504, connection failures),
honouring `Retry-After`, with jittered exponential backoff, all within `export_timeout_s`.
"""

from __future__ import annotations

import base64
import http.client
import math
import random
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Final
from urllib.parse import urlsplit

import msgspec
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

from .. import __version__
from ..policies.retry import Backoff

RETRYABLE: Final = frozenset({429, 502, 503, 504})
_BACKOFF: Final = Backoff(base_s=0.5, cap_s=5.0)
_encoder: Final = msgspec.json.Encoder()
# OTLP Span.flags: bits 0-7 the W3C trace flags, bit 8 "whether the parent is remote is known", bit 9 "it is".
_HAS_IS_REMOTE: Final = 0x100
_IS_REMOTE: Final = 0x200


def _double(value: float) -> dict[str, Any]:
    if math.isfinite(value):
        return {"doubleValue": value}
    return {"doubleValue": "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")}


def _array(values: Sequence[Any]) -> dict[str, Any]:
    return {"arrayValue": {"values": [any_value(v) for v in values]}}


_VALUE: Final[dict[type, Callable[[Any], dict[str, Any]]]] = {
    str: lambda v: {"stringValue": v},
    bool: lambda v: {"boolValue": v},
    int: lambda v: {"intValue": str(v)},
    float: _double,
    bytes: lambda v: {"bytesValue": base64.b64encode(v).decode("ascii")},
    tuple: _array,
    list: _array,
}


def any_value(value: Any) -> dict[str, Any]:
    kind = type(value)
    if kind is str:  # the common case first, without a call
        return {"stringValue": value}
    encode = _VALUE.get(kind)
    return encode(value) if encode is not None else {"stringValue": str(value)}


def encode_attributes(attributes: Mapping[str, Any] | None) -> list[dict[str, Any]]:
    if not attributes:
        return []
    return [{"key": key, "value": any_value(value)} for key, value in attributes.items()]


def _span(span: ReadableSpan) -> dict[str, Any]:
    context = span.context
    parent = span.parent
    out: dict[str, Any] = {
        "traceId": "%032x" % context.trace_id,
        "spanId": "%016x" % context.span_id,
        "name": span.name,
        "kind": span.kind.value + 1,  # the SDK's SpanKind counts from INTERNAL = 0; OTLP's from UNSPECIFIED = 0
        "startTimeUnixNano": str(span.start_time),
        "endTimeUnixNano": str(span.end_time),
        "attributes": encode_attributes(span.attributes),
        "flags": (context.trace_flags & 0xFF) | _HAS_IS_REMOTE | (_IS_REMOTE if parent is not None and parent.is_remote else 0),
    }
    if parent is not None:
        out["parentSpanId"] = "%016x" % parent.span_id
    if context.trace_state:
        out["traceState"] = context.trace_state.to_header()
    status = span.status
    if status.status_code.value:  # UNSET (0) is the default: left out
        out["status"] = {"code": status.status_code.value, **({"message": status.description} if status.description else {})}
    if span.events:
        out["events"] = [
            {"timeUnixNano": str(event.timestamp), "name": event.name, "attributes": encode_attributes(event.attributes)}
            for event in span.events
        ]
    if span.links:
        out["links"] = [
            {"traceId": "%032x" % link.context.trace_id, "spanId": "%016x" % link.context.span_id,
             "attributes": encode_attributes(link.attributes)}
            for link in span.links
        ]
    if span.dropped_attributes:
        out["droppedAttributesCount"] = span.dropped_attributes
    if span.dropped_events:
        out["droppedEventsCount"] = span.dropped_events
    if span.dropped_links:
        out["droppedLinksCount"] = span.dropped_links
    return out


def encode(spans: Sequence[ReadableSpan]) -> bytes:
    """An `ExportTraceServiceRequest` as OTLP/JSON: spans grouped by resource, then by instrumentation scope."""
    resources: dict[int, tuple[Any, dict[tuple[str, str], list[dict[str, Any]]]]] = {}
    for span in spans:
        resource = span.resource
        _, scopes = resources.setdefault(id(resource), (resource, {}))
        scope = span.instrumentation_scope
        key = (scope.name, scope.version or "") if scope is not None else ("", "")
        scopes.setdefault(key, []).append(_span(span))
    return _encoder.encode({
        "resourceSpans": [
            {
                "resource": {"attributes": encode_attributes(resource.attributes)},
                "scopeSpans": [
                    {"scope": {"name": name, "version": version}, "spans": encoded}
                    for (name, version), encoded in scopes.items()
                ],
            }
            for resource, scopes in resources.values()
        ]
    })


class OtlpJsonExporter(SpanExporter):
    """POSTs batches to `endpoint`; counts what it exported and what it gave up on."""

    def __init__(
        self, endpoint: str, *, headers: Mapping[str, str] | None = None, timeout_s: float = 10.0,
        backoff: Backoff = _BACKOFF, rng: random.Random | None = None,
    ) -> None:
        parts = urlsplit(endpoint)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {endpoint!r}")
        self._https = parts.scheme == "https"
        self._host = parts.hostname
        self._port = parts.port or (443 if self._https else 80)
        self._target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        self._headers = {
            "Content-Type": "application/json",
            "User-Agent": f"sidecard/{__version__}",
            **(headers or {}),
        }
        self._timeout_s = timeout_s
        self._backoff = backoff
        self._rng = rng or random.Random()
        self._conn: http.client.HTTPConnection | None = None
        self._stopping = threading.Event()  # interrupts a backoff wait at shutdown
        self.exported = 0  # spans the collector accepted
        self.failed = 0  # spans given up on (the collector refused them, or stayed unreachable)
        self.failed_batches = 0
        self.last_error: str | None = None  # never holds a header value: those may be credentials

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        if not spans:
            return SpanExportResult.SUCCESS
        return SpanExportResult.SUCCESS if self.send(encode(spans), len(spans)) else SpanExportResult.FAILURE

    def send(self, body: bytes, count: int) -> bool:
        """POST one encoded batch of `count` spans, retrying what OTLP says to retry; True when accepted."""
        deadline = time.monotonic() + self._timeout_s
        retry = 0
        while True:
            status, retry_after, error = self._post(body, max(deadline - time.monotonic(), 0.001))
            if status is not None and 200 <= status < 300:
                self.exported += count
                self.last_error = None
                return True
            self.last_error = error or f"the collector answered {status}"
            if status is not None and status not in RETRYABLE:
                break
            retry += 1
            delay = retry_after if retry_after is not None else self._backoff.delay(min(retry, 16), self._rng)
            if self._stopping.is_set() or time.monotonic() + delay >= deadline or self._stopping.wait(delay):
                break
        self.failed += count
        self.failed_batches += 1
        return False

    def _post(self, body: bytes, remaining: float) -> tuple[int | None, float | None, str | None]:
        """(status, retry-after seconds, None), or (None, None, what went wrong) when no answer came."""
        try:
            conn = self._connection(remaining)
            conn.request("POST", self._target, body=body, headers=self._headers)
            response = conn.getresponse()
            response.read()  # the whole answer, so the connection can carry the next batch
        except (OSError, http.client.HTTPException) as exc:
            self._close()
            return None, None, f"could not reach the collector: {type(exc).__name__}"
        if response.will_close:
            self._close()
        return response.status, _retry_after(response.getheader("retry-after")), None

    def _connection(self, timeout_s: float) -> http.client.HTTPConnection:
        conn = self._conn
        if conn is None:
            cls = http.client.HTTPSConnection if self._https else http.client.HTTPConnection
            conn = self._conn = cls(self._host, self._port, timeout=timeout_s)
        else:
            conn.timeout = timeout_s
            if conn.sock is not None:
                conn.sock.settimeout(timeout_s)
        return conn

    def _close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return True

    def stop_retrying(self) -> None:
        """From now on an export gets one try (at shutdown: the last flush must not hold the daemon up)."""
        self._stopping.set()

    def shutdown(self) -> None:
        self._stopping.set()
        self._close()


def _retry_after(value: str | None) -> float | None:
    """`Retry-After` in seconds (the date form is not worth parsing here: backoff applies instead)."""
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        return None
    return seconds if 0 <= seconds < 3600 else None
