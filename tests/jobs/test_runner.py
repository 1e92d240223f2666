"""The jobs runner against the real simulator's Message Batches API (mock clock), with an interactive callable
that calls the simulator through the real fast path: batches at the batch price, errored and expired requests
falling back in time, crashes between results and completions, failed creates and polls, engine retries,
waiting, cancelling and webhooks."""

from __future__ import annotations

import functools
import threading
import json
from typing import Any

import msgspec
import pytest
import trio

from sidecard.config import Price, Target
from sidecard.errors import Code, SidecardError
from sidecard.httpserver import HttpRequest, Responder, serve_tcp_http
from sidecard.jobs import runner as runner_module
from sidecard.jobs.runner import EngineRun, JobRunner
from sidecard.jobs.settings import JobsSettings, WebhookSettings
from sidecard.jobs.store import JobSpec, JobStore, Outcome
from sidecard.jobs.submit import JOB_NOT_FOUND
from sidecard.jobs.webhook import SIGNATURE_HEADER, WebhookSender
from sidecard.pricing import PriceTable
from sidecard.sim import Fault, Simulator, serve_sim
from sidecard.sim.batches import BatchTiming
from sidecard.upstream.batches import MessageBatches
from sidecard.upstream.client import Upstream
from sidecard.upstream.errors import UpstreamError, to_sidecard_error
from sidecard.upstream.pool import ConnectionPool
from sidecard_client import verify_webhook

MODEL = "claude-sonnet-4-6"
HOUR = 3600.0
SETTINGS = JobsSettings(
    batch_max_age_s=10, expected_turnaround_s=900, min_slack_s=300, poll_initial_s=30, poll_max_s=120,
    engine_concurrency=4, retry_initial_s=5, synchronous="normal",
)  # fmt: skip
PRICES = PriceTable({"claude-sonnet-4": Price(input=3.0, output=15.0)})
SECRET = b"whsec-runner"


class Crash(Exception):
    """The process dies here."""


class Interactive:
    """The engine's stand-in: the job's request (Messages params) sent through the real fast path to the simulator,
    priced at the interactive price. `failures` are raised first, one per call."""

    def __init__(self, upstream: Upstream) -> None:
        self.upstream = upstream
        self.calls: list[EngineRun] = []
        self.failures: list[SidecardError] = []

    async def __call__(self, run: EngineRun) -> Outcome:
        self.calls.append(run)
        if self.failures:
            raise self.failures.pop(0)
        body = msgspec.json.decode(run.request)
        model = body.pop("model")
        try:
            reply = await self.upstream.create(Target(model=model), body, timeout_s=30)
        except UpstreamError as err:
            raise to_sidecard_error(err) from None
        cost = PRICES.cost(model, reply.message.usage)
        return Outcome(served="engine", message=msgspec.Raw(msgspec.json.encode(reply.message)), usage=reply.message.usage,
                       cost_usd=cost, list_usd=cost)  # fmt: skip


class Harness:
    def __init__(self, nursery: trio.Nursery, sim: Simulator, url: str, pool: ConnectionPool, path: str) -> None:
        self.nursery = nursery
        self.sim = sim
        self.path = path
        self.batches = MessageBatches(pool, api_key="k", base_url=url)
        self.interactive = Interactive(Upstream(pool, api_key="k", base_url=url))
        self.pool = pool
        self.base = 1_700_000_000.0 - trio.current_time()
        self.events: list[tuple[str, dict[str, Any]]] = []

    def now(self) -> float:
        return self.base + trio.current_time()

    def runner(self, store: JobStore | None = None, settings: JobsSettings = SETTINGS, webhooks: WebhookSender | None = None,
               in_thread: bool = False) -> JobRunner:  # fmt: skip
        return JobRunner(
            store or JobStore(self.path, synchronous="normal"),
            settings,
            batches_for=lambda target: self.batches if target == "anthropic" else None,
            run_interactive=self.interactive,
            price=PRICES.cost,
            wall_clock=self.now,
            webhooks=webhooks,
            on_event=lambda name, fields: self.events.append((name, fields)),
            store_in_thread=in_thread,  # (a mock clock cannot see a thread's time)
        )

    async def start(self, runner: JobRunner) -> trio.CancelScope:
        scope = trio.CancelScope()

        async def run(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
            with scope:
                await runner.run(task_status=task_status)

        await self.nursery.start(run)
        return scope

    def spec(self, i: int, *, within: float = 24 * HOUR, webhook: str | None = None, **params: Any) -> JobSpec:
        body = {"model": MODEL, "max_tokens": 40, "messages": [{"role": "user", "content": f"Summarise report {i}."}], **params}
        raw = msgspec.json.encode(body)
        now = self.now()
        return JobSpec(request=raw, params=raw, target="anthropic", created=now, deadline=now + within, webhook=webhook)


@pytest.fixture
def sim() -> Simulator:
    return Simulator(seed=4, batch_timing=BatchTiming(processing_s=600.0))


@pytest.fixture
async def harness(nursery, sim, tmp_path):
    url = await nursery.start(serve_sim, sim)
    pool = ConnectionPool()
    yield Harness(nursery, sim, url, pool, str(tmp_path / "jobs.sqlite"))
    await pool.aclose()


async def crashes(runner: JobRunner, specs: list[JobSpec]) -> list[str]:
    """Run RUNNER until it dies of a `Crash`, after submitting SPECS; their ids."""
    ids: list[str] = []
    crashed = False
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(runner.run)
            ids += await runner.submit(specs)
    except* Crash:
        crashed = True
    assert crashed
    runner.store.close()
    return ids


async def finish_all(runner: JobRunner, ids: list[str]):
    return [await runner.wait(job_id, 7 * 86_400) for job_id in ids]


def text_of(view) -> str:
    message = msgspec.json.decode(view.outcome.message)
    return "".join(block["text"] for block in message["content"] if block["type"] == "text")


async def test_jobs_that_can_wait_ride_one_batch_at_half_the_price(harness, sim, autojump_clock):
    runner = harness.runner()
    await harness.start(runner)
    started = harness.now()
    ids = await runner.submit([harness.spec(i) for i in range(5)])
    views = await finish_all(runner, ids)
    assert [v.state for v in views] == ["succeeded"] * 5 and {v.outcome.served for v in views} == {"batch"}
    assert len(sim.batches) == 1 and sim.stats_total()["batched"] == 5 and sim.stats_total()["requests"] == 0
    assert harness.interactive.calls == []
    for view in views:
        listed = PRICES.cost(MODEL, view.outcome.usage)
        assert view.outcome.list_usd == pytest.approx(listed) and view.outcome.cost_usd == pytest.approx(listed / 2)
        assert view.outcome.usage.service_tier == "batch" and view.outcome.batch in sim.batches and view.attempts == 1
    # formed after batch_max_age_s, ended after the processing time, read at the next poll (30, 60, 120, 120... s)
    assert 600 <= max(v.finished for v in views) - started <= 10 + 600 + 120 + 1
    direct = await harness.interactive(EngineRun("x", harness.spec(3).request, 0, 1, b""))
    assert text_of(views[3]) == "".join(b["text"] for b in msgspec.json.decode(direct.message)["content"])
    stats = await runner.stats()
    assert stats["jobs"]["succeeded"] == 5 and stats["batches_in_flight"] == 0
    assert stats["savings_usd"] == pytest.approx(sum(v.outcome.list_usd - v.outcome.cost_usd for v in views))
    assert [name for name, _ in harness.events] == ["jobs_recovered", "jobs_batch_submitted", "jobs_batch_ended"]


async def test_a_deadline_too_short_for_a_batch_runs_through_the_engine_at_once(harness, sim, autojump_clock):
    runner = harness.runner()
    await harness.start(runner)
    ids = await runner.submit([harness.spec(1, within=900), harness.spec(2, within=24 * HOUR)])
    only_engine = await runner.submit([msgspec.structs.replace(harness.spec(3), target="bedrock")])
    views = await finish_all(runner, ids + only_engine)
    assert [v.outcome.served for v in views] == ["engine", "batch", "engine"]
    assert views[0].finished - views[0].created < 1  # no waiting for anything
    assert views[0].outcome.cost_usd == views[0].outcome.list_usd
    assert len(harness.interactive.calls) == 2 and sim.stats_total()["requests"] == 2


async def test_errored_requests_go_to_the_engine_and_the_rest_complete_from_the_batch(harness, sim, autojump_clock):
    runner = harness.runner()
    await harness.start(runner)
    sim.set_fault(MODEL, Fault(status=529, count=3))  # the batch's first three requests; spent before any engine call
    ids = await runner.submit([harness.spec(i) for i in range(8)] + [harness.spec(8, max_tokens=0)])
    views = await finish_all(runner, ids)
    assert [v.outcome.served if v.outcome else v.state for v in views] == ["engine"] * 3 + ["batch"] * 5 + ["failed"]
    assert [run.id for run in harness.interactive.calls] == ids[:3]  # the invalid one was not retried: it cannot succeed
    assert views[8].error.code == Code.INVALID_REQUEST and "max_tokens" in views[8].error.message
    assert all(v.attempts == 2 for v in views[:3]) and all(v.attempts == 1 for v in views[3:])
    assert runner.counts["fallback"] == 3 and runner.counts["batch"] == 5 and runner.counts["engine"] == 3


async def test_an_expired_batch_falls_back_before_the_jobs_deadline_and_is_cancelled(harness, sim, autojump_clock):
    runner = harness.runner(settings=msgspec.structs.replace(SETTINGS, poll_max_s=1800))  # (fewer polls: a faster test)
    await harness.start(runner)
    sim.set_fault("batches:create", Fault(expire=True, count=1))  # the batch never ends before its 24 hours
    ids = await runner.submit([harness.spec(1, within=2 * HOUR), harness.spec(2, within=3 * HOUR)])
    views = await finish_all(runner, ids)
    for view in views:
        assert view.outcome.served == "engine" and view.deadline - 300 <= view.finished < view.deadline - 290
    (batch,) = sim.batches.values()
    assert batch.cancel_at is not None  # once no job was left in it
    assert [e for e, f in harness.events if e == "jobs_fallback"] == ["jobs_fallback", "jobs_fallback"]


async def test_a_crash_between_results_fetched_and_jobs_completed_completes_each_once(harness, sim, autojump_clock, monkeypatch):
    monkeypatch.setattr(runner_module, "SETTLE_AT_ONCE", 2)  # results applied two at a time

    class Dying(JobStore):
        settles = 0

        def settle(self, settles, now):
            Dying.settles += 1
            if Dying.settles == 3:  # two chunks applied; the process dies with the third read and not recorded
                raise Crash
            return super().settle(settles, now)

    first = harness.runner(Dying(harness.path, synchronous="normal"))
    ids = await crashes(first, [harness.spec(i) for i in range(7)])
    assert first.counts["batch"] == 4

    second = harness.runner()
    await harness.start(second)
    views = await finish_all(second, ids)
    assert [v.outcome.served for v in views] == ["batch"] * 7 and second.counts["batch"] == 3  # the other three, once
    assert len(sim.batches) == 1 and harness.interactive.calls == []  # the same batch's results, read again
    stats = await second.stats()
    assert stats["savings_usd"] == pytest.approx(sum(v.outcome.list_usd - v.outcome.cost_usd for v in views))  # none wasted


async def test_a_restart_before_the_batch_is_recorded_submits_its_jobs_again(harness, sim, autojump_clock):
    class Dying(JobStore):
        def batch_submitted(self, *args):
            raise Crash

    ids = await crashes(harness.runner(Dying(harness.path, synchronous="normal")), [harness.spec(i) for i in range(3)])
    second = harness.runner()
    await harness.start(second)
    views = await finish_all(second, ids)
    assert [v.outcome.served for v in views] == ["batch"] * 3 and [v.attempts for v in views] == [2, 2, 2]
    assert len(sim.batches) == 2  # the first, created in the instant before the crash, is never read
    assert harness.events[0] == ("jobs_recovered", {"engine": 0, "unrecorded_batches": 0, "batch_jobs": 0})
    assert ("jobs_recovered", {"engine": 0, "unrecorded_batches": 1, "batch_jobs": 3}) in harness.events


async def test_a_failed_create_holds_the_target_then_submits_again(harness, sim, autojump_clock):
    runner = harness.runner()
    await harness.start(runner)
    sim.set_fault("batches:create", Fault(status=500, count=1))
    sim.set_fault("batches:retrieve", Fault(status=529, count=2))
    ids = await runner.submit([harness.spec(i) for i in range(3)])
    views = await finish_all(runner, ids)
    assert [v.outcome.served for v in views] == ["batch"] * 3
    assert sim.batch_calls["create"] == 2 and len(sim.batches) == 1
    events = [name for name, _ in harness.events]
    assert events.count("jobs_batch_create_failed") == 1 and events.count("jobs_batch_poll_failed") == 2


async def test_engine_runs_are_retried_while_the_deadline_allows(harness, autojump_clock):
    runner = harness.runner()
    await harness.start(runner)
    harness.interactive.failures = [SidecardError(Code.OVERLOADED, "busy", retry_after_ms=20_000)]
    (retried,) = await runner.submit([harness.spec(1, within=900)])
    view = await runner.wait(retried, HOUR)
    assert view.outcome.served == "engine" and view.attempts == 2 and view.finished - view.created >= 20
    harness.interactive.failures = [SidecardError(Code.INVALID_REQUEST, "no")]
    (final,) = await runner.submit([harness.spec(2, within=900)])
    view = await runner.wait(final, HOUR)
    assert view.state == "failed" and view.error.code == Code.INVALID_REQUEST and view.attempts == 1


async def test_an_engine_that_overruns_the_deadline_is_cut_short(harness, autojump_clock):
    async def hangs(run: EngineRun) -> Outcome:
        await trio.sleep_forever()

    runner = harness.runner()
    runner._run_interactive = hangs
    await harness.start(runner)
    (job_id,) = await runner.submit([harness.spec(1, within=60)])
    view = await runner.wait(job_id, HOUR)
    assert view.state == "failed" and view.error.code == Code.DEADLINE_EXCEEDED
    assert view.finished == pytest.approx(view.deadline + runner_module.ENGINE_GRACE_S, abs=1)


async def test_wait_cancel_and_unknown_jobs(harness, sim, autojump_clock):
    runner = harness.runner()
    await harness.start(runner)
    ids = await runner.submit([harness.spec(1), harness.spec(2)])
    assert (await runner.wait(ids[0], 5)).state in ("accepted", "queued_batch")  # not done after 5 s
    waited = []

    async def wait() -> None:
        waited.append(await runner.wait(ids[1], 86_400))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(wait)
        await trio.sleep(1)
        cancelled = await runner.cancel(ids[1])
    assert cancelled.state == "cancelled" and cancelled.error.code == "cancelled"
    assert waited[0].state == "cancelled" and waited[0].finished - waited[0].created < 10  # woken at once
    assert (await runner.wait(ids[0], 86_400)).outcome.served == "batch"
    assert sim.stats_total()["batched"] <= 2
    for call in (runner.view, runner.cancel, functools.partial(runner.wait, timeout_s=1)):
        with pytest.raises(SidecardError) as caught:
            await call("job_unknown")
        assert caught.value.code == JOB_NOT_FOUND and not caught.value.retryable


async def test_cancelling_a_batch_sends_its_jobs_to_the_engine(harness, sim, autojump_clock):
    runner = harness.runner()
    await harness.start(runner)
    ids = await runner.submit([harness.spec(i) for i in range(2)])
    await trio.sleep(60)  # formed and submitted
    (batch_id,) = [f["batch"] for name, f in harness.events if name == "jobs_batch_submitted"]
    status = await runner.cancel_batch(batch_id)
    assert status.processing_status == "canceling"
    views = await finish_all(runner, ids)
    assert [v.outcome.served for v in views] == ["engine", "engine"]
    with pytest.raises(SidecardError) as caught:
        await runner.cancel_batch("bat_unknown")
    assert caught.value.code == "batch_not_found"


async def test_finished_jobs_are_delivered_to_their_webhook_signed(harness, autojump_clock):
    received: list[HttpRequest] = []
    answers = [503, 200, 200]

    async def receiver(request: HttpRequest, responder: Responder) -> None:
        received.append(request)
        await responder.send(answers.pop(0), [], b"")

    host, port = await harness.nursery.start(functools.partial(serve_tcp_http, receiver, "127.0.0.1", 0))
    hook = f"http://{host}:{port}/hooks/jobs"
    settings = WebhookSettings(allowed_prefixes=[hook], secret_file="unused", retry_initial_s=5)
    runner = harness.runner(webhooks=WebhookSender(harness.pool, SECRET, settings))
    await harness.start(runner)
    (job_id,) = await runner.submit([harness.spec(1, within=900, webhook=hook)])
    await runner.wait(job_id, HOUR)
    await trio.sleep(10)  # the first delivery fails; the second, 5 s later, arrives
    assert len(received) == 2 and answers == [200]
    last = received[-1]
    event = verify_webhook(SECRET, last.header(SIGNATURE_HEADER), last.body, now=harness.now())
    assert event["type"] == "job.finished" and event["job"]["id"] == job_id and event["job"]["state"] == "succeeded"
    assert event["job"]["outcome"]["served"] == "engine" and json.loads(last.body) == event


async def test_a_cached_answer_completes_the_job_at_once(harness, autojump_clock):
    runner = harness.runner()
    await harness.start(runner)
    outcome = Outcome(served="cache", message=msgspec.Raw(b'{"content": []}'))
    job_id = await runner.complete_cached(harness.spec(1), outcome)
    assert (await runner.wait(job_id, 0)).outcome.served == "cache" and runner.counts["cache"] == 1


async def test_submit_needs_a_running_runner(harness):
    runner = harness.runner()
    with pytest.raises(SidecardError) as caught:
        await runner.submit([harness.spec(1)])
    assert caught.value.code == Code.SHUTTING_DOWN and caught.value.retry_after_ms == 1000  # as the faces' say
    runner.store.close()


async def test_by_default_the_store_runs_in_a_worker_thread(harness):
    """(Real time: a job for the engine is done in milliseconds.)"""
    runner = harness.runner(in_thread=True)
    threads = []
    real_add = runner.store.add

    def add(*args):
        threads.append(threading.current_thread())
        return real_add(*args)

    runner.store.add = add
    await harness.start(runner)
    (job_id,) = await runner.submit([harness.spec(1, within=120)])
    assert (await runner.wait(job_id, 30)).outcome.served == "engine"
    assert threads and threads[0] is not threading.main_thread()


async def test_jobs_accepted_without_a_lane_are_routed_by_the_runner(harness, autojump_clock):
    store = JobStore(harness.path, synchronous="normal")
    ids = store.add([harness.spec(1), harness.spec(2, within=900)], harness.now())  # e.g. by another process
    runner = harness.runner(store)
    await harness.start(runner)
    assert [v.outcome.served for v in await finish_all(runner, ids)] == ["batch", "engine"]


async def test_finished_jobs_are_forgotten_after_the_retention_time(harness, autojump_clock):
    runner = harness.runner(settings=msgspec.structs.replace(SETTINGS, retention_s=2 * HOUR))
    await harness.start(runner)
    (job_id,) = await runner.submit([harness.spec(1, within=900)])
    assert (await runner.wait(job_id, HOUR)).state == "succeeded"
    await trio.sleep(3 * HOUR + 60)  # purges run hourly: the next after the retention time forgets it
    with pytest.raises(SidecardError) as caught:
        await runner.view(job_id)
    assert caught.value.code == JOB_NOT_FOUND and ("jobs_purged", {"jobs": 1}) in harness.events
