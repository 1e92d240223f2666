"""The span pipeline without a daemon: the recorder's queue, its OTLP/JSON encoding against the OTLP schema (a
loopback receiver), the exporter's retries, ids and sampling. Flushed explicitly: no timer is waited for."""

from __future__ import annotations

import random
import socket
import threading

import pytest
import trio

from sidecard.policies.retry import Backoff
from sidecard.tracing import TracingSettings
from sidecard.tracing.otlp import OtlpJsonExporter
from sidecard.tracing.recorder import Recorder
from sidecard.tracing.spans import CLIENT, SERVER, Ids, SpanData

from .receiver import Receiver, serve_receiver

APP = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def settings(url: str, **overrides: object) -> TracingSettings:
    return TracingSettings(enabled=True, endpoint=url, schedule_delay_s=3600, **overrides)


def span(span_id: int = 1, parent: int = 0, attributes: dict | None = None, **fields: object) -> SpanData:
    return SpanData(**{"trace_id": 0x4bf92f3577b34da6a3ce929d0e0e4736, "span_id": span_id, "parent_id": parent,
                       "name": "chat m", "kind": SERVER, "start_ns": 1, "end_ns": 2, "attributes": attributes or {}, **fields})


async def flush(recorder: Recorder) -> None:
    await trio.to_thread.run_sync(recorder.flush)


@pytest.fixture
async def receiver(nursery: trio.Nursery) -> Receiver:
    return await serve_receiver(nursery)


async def test_spans_pass_the_otlp_schema_with_their_ids_parents_and_status(receiver: Receiver) -> None:
    recorder = Recorder(settings(receiver.url, headers={"authorization": "Bearer collector-t0ken"}))
    recorder.submit([span(1, 0x00f067aa0ba902b7, {"a": "x"}, remote_parent=True),
                     span(2, 1, {"b": 1}, kind=CLIENT, error=True)])
    await flush(recorder)
    request, attempt = receiver.spans
    assert (request.trace_id, request.span_id, request.parent_span_id) == ("4bf92f3577b34da6a3ce929d0e0e4736", "%016x" % 1, "00f067aa0ba902b7")
    assert request.flags == 0x301 and request.status_code == 0 and request.kind == SERVER
    assert attempt.parent_span_id == "%016x" % 1 and attempt.status_code == 2 and attempt.flags == 0x101
    assert request.resource == {"service.name": "sidecard", "service.version": request.resource["service.version"]}
    assert request.scope == "sidecard" and receiver.headers[0]["authorization"] == "Bearer collector-t0ken"
    assert recorder.counts() == {"recorded": 2, "dropped": 0, "exported": 2, "failed": 0}


async def test_every_attribute_type_survives_the_schema(receiver: Receiver) -> None:
    recorder = Recorder(settings(receiver.url))
    values = {"s": 'x"\\\n', "b": True, "i": -(2**62), "f": 0.5, "nan": float("nan"), "inf": float("-inf"),
              "strings": ("a", "b"), "ints": [1, 2], "floats": [1.5], "bools": [False], "raw": b"\x00\xff", "other": None}
    recorder.submit([span(attributes=values)])
    await flush(recorder)
    got = receiver.spans[0].attributes
    assert got.pop("nan") == "NaN" and got.pop("inf") == "-Infinity" and got.pop("raw") == "AP8="
    assert got == {**{k: list(v) if isinstance(v, tuple) else v for k, v in values.items() if k not in ("nan", "inf", "raw")},
                   "other": "None"}


async def test_the_exporter_retries_what_otlp_says_to_retry(receiver: Receiver) -> None:
    recorder = Recorder(settings(receiver.url))
    receiver.answers.extend([(503, "0"), (429, "0")])
    recorder.submit([span()])
    await flush(recorder)
    assert receiver.posts == 3 and len(receiver.spans) == 1

    receiver.answers.append((400, None))  # a refusal is final
    recorder.submit([span(2)])
    await flush(recorder)
    assert receiver.posts == 4 and len(receiver.spans) == 1
    assert recorder.counts() == {"recorded": 2, "dropped": 0, "exported": 1, "failed": 1}
    assert recorder.exporter.last_error == "the collector answered 400"


async def test_an_unreachable_collector_costs_one_failed_batch_within_the_timeout() -> None:
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"http://127.0.0.1:{port}/v1/traces"
    exporter = OtlpJsonExporter(url, timeout_s=0.05, backoff=Backoff(base_s=0.0, cap_s=0.0))
    recorder = Recorder(settings(url), exporter=exporter)
    recorder.submit([span(), span(2)])
    await flush(recorder)
    assert recorder.counts()["failed"] == 2 and exporter.failed_batches == 1
    assert exporter.last_error == "could not reach the collector: ConnectionRefusedError"


class _Gate:
    """An exporter whose first send waits for `release`: the queue fills behind it."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()
        self.exported = 0

    def send(self, body: bytes, count: int) -> bool:
        self.entered.set()
        self.release.wait(10)
        self.exported += count
        return True


async def test_the_span_queue_is_bounded_and_a_full_one_drops_new_spans() -> None:
    gate = _Gate()
    recorder = Recorder(settings("http://127.0.0.1:9/v1/traces", max_queue_spans=4, max_batch_spans=4), exporter=gate)
    recorder.start()
    recorder.submit([span(i) for i in range(1, 5)])  # a full batch wakes the exporter thread, which waits at the gate
    assert await trio.to_thread.run_sync(gate.entered.wait, 10)
    recorder.submit([span(i) for i in range(5, 9)])
    recorder.submit([span(9), span(10)])  # no room: dropped, counted
    gate.release.set()
    await recorder.aclose()
    assert recorder.counts() == {"recorded": 8, "dropped": 2, "exported": 8, "failed": 0}


async def test_closing_exports_what_is_left(receiver: Receiver) -> None:
    recorder = Recorder(settings(receiver.url))
    recorder.start()
    recorder.submit([span()])
    await recorder.aclose()
    assert len(receiver.spans) == 1


def test_ids_continue_the_apps_trace_and_follow_its_sampling_decision() -> None:
    ids = Ids(1.0, random.Random(1))
    marks = ids.begin(APP)
    assert marks.trace_id_hex == "4bf92f3577b34da6a3ce929d0e0e4736" and marks.parent_id == 0x00f067aa0ba902b7 and marks.sampled
    assert marks.span_id and marks.flags == 1
    assert not Ids(1.0).begin(APP[:-2] + "00").sampled  # the app decided not to record
    fresh = ids.begin("not a traceparent")
    assert fresh.parent_id == 0 and fresh.trace_id != marks.trace_id and fresh.sampled
    assert not Ids(0.0, random.Random(1)).begin(None).sampled
    tenth = Ids(0.1, random.Random(2))
    assert 50 < sum(tenth.begin(None).sampled for _ in range(1000)) < 150
