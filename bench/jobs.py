"""Async jobs through the daemon and the simulator's Message Batches API: submit throughput, the daemon's memory,
cost against the same work done interactively (the goal: about 50%), and time to result, for the jobs served by a
batch and for those that fell back to the engine (2% of the batch requests come back errored).

    .venv/bin/python bench/jobs.py [--jobs 10000] [--batch 2500] [--submitters 100]

`sidecard serve` runs as deployed (its own process, `[jobs]` on, the job store fsyncing every commit) in front of a
`sidecard sim` process whose batches take `--processing-s` real seconds. Jobs are submitted over the app socket
(`op: submit`), awaited with `op: wait`; then a sample of the same requests is sent as ordinary `complete`
requests, to price the same work done interactively.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
import urllib.request

import msgspec
import trio

from _common import Client, cpu_seconds, current_rss_mb, daemon, peak_rss_mb, percentile, simulator

MODEL = "claude-sonnet-4-6"
ERRORED_SHARE = 0.02
INTERACTIVE_SAMPLE = 200
WAITERS = 100


def control(sim_url: str, path: str, body: dict) -> None:
    request = urllib.request.Request(f"{sim_url}{path}", data=json.dumps(body).encode(), method="POST")
    urllib.request.urlopen(request, timeout=10).read()


def ask(i: int) -> list[dict]:
    return [{"role": "user", "content": f"Summarise support ticket {i}: the customer cannot reset a password after the update."}]


def frame(op: str, **fields: object) -> bytes:
    return msgspec.json.encode({"op": op, "id": 0, **fields}) + b"\n"


def jobs_toml(args: argparse.Namespace) -> str:
    return f"""
[jobs]
enabled = true
batch_max_requests = {args.batch}
batch_max_age_s = 1.0
expected_turnaround_s = 60.0
min_slack_s = 30.0
poll_initial_s = 0.5
poll_max_s = 2.0
engine_concurrency = 16
"""


async def bench(args: argparse.Namespace, sim_url: str, socket_path: str, pid: int) -> None:
    rss_before = current_rss_mb(pid)
    ids: dict[str, int] = {}  # job id -> its request's number
    async with trio.open_nursery() as nursery:
        clients = [await Client.open(socket_path, nursery) for _ in range(args.submitters)]

        async def submitter(client: Client, first: int, count: int) -> None:
            for i in range(first, first + count):
                reply = await client.call(frame("submit", messages=ask(i), model=MODEL, max_tokens=200, by="1d"))
                assert reply["ok"], reply
                ids[reply["jobs"][0]["id"]] = i

        cpu_before = cpu_seconds(pid)
        started = time.perf_counter()
        await submitter(clients[0], 0, args.sequential)  # one at a time: a commit (and an fsync) each
        sequential_s = time.perf_counter() - started
        per = (args.jobs - args.sequential) // args.submitters
        async with trio.open_nursery() as submitters:
            for n, client in enumerate(clients):
                submitters.start_soon(submitter, client, args.sequential + n * per, per)
        submit_s = time.perf_counter() - started - sequential_s
        submit_cpu_ms = (cpu_seconds(pid) - cpu_before) * 1000 / len(ids)
        rss_submitted = current_rss_mb(pid)

        jobs: dict[str, dict] = {}

        async def waiter(client: Client, job_ids: list[str]) -> None:
            for job_id in job_ids:
                reply = await client.call(frame("wait", job=job_id, timeout_ms=600_000))
                assert reply["ok"] and reply["job"]["state"] == "succeeded", reply
                jobs[job_id] = reply["job"]

        every = list(ids)
        waiting = clients[:WAITERS]
        async with trio.open_nursery() as waiters:
            for n, client in enumerate(waiting):
                waiters.start_soon(waiter, client, every[n :: len(waiting)])
        done_s = time.perf_counter() - started
        rss_peak = peak_rss_mb(pid)

        sample = random.Random(1).sample(every, INTERACTIVE_SAMPLE)  # the same work, as ordinary requests
        interactive = 0.0
        for job_id in sample:
            reply = await clients[0].call(frame("complete", messages=ask(ids[job_id]), model=MODEL, max_tokens=200))
            assert reply["ok"], reply
            interactive += reply["cost_usd"]
        nursery.cancel_scope.cancel()

    views = list(jobs.values())
    by_batch = [v for v in views if v["outcome"]["served"] == "batch"]
    fell_back = [v for v in views if v["outcome"]["served"] == "engine"]
    cost = sum(v["outcome"]["cost_usd"] for v in views)
    listed = sum(v["outcome"]["list_usd"] for v in views)
    sample_cost = sum(jobs[j]["outcome"]["cost_usd"] for j in sample)
    print(f"jobs: {len(ids):,} through the daemon; batches of at most {args.batch}, {args.processing_s:g} s processing; "
          f"{int(args.jobs * ERRORED_SHARE)} batch requests errored")  # fmt: skip
    print(f"submit (every commit fsynced): {args.sequential / sequential_s:,.0f} jobs/s one at a time on one connection; "
          f"{len(ids) - args.sequential:,} from {args.submitters} connections at once (group-committed): "
          f"{(len(ids) - args.sequential) / submit_s:,.0f} jobs/s; daemon CPU {submit_cpu_ms:.2f} ms per submit")  # fmt: skip
    print(f"all done in {done_s:.1f} s: {len(by_batch):,} from batches, {len(fell_back)} fell back to the engine")
    print(f"daemon memory: RSS {rss_before:.0f} MB before, {rss_submitted:.0f} MB with every job submitted, "
          f"peak {rss_peak:.0f} MB (+{rss_peak - rss_before:.0f} MB)")  # fmt: skip
    print(f"cost: ${cost:.4f} against ${listed:.4f} at the interactive price = {cost / listed:.1%}")
    print(f"interactive check: {INTERACTIVE_SAMPLE} of the jobs sent again as `complete` cost ${interactive:.6f}; "
          f"as jobs they cost ${sample_cost:.6f} = {sample_cost / interactive:.1%}")  # fmt: skip
    for name, group in (("from a batch", by_batch), ("fell back", fell_back)):
        if group:
            waits = [v["finished"] - v["created"] for v in group]
            print(f"time to result, {name}: p50 {statistics.median(waits):.2f} s, p99 {percentile(waits, 99):.2f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=10_000)
    parser.add_argument("--batch", type=int, default=2500)
    parser.add_argument("--submitters", type=int, default=100)
    parser.add_argument("--sequential", type=int, default=500, help="of the jobs, submitted one at a time first")
    parser.add_argument("--processing-s", type=float, default=2.0)
    args = parser.parse_args()
    with simulator() as (sim_url, _):
        control(sim_url, "/_sim/batches", {"processing_s": args.processing_s})
        errored = int(args.jobs * ERRORED_SHARE)
        control(sim_url, "/_sim/faults", {"model": MODEL, "status": 529, "count": errored})  # spent by the batches
        with daemon(sim_url, jobs_toml(args)) as (socket_path, proc):
            trio.run(bench, args, sim_url, socket_path, proc.pid)


if __name__ == "__main__":
    main()
