"""The W3C `traceparent` header (Trace Context, https://www.w3.org/TR/trace-context/#traceparent-header).

`version-traceid-parentid-flags` in lowercase hex: `00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01`.
A trace or parent id of all zeros is invalid, so is version `ff`; version 00 has exactly four fields, a later
version may append more after a `-` (we read the first four, as the spec asks). Surrounding blanks are allowed
(HTTP trims them anyway).

One parser for both modes: with tracing off it only tells the log line which trace a request belongs to; with
tracing on the same result becomes the parent of the request's span. It agrees with the SDK's
`TraceContextTextMapPropagator` (a property test holds it to that) at a fraction of the cost.
"""

from __future__ import annotations

import re
from typing import Final, NamedTuple

_HEADER: Final = re.compile(r"[ \t]*([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(?:(-.*)|[ \t]*)")
SAMPLED: Final = 0x01
MAX_LENGTH: Final = 512  # a header longer than this is not worth a regex run


class TraceParent(NamedTuple):
    trace_id: int  # 128 bits, never 0
    span_id: int  # the caller's span: 64 bits, never 0
    flags: int  # trace-flags; bit 0 is "sampled"

    @property
    def sampled(self) -> bool:
        return bool(self.flags & SAMPLED)

    @property
    def trace_id_hex(self) -> str:
        return "%032x" % self.trace_id

    def header(self) -> str:
        """As a version-00 header value."""
        return "00-%032x-%016x-%02x" % (self.trace_id, self.span_id, self.flags & 0xFF)


def parse(value: object) -> TraceParent | None:
    """The header's trace context, or None when it is absent or invalid (then a request starts a new trace)."""
    if not isinstance(value, str) or len(value) > MAX_LENGTH:
        return None
    match = _HEADER.fullmatch(value)
    if match is None:
        return None
    version, trace_id, span_id, flags, rest = match.groups()
    if version == "ff" or (version == "00" and rest is not None):
        return None
    trace, span = int(trace_id, 16), int(span_id, 16)
    if not trace or not span:
        return None
    return TraceParent(trace, span, int(flags, 16))
