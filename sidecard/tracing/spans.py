"""Spans recorded after the fact: a request's marks as it goes, its spans built once it is over.

Why not live OpenTelemetry SDK spans: one costs about 30-40 µs of CPU to start, set and end (validation, locks,
a copy into a `ReadableSpan`, its batch processor), so a request with its attempts and steps paid about 195 µs
against the 100 µs tracing may cost. A request already records what tracing needs (its attempts with their
outcomes, its usage, cost and outcome in the `Finished` record), so the engine only adds a few clock readings
(`SpanMarks`, made only with tracing on), an accounting sink turns the finished record into plain `SpanData`
tuples in one go (`engine/spans.py`), and the exporter thread (`recorder.py`) writes them as OTLP/JSON bytes.
Measured on the real path (`bench/observe_cost.py`): about 50 µs of daemon CPU per traced request, the
exporter thread's included. Context needs no propagation across Trio tasks: the hedge racers append their
marks to the one `Trace` they share, and the spans are parented when they are built.

Ids are drawn from an injected `random.Random` (W3C: random trace ids; a sampler of ours, `sample_ratio`, or
the app's sampled flag when it sent a `traceparent`, as the SDK's `ParentBased` sampler does).
"""

from __future__ import annotations

import random
from typing import Any, NamedTuple

import msgspec

from .traceparent import SAMPLED, parse

SERVER, CLIENT, INTERNAL = 2, 3, 1  # OTLP span kinds


class SpanMarks(msgspec.Struct, gc=False):  # (holds numbers only)
    """A traced request's ids and the times the engine noted on its way (engine clock, seconds)."""

    trace_id: int
    span_id: int  # the request span's
    parent_id: int = 0  # the app's span, from its traceparent (0: none)
    flags: int = 0  # W3C trace flags: bit 0 is "sampled" (spans are exported)
    planned: float = 0.0  # the plan (and a prompt's render) done
    looked_up: float = 0.0  # the response cache looked in
    guarded: bool = False  # the output guardrails checked the whole answer,
    guard_from: float = 0.0  # from their first check
    guard_to: float = 0.0  # to their decision
    # Per upstream attempt: (its index in Trace.attempts, queued, started, ended, hedge).
    attempts: list[tuple[int, float, float, float, bool]] = msgspec.field(default_factory=list)

    @property
    def trace_id_hex(self) -> str:
        return "%032x" % self.trace_id

    @property
    def sampled(self) -> bool:
        return bool(self.flags & SAMPLED)


class SpanData(NamedTuple):
    """One ended span, as the exporter encodes it."""

    trace_id: int
    span_id: int
    parent_id: int  # 0: a root span
    name: str
    kind: int
    start_ns: int
    end_ns: int
    attributes: dict[str, Any]
    error: bool = False
    remote_parent: bool = False


class Ids:
    """Trace and span ids, and the sampling decision of a new trace."""

    def __init__(self, sample_ratio: float, rng: random.Random | None = None) -> None:
        self._rng = rng or random.Random()
        self._ratio = sample_ratio

    def span_id(self) -> int:
        return self._rng.getrandbits(64) or 1

    def begin(self, traceparent: str | None) -> SpanMarks:
        """A request's marks: the app's trace continued when its traceparent is valid, else a new trace."""
        parent = parse(traceparent) if traceparent is not None else None
        if parent is not None:
            return SpanMarks(parent.trace_id, self.span_id(), parent.span_id, parent.flags & 0xFF)
        rng = self._rng
        sampled = self._ratio >= 1.0 or rng.random() < self._ratio
        return SpanMarks(rng.getrandbits(128) or 1, self.span_id(), 0, SAMPLED if sampled else 0)
