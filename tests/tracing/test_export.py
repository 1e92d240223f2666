"""Spans through the real pipeline: the SDK, the batch processor's thread, OTLP/JSON over HTTP, and a receiver
that checks them against the OTLP schema. Everything is local and flushed explicitly: no timer is waited for."""

from __future__ import annotations

import socket
import threading

import pytest
import trio

from sidecard.policies.retry import Backoff
from sidecard.tracing import TracingSettings, open_tracer, parse_traceparent
from sidecard.tracing import attributes as a
from sidecard.tracing.otlp import OtlpJsonExporter
from sidecard.tracing.sdk import SdkTracer

from .receiver import Receiver, serve_receiver

APP = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
MODEL = "claude-sonnet-4-6"
SERVER, CLIENT, INTERNAL = 2, 3, 1
UNSET, ERROR = 0, 2


def settings(url: str, **overrides: object) -> TracingSettings:
    return TracingSettings(enabled=True, endpoint=url, schedule_delay_s=3600, **overrides)  # exports on flush only


async def flush(tracer: object) -> None:
    assert await trio.to_thread.run_sync(tracer.force_flush)


@pytest.fixture
async def receiver(nursery: trio.Nursery) -> Receiver:
    return await serve_receiver(nursery)


async def test_a_request_continues_the_apps_trace_and_shows_every_attempt(receiver: Receiver) -> None:
    tracer = open_tracer(settings(receiver.url, headers={"authorization": "Bearer collector-t0ken"}))
    app = parse_traceparent(APP)
    with tracer.request(model=MODEL, face="ndjson", feature="search", route="default", prompt="summarize", version="v3",
                        user="ab12cd34ef56ab78", parent=app) as request:
        with tracer.step("cache", {a.CACHE: "miss"}):
            pass
        with tracer.step("render"):
            pass
        with tracer.attempt(provider="anthropic", model=MODEL, number=1, server=("api.anthropic.com", 443)) as first:
            first.set(a.HTTP_STATUS, 529)
            first.fail("overloaded_error")
        with tracer.attempt(provider="bedrock", model=MODEL, number=2, fallback=True, retry_reason="overloaded_error") as second:
            second.update({a.QUEUE_WAIT_S: 0.25, a.RESPONSE_MODEL: MODEL, a.RESPONSE_FINISH_REASONS: ["end_turn"],
                           a.HTTP_STATUS: None})
            second.usage(input_tokens=10, output_tokens=20, cache_read_tokens=100, cache_write_tokens=5)
        request.update({a.OUTCOME: "ok", a.COST_USD: 0.0012, a.CACHE: "miss"})
        request.usage(input_tokens=10, output_tokens=20, cache_read_tokens=100, cache_write_tokens=5)
    await flush(tracer)

    assert request.trace_id == app.trace_id_hex
    assert len(receiver.spans) == 5 and {s.trace_id for s in receiver.spans} == {app.trace_id_hex}
    [root] = [s for s in receiver.spans if s.kind == SERVER]
    assert root.name == f"chat {MODEL}" and root.parent_span_id == "00f067aa0ba902b7"
    assert root.flags == 0x301  # sampled, and the parent is known to be remote
    assert root.attributes == {
        a.OPERATION: "chat", a.REQUEST_MODEL: MODEL, a.FACE: "ndjson", a.FEATURE: "search", a.ROUTE: "default",
        a.PROMPT_NAME: "summarize", a.PROMPT_VERSION: "v3", a.USER: "ab12cd34ef56ab78", a.OUTCOME: "ok",
        a.COST_USD: 0.0012, a.CACHE: "miss", a.USAGE_INPUT: 115, a.USAGE_OUTPUT: 20, a.USAGE_CACHE_READ: 100,
        a.USAGE_CACHE_WRITE: 5,
    }
    assert root.resource["service.name"] == "sidecard" and root.scope == "sidecard"
    assert request.traceparent() == f"00-{app.trace_id_hex}-{root.span_id}-01"

    children = [s for s in receiver.spans if s is not root]
    assert {s.parent_span_id for s in children} == {root.span_id}
    assert all(root.start_ns <= s.start_ns <= s.end_ns <= root.end_ns for s in children)
    assert receiver.one("sidecard.cache").attributes == {a.CACHE: "miss"}
    assert receiver.one("sidecard.cache").kind == receiver.one("sidecard.render").kind == INTERNAL

    attempts = sorted((s for s in children if s.kind == CLIENT), key=lambda s: s.attributes[a.ATTEMPT])
    assert [s.name for s in attempts] == [f"chat {MODEL}"] * 2
    assert attempts[0].end_ns <= attempts[1].start_ns  # each attempt with its own timing
    assert attempts[0].attributes == {
        a.OPERATION: "chat", a.PROVIDER: "anthropic", a.REQUEST_MODEL: MODEL, a.TARGET: f"anthropic:{MODEL}",
        a.ATTEMPT: 1, a.SERVER_ADDRESS: "api.anthropic.com", a.SERVER_PORT: 443, a.HTTP_STATUS: 529,
        a.ERROR_TYPE: "overloaded_error",
    }
    assert attempts[0].status_code == ERROR
    assert attempts[1].attributes[a.PROVIDER] == "aws.bedrock"
    assert attempts[1].attributes[a.FALLBACK] is True and attempts[1].attributes[a.RETRY_REASON] == "overloaded_error"
    assert attempts[1].attributes[a.QUEUE_WAIT_S] == 0.25 and attempts[1].attributes[a.USAGE_INPUT] == 115
    assert attempts[1].attributes[a.RESPONSE_FINISH_REASONS] == ["end_turn"] and a.HTTP_STATUS not in attempts[1].attributes
    assert attempts[1].status_code == UNSET

    assert receiver.headers[0]["authorization"] == "Bearer collector-t0ken"
    assert receiver.headers[0]["content-type"] == "application/json"
    assert tracer.stats() == {"started": 5, "exported": 5, "failed": 0, "failed_batches": 0}
    await tracer.aclose()


async def test_hedge_racers_started_in_a_nursery_are_children_of_the_request(receiver: Receiver) -> None:
    tracer = open_tracer(settings(receiver.url))

    loser_waiting = trio.Event()

    async def racer(number: int, race: trio.CancelScope, wins: bool) -> None:
        with tracer.attempt(provider="anthropic", model=MODEL, number=number, hedge=number > 1) as span:
            assert tracer.current() is span
            with tracer.step("guardrails"):  # a step inside a racer is the racer's child
                await trio.lowlevel.checkpoint()
            if wins:
                await loser_waiting.wait()
                span.set(a.HEDGE_RESULT, "won")
                race.cancel()
                return
            try:
                loser_waiting.set()
                await trio.sleep_forever()
            finally:
                span.set(a.HEDGE_RESULT, "lost")

    with tracer.request(model=MODEL, face="http") as request:
        async with trio.open_nursery() as race:
            race.start_soon(racer, 1, race.cancel_scope, False)
            race.start_soon(racer, 2, race.cancel_scope, True)
        assert tracer.current() is request
    assert tracer.current().trace_id is None  # outside every span: NO_SPAN
    await flush(tracer)

    [root] = [s for s in receiver.spans if s.kind == SERVER]
    racers = {s.attributes[a.ATTEMPT]: s for s in receiver.spans if s.kind == CLIENT}
    assert {s.parent_span_id for s in racers.values()} == {root.span_id}
    assert racers[2].attributes[a.HEDGE] is True and racers[2].attributes[a.HEDGE_RESULT] == "won"
    assert racers[1].attributes[a.HEDGE_RESULT] == "lost" and racers[1].attributes[a.CANCELLED] is True
    assert racers[1].status_code == UNSET  # a lost race is no failure
    guards = receiver.by_name("sidecard.guardrails")
    assert sorted(g.parent_span_id for g in guards) == sorted(s.span_id for s in racers.values())
    await tracer.aclose()


async def test_work_in_another_task_names_its_parent(receiver: Receiver, nursery: trio.Nursery) -> None:
    """The quality judge runs in a task of its own, started before the request: it passes parent= explicitly."""
    tracer = open_tracer(settings(receiver.url))
    send, receive = trio.open_memory_channel(1)
    done = trio.Event()

    async def judge() -> None:
        request = await receive.receive()
        with tracer.step("quality", {"sidecard.quality.score": 0.9}, parent=request):
            pass
        with tracer.step("quality"):  # no parent given and none current here: a trace of its own
            pass
        done.set()

    nursery.start_soon(judge)
    with tracer.request(model=MODEL, face="ndjson") as request:
        pass
    await send.send(request)
    await done.wait()
    await flush(tracer)
    [root] = [s for s in receiver.spans if s.kind == SERVER]
    linked, orphan = receiver.by_name("sidecard.quality")
    assert linked.parent_span_id == root.span_id and linked.attributes == {"sidecard.quality.score": 0.9}
    assert orphan.parent_span_id is None and orphan.trace_id != root.trace_id
    await tracer.aclose()


async def test_sampling_follows_the_apps_decision(receiver: Receiver) -> None:
    tracer = open_tracer(settings(receiver.url, sample_ratio=0.0))
    for parent in (None, parse_traceparent(APP[:-2] + "00"), parse_traceparent(APP)):
        with tracer.request(model=MODEL, face="ndjson", parent=parent) as span:
            with tracer.attempt(provider="anthropic", model=MODEL, number=1):
                pass
        assert span.trace_id is not None  # the log line names the trace even when it is not recorded
    await flush(tracer)
    assert len(receiver.spans) == 2 and {s.trace_id for s in receiver.spans} == {parse_traceparent(APP).trace_id_hex}
    assert tracer.stats()["started"] == 2
    await tracer.aclose()


async def test_the_exporter_retries_what_otlp_says_to_retry(receiver: Receiver) -> None:
    tracer = open_tracer(settings(receiver.url))
    receiver.answers.extend([(503, "0"), (429, "0")])
    with tracer.request(model=MODEL, face="ndjson"):
        pass
    await flush(tracer)
    assert receiver.posts == 3 and len(receiver.spans) == 1

    receiver.answers.append((400, None))  # a refusal is final
    with tracer.request(model=MODEL, face="ndjson"):
        pass
    await flush(tracer)
    assert receiver.posts == 4 and len(receiver.spans) == 1
    assert tracer.stats() == {"started": 2, "exported": 1, "failed": 1, "failed_batches": 1}
    assert tracer.exporter.last_error == "the collector answered 400"
    await tracer.aclose()


async def test_an_unreachable_collector_costs_one_failed_batch_within_the_timeout() -> None:
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"http://127.0.0.1:{port}/v1/traces"
    exporter = OtlpJsonExporter(url, timeout_s=0.05, backoff=Backoff(base_s=0.0, cap_s=0.0))
    tracer = SdkTracer(settings(url), exporter=exporter)
    with tracer.request(model=MODEL, face="ndjson"):
        pass
    await flush(tracer)
    assert tracer.stats() == {"started": 1, "exported": 0, "failed": 1, "failed_batches": 1}
    assert exporter.last_error == "could not reach the collector: ConnectionRefusedError"
    await tracer.aclose()


class _Gate:
    """An exporter whose first export waits for `release`: the queue fills behind it."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()
        self.exported = 0

    def export(self, spans: object) -> object:
        from opentelemetry.sdk.trace.export import SpanExportResult

        self.entered.set()
        self.release.wait(10)
        self.exported += len(spans)
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        self.release.set()

    def force_flush(self, timeout_millis: int = 0) -> bool:
        return True


async def test_the_span_queue_is_bounded_and_drops_the_oldest() -> None:
    gate = _Gate()
    tracer = SdkTracer(settings("http://127.0.0.1:9/v1/traces", max_queue_spans=4, max_batch_spans=4), exporter=gate)
    for _ in range(4):  # a full batch wakes the exporter thread, which then waits at the gate
        tracer.step("cache").end()
    assert await trio.to_thread.run_sync(gate.entered.wait, 10)
    for _ in range(10):  # the queue keeps the newest 4 of these
        tracer.step("cache").end()
    gate.release.set()
    await flush(tracer)
    stats = tracer.stats()
    assert (stats["started"], stats["exported"]) == (14, 8)  # 6 dropped: started - exported - failed, after a flush
    await tracer.aclose()


async def test_closing_exports_what_is_left(receiver: Receiver) -> None:
    tracer = open_tracer(settings(receiver.url))
    with tracer.request(model=MODEL, face="ndjson"):
        pass
    await tracer.aclose()
    assert len(receiver.spans) == 1


async def test_every_attribute_type_survives_the_schema(receiver: Receiver) -> None:
    tracer = open_tracer(settings(receiver.url))
    values = {"s": "x", "b": True, "i": -(2**62), "f": 0.5, "nan": float("nan"), "inf": float("inf"),
              "strings": ["a", "b"], "ints": [1, 2], "floats": [1.5], "bools": [False]}
    with tracer.step("render", values):
        pass
    await flush(tracer)
    got = receiver.one("sidecard.render").attributes
    assert got.pop("nan") == "NaN" and got.pop("inf") == "Infinity"
    assert got == {k: v for k, v in values.items() if k not in ("nan", "inf")}
    await tracer.aclose()
