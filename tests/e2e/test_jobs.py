"""Async jobs through the real daemon and the simulator's Message Batches API (mock clock): the batch path at the
batch price, the engine path for a short deadline, a cached answer at once, a partly failed batch, an expired
batch falling back before the deadline, webhooks signed and verified, budgets reserved at submit, kill switches,
the operator's view and cancels, and every bad submit typed, on the app socket and the HTTP face."""

from __future__ import annotations

import functools
import itertools
import os
import time
from typing import Any

import msgspec
import pytest
import trio

from sidecard.daemon import Daemon
from sidecard.httpserver import HttpRequest, Responder, serve_tcp_http
from sidecard.sim import Fault, Simulator, replies
from sidecard.sim.batches import BatchTiming
from sidecard_client import InvalidWebhook, verify_webhook
from tests.harness import admin, connect, metric


MODEL = "claude-sonnet-4-6"
JOBS = {
    "enabled": True, "batch_max_age_s": 10, "expected_turnaround_s": 600, "min_slack_s": 300, "poll_initial_s": 30,
    "poll_max_s": 120, "retry_initial_s": 5, "synchronous": "normal",
}  # fmt: skip
SECRET = b"whsec-e2e"


@pytest.fixture
def jobs_daemon(daemon_factory):
    """`await jobs_daemon(sim, jobs={...}, **sections)`: a daemon with `[jobs]` on, its store on the event loop."""

    async def start(sim: Simulator, jobs: dict[str, Any] | None = None, **sections: Any) -> Daemon:
        return await daemon_factory(sim, options={"jobs_store_in_thread": False}, jobs={**JOBS, **(jobs or {})}, **sections)

    return start


def submit_frame(text: str = "Summarise ticket 1", **fields: Any) -> dict[str, Any]:
    return {"op": "submit", "messages": [{"role": "user", "content": text}], "model": MODEL, "by": "2h", **fields}


@pytest.fixture
def batch_sim() -> Simulator:
    return Simulator(seed=1, batch_timing=BatchTiming(processing_s=120))


async def test_batch_path_costs_half_and_says_how_it_was_served(jobs_daemon, batch_sim, autojump_clock):
    d = await jobs_daemon(batch_sim)
    client = await connect(d)
    submitted = [await client.call(submit_frame(f"Summarise ticket {i}")) for i in range(3)]
    assert all(r["ok"] and r["jobs"][0]["state"] == "accepted" for r in submitted), submitted
    ids = [r["jobs"][0]["id"] for r in submitted]
    waited = [await client.call({"op": "wait", "job": job_id, "timeout_ms": 3_600_000}) for job_id in ids]
    for reply in waited:
        job = reply["job"]
        assert job["state"] == "succeeded", job
        outcome = job["outcome"]
        assert outcome["served"] == "batch" and outcome["batch"].startswith("msgbatch_sim_")
        assert outcome["cost_usd"] == pytest.approx(outcome["list_usd"] / 2) and outcome["cost_usd"] > 0
        assert outcome["message"]["content"][0]["type"] == "text"
    assert batch_sim.batch_calls["create"] == 1 and batch_sim.stats_total()["requests"] == 0  # one batch, no interactive call
    # Accounted for like requests: the cost metric at the batch price, the log line, the finished counter.
    assert metric(d, "sidecard_cost_usd_total", feature="default", model=MODEL) == pytest.approx(
        sum(r["job"]["outcome"]["cost_usd"] for r in waited)
    )
    assert metric(d, "sidecard_jobs_finished_total", served="batch", outcome="succeeded") == 3
    polled = await client.call({"op": "job", "job": ids[0]})
    assert polled["job"] == waited[0]["job"]
    view = await admin(d, {"op": "jobs"})
    assert view["ok"] and view["result"]["jobs"]["succeeded"] == 3 and view["result"]["savings_usd"] > 0


async def test_a_short_deadline_runs_on_the_engine_at_batch_priority(jobs_daemon, batch_sim, capture_log, autojump_clock):
    d = await jobs_daemon(batch_sim)
    client = await connect(d)
    reply = await client.call(submit_frame(by=120))
    job_id = reply["jobs"][0]["id"]
    job = (await client.call({"op": "wait", "job": job_id, "timeout_ms": 60_000}))["job"]
    assert job["state"] == "succeeded" and job["outcome"]["served"] == "engine", job
    assert job["outcome"]["cost_usd"] == job["outcome"]["list_usd"] > 0
    assert batch_sim.batch_calls["create"] == 0 and batch_sim.stats_total()["requests"] == 1
    assert [e["outcome"] for e in capture_log.events("request")] == ["ok"]


async def test_a_job_run_on_the_engine_counts_once_against_its_rate_limits(jobs_daemon, batch_sim, autojump_clock):
    """The submit takes the job's share of its rate limits; its run on the engine does not take them again, and the
    token estimate the submit took is corrected to what the run used."""
    limits = [{"scope": "feature", "requests_per_minute": 1, "burst_s": 120},
              {"scope": "global", "tokens_per_minute": 800, "burst_s": 60}]
    d = await jobs_daemon(batch_sim, rate_limits=limits)  # 2 requests at once; 800 tokens
    client = await connect(d)
    reply = await client.call(submit_frame(by=120, max_tokens=400))
    job = (await client.call({"op": "wait", "job": reply["jobs"][0]["id"], "timeout_ms": 60_000}))["job"]
    assert job["state"] == "succeeded" and job["outcome"]["served"] == "engine", job
    usage = job["outcome"]["usage"]
    assert usage["input_tokens"] + usage["output_tokens"] < 350  # estimated over 400 at submit
    # Taken twice, the run would leave neither the request nor the tokens for this one (over 400 more at most);
    # left at the submit's estimate, the tokens would not be there either.
    answer = await client.complete("Summarise ticket 2", model=MODEL, max_tokens=400)
    assert answer["ok"], answer
    refused = await client.complete("Summarise ticket 3", model=MODEL, max_tokens=10)
    assert refused["error"]["code"] == "rate_limited", refused


async def test_a_cached_answer_completes_the_job_at_once(jobs_daemon, batch_sim, autojump_clock):
    d = await jobs_daemon(batch_sim)
    client = await connect(d)
    first = await client.complete("Summarise ticket 1", model=MODEL, temperature=0.0)  # (only such answers are cached)
    assert first["ok"]
    reply = await client.call(submit_frame("Summarise ticket 1", temperature=0.0))
    job = reply["jobs"][0]
    assert job["state"] == "succeeded" and job["outcome"]["served"] == "cache" and job["outcome"]["cost_usd"] == 0
    assert batch_sim.stats_total()["requests"] == 1


async def test_a_batch_answer_with_a_container_is_never_anyone_elses_cached_answer(jobs_daemon, batch_sim, autojump_clock,
                                                                                   monkeypatch):
    """A container is the job's conversation's code execution state (docs/cache.md). Before, the batch's answer was
    cached and the same question on the socket got it."""
    container = {"id": "container_011CVjob", "expires_at": "2026-12-04T23:30:00Z"}
    made = replies.message
    monkeypatch.setattr(replies, "message", lambda *args: {**made(*args), "container": container})
    d = await jobs_daemon(batch_sim)
    client = await connect(d)
    job_id = (await client.call(submit_frame("Run the numbers", temperature=0.0)))["jobs"][0]["id"]
    job = (await client.call({"op": "wait", "job": job_id, "timeout_ms": 3_600_000}))["job"]
    assert job["outcome"]["served"] == "batch" and job["outcome"]["message"]["container"] == container
    asked = await client.complete("Run the numbers", model=MODEL, temperature=0.0)
    assert asked["cached"] is False and asked["extra"] == {"container": container}
    assert batch_sim.stats_total()["requests"] == 1


async def test_a_partly_failed_batch_retries_its_failed_items_on_the_engine(jobs_daemon, batch_sim, autojump_clock):
    batch_sim.set_fault(MODEL, Fault(status=500, count=2))  # the batch's first two items come back errored
    d = await jobs_daemon(batch_sim)
    client = await connect(d)
    ids = [(await client.call(submit_frame(f"ticket {i}")))["jobs"][0]["id"] for i in range(5)]
    jobs = [(await client.call({"op": "wait", "job": i, "timeout_ms": 3_600_000}))["job"] for i in ids]
    assert all(j["state"] == "succeeded" for j in jobs), jobs
    assert sorted(j["outcome"]["served"] for j in jobs) == ["batch"] * 3 + ["engine"] * 2
    assert batch_sim.stats_total()["requests"] == 2  # the two errored items, once each


async def test_an_expired_batch_falls_back_before_the_deadline(jobs_daemon, batch_sim, autojump_clock):
    batch_sim.set_fault("batches:create", Fault(expire=True))  # the batch never processes: it would end at expiry
    d = await jobs_daemon(batch_sim, jobs={"poll_max_s": 600})
    client = await connect(d)
    reply = await client.call(submit_frame(by="30m"))
    created = reply["jobs"][0]
    job = (await client.call({"op": "wait", "job": created["id"], "timeout_ms": 3_600_000}))["job"]
    assert job["state"] == "succeeded" and job["outcome"]["served"] == "engine", job
    assert job["finished"] < created["deadline"]


async def test_a_submit_states_the_created_time_its_job_keeps(daemon_factory, batch_sim, autojump_clock):
    """One reading of the clock is the job's `created`, in the submit's reply and in what `job` and `wait` say later,
    and its deadline counts from it. The store took its own reading (a real clock moves between the two), so the
    reply's `created` was not the job's and `deadline - created` was not `by` (a fresh-clone trial)."""
    readings = itertools.count()
    base = time.time()

    def wall() -> float:  # a clock that moves with every reading, as a real one does
        return base + trio.current_time() + next(readings) / 1000

    d = await daemon_factory(batch_sim, options={"jobs_store_in_thread": False, "wall_clock": wall}, jobs=JOBS)
    client = await connect(d)
    first = await client.complete("Summarise ticket 1", model=MODEL, temperature=0.0)
    assert first["ok"], first
    for text in ("Summarise ticket 2", "Summarise ticket 1"):  # queued, and answered at once from the cache
        submitted = (await client.call(submit_frame(text, temperature=0.0, by=7200)))["jobs"][0]
        assert submitted["deadline"] - submitted["created"] == pytest.approx(7200, abs=1e-6)
        polled = (await client.call({"op": "job", "job": submitted["id"]}))["job"]
        assert (polled["created"], polled["deadline"]) == (submitted["created"], submitted["deadline"]), (submitted, polled)
        assert polled["deadline"] - polled["created"] == pytest.approx(7200, abs=1e-6)
        assert polled.get("finished") == submitted.get("finished")


async def test_a_batch_the_upstream_no_longer_knows_sends_its_jobs_to_the_engine_at_once(jobs_daemon, batch_sim, capture_log, autojump_clock):
    """A poll answered 404 (another workspace, a restarted simulator) was retried as if passing, and the jobs sat
    `running` until just before their deadline (a third fresh-clone trial)."""
    d = await jobs_daemon(batch_sim)
    client = await connect(d)
    created = (await client.call(submit_frame(by="2h")))["jobs"][0]
    with trio.fail_after(60):
        while not batch_sim.batches:
            await trio.sleep(1)
    batch_sim.batches.clear()  # the upstream forgets it
    job = (await client.call({"op": "wait", "job": created["id"], "timeout_ms": 3_600_000}))["job"]
    assert job["state"] == "succeeded" and job["outcome"]["served"] == "engine", job
    assert job["finished"] - created["created"] < 600  # the next poll, not the deadline's fallback (~1h55m)
    assert capture_log.events("jobs_batch_lost")

async def test_a_finished_job_is_posted_to_its_webhook_signed(jobs_daemon, batch_sim, nursery, short_tmp, autojump_clock):
    received: list[tuple[dict[bytes, bytes], bytes]] = []
    arrived = trio.Event()

    async def receiver(request: HttpRequest, responder: Responder) -> None:
        received.append((dict(request.headers), request.body))
        arrived.set()
        await responder.send(200, [], b"")

    _, port = await nursery.start(serve_tcp_http, receiver, "127.0.0.1", 0)
    secret_file = os.path.join(short_tmp, "webhook.key")
    with open(secret_file, "wb") as f:
        f.write(SECRET)
    hooks = f"http://127.0.0.1:{port}/hooks/"
    d = await jobs_daemon(batch_sim, jobs={"webhook": {"allowed_prefixes": [hooks], "secret_file": secret_file}})
    client = await connect(d)
    job_id = (await client.call(submit_frame(by=120, webhook=hooks + "done")))["jobs"][0]["id"]
    await arrived.wait()
    headers, body = received[0]
    event = verify_webhook(SECRET, headers[b"sidecard-signature"].decode(), body, now=d._wall())
    assert event["type"] == "job.finished" and event["job"]["id"] == job_id and event["job"]["state"] == "succeeded"
    assert headers[b"sidecard-delivery"].decode() == job_id
    with pytest.raises(InvalidWebhook):
        verify_webhook(b"not-the-secret", headers[b"sidecard-signature"].decode(), body, now=d._wall())
    refused = await client.call(submit_frame(webhook="http://elsewhere.example/hooks/x"))
    assert refused["error"]["code"] == "bad_request" and "allowed_prefixes" in refused["error"]["message"]


async def test_a_webhook_that_would_leave_its_allowed_prefix_is_refused(jobs_daemon, batch_sim, short_tmp, autojump_clock):
    secret_file = os.path.join(short_tmp, "webhook.key")
    with open(secret_file, "wb") as f:
        f.write(SECRET)
    hooks = "http://127.0.0.1:9/hooks/"
    d = await jobs_daemon(batch_sim, jobs={"webhook": {"allowed_prefixes": [hooks], "secret_file": secret_file}})
    client = await connect(d)
    # A receiver's server resolves dot segments (`/hooks/../admin` is `/admin`), so these would be POSTed outside it.
    for url in (hooks + "../admin", hooks + "%2E%2e/admin", hooks + "a/./../../admin", hooks + "..", hooks + "..\\admin"):
        refused = await client.call(submit_frame(webhook=url))
        assert refused["error"]["code"] == "bad_request", (url, refused)
    refused = await client.call(submit_frame(webhook=hooks + "a b"))  # no delivery could send it
    assert refused["error"]["code"] == "bad_request" and "http(s) URL" in refused["error"]["message"], refused
    for url in (hooks + "done", hooks + "v1.2/..done?x=../y"):  # a dot inside a segment, or in the query, is fine
        assert (await client.call(submit_frame(webhook=url)))["ok"], url


async def test_budgets_are_reserved_at_submit(jobs_daemon, batch_sim, autojump_clock):
    d = await jobs_daemon(batch_sim, budgets=[{"scope": "global", "window": "day", "hard_usd": 0.01}])
    client = await connect(d)
    codes, ids = [], []
    for i in range(40):
        reply = await client.call(submit_frame(f"ticket {i}", max_tokens=100))
        codes.append("ok" if reply["ok"] else reply["error"]["code"])
        ids += [job["id"] for job in reply.get("jobs", [])]
    assert "ok" in codes and codes[-1] == "budget_exceeded", codes  # the worst cases held add up before any answer
    (budget,) = (await admin(d, {"op": "budget"}))["result"]["budgets"]
    assert budget["reserved_usd"] > 0 and budget["spent_usd"] == 0
    jobs = [(await client.call({"op": "wait", "job": i, "timeout_ms": 3_600_000}))["job"] for i in ids]
    assert {j["outcome"]["served"] for j in jobs} == {"batch"}
    (budget,) = (await admin(d, {"op": "budget"}))["result"]["budgets"]
    # What the batches cost is spent, at the batch price; the worst cases held are released.
    assert budget["spent_usd"] == pytest.approx(sum(j["outcome"]["cost_usd"] for j in jobs), abs=1e-6)
    assert budget["reserved_usd"] == 0


async def test_kill_switches_refuse_a_submit(jobs_daemon, batch_sim, autojump_clock):
    d = await jobs_daemon(batch_sim)
    assert (await admin(d, {"op": "kill", "scope": "feature:reports"}))["ok"]
    client = await connect(d)
    reply = await client.call(submit_frame(feature="reports"))
    assert reply["error"]["code"] == "ai_disabled"


async def test_a_kill_switch_stops_queued_jobs_before_they_reach_the_upstream(jobs_daemon, batch_sim, autojump_clock):
    batch_sim.set_fault("*", Fault(status=529))  # the engine job's first run fails (every target), to be retried
    d = await jobs_daemon(batch_sim)
    client = await connect(d)
    batched = (await client.call(submit_frame("ticket 1", feature="reports")))["jobs"][0]["id"]
    spared = (await client.call(submit_frame("ticket 2", feature="chat")))["jobs"][0]["id"]
    on_engine = (await client.call(submit_frame("ticket 3", feature="reports", by=120)))["jobs"][0]["id"]
    await trio.sleep(1)  # the engine job has failed once; the batch is still forming
    assert (await admin(d, {"op": "kill", "scope": "feature:reports", "mode": "static", "text": "later"}))["ok"]
    batch_sim.clear_faults()
    jobs = {i: (await client.call({"op": "wait", "job": i, "timeout_ms": 3_600_000}))["job"] for i in (batched, spared, on_engine)}
    for stopped in (batched, on_engine):
        assert jobs[stopped]["state"] == "failed" and jobs[stopped]["error"]["code"] == "ai_disabled", jobs[stopped]
    assert jobs[spared]["outcome"]["served"] == "batch"
    assert batch_sim.stats_total()["batched"] == 1  # the killed job never reached the upstream


async def test_bad_submits_get_typed_errors(jobs_daemon, batch_sim, autojump_clock):
    d = await jobs_daemon(batch_sim, jobs={"max_submit": 3})
    client = await connect(d)

    async def code(frame: dict[str, Any]) -> str:
        reply = await client.call(frame)
        assert not reply["ok"], reply
        return reply["error"]["code"]

    no_deadline = submit_frame()
    del no_deadline["by"]
    assert await code(no_deadline) == "bad_request"
    assert await code(submit_frame(by="2020-01-01T00:00:00Z")) == "bad_request"
    assert await code(submit_frame(by=-5)) == "bad_request"
    request = {"messages": [{"role": "user", "content": "hi"}], "model": MODEL}
    assert await code({"op": "submit", "by": "1h", "jobs": [request] * 4}) == "request_too_large"
    assert await code({"op": "submit", "by": "1h", "jobs": [{"messages": "no"}]}) == "bad_request"
    assert await code({"op": "job", "job": "job_unknown"}) == "job_not_found"
    assert await code({"op": "wait", "job": "job_unknown", "timeout_ms": 10}) == "job_not_found"
    assert await code(submit_frame(stream=True)) == "bad_request"
    accepted = await client.call({"op": "submit", "by": "1h", "jobs": [request] * 3})
    assert accepted["ok"] and len(accepted["jobs"]) == 3


async def test_a_submit_during_the_drain_is_told_when_to_come_back(jobs_daemon, batch_sim, autojump_clock):
    """The jobs desk refuses a submit as soon as the drain begins, before the faces do: its `shutting_down` had no
    `retry_after_ms`, where the faces' has one (an operators' audit found it)."""
    d = await jobs_daemon(batch_sim)
    client = await connect(d)
    assert d.jobs is not None
    d.jobs.drain()
    reply = await client.call(submit_frame())
    assert reply["error"] == {"code": "shutting_down", "message": "the daemon is shutting down", "retryable": True,
                              "retry_after_ms": 1000}


async def test_jobs_are_refused_when_not_enabled(daemon, autojump_clock):
    client = await connect(daemon)
    reply = await client.call(submit_frame())
    assert reply["error"]["code"] == "bad_request" and "[jobs]" in reply["error"]["message"]


async def test_an_operator_cancels_a_job_and_a_batch(jobs_daemon, batch_sim, autojump_clock):
    batch_sim.set_batch_timing(processing_s=3000)
    d = await jobs_daemon(batch_sim)
    client = await connect(d)
    first, second = [(await client.call(submit_frame(f"ticket {i}", by="4h")))["jobs"][0]["id"] for i in range(2)]
    cancelled = await admin(d, {"op": "jobs.cancel", "job": first})
    assert cancelled["ok"] and cancelled["result"]["state"] == "cancelled"
    while not (status := (await admin(d, {"op": "jobs"}))["result"])["batches"]:
        await trio.sleep(5)
    assert status["batches_in_flight"] == 1 and status["jobs"]["running"] == 1
    batch = status["batches"][0]["id"]
    assert (await admin(d, {"op": "jobs.cancel_batch", "batch": batch}))["ok"]
    job = (await client.call({"op": "wait", "job": second, "timeout_ms": 3_600_000}))["job"]
    assert job["state"] == "succeeded" and job["outcome"]["served"] == "engine"  # its request was never processed
    assert (await client.call({"op": "job", "job": first}))["job"]["state"] == "cancelled"
    unknown = await admin(d, {"op": "jobs.cancel_batch", "batch": "bat_nope"})
    assert unknown["error"]["code"] == "batch_not_found"


async def http_call(d: Daemon, method: str, target: str, body: bytes, **headers: str) -> tuple[int, bytes]:
    """One request on the HTTP face's socket (`connection: close`): its status and body."""
    stream = await trio.open_unix_socket(d.config.http.socket)
    more = "".join(f"{name.replace('_', '-')}: {value}\r\n" for name, value in headers.items())
    async with stream:
        head = f"{method} {target} HTTP/1.1\r\nhost: sidecard\r\ncontent-type: application/json\r\n{more}" \
               f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
        await stream.send_all(head.encode() + body)
        data = b""
        while chunk := await stream.receive_some(65536):
            data += chunk
    head_bytes, _, payload = data.partition(b"\r\n\r\n")
    return int(head_bytes.split(b" ", 2)[1]), payload


async def test_the_http_face_takes_and_answers_jobs(jobs_daemon, batch_sim, autojump_clock):
    d = await jobs_daemon(batch_sim)
    body = msgspec.json.encode({"messages": [{"role": "user", "content": "hi"}], "model": MODEL, "by": 120})
    status, payload = await http_call(d, "POST", "/v1/sidecard/jobs", body)
    assert status == 202, payload
    job_id = msgspec.json.decode(payload)["jobs"][0]["id"]
    status, payload = await http_call(d, "GET", f"/v1/sidecard/jobs/{job_id}?wait_ms=60000", b"")
    assert status == 200 and msgspec.json.decode(payload)["state"] == "succeeded", payload
    status, payload = await http_call(d, "GET", "/v1/sidecard/jobs/job_nope", b"")
    assert status == 404 and msgspec.json.decode(payload)["error"]["sidecard_code"] == "job_not_found"
    status, payload = await http_call(d, "POST", "/v1/sidecard/jobs", msgspec.json.encode({"messages": [], "model": MODEL}))
    assert status == 400 and msgspec.json.decode(payload)["error"]["sidecard_code"] == "bad_request"
    status, _ = await http_call(d, "DELETE", "/v1/sidecard/jobs/x", b"")
    assert status == 404
    status, payload = await http_call(d, "GET", f"/v1/sidecard/jobs/{job_id}?wait_ms=soon", b"")
    assert status == 400 and b"wait_ms" in payload


async def test_a_job_posted_with_sidecard_option_headers_is_refused_naming_the_body_field(jobs_daemon, batch_sim, capture_log, autojump_clock):
    """A job's options are body fields. `x-sidecard-feature` (as the SDK examples set on every request) was ignored:
    the job ran as feature `default`, outside the kill switches, limits and budgets of the feature it named."""
    d = await jobs_daemon(batch_sim)
    body = msgspec.json.encode({"messages": [{"role": "user", "content": "hi"}], "model": MODEL, "by": 120})
    status, payload = await http_call(d, "POST", "/v1/sidecard/jobs", body, x_sidecard_feature="digest")
    assert status == 400, payload
    error = msgspec.json.decode(payload)["error"]
    assert error["sidecard_code"] == "bad_request" and "x-sidecard-feature" in error["message"] and '"feature"' in error["message"]
    assert not capture_log.events("request")


async def test_the_python_clients_submit_poll_and_wait(jobs_daemon, batch_sim):
    import sidecard_client as sc
    from sidecard_client.aio import AsyncClient

    d = await jobs_daemon(batch_sim)
    ask = [{"role": "user", "content": "[[sim:say:Done later]]"}]

    def blocking() -> None:
        with sc.Client(d.socket_path, timeout=10) as client:
            job = client.submit(ask, by=60, model=MODEL)  # too soon for a batch: the engine
            done = client.wait(job["id"], 10)
            assert done["state"] == "succeeded" and done["outcome"]["message"]["content"][0]["text"] == "Done later"
            assert client.job(job["id"]) == done
            assert len(client.submit_many([{"messages": ask}, {"messages": ask}], by="1h")) == 2
            with pytest.raises(sc.JobNotFound):
                client.job("job_unknown")
            with pytest.raises(sc.BadRequest):
                client.submit(ask, by="yesterday")

    await trio.to_thread.run_sync(blocking)
    async with AsyncClient(d.socket_path, timeout=10) as client:
        job = await client.submit(ask, by=60)
        assert (await client.wait(job["id"], 10))["state"] == "succeeded"
        assert (await client.job(job["id"]))["outcome"]["served"] == "engine"
        assert len(await client.submit_many([{"messages": ask}], by="2h")) == 1
        with pytest.raises(sc.JobNotFound):
            await client.wait("job_unknown", 1)


async def test_a_batch_answer_is_quality_checked_like_a_request(jobs_daemon, batch_sim, capture_log, autojump_clock):
    d = await jobs_daemon(batch_sim, quality={"enabled": True, "sample_rate": 0.0})
    client = await connect(d)
    job_id = (await client.call(submit_frame("Summarise ticket 9")))["jobs"][0]["id"]
    job = (await client.call({"op": "wait", "job": job_id, "timeout_ms": 3_600_000}))["job"]
    assert job["outcome"]["served"] == "batch"
    await trio.sleep(1)  # the checks run in the background
    assert metric(d, "sidecard_quality_answers_total", prompt="feature:default", version="-", model=MODEL) == 1
    (line,) = capture_log.events("request")
    assert line["outcome"] == "ok" and line["cost_usd"] == pytest.approx(job["outcome"]["cost_usd"])


async def test_a_graceful_restart_keeps_a_batch_in_flight_and_answers_waits(persistent, sim, autojump_clock):
    sim.set_batch_timing(processing_s=600)
    start = functools.partial(persistent, options={"jobs_store_in_thread": False}, jobs=JOBS)
    d = await start()
    client = await connect(d)
    ids = [(await client.call(submit_frame(f"ticket {i}")))["jobs"][0]["id"] for i in range(3)]
    while not (await admin(d, {"op": "jobs"}))["result"]["batches_in_flight"]:
        await trio.sleep(1)
    waiting = await client.send({"op": "wait", "job": ids[0], "timeout_ms": 3_600_000})
    await trio.sleep(1)
    await persistent.stop(d)  # the drain answers the wait at once, with the job as it is
    assert (await client.reply(waiting))["job"]["state"] == "running"
    d = await start()
    client = await connect(d)
    jobs = [(await client.call({"op": "wait", "job": i, "timeout_ms": 3_600_000}))["job"] for i in ids]
    assert [j["outcome"]["served"] for j in jobs] == ["batch"] * 3
    assert sim.batch_calls["create"] == 1 and sim.stats_total()["requests"] == 0


async def test_a_job_whose_answer_safety_checks_never_skips_them_in_a_batch(jobs_daemon, batch_sim, autojump_clock):
    """A batch's answer went to the app as it came: a job with time to wait skipped the output guardrails (and the
    data policy's placeholders were never restored) that the same request gets on the engine. Now a batch's
    answers are vetted as the engine's are, at the batch price."""
    blocky = {"checks": [{"kind": "blocklist", "words": ["forbidden"], "action": "block"}]}
    scrub = {"scrub": ["email"], "restore": True}
    d = await jobs_daemon(batch_sim, safety={"guardrails": {"features": {"blocky": blocky}}, "data": {"features": {"scrub": scrub}}})
    client = await connect(d)
    guarded = await client.call(submit_frame("[[sim:say:a forbidden answer]]", feature="blocky"))
    scrubbed = await client.call(submit_frame("[[sim:echo]] write to ada@example.com", feature="scrub"))
    plain = await client.call(submit_frame("Summarise ticket 3"))
    jobs = [(await client.call({"op": "wait", "job": r["jobs"][0]["id"], "timeout_ms": 3_600_000}))["job"] for r in (guarded, scrubbed, plain)]
    assert jobs[0]["state"] == "failed" and jobs[0]["error"]["code"] == "output_blocked", jobs[0]
    assert jobs[1]["outcome"]["served"] == "batch" and "ada@example.com" in jobs[1]["outcome"]["message"]["content"][0]["text"]
    assert jobs[2]["outcome"]["served"] == "batch"  # nothing to check on the answer: the batch price
