"""Tracing off: no span objects, no OpenTelemetry SDK, nothing but a few method calls on one shared object."""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap

import msgspec
import pytest

from sidecard.tracing import NO_SPAN, OFF, TracingSettings, open_tracer, parse_traceparent
from sidecard.tracing import attributes as a


async def test_every_helper_hands_out_the_one_shared_no_span() -> None:
    tracer = open_tracer(TracingSettings())
    assert tracer is OFF and not tracer.enabled
    parent = parse_traceparent("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
    with tracer.request(model="m", face="ndjson", feature="f", parent=parent) as request:
        assert request is NO_SPAN and tracer.current() is NO_SPAN
        with tracer.step("cache", {a.CACHE: "hit"}) as step, tracer.attempt(provider="anthropic", model="m", number=1) as attempt:
            assert step is attempt is NO_SPAN
            attempt.usage(input_tokens=1, output_tokens=2)
            attempt.fail("overloaded_error")
        request.update({a.OUTCOME: "ok"})
        request.set(a.COST_USD, 0.1)
    assert request.trace_id is None and request.traceparent() is None and not request.recording
    assert tracer.force_flush() and tracer.stats()["started"] == 0
    await tracer.aclose()


def test_with_tracing_off_the_sdk_is_never_imported() -> None:
    """Start-up cost and the no-span promise: a request's worth of calls leaves the SDK unloaded."""
    script = textwrap.dedent("""
        import sys
        from sidecard.tracing import TracingSettings, open_tracer
        tracer = open_tracer(TracingSettings())
        with tracer.request(model="m", face="http") as span:
            with tracer.attempt(provider="anthropic", model="m", number=1):
                pass
        loaded = sorted(m for m in sys.modules if m.startswith(("opentelemetry.sdk", "sidecard.tracing.sdk", "sidecard.tracing.otlp")))
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
