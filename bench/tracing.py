"""Tracing's cost, in-process: CPU per request with tracing off and on, CPU per span encoded, import time.

    .venv/bin/python bench/tracing.py [--requests N] [--rounds R]

Per request: 32 Trio tasks run the spans of a typical request (the request span, a cache step, a render step,
two attempts, usage and outcome: five spans) with a checkpoint where the real one would wait, N requests in
all. CPU is `time.process_time()` (every thread: the exporter's included) over the run plus a flush, minus the
same run without tracing calls. Variants, alternated over R rounds (the median is shown):

  off        tracing disabled (the daemon's default)
  sampled-0  on, sample_ratio = 0, requests without a traceparent: spans are created but not recorded
  sdk-only   on, spans handed to an exporter that drops them (the SDK's own cost)
  otlp-json  on, OTLP/JSON over HTTP to a collector stand-in in another process (the whole pipeline)
  minimal    for reference, not shipped: the same spans as bare slotted objects in a bounded deque (what span
             bookkeeping itself costs in Python, without the SDK's validation, locks and copies)

Per span: encoding one batch of 512 spans with our OTLP/JSON encoder, and with the SDK's protobuf encoder
(the `opentelemetry-exporter-otlp-proto-http` path) when that package is installed.

Import: the tracing layer's import time in a fresh interpreter that already has the daemon loaded (min of 5).
"""

from __future__ import annotations

import argparse
import functools
import random
import statistics
import subprocess
import sys
import time
from collections import deque
from contextvars import ContextVar
from typing import Any

import trio

from sidecard.httpserver import HttpRequest, Responder, serve_tcp_http
from sidecard.tracing import OFF, TracingSettings, attributes as a, open_tracer, parse_traceparent

CONCURRENCY = 32
MODEL = "claude-sonnet-4-6"
APP = parse_traceparent("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")


# ------------------------------------------------------------ a collector stand-in (subprocess)

async def _answer(request: HttpRequest, responder: Responder) -> None:
    await responder.send(200, [("content-type", "application/json")], b"{}")


async def _serve() -> None:
    async with trio.open_nursery() as nursery:
        _, port = await nursery.start(functools.partial(serve_tcp_http, _answer, "127.0.0.1", 0))
        print(port, flush=True)


# ------------------------------------------------------------ the request shape

SPANS = 5


async def _request(tracer: Any, parent: Any = APP) -> None:
    with tracer.request(model=MODEL, face="ndjson", feature="search", route="default", prompt="summarize", version="v3",
                        user="ab12cd34ef56ab78", parent=parent) as request:
        with tracer.step("cache", {a.CACHE: "miss"}):
            pass
        with tracer.step("render"):
            pass
        for number in (1, 2):
            with tracer.attempt(provider="anthropic", model=MODEL, number=number, retry_reason="overloaded_error" if number > 1 else None) as attempt:
                attempt.set(a.QUEUE_WAIT_S, 0.0)
                await trio.lowlevel.checkpoint()  # the upstream call
                if number == 1:
                    attempt.set(a.HTTP_STATUS, 529)
                    attempt.fail("overloaded_error")
                else:
                    attempt.usage(input_tokens=1200, output_tokens=300, cache_read_tokens=1000)
        request.update({a.OUTCOME: "ok", a.COST_USD: 0.0123, a.CACHE: "miss"})
        request.usage(input_tokens=1200, output_tokens=300, cache_read_tokens=1000)


async def _bare() -> None:
    for _ in (1, 2):
        await trio.lowlevel.checkpoint()


async def _drive(n: int, one: Any) -> None:
    async def worker(count: int) -> None:
        for _ in range(count):
            await one()

    async with trio.open_nursery() as nursery:
        for i in range(CONCURRENCY):
            nursery.start_soon(worker, n // CONCURRENCY + (i < n % CONCURRENCY))


def _cpu_us(n: int, tracer: Any, parent: Any = APP) -> float:
    """CPU per request over the run and a flush (which waits for the exporter thread)."""
    one = _bare if tracer is None else functools.partial(_request, tracer, parent)
    start = time.process_time()
    trio.run(_drive, n, one)
    if tracer is not None:
        tracer.force_flush()
    return (time.process_time() - start) / n * 1e6


class _Drop:
    def export(self, spans: Any) -> Any:
        from opentelemetry.sdk.trace.export import SpanExportResult

        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        pass

    def force_flush(self, timeout_millis: int = 0) -> bool:
        return True


class _MinimalSpan:
    __slots__ = ("attributes", "end_ns", "kind", "name", "parent_id", "span_id", "start_ns", "token", "trace_id")

    def __init__(self, name: str, kind: int, attributes: dict[str, Any], parent: _MinimalSpan | None) -> None:
        self.name, self.kind, self.attributes = name, kind, attributes
        self.trace_id = parent.trace_id if parent is not None else random.getrandbits(128)
        self.parent_id = parent.span_id if parent is not None else 0
        self.span_id = random.getrandbits(64)
        self.start_ns, self.end_ns, self.token = time.time_ns(), 0, None

    def __enter__(self) -> _MinimalSpan:
        self.token = _minimal_current.set(self)
        return self

    def __exit__(self, *exc: object) -> None:
        _minimal_current.reset(self.token)
        self.end_ns = time.time_ns()
        _minimal_queue.append(self)

    def set(self, key: str, value: Any) -> None:
        if value is not None:
            self.attributes[key] = value

    def update(self, attributes: dict[str, Any]) -> None:
        self.attributes.update((k, v) for k, v in attributes.items() if v is not None)

    def usage(self, **tokens: int) -> None:
        self.update(tokens)

    def fail(self, error_type: str) -> None:
        self.attributes[a.ERROR_TYPE] = error_type


_minimal_current: ContextVar[_MinimalSpan | None] = ContextVar("minimal", default=None)
_minimal_queue: deque[_MinimalSpan] = deque(maxlen=65536)


class _MinimalTracer:
    def request(self, *, model: str, face: str, parent: Any = None, **fields: Any) -> _MinimalSpan:
        return _MinimalSpan(f"chat {model}", 2, {a.OPERATION: "chat", a.REQUEST_MODEL: model, a.FACE: face, **fields}, None)

    def attempt(self, *, provider: str, model: str, number: int, **fields: Any) -> _MinimalSpan:
        attributes = {a.OPERATION: "chat", a.PROVIDER: provider, a.REQUEST_MODEL: model, a.ATTEMPT: number}
        attributes.update((k, v) for k, v in fields.items() if v is not None)
        return _MinimalSpan(f"chat {model}", 3, attributes, _minimal_current.get())

    def step(self, name: str, attributes: dict[str, Any] | None = None) -> _MinimalSpan:
        return _MinimalSpan(f"sidecard.{name}", 1, dict(attributes or {}), _minimal_current.get())

    def force_flush(self) -> bool:
        _minimal_queue.clear()
        return True

    def stats(self) -> dict[str, int]:
        return {}

    async def aclose(self) -> None:
        pass


def per_request(n: int, rounds: int, collector_url: str) -> None:
    from sidecard.tracing.sdk import SdkTracer

    base = {"enabled": True, "endpoint": collector_url, "schedule_delay_s": 0.5, "max_queue_spans": 65536}
    tracers: dict[str, Any] = {
        "off": OFF,
        "sampled-0": open_tracer(TracingSettings(**base, sample_ratio=0.0)),
        "sdk-only": SdkTracer(TracingSettings(**base), exporter=_Drop()),
        "otlp-json": open_tracer(TracingSettings(**base)),
        "minimal": _MinimalTracer(),
    }
    bare_runs: list[float] = []
    runs: dict[str, list[float]] = {name: [] for name in tracers}
    for name in ("off", "otlp-json"):  # warm-up
        _cpu_us(n // 4, tracers[name])
    for _ in range(rounds):
        bare_runs.append(_cpu_us(n, None))
        for name, tracer in tracers.items():
            runs[name].append(_cpu_us(n, tracer, None if name == "sampled-0" else APP))
    bare = statistics.median(bare_runs)
    print(f"CPU per request, {n} requests at concurrency {CONCURRENCY}, median of {rounds} alternated rounds")
    print(f"  {'no tracing calls':<12} {bare:8.1f} us  (the baseline: tasks and checkpoints)")
    for name, values in runs.items():
        median = statistics.median(values)
        print(f"  {name:<12} {median:8.1f} us  adds {median - bare:7.1f} us per request ({(median - bare) / SPANS:5.1f} us per span)")
    exported = tracers["otlp-json"].stats()
    print(f"  otlp-json: {exported['exported']} spans exported, {exported['failed']} failed")
    for tracer in tracers.values():
        trio.run(tracer.aclose)


def per_span_encoding(rounds: int) -> None:
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from sidecard.tracing.otlp import encode
    from sidecard.tracing.sdk import SdkTracer

    memory = InMemorySpanExporter()
    tracer = SdkTracer(TracingSettings(enabled=True, schedule_delay_s=3600, max_queue_spans=65536), exporter=memory)
    trio.run(_drive, 512 // SPANS + 1, functools.partial(_request, tracer))
    tracer.force_flush()
    spans = memory.get_finished_spans()[:512]
    encoders = {"otlp-json (ours)": lambda batch: encode(batch)}
    try:
        from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans

        encoders["protobuf (SDK's)"] = lambda batch: encode_spans(batch).SerializeToString()
    except ImportError:
        print("  (protobuf encoder not installed: pip install opentelemetry-exporter-otlp-proto-common to compare)")
    print(f"CPU per span encoded, batches of {len(spans)}, best of {rounds * 5}")
    for name, encode_batch in encoders.items():
        best = min(_timed(encode_batch, spans) for _ in range(rounds * 5))
        print(f"  {name:<18} {best / len(spans) * 1e6:6.2f} us per span, {len(encode_batch(spans)) / len(spans):6.0f} bytes per span")
    trio.run(tracer.aclose)


def _timed(fn: Any, arg: Any) -> float:
    start = time.process_time()
    fn(arg)
    return time.process_time() - start


_IMPORT = """
import importlib, sys, time
for name in sys.argv[1].split(","):
    if name:
        importlib.import_module(name)
start = time.perf_counter()
for name in sys.argv[2].split(","):
    importlib.import_module(name)
print((time.perf_counter() - start) * 1000)
"""


def import_costs() -> None:
    loaded = "sidecard.daemon"
    cases = {
        "tracing off (sidecard.tracing)": "sidecard.tracing",
        "tracing on (+ SDK, OTLP/JSON exporter)": "sidecard.tracing.sdk",
        "SDK's proto-http exporter, for comparison": "opentelemetry.sdk.trace.export,opentelemetry.exporter.otlp.proto.http.trace_exporter",
    }
    print(f"Import time on top of {loaded} (fresh interpreter, min of 5)")
    for label, modules in cases.items():
        times = []
        for _ in range(5):
            result = subprocess.run([sys.executable, "-c", _IMPORT, loaded, modules], capture_output=True, text=True)
            if result.returncode:
                break
            times.append(float(result.stdout))
        print(f"  {label:<44} " + (f"{min(times):6.1f} ms" if times else "not installed"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=6400)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        trio.run(_serve)
        return
    import_costs()
    per_span_encoding(args.rounds)
    collector = subprocess.Popen([sys.executable, __file__, "--serve"], stdout=subprocess.PIPE, text=True)
    try:
        port = int(collector.stdout.readline())
        per_request(args.requests, args.rounds, f"http://127.0.0.1:{port}/v1/traces")
    finally:
        collector.terminate()
        collector.wait()


if __name__ == "__main__":
    main()
