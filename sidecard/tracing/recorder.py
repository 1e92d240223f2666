"""The daemon's span pipeline: ended spans on a bounded queue, exported as OTLP/JSON by a thread of its own.

`submit` is all the request path does: it appends a request's spans to a deque, or, when the queue is full,
drops them and counts them (`dropped`): a collector that is slow or down costs memory up to
`max_queue_spans` and never a request's time. The exporter thread wakes every `schedule_delay_s` (or when a
full batch waits), encodes batches with msgspec and POSTs them (`otlp.OtlpJsonExporter.send`: keep-alive,
OTLP's retries within `export_timeout_s`). `flush` exports what has queued in the caller's thread (tests, and
the last export at shutdown, which gets one try).

Imported only when `[tracing] enabled = true`.
"""

from __future__ import annotations

import base64
import math
import random
import threading
from collections import deque
from collections.abc import Sequence
from typing import Any, Final

import msgspec
import trio

from .. import __version__
from ..config import TracingSettings
from . import attributes as a
from .otlp import OtlpJsonExporter
from .spans import Ids, SpanData

_encoder: Final = msgspec.json.Encoder()
_SCOPE: Final = _encoder.encode({"name": "sidecard", "version": __version__})
_HAS_IS_REMOTE: Final = 0x100  # OTLP Span.flags: whether the parent is remote is known ...
_IS_REMOTE: Final = 0x200  # ... and it is


_json: Final = _encoder.encode
_KEYS: dict[str, bytes] = {}  # an attribute's `{"key":...,"value":` prefix, encoded once per name
_PAIRS: dict[tuple[str, Any], bytes] = {}  # a whole pair, for the attributes whose values repeat
REPEATING: Final = frozenset({
    a.OPERATION, a.PROVIDER, a.REQUEST_MODEL, a.RESPONSE_MODEL, a.FACE, a.FEATURE, a.ROUTE, a.PROMPT_NAME,
    a.PROMPT_VERSION, a.CACHE, a.OUTCOME, a.TARGET, a.ATTEMPT, a.HEDGE, a.FALLBACK, a.CANCELLED, a.RETRY_REASON,
    a.ERROR_TYPE, a.REQUEST_STREAM, a.RESPONSE_FINISH_REASONS,
})


def _value(value: Any) -> bytes:
    kind = type(value)
    if kind is str:
        return b'{"stringValue":%s}' % _json(value)
    if kind is bool:
        return b'{"boolValue":true}' if value else b'{"boolValue":false}'
    if kind is int:
        return b'{"intValue":"%d"}' % value
    if kind is float:  # proto3 JSON spells the non-finite doubles out
        return b'{"doubleValue":%s}' % (_json(value) if math.isfinite(value) else b'"NaN"' if math.isnan(value)
                                        else b'"Infinity"' if value > 0 else b'"-Infinity"')
    if kind is list or kind is tuple:
        return b'{"arrayValue":{"values":[%s]}}' % b",".join(_value(v) for v in value)
    if kind is bytes:
        return b'{"bytesValue":"%s"}' % base64.b64encode(value)
    return b'{"stringValue":%s}' % _json(str(value))


def encode_attributes_json(attributes: dict[str, Any]) -> bytes:
    """OTLP/JSON `KeyValue`s as a JSON array, written directly: a whole pair is encoded once when its value is
    one of the few that repeat (a model, a feature, an outcome), else its name's prefix is."""
    parts = []
    for key, value in attributes.items():
        cached = key in REPEATING and type(value) is not list  # (a tuple is hashable, a list is not)
        encoded = _PAIRS.get((key, value)) if cached else None
        if encoded is None:
            prefix = _KEYS.get(key)
            if prefix is None:
                prefix = b'{"key":%s,"value":' % _json(key)
                if len(_KEYS) < 1024:  # the names are ours, a fixed few
                    _KEYS[key] = prefix
            encoded = prefix + _value(value) + b"}"
            if cached and len(_PAIRS) < 8192:
                _PAIRS[key, value] = encoded
        parts.append(encoded)
    return b"[" + b",".join(parts) + b"]"


def _span(span: SpanData) -> bytes:
    flags = 0x01 | _HAS_IS_REMOTE | (_IS_REMOTE if span.remote_parent else 0)
    return b'{"traceId":"%032x","spanId":"%016x",%s"name":%s,"kind":%d,"startTimeUnixNano":"%d","endTimeUnixNano":"%d","attributes":%s,"flags":%d%s}' % (
        span.trace_id, span.span_id, b'"parentSpanId":"%016x",' % span.parent_id if span.parent_id else b"", _json(span.name),
        span.kind, span.start_ns, span.end_ns, encode_attributes_json(span.attributes), flags,
        b',"status":{"code":2}' if span.error else b"",
    )


def encode(spans: Sequence[SpanData], resource: bytes) -> bytes:
    """An `ExportTraceServiceRequest` as OTLP/JSON: one resource, one scope."""
    return b'{"resourceSpans":[{"resource":{"attributes":%s},"scopeSpans":[{"scope":%s,"spans":[%s]}]}]}' % (
        resource, _SCOPE, b",".join(_span(span) for span in spans),
    )


class Recorder:
    def __init__(self, settings: TracingSettings, *, exporter: Any = None, rng: random.Random | None = None) -> None:
        """`exporter`: anything with `send(body, count) -> bool` in place of the OTLP/HTTP one (benches)."""
        self.ids = Ids(settings.sample_ratio, rng)
        self.exporter = exporter if exporter is not None else OtlpJsonExporter(
            settings.endpoint, headers=settings.headers, timeout_s=settings.export_timeout_s
        )
        self._resource = encode_attributes_json({"service.name": settings.service_name, "service.version": __version__})
        self._queue: deque[SpanData] = deque()
        self._max_queue = settings.max_queue_spans
        self._batch = settings.max_batch_spans
        self._delay_s = settings.schedule_delay_s
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._sending = threading.Lock()  # one export at a time on the one connection
        self._thread: threading.Thread | None = None
        self.recorded = 0  # spans queued
        self.dropped = 0  # spans lost to a full queue

    def submit(self, spans: list[SpanData]) -> None:
        """A request's spans (never blocks, never raises)."""
        queue = self._queue
        if len(queue) + len(spans) > self._max_queue:
            self.dropped += len(spans)
            return
        queue.extend(spans)
        self.recorded += len(spans)
        if len(queue) >= self._batch:
            self._wake.set()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="sidecard-spans", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stopping.is_set():
            self._wake.wait(self._delay_s)
            self._wake.clear()
            self.flush()

    def flush(self) -> None:
        """Export everything queued now (blocking)."""
        queue = self._queue
        with self._sending:
            while queue:
                batch = [queue.popleft() for _ in range(min(len(queue), self._batch))]
                self.exporter.send(encode(batch, self._resource), len(batch))

    def counts(self) -> dict[str, int]:
        """For the metric `sidecard_tracing_spans_total{result}`."""
        exporter = self.exporter
        return {"recorded": self.recorded, "dropped": self.dropped, "exported": getattr(exporter, "exported", 0),
                "failed": getattr(exporter, "failed", 0)}

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The exporter thread for as long as this task runs; then the last export (bounded)."""
        self.start()
        task_status.started()
        try:
            await trio.sleep_forever()
        finally:
            await self.aclose()

    async def aclose(self, timeout_s: float = 5.0) -> None:
        """Stop the thread; what is left gets one export attempt, bounded by `timeout_s`, shielded."""
        self._stopping.set()
        stop = getattr(self.exporter, "stop_retrying", None)
        if stop is not None:
            stop()
        self._wake.set()
        thread = self._thread

        def finish() -> None:
            if thread is not None:
                thread.join()
            self.flush()
            close = getattr(self.exporter, "shutdown", None)
            if close is not None:
                close()

        with trio.move_on_after(timeout_s, shield=True):
            await trio.to_thread.run_sync(finish, abandon_on_cancel=True)
