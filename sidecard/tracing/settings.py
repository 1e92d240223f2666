"""The `[tracing]` settings: off by default; when on, spans go to an OTLP/HTTP collector."""

from __future__ import annotations

import re
from typing import Annotated, Final
from urllib.parse import urlsplit

import msgspec

_TOKEN: Final = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # an HTTP header name (RFC 9110 token)
_UNSAFE: Final = re.compile(r"[\r\n\0]")


class TracingSettings(msgspec.Struct, forbid_unknown_fields=True, kw_only=True, frozen=True):
    enabled: bool = False
    # The collector's OTLP/HTTP traces URL (its default port is 4318).
    endpoint: str = "http://127.0.0.1:4318/v1/traces"
    # Sent with every export, e.g. {authorization = "Bearer ..."}: treated as secrets, never logged.
    headers: dict[str, str] = {}
    service_name: Annotated[str, msgspec.Meta(min_length=1, max_length=128)] = "sidecard"
    # Share of new traces recorded; a request that arrives with a traceparent follows its sampled flag.
    sample_ratio: Annotated[float, msgspec.Meta(ge=0, le=1)] = 1.0
    # Ended spans waiting for export (about 3 KB each); beyond it the oldest are dropped, so a collector outage
    # costs at most this much memory.
    max_queue_spans: Annotated[int, msgspec.Meta(ge=1, le=1_000_000)] = 4096
    max_batch_spans: Annotated[int, msgspec.Meta(ge=1, le=100_000)] = 512
    # How often the exporter thread sends what has queued (sooner when a full batch is waiting).
    schedule_delay_s: Annotated[float, msgspec.Meta(gt=0, le=3600)] = 2.0
    # One export, its retries included.
    export_timeout_s: Annotated[float, msgspec.Meta(gt=0, le=300)] = 10.0

    def __post_init__(self) -> None:
        parts = urlsplit(self.endpoint)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"tracing.endpoint {self.endpoint!r}: use an http(s) URL, e.g. http://127.0.0.1:4318/v1/traces")
        for name, value in self.headers.items():
            if not _TOKEN.fullmatch(name) or _UNSAFE.search(value):
                raise ValueError(f"tracing.headers: {name!r} is not a valid header (name a token, value without CR, LF or NUL)")
        if self.max_batch_spans > self.max_queue_spans:
            raise ValueError("tracing.max_batch_spans is larger than tracing.max_queue_spans")
