"""The simulated Message Batches API, driven by the official SDK: create, retrieve, list, results (JSONL), cancel;
processing on trio's clock; per-request errors and expiry; faults on the batch endpoints; the API's limits."""

from __future__ import annotations

import json
from typing import Any

import anthropic
import httpx2
import pytest
import trio

from sidecard.sim import Fault, Simulator
from sidecard.sim.batches import BatchTiming

MODEL = "claude-sonnet-4-6"
OTHER = "claude-haiku-4-5-20251001"
VERSION = {"anthropic-version": "2023-06-01"}


def ask(i: int, model: str = MODEL, **extra: Any) -> dict[str, Any]:
    params = {"model": model, "max_tokens": 64, "messages": [{"role": "user", "content": f"Summarise ticket {i}."}]}
    return {"custom_id": f"job-{i}", "params": {**params, **extra}}


@pytest.fixture
def sim() -> Simulator:
    return Simulator(seed=11, batch_timing=BatchTiming(processing_s=120.0), batch_max_requests=50, batch_max_bytes=64_000)


@pytest.fixture
async def http(url: str):
    async with httpx2.AsyncClient(base_url=url, headers=VERSION) as http:
        yield http


async def results_of(client: anthropic.AsyncAnthropic, batch_id: str) -> dict[str, Any]:
    return {entry.custom_id: entry.result async for entry in await client.messages.batches.results(batch_id)}


async def test_a_batch_runs_on_the_clock_and_its_results_answer_like_messages_calls(client, sim, autojump_clock):
    batch = await client.messages.batches.create(requests=[ask(i) for i in range(3)])
    assert batch.id.startswith("msgbatch_sim_") and batch.type == "message_batch"
    assert batch.processing_status == "in_progress" and batch.results_url is None and batch.ended_at is None
    assert batch.request_counts.model_dump() == {"processing": 3, "succeeded": 0, "errored": 0, "canceled": 0, "expired": 0}
    assert (batch.expires_at - batch.created_at).total_seconds() == pytest.approx(86_400)

    await trio.sleep(119)
    assert (await client.messages.batches.retrieve(batch.id)).processing_status == "in_progress"
    await trio.sleep(1)
    ended = await client.messages.batches.retrieve(batch.id)
    assert ended.processing_status == "ended" and ended.request_counts.succeeded == 3 and ended.request_counts.processing == 0
    assert (ended.ended_at - ended.created_at).total_seconds() == pytest.approx(120)
    assert ended.results_url.endswith(f"/v1/messages/batches/{batch.id}/results")

    results = await results_of(client, batch.id)
    assert list(results) == ["job-0", "job-1", "job-2"] and {r.type for r in results.values()} == {"succeeded"}
    # The same answer as a Messages call, with the usage the API reports for a batch.
    direct = await client.messages.create(**ask(1)["params"])
    message = results["job-1"].message
    assert message.content == direct.content and message.usage.input_tokens == direct.usage.input_tokens
    assert message.usage.service_tier == "batch" and message.usage.output_tokens == direct.usage.output_tokens
    assert sim.calls_for(MODEL) == 1 and sim.stats[MODEL].batched == 3 and sim.stats_total()["batched"] == 3


async def test_requests_with_faults_come_back_errored_or_expired(client, sim, autojump_clock):
    sim.set_fault(MODEL, Fault(status=529, rate=0.5))
    sim.set_fault(OTHER, Fault(expire=True))
    requests = [ask(i) for i in range(40)] + [ask(40, OTHER), ask(41, max_tokens=0)]
    batch = await client.messages.batches.create(requests=requests)
    await trio.sleep(121)
    assert (await client.messages.batches.retrieve(batch.id)).processing_status == "in_progress"  # expiry pending
    await trio.sleep(86_400)
    ended = await client.messages.batches.retrieve(batch.id)
    counts = ended.request_counts
    assert ended.processing_status == "ended" and counts.expired == 1 and counts.succeeded + counts.errored == 41
    assert 10 <= counts.errored - 1 <= 30  # about half of 40, seeded; plus the invalid request
    results = await results_of(client, batch.id)
    assert results["job-40"].type == "expired"
    assert results["job-41"].type == "errored" and results["job-41"].error.error.type == "invalid_request_error"
    assert results["job-41"].error.error.message.startswith("max_tokens: Input should be")
    overloaded = [r for r in results.values() if r.type == "errored" and r.error.error.type == "overloaded_error"]
    assert len(overloaded) == counts.errored - 1 and all(r.error.type == "error" for r in overloaded)


async def test_a_batch_fault_expires_the_whole_batch(client, sim, autojump_clock):
    sim.set_fault("batches:create", Fault(expire=True, count=1))
    sim.set_batch_timing(expiry_s=3600.0)
    expiring = await client.messages.batches.create(requests=[ask(i) for i in range(4)])
    normal = await client.messages.batches.create(requests=[ask(9)])
    await trio.sleep(3599)
    assert (await client.messages.batches.retrieve(expiring.id)).processing_status == "in_progress"
    assert (await client.messages.batches.retrieve(normal.id)).processing_status == "ended"
    await trio.sleep(1)
    ended = await client.messages.batches.retrieve(expiring.id)
    assert ended.processing_status == "ended" and ended.request_counts.expired == 4
    assert {r.type for r in (await results_of(client, expiring.id)).values()} == {"expired"}


async def test_cancel_keeps_what_was_done_and_cancels_the_rest(client, sim, autojump_clock):
    batch = await client.messages.batches.create(requests=[ask(i) for i in range(4)])
    await trio.sleep(60)  # half the processing time: two of four done
    cancelling = await client.messages.batches.cancel(batch.id)
    assert cancelling.processing_status == "canceling" and cancelling.cancel_initiated_at is not None
    await trio.sleep(1)
    ended = await client.messages.batches.retrieve(batch.id)
    assert ended.processing_status == "ended" and ended.request_counts.succeeded == 2 and ended.request_counts.canceled == 2
    results = await results_of(client, batch.id)
    assert [r.type for r in results.values()] == ["succeeded", "succeeded", "canceled", "canceled"]
    again = await client.messages.batches.cancel(batch.id)  # an ended batch stays as it was
    assert again.processing_status == "ended" and again.request_counts == ended.request_counts


async def test_list_pages_newest_first(client, sim):
    ids = [(await client.messages.batches.create(requests=[ask(i)])).id for i in range(5)]
    page = await client.messages.batches.list(limit=2)
    assert [b.id for b in page.data] == ids[:2:-1][:2] and page.has_more
    assert [b.id async for b in await client.messages.batches.list(limit=2)] == ids[::-1]  # the SDK follows after_id
    newer = await client.messages.batches.list(limit=10, before_id=ids[1])
    assert [b.id for b in newer.data] == ids[:1:-1] and not newer.has_more


@pytest.mark.parametrize(
    ("requests", "message"),
    [
        ([], "requests: Input should be a non-empty list"),
        ([ask(i) for i in range(51)], "requests: a batch holds at most 50 requests, got 51"),
        ([ask(1), ask(1)], "requests.1.custom_id: Duplicate custom_id 'job-1'"),
        ([{**ask(1), "custom_id": "no spaces allowed"}], "requests.0.custom_id: String should match pattern"),
        ([{"custom_id": "a"}], "requests.0.params: Field required"),
    ],
)
async def test_a_bad_batch_is_refused_whole(client, sim, requests, message):
    with pytest.raises(anthropic.BadRequestError) as caught:
        await client.messages.batches.create(requests=requests)
    assert caught.value.body["error"]["message"].startswith(message)
    assert not sim.batches


async def test_the_size_limit_is_a_413_in_the_apis_shape(http, sim):
    big = [ask(i, system="x" * 2000) for i in range(40)]  # about 90 kB, over this simulator's 64,000 bytes
    response = await http.post("/v1/messages/batches", json={"requests": big})
    assert response.status_code == 413 and response.json()["error"]["type"] == "request_too_large"
    huge = b"x" * (32 * 1024 * 1024 + 1)  # past the HTTP server's own limit: refused before it is read, same shape
    response = await http.post("/v1/messages", content=huge)
    assert response.status_code == 413 and response.json()["error"]["type"] == "request_too_large"


async def test_unknown_batches_and_early_results_are_errors(client, http):
    with pytest.raises(anthropic.NotFoundError):
        await client.messages.batches.retrieve("msgbatch_nope")
    batch = await client.messages.batches.create(requests=[ask(1)])
    response = await http.get(f"/v1/messages/batches/{batch.id}/results")
    assert response.status_code == 400 and "has not ended" in response.json()["error"]["message"]
    for method, path in [("DELETE", "/v1/messages/batches/x/y"), ("GET", "/v1/messages/batches/x/cancel"), ("GET", "/v1/messages/batchesx")]:
        assert (await http.request(method, path)).status_code == 404


async def test_endpoint_faults_take_the_call_or_every_batch_call_but_never_star(client, sim, http, autojump_clock):
    sim.set_fault("*", Fault(status=500))  # models only
    sim.set_fault("batches:create", Fault(status=500, count=1))
    with pytest.raises(anthropic.InternalServerError):
        await client.messages.batches.create(requests=[ask(1)])
    batch = await client.messages.batches.create(requests=[ask(1)])  # spent; "*" does not apply
    sim.set_fault("batches", Fault(status=529, count=2, retry_after_s=3))
    response = await http.get(f"/v1/messages/batches/{batch.id}")
    assert response.status_code == 529 and response.headers["retry-after"] == "3"
    with pytest.raises(anthropic.APIStatusError):
        await client.messages.batches.list()
    await trio.sleep(120)
    results = await results_of(client, batch.id)
    assert results["job-1"].type == "errored" and results["job-1"].error.error.type == "api_error"  # "*" hit the request
    assert sim.batch_calls == {"create": 2, "retrieve": 2, "results": 1, "cancel": 0, "list": 1}


async def test_results_can_be_cut_or_spoilt(sim, http, autojump_clock):
    created = await http.post("/v1/messages/batches", json={"requests": [ask(i) for i in range(5)]})
    batch_id = created.json()["id"]
    await trio.sleep(120)
    whole = (await http.get(f"/v1/messages/batches/{batch_id}/results")).content
    assert len(whole.splitlines()) == 5 and all(json.loads(line)["result"]["type"] == "succeeded" for line in whole.splitlines())
    sim.set_fault("batches:results", Fault(malformed=True, count=1))
    spoilt = (await http.get(f"/v1/messages/batches/{batch_id}/results")).content
    assert whole.startswith(spoilt) and not spoilt.endswith(b"\n")
    sim.set_fault("batches:results", Fault(reset_after_bytes=300, count=1))
    with pytest.raises(httpx2.TransportError):
        await http.get(f"/v1/messages/batches/{batch_id}/results")


async def test_the_control_endpoint_sets_batch_timing_and_reset_forgets_batches(http, client, sim):
    response = await http.post("/_sim/batches", json={"processing_s": 5})
    assert response.json() == {"timing": {"processing_s": 5.0, "expiry_s": 86_400.0, "cancel_s": 1.0}}
    response = await http.post("/_sim/batches", json={"processing_s": 100_000})
    assert response.status_code == 400 and "processing_s must be within" in response.json()["error"]
    await client.messages.batches.create(requests=[ask(1)])
    state = (await http.get("/_sim/batches")).json()
    assert state["batches"] == 1 and state["timing"]["processing_s"] == 5.0 and state["calls"]["create"] == 1
    assert (await http.get("/_sim/stats")).json()["total"]["batched"] == 1
    await http.post("/_sim/reset")
    state = (await http.get("/_sim/batches")).json()
    assert state["batches"] == 0 and state["timing"]["processing_s"] == 120.0
