"""Async jobs through the simulator's Message Batches API: submit throughput, memory, cost against the same work
done interactively (the goal: about 50%), and time to result, for the jobs served by a batch and for those that
fell back to the engine (2% of the batch requests come back errored).

    .venv/bin/python bench/jobs.py [--jobs 10000] [--batch 2500] [--submitters 100]

The jobs runner runs here, on a durable store (synchronous = "full": every commit fsynced) in a temporary
directory; the simulator is a separate `sidecard sim` process whose batches take `--processing-s` real seconds.
Fallbacks run through a direct call to the simulator (the real fast path), standing in for the engine.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import tempfile
import time
import urllib.request

import msgspec
import trio

from _common import current_rss_mb, peak_rss_mb, percentile, simulator
from sidecard.config import Price, Target
from sidecard.errors import SidecardError
from sidecard.jobs.runner import EngineRun, JobRunner
from sidecard.jobs.settings import JobsSettings
from sidecard.jobs.store import JobSpec, JobStore, Outcome
from sidecard.pricing import PriceTable
from sidecard.upstream.batches import MessageBatches
from sidecard.upstream.client import Upstream
from sidecard.upstream.errors import UpstreamError, to_sidecard_error
from sidecard.upstream.pool import ConnectionPool

MODEL = "claude-sonnet-4-6"
PRICES = PriceTable({"claude-sonnet-4": Price(input=3.0, output=15.0)})
ERRORED_SHARE = 0.02


def control(sim_url: str, path: str, body: dict) -> None:
    request = urllib.request.Request(f"{sim_url}{path}", data=json.dumps(body).encode(), method="POST")
    urllib.request.urlopen(request, timeout=10).read()


def request_body(i: int) -> bytes:
    question = f"Summarise support ticket {i}: the customer cannot reset a password after the update."
    return msgspec.json.encode({"model": MODEL, "max_tokens": 200, "messages": [{"role": "user", "content": question}]})


class Direct:
    """Fallbacks: the job's request straight to the simulator, at the interactive price."""

    def __init__(self, upstream: Upstream) -> None:
        self.upstream = upstream
        self.calls = 0

    async def __call__(self, run: EngineRun) -> Outcome:
        self.calls += 1
        body = msgspec.json.decode(run.request)
        model = body.pop("model")
        try:
            reply = await self.upstream.create(Target(model=model), body, timeout_s=30)
        except UpstreamError as err:
            raise to_sidecard_error(err) from None
        cost = PRICES.cost(model, reply.message.usage)
        message = msgspec.Raw(msgspec.json.encode(reply.message))
        return Outcome(served="engine", message=message, usage=reply.message.usage, cost_usd=cost, list_usd=cost)


async def bench(args: argparse.Namespace, sim_url: str) -> None:
    control(sim_url, "/_sim/batches", {"processing_s": args.processing_s})
    errored = int(args.jobs * ERRORED_SHARE)
    control(sim_url, "/_sim/faults", {"model": MODEL, "status": 529, "count": errored})  # spent by the batches
    settings = JobsSettings(
        batch_max_requests=args.batch, batch_max_age_s=1.0, expected_turnaround_s=60.0, min_slack_s=30.0,
        poll_initial_s=0.5, poll_max_s=2.0, engine_concurrency=16,
    )  # fmt: skip
    directory = tempfile.mkdtemp(prefix="scb-jobs-", dir="/tmp")
    store = JobStore(os.path.join(directory, "jobs.sqlite"), synchronous=settings.synchronous)
    pool = ConnectionPool()
    direct = Direct(Upstream(pool, api_key="bench-key", base_url=sim_url))
    batches = MessageBatches(pool, api_key="bench-key", base_url=sim_url)
    runner = JobRunner(store, settings, batches_for=lambda target: batches, run_interactive=direct, price=PRICES.cost)
    rss_before = current_rss_mb(os.getpid())
    deadline = time.time() + 86_400

    async with trio.open_nursery() as nursery:
        await nursery.start(runner.run)
        ids: dict[str, int] = {}  # job id -> its request's number

        async def submitter(first: int, count: int) -> None:
            for i in range(first, first + count):
                spec = JobSpec(request=request_body(i), params=request_body(i), target="anthropic", deadline=deadline)
                (job_id,) = await runner.submit([spec])
                ids[job_id] = i

        started = time.perf_counter()
        await submitter(0, args.sequential)  # one at a time: a commit (and an fsync) each
        sequential_s = time.perf_counter() - started
        per = (args.jobs - args.sequential) // args.submitters
        async with trio.open_nursery() as submitters:
            for n in range(args.submitters):
                submitters.start_soon(submitter, args.sequential + n * per, per)
        submit_s = time.perf_counter() - started - sequential_s
        for job_id in ids:
            view = await runner.wait(job_id, 600)
            assert view.state == "succeeded", view
        done_s = time.perf_counter() - started
        rss_peak = peak_rss_mb(os.getpid())

        views = [store.view(job_id) for job_id in ids]
        sample = random.Random(1).sample(views, 200)  # the same work, done interactively: what it costs there
        interactive = 0.0
        for view in sample:
            outcome = await direct(EngineRun(view.id, request_body(ids[view.id]), deadline, 1, b""))
            interactive += outcome.cost_usd
        stats = await runner.stats()
        nursery.cancel_scope.cancel()
    await pool.aclose()
    store.close()

    by_batch = [v for v in views if v.outcome.served == "batch"]
    fell_back = [v for v in views if v.outcome.served == "engine"]
    cost = sum(v.outcome.cost_usd for v in views)
    listed = sum(v.outcome.list_usd for v in views)
    sample_listed = sum(v.outcome.list_usd for v in sample)
    print(f"jobs: {len(ids)}; batches of at most {args.batch}, {args.processing_s:g} s processing; "
          f"{errored} batch requests errored")  # fmt: skip
    print(f"submit (every commit fsynced): {args.sequential / sequential_s:,.0f} jobs/s one at a time; "
          f"{len(ids) - args.sequential:,} from {args.submitters} concurrent submitters (group-committed): "
          f"{(len(ids) - args.sequential) / submit_s:,.0f} jobs/s")  # fmt: skip
    print(f"all done in {done_s:.1f} s: {len(by_batch)} from batches, {len(fell_back)} fell back to the engine "
          f"({direct.calls - len(sample)} engine calls)")  # fmt: skip
    print(f"memory: RSS {rss_before:.0f} MB before, peak {rss_peak:.0f} MB (+{rss_peak - rss_before:.0f} MB)")
    print(f"cost: ${cost:.4f} against ${listed:.4f} interactive = {cost / listed:.1%} "
          f"(savings reported: ${stats['savings_usd']:.4f})")  # fmt: skip
    print(f"interactive check: 200 jobs run again interactively cost ${interactive:.6f}; their interactive price "
          f"as accounted ${sample_listed:.6f}")  # fmt: skip
    for name, group in (("from a batch", by_batch), ("fell back", fell_back)):
        if group:
            waits = [v.finished - v.created for v in group]
            print(f"time to result, {name}: p50 {statistics.median(waits):.2f} s, p99 {percentile(waits, 99):.2f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=10_000)
    parser.add_argument("--batch", type=int, default=2500)
    parser.add_argument("--submitters", type=int, default=100)
    parser.add_argument("--sequential", type=int, default=500, help="of the jobs, submitted one at a time first")
    parser.add_argument("--processing-s", type=float, default=2.0)
    args = parser.parse_args()
    try:
        with simulator() as (sim_url, _):
            trio.run(bench, args, sim_url)
    except SidecardError as err:
        raise SystemExit(f"bench: {err}") from None


if __name__ == "__main__":
    main()
