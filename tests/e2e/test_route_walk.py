"""The route walk's answers through the real daemon: deadlines that pass early, the error that ends a walk, a target
that cannot be called, first-token timeouts and named models."""

import msgspec
import trio

from sidecard.sim import Fault
from tests.harness import connect

PRIMARY, FALLBACK = "claude-sonnet-4-6", "claude-haiku-4-5-20251001"
ASK = [{"role": "user", "content": "Hello"}]


async def test_pipelined_requests_whose_deadline_passes_before_any_attempt_are_deadline_exceeded(daemon_factory, sim):
    """Real time on purpose: with 60 frames in one write, most requests are first scheduled after their 1-5 ms have
    passed, which is what a mock clock never lets happen. Before the fix they computed a negative attempt timeout and
    answered `internal`."""
    d = await daemon_factory()
    sim.set_fault("*", Fault(hang=True))  # whatever reaches the upstream gets no answer before its deadline
    client = await connect(d)
    frames = [{"op": "complete", "id": i, "messages": ASK, "deadline_ms": 1 + i % 5, "cache": "bypass"} for i in range(60)]
    await client.send_raw(b"".join(msgspec.json.encode(f) + b"\n" for f in frames))
    replies = [await client.reply(i) for i in range(60)]
    assert {r["error"]["code"] for r in replies} == {"deadline_exceeded"}
    assert all(r["error"]["retryable"] for r in replies)
    # Deadlines the clients chose are not the targets' failures: no breaker opened.
    assert {t["breaker"] for t in d.status()["routes"]["default"]["targets"]} == {"closed"}
