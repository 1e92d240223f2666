"""Tracing off: nothing of tracing loaded; its settings refuse what cannot work."""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap

import msgspec
import pytest

from sidecard.tracing import TracingSettings


def test_with_tracing_off_nothing_of_tracing_is_loaded() -> None:
    """Start-up cost and the no-span promise: the daemon and its engine load neither the span recorder, its
    exporter nor any OpenTelemetry package (with tracing off no `SpanMarks` is made: test_daemon_spans.py)."""
    script = textwrap.dedent("""
        import sys
        import sidecard.daemon, sidecard.engine, sidecard.faces.http, sidecard.faces.ndjson
        loaded = sorted(m for m in sys.modules if m.startswith(("opentelemetry", "sidecard.tracing.recorder",
                                                                "sidecard.tracing.otlp", "sidecard.engine.spans")))
        print(loaded)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.parametrize(
    "raw, problem",
    [
        ({"endpoint": "localhost:4318"}, "use an http(s) URL"),
        ({"headers": {"bad name": "x"}}, "not a valid header"),
        ({"headers": {"x-key": "a\r\nb"}}, "not a valid header"),
        ({"max_queue_spans": 10, "max_batch_spans": 20}, "larger than tracing.max_queue_spans"),
        ({"sample_ratio": 1.5}, "<= 1"),
        ({"exporter": "zipkin"}, "unknown field"),
    ],
)
def test_settings_refuse_what_cannot_work(raw: dict[str, object], problem: str) -> None:
    with pytest.raises(msgspec.ValidationError, match=re.escape(problem)):
        msgspec.convert(raw, TracingSettings)


def test_settings_defaults_are_off_and_local() -> None:
    settings = msgspec.convert({}, TracingSettings)
    assert not settings.enabled and settings.endpoint == "http://127.0.0.1:4318/v1/traces"
