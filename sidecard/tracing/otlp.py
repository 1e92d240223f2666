"""Encoded spans to an OTLP/HTTP collector: the exporter thread's transport (`recorder.py` encodes).

Why our own and not the SDK's `opentelemetry-exporter-otlp-proto-http`: it brings `requests` and `protobuf`
(about 130 ms more import at daemon start, on top of the SDK's 20 ms) and encodes span by span through Python
protobuf objects. OTLP/JSON is part of the OTLP specification, and every collector's OTLP/HTTP receiver takes it
on the same `/v1/traces`.

Transport: stdlib `http.client`, one keep-alive connection owned by the exporter thread (the project's Trio pool
lives on the event loop; reaching it from this thread would tie every export, and the final flush at shutdown,
to the loop's liveness). An export retries what OTLP says to retry (429, 502, 503, 504, connection failures),
honouring `Retry-After`, with jittered exponential backoff, all within `export_timeout_s`.
"""

from __future__ import annotations

import http.client
import random
import threading
import time
from collections.abc import Mapping
from typing import Final
from urllib.parse import urlsplit

from .. import __version__
from ..policies.retry import Backoff

RETRYABLE: Final = frozenset({429, 502, 503, 504})
_BACKOFF: Final = Backoff(base_s=0.5, cap_s=5.0)


class OtlpJsonExporter:
    """POSTs encoded batches to `endpoint` (`send`); counts what it exported and what it gave up on."""

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
