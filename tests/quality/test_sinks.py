"""Alert delivery: the log at once, a real loopback webhook with retries, a bounded queue, the command hook."""

import json
import math
import random
import sys

import pytest
import trio

from sidecard.httpserver import serve_tcp_http
from sidecard.quality.monitor import AlertEvent
from sidecard.quality.sinks import AlertSinks, payload

K = ("support-reply", "3", "claude-sonnet-4-6")
FIRING = AlertEvent("firing", K, "score", 0.5, 0.9, 0.85, 100.0, "mean score 0.50 is below 0.85")
RESOLVED = AlertEvent("resolved", K, "score", 0.88, 0.9, 0.85, 160.0, "back")


def test_payload():
    assert json.loads(payload(FIRING)) == {
        "state": "firing", "key": list(K), "signal": "score", "value": 0.5, "baseline": 0.9, "threshold": 0.85,
        "at": 100.0, "reason": "mean score 0.50 is below 0.85", "prompt": "support-reply", "version": "3",
        "model": "claude-sonnet-4-6", "source": "sidecard",
    }  # fmt: skip


class Deliveries:
    """`on_delivery` outcomes, awaitable by count."""

    def __init__(self):
        self.outcomes = []  # (sink, ok)
        self._changed = trio.Event()

    def __call__(self, sink, ok):
        self.outcomes.append((sink, ok))
        self._changed.set()
        self._changed = trio.Event()

    async def wait_for(self, count, *, guard_s=60.0):
        with trio.fail_after(guard_s):
            while len(self.outcomes) < count:
                await self._changed.wait()
        return self.outcomes


class Receiver:
    """A loopback webhook that answers with the statuses it is given, in turn (then 200)."""

    def __init__(self, statuses):
        self.statuses = list(statuses)
        self.received = []  # (status answered, method, target, content type, body)

    async def handle(self, request, responder):
        status = self.statuses.pop(0) if self.statuses else 200
        self.received.append((status, request.method, request.target, request.header("content-type"), request.body))
        await responder.send(status, [("content-type", "text/plain")], b"ok")


async def test_webhook_retries_then_delivers_in_order(nursery, autojump_clock):
    receiver = Receiver([500, 429])
    host, port = await nursery.start(serve_tcp_http, receiver.handle, "127.0.0.1", 0)
    logged, delivered = [], Deliveries()
    sinks = AlertSinks(log=logged.append, webhook_url=f"http://{host}:{port}/hooks/quality?team=ai",
                       on_delivery=delivered, rng=random.Random(1))  # fmt: skip
    await nursery.start(sinks.run)
    start = trio.current_time()
    sinks.submit(FIRING)
    sinks.submit(RESOLVED)
    assert logged == [FIRING, RESOLVED]  # synchronously
    assert await delivered.wait_for(2) == [("webhook", True), ("webhook", True)]
    assert [r[0] for r in receiver.received] == [500, 429, 200, 200]
    assert {(r[1], r[2], r[3]) for r in receiver.received} == {("POST", "/hooks/quality?team=ai", "application/json")}
    bodies = [json.loads(r[4]) for r in receiver.received]
    assert [b["state"] for b in bodies] == ["firing", "firing", "firing", "resolved"]
    assert all(b["source"] == "sidecard" for b in bodies)
    # two backoffs: 0.25-0.5 s, then 0.5-1 s (virtual time)
    assert 0.75 <= trio.current_time() - start <= 1.5


async def test_webhook_gives_up_after_its_retries_and_not_on_4xx(nursery, autojump_clock):
    receiver = Receiver([503] * 3 + [404])
    host, port = await nursery.start(serve_tcp_http, receiver.handle, "127.0.0.1", 0)
    delivered = Deliveries()
    sinks = AlertSinks(log=lambda e: None, webhook_url=f"http://{host}:{port}/", webhook_retries=3,
                       on_delivery=delivered)  # fmt: skip
    await nursery.start(sinks.run)
    sinks.submit(FIRING)  # 503 x3: failed
    sinks.submit(RESOLVED)  # 404: failed at once
    assert await delivered.wait_for(2) == [("webhook", False)] * 2
    assert [r[0] for r in receiver.received] == [503, 503, 503, 404]


async def test_an_unreachable_webhook_fails_after_its_attempts(nursery, autojump_clock):
    listener = trio.socket.socket()
    await listener.bind(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    listener.close()  # nothing listens there now: connection refused
    delivered = Deliveries()
    sinks = AlertSinks(log=lambda e: None, webhook_url=f"http://127.0.0.1:{port}/", webhook_retries=2,
                       on_delivery=delivered)  # fmt: skip
    await nursery.start(sinks.run)
    sinks.submit(FIRING)
    assert await delivered.wait_for(1) == [("webhook", False)]


async def test_a_full_queue_drops_and_counts():
    drops = []
    sinks = AlertSinks(log=lambda e: None, webhook_url="http://127.0.0.1:9/", command=["true"], queue_size=2,
                       on_drop=lambda: drops.append(1))  # fmt: skip
    for _ in range(5):  # nothing delivers yet: two fit in each queue
        sinks.submit(FIRING)
    assert sinks.dropped == 6 and len(drops) == 6
    logged = []
    AlertSinks(log=logged.append, queue_size=1).submit(FIRING)  # log only: nothing to queue, nothing dropped
    assert logged == [FIRING]


def test_bad_settings():
    with pytest.raises(ValueError, match="http"):
        AlertSinks(log=print, webhook_url="ftp://example.com/")
    with pytest.raises(ValueError):
        AlertSinks(log=print, command=[])
    with pytest.raises(ValueError):
        AlertSinks(log=print, queue_size=0)


async def test_command_hook_gets_the_event_on_stdin(nursery, tmp_path):
    out = tmp_path / "events.jsonl"
    script = f"import sys; open({str(out)!r}, 'ab').write(sys.stdin.buffer.read() + b'\\n')"
    delivered = Deliveries()
    sinks = AlertSinks(log=lambda e: None, command=[sys.executable, "-c", script], on_delivery=delivered)
    await nursery.start(sinks.run)
    sinks.submit(FIRING)
    sinks.submit(RESOLVED)
    assert await delivered.wait_for(2) == [("command", True)] * 2
    events = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(e["state"], e["prompt"], e["source"]) for e in events] == [
        ("firing", "support-reply", "sidecard"), ("resolved", "support-reply", "sidecard")
    ]


async def test_command_failures_are_reported(nursery, tmp_path):
    delivered = Deliveries()
    for command in ([sys.executable, "-c", "import sys; sys.exit(3)"], [str(tmp_path / "missing")]):
        sinks = AlertSinks(log=lambda e: None, command=command, on_delivery=delivered)
        await nursery.start(sinks.run)
        sinks.submit(FIRING)
    assert await delivered.wait_for(2) == [("command", False)] * 2


async def test_a_command_that_hangs_is_stopped(nursery, autojump_clock):
    delivered = Deliveries()
    sinks = AlertSinks(log=lambda e: None, command=[sys.executable, "-c", "import time; time.sleep(60)"],
                       command_timeout_s=1.0, on_delivery=delivered)  # fmt: skip
    await nursery.start(sinks.run)
    sinks.submit(FIRING)
    # No guard deadline: while the loop waits for the real process to exit, virtual time would jump to it.
    assert await delivered.wait_for(1, guard_s=math.inf) == [("command", False)]
