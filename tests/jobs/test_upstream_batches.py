"""`upstream.batches`: the Message Batches calls over the real pool, against the simulator (mock clock)."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest
import trio

from sidecard.sim import Fault, Simulator, serve_sim
from sidecard.sim.batches import BatchTiming
from sidecard.upstream import errors
from sidecard.upstream.batches import BatchStatus, MessageBatches
from sidecard.upstream.errors import UpstreamError
from sidecard.upstream.pool import ConnectionPool

MODEL = "claude-sonnet-4-6"
KEY = "test-key"


def params(i: int, **extra: Any) -> bytes:
    body = {"model": MODEL, "max_tokens": 32, "messages": [{"role": "user", "content": f"Item {i}"}], **extra}
    return msgspec.json.encode(body)


@pytest.fixture
def sim() -> Simulator:
    return Simulator(seed=2, api_key=KEY, batch_timing=BatchTiming(processing_s=30.0))


@pytest.fixture
async def pool():
    pool = ConnectionPool()
    yield pool
    await pool.aclose()


@pytest.fixture
async def batches(nursery, sim, pool) -> MessageBatches:
    url = await nursery.start(serve_sim, sim)
    return MessageBatches(pool, api_key=KEY, base_url=url, timeout_s=5.0)


async def items_of(batches: MessageBatches, batch: BatchStatus) -> list:
    async with await batches.open_results(batch) as stream:
        return [item async for item in stream]


async def test_a_batch_round_trip(batches, sim, pool, autojump_clock):
    created = await batches.create([(f"j{i}", params(i)) for i in range(3)] + [("bad", params(9, max_tokens=0))])
    assert created.processing_status == "in_progress" and created.request_counts.processing == 4
    await trio.sleep(30)
    ended = await batches.retrieve(created.id)
    assert ended.ended and ended.request_counts.succeeded == 3 and ended.request_counts.errored == 1
    items = await items_of(batches, ended)
    assert [item.custom_id for item in items] == ["j0", "j1", "j2", "bad"]
    reply = items[0].reply()
    assert reply.text and reply.message.usage.service_tier == "batch" and reply.message.usage.output_tokens > 0
    assert items[3].result.type == "errored" and items[3].result.error.error.type == "invalid_request_error"
    assert pool.stats["waiting"] == 0 and pool.stats["open"] == pool.stats["idle"]  # every connection came back


async def test_cancel(batches, autojump_clock):
    created = await batches.create([("a", params(1))])
    cancelled = await batches.cancel(created.id)
    assert cancelled.processing_status == "canceling"
    await trio.sleep(1)
    ended = await batches.retrieve(created.id)
    assert ended.ended and ended.request_counts.canceled == 1
    assert [item.result.type for item in await items_of(batches, ended)] == ["canceled"]


async def test_failures_are_upstream_errors(batches, sim, autojump_clock):
    sim.set_fault("batches:create", Fault(status=529, count=1, retry_after_s=2))
    with pytest.raises(UpstreamError) as caught:
        await batches.create([("a", params(1))])
    assert caught.value.status == 529 and caught.value.error_type == "overloaded_error" and caught.value.retry_after_s == 2
    created = await batches.create([("a", params(1))])
    sim.set_fault("batches:retrieve", Fault(malformed=True, count=1))
    with pytest.raises(UpstreamError) as caught:
        await batches.retrieve(created.id)
    assert caught.value.kind == errors.MALFORMED
    sim.set_fault("batches:retrieve", Fault(hang=True, count=1))
    with pytest.raises(UpstreamError) as caught:
        await batches.retrieve(created.id)
    assert caught.value.kind == errors.TIMEOUT
    with pytest.raises(UpstreamError) as caught:
        await batches.retrieve("msgbatch_unknown")
    assert caught.value.status == 404
    with pytest.raises(UpstreamError) as caught:
        await batches.open_results(created)  # not ended yet
    assert caught.value.status == 400


async def test_a_spoilt_or_cut_results_file_is_an_error_after_the_good_lines(batches, sim, autojump_clock):
    created = await batches.create([(f"j{i}", params(i)) for i in range(6)])
    await trio.sleep(30)
    ended = await batches.retrieve(created.id)
    sim.set_fault("batches:results", Fault(malformed=True, count=1))
    seen = []
    with pytest.raises(UpstreamError) as caught:
        async with await batches.open_results(ended) as stream:
            async for item in stream:
                seen.append(item.custom_id)
    assert caught.value.kind == errors.MALFORMED and seen == ["j0", "j1"]  # the half line is refused
    sim.set_fault("batches:results", Fault(reset_after_bytes=900, count=1))
    with pytest.raises(UpstreamError) as caught:
        await items_of(batches, ended)
    assert caught.value.kind in (errors.CONNECT, errors.MALFORMED)


async def test_a_line_over_the_limit_is_refused_not_buffered(batches, autojump_clock):
    long = {"model": MODEL, "max_tokens": 4000, "messages": [{"role": "user", "content": "[[sim:long]]"}]}
    created = await batches.create([("a", params(1)), ("b", msgspec.json.encode(long))])
    await trio.sleep(30)
    ended = await batches.retrieve(created.id)
    batches.max_line_bytes = 5000  # the long answer's line is about twice that
    with pytest.raises(UpstreamError) as caught:
        await items_of(batches, ended)
    assert caught.value.kind == errors.MALFORMED


async def test_a_results_url_elsewhere_is_not_followed_with_our_key(batches, autojump_clock):
    created = await batches.create([("a", params(1))])
    await trio.sleep(30)
    ended = await batches.retrieve(created.id)
    elsewhere = msgspec.structs.replace(ended, results_url=f"http://example.invalid/v1/messages/batches/{ended.id}/results")
    assert [item.custom_id for item in await items_of(batches, elsewhere)] == ["a"]  # our own origin's path instead
