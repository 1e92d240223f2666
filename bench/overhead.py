"""What sidecard adds to a Claude call, measured against the simulated upstream in one run.

    .venv/bin/python bench/overhead.py [--quick] [--burst] [--before CHECKOUT [--rounds R]]

Runs the simulator (its own process) and the daemon (its own process), then prints:
  1. latency at concurrency 1: a direct AsyncAnthropic call (asyncio, the SDK's default stack) and a direct
     call on sidecard's own pool, beside the same call through sidecard;
  2. throughput at concurrency 32 through one daemon, with the daemon's CPU time per request;
  3. 2,000 requests in flight at once against a 1 s upstream, in rounds: wall time through sidecard beside the
     same 2,000 calls made directly on sidecard's pool in the same run, daemon CPU per request, peak RSS
     (`--burst`: this part alone).
`--before CHECKOUT`: instead, a before/after run of a change: two daemons on one simulator, this checkout's code
and CHECKOUT's (`git worktree add DIR COMMIT`), each sent the same rounds at concurrency 32 in turn (the order
alternates), on the NDJSON socket and on the HTTP face; printed: each side's median daemon CPU per request and the
median of the paired per-round differences.
The machine is noisy (2 cores shared by client, daemon and simulator): compare medians, run it twice.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from contextlib import ExitStack

import anthropic
import trio

from _common import Client, cpu_seconds, daemon, free_port, peak_rss_mb, simulator, summary
from sidecard.upstream.pool import ConnectionPool, Origin

MESSAGES = [{"role": "user", "content": "Give me one sentence about reliable systems."}]
FRAME = b'{"op":"complete","id":0,"max_tokens":64,"messages":[{"role":"user","content":"Give me one sentence about reliable systems."}]}\n'
BODY = b'{"model":"claude-sonnet-4-6","max_tokens":64,"messages":[{"role":"user","content":"Give me one sentence about reliable systems."}]}'


def sdk_direct(url: str, n: int) -> list[float]:
    async def run() -> list[float]:
        client = anthropic.AsyncAnthropic(api_key="bench", base_url=url, max_retries=0)
        latencies = []
        for i in range(n + n // 10):
            t = time.perf_counter()
            await client.messages.create(model="claude-sonnet-4-6", max_tokens=64, messages=MESSAGES)
            if i >= n // 10:
                latencies.append(time.perf_counter() - t)
        await client.close()
        return latencies

    return asyncio.run(run())


async def pool_direct(url: str, n: int) -> list[float]:
    pool = ConnectionPool()
    origin = Origin.from_url(url)
    headers = [(b"x-api-key", b"bench"), (b"anthropic-version", b"2023-06-01"), (b"content-type", b"application/json")]
    latencies = []
    for i in range(n + n // 10):
        t = time.perf_counter()
        response = await pool.request(origin, b"POST", b"/v1/messages", headers, BODY)
        await response.read()
        if i >= n // 10:
            latencies.append(time.perf_counter() - t)
    await pool.aclose()
    return latencies


HTTP_BODY = b'{"model":"claude-sonnet-4-6","max_tokens":64,"messages":[{"role":"user","content":"Give me one sentence about reliable systems."}]}'
HTTP_HEADERS = [(b"x-api-key", b"unused"), (b"anthropic-version", b"2023-06-01"), (b"content-type", b"application/json")]


async def through_http_face(url: str, n: int) -> list[float]:
    """The same call as an SDK app would make it, to sidecard's HTTP face (on sidecard's lean pool)."""
    pool = ConnectionPool()
    origin = Origin.from_url(url)
    latencies = []
    for i in range(n + n // 10):
        t = time.perf_counter()
        response = await pool.request(origin, b"POST", b"/v1/messages", HTTP_HEADERS, HTTP_BODY)
        await response.read()
        assert response.status == 200
        if i >= n // 10:
            latencies.append(time.perf_counter() - t)
    await pool.aclose()
    return latencies


async def http_load(url: str, connections: int, per_connection: int, pool: ConnectionPool | None = None) -> tuple[int, float]:
    """`connections` workers making `per_connection` calls each; on POOL if given (kept open), else a pool of their own."""
    own = pool is None
    pool = pool or ConnectionPool()
    origin = Origin.from_url(url)
    ok = 0

    async def worker() -> None:
        nonlocal ok
        for _ in range(per_connection):
            response = await pool.request(origin, b"POST", b"/v1/messages", HTTP_HEADERS, HTTP_BODY)
            await response.read()
            ok += response.status == 200

    started = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for _ in range(connections):
            nursery.start_soon(worker)
    elapsed = time.perf_counter() - started
    if own:
        await pool.aclose()
    return ok, elapsed


async def through_sidecard(path: str, n: int) -> list[float]:
    latencies = []
    async with trio.open_nursery() as nursery:
        client = await Client.open(path, nursery)
        for i in range(n + n // 10):
            t = time.perf_counter()
            reply = await client.call(FRAME)
            assert reply["ok"], reply
            if i >= n // 10:
                latencies.append(time.perf_counter() - t)
        nursery.cancel_scope.cancel()
    return latencies


async def load(path: str, connections: int, per_connection: int, pipelined: int = 1) -> tuple[int, int, float]:
    """`connections` x `pipelined` requests in flight; returns (ok, failed, wall seconds)."""
    ok = failed = 0

    async def worker(client: Client) -> None:
        nonlocal ok, failed
        for _ in range(per_connection):
            reply = await client.call(FRAME)
            if reply["ok"]:
                ok += 1
            else:
                failed += 1

    started = time.perf_counter()
    async with trio.open_nursery() as outer:
        clients = [await Client.open(path, outer) for _ in range(connections)]
        async with trio.open_nursery() as workers:
            for client in clients:
                for _ in range(pipelined):
                    workers.start_soon(worker, client)
        outer.cancel_scope.cancel()
    return ok, failed, time.perf_counter() - started


BURST = 2000
ROUNDS = 3


def burst() -> None:
    """Rounds of 2,000 at once, direct and through the daemon in turn; each side keeps its connections between
    rounds (the first round opens them). The machine is shared, so compare the medians."""
    # The default queue holds 256 calls per target in flight; lift it to put all 2,000 upstream at once.
    with simulator(latency_ms=1000) as (url, _sim), daemon(url, "[queue]\nmax_concurrency = 4096\n") as (path, proc):
        direct_pool = ConnectionPool()
        print(f"3. {BURST:,} requests in flight, upstream answers after 1 s ({ROUNDS} rounds)")
        print("   round   direct   through sidecard   difference   daemon CPU per request")
        direct, through, cpu = [], [], []
        for round_ in range(1, ROUNDS + 1):
            # Direct: all at once straight to the upstream on the pool, the floor a daemon in between is held to.
            direct_ok, direct_wall = trio.run(http_load, url, BURST, 1, direct_pool)
            cpu0 = cpu_seconds(proc.pid)
            ok, failed, wall = trio.run(load, path, 100, 1, BURST // 100)
            cpu.append((cpu_seconds(proc.pid) - cpu0) / max(1, ok + failed) * 1000)
            direct.append(direct_wall)
            through.append(wall)
            assert direct_ok == ok == BURST and not failed, (direct_ok, ok, failed)
            print(f"   {round_:5d}   {direct_wall:5.2f} s   {wall:5.2f} s            {wall - direct_wall:+5.2f} s      {cpu[-1]:.3f} ms")
        rss = peak_rss_mb(proc.pid)
        trio.run(direct_pool.aclose)
    print(f"   median  {statistics.median(direct):5.2f} s   {statistics.median(through):5.2f} s            "
          f"{statistics.median(through) - statistics.median(direct):+5.2f} s      {statistics.median(cpu):.3f} ms")
    print(f"   all {ROUNDS * BURST:,} answered through sidecard; daemon peak RSS {rss:.0f} MB")


def paired(before: str, rounds: int, per_round: int) -> None:
    """Daemon CPU per request at concurrency 32, this code against BEFORE's, in alternating rounds."""
    ports = {"after": free_port(), "before": free_port()}
    with simulator() as (url, _sim), ExitStack() as stack:
        daemons = {side: stack.enter_context(daemon(url, f'[http]\naddress = "127.0.0.1:{ports[side]}"\n',
                                                     source=before if side == "before" else None))
                   for side in ("after", "before")}
        faces = {
            "NDJSON": lambda side: trio.run(load, daemons[side][0], 32, per_round // 32)[0],
            "HTTP face": lambda side: trio.run(http_load, f"http://127.0.0.1:{ports[side]}", 32, per_round // 32)[0],
        }
        for side in daemons:  # warm up: connections, caches
            for face in faces.values():
                face(side)
        cpu: dict[tuple[str, str], list[float]] = {(face, side): [] for face in faces for side in daemons}
        for round_ in range(rounds):
            for face, run in faces.items():
                for side in (("after", "before") if round_ % 2 else ("before", "after")):
                    proc = daemons[side][1]
                    cpu0 = cpu_seconds(proc.pid)
                    ok = run(side)
                    cpu[face, side].append((cpu_seconds(proc.pid) - cpu0) / ok * 1e6)
    print(f"daemon CPU per request, concurrency 32, {rounds} rounds of {per_round // 32 * 32} requests, alternating\n")
    print("face        before µs   after µs   paired after - before, median µs (min..max)")
    for face in faces:
        diffs = [a - b for a, b in zip(cpu[face, "after"], cpu[face, "before"])]
        print(f"{face:10}  {statistics.median(cpu[face, 'before']):9.1f}  {statistics.median(cpu[face, 'after']):9.1f}   "
              f"{statistics.median(diffs):+8.1f}  ({min(diffs):+.1f}..{max(diffs):+.1f})")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="fewer requests (a smoke run)")
    parser.add_argument("--burst", action="store_true", help="only part 3, the 2,000 requests in flight")
    parser.add_argument("--before", metavar="CHECKOUT", help="a paired before/after run against this checkout's code")
    parser.add_argument("--rounds", type=int, default=8, help="with --before")
    parser.add_argument("--requests", type=int, default=4000, help="with --before: per round, face and side")
    args = parser.parse_args()
    if args.before:
        paired(args.before, args.rounds, args.requests)
        return
    if args.burst:
        burst()
        return
    n1 = 300 if args.quick else 2000
    n32 = 3000 if args.quick else 20000

    print("sidecard overhead benchmark (simulated upstream, zero added latency)\n")
    http_port = free_port()
    http_url = f"http://127.0.0.1:{http_port}"
    with simulator() as (url, _sim), daemon(url, f'[http]\naddress = "127.0.0.1:{http_port}"\n') as (path, proc):
        sdk = summary(sdk_direct(url, n1))
        pool = summary(trio.run(pool_direct, url, n1))
        cpu0 = cpu_seconds(proc.pid)
        via = summary(trio.run(through_sidecard, path, n1))
        cpu_c1 = (cpu_seconds(proc.pid) - cpu0) / (n1 + n1 // 10) * 1000
        cpu0 = cpu_seconds(proc.pid)
        face = summary(trio.run(through_http_face, http_url, n1))
        cpu_face = (cpu_seconds(proc.pid) - cpu0) / (n1 + n1 // 10) * 1000
        print("1. concurrency 1, latency in ms            p50      p99")
        print(f"   direct, AsyncAnthropic (default stack) {sdk[0]:7.3f}  {sdk[1]:7.3f}")
        print(f"   direct, sidecard's pool                {pool[0]:7.3f}  {pool[1]:7.3f}")
        print(f"   through sidecard (NDJSON socket)       {via[0]:7.3f}  {via[1]:7.3f}")
        print(f"   through sidecard (HTTP face, SDK-style){face[0]:7.3f}  {face[1]:7.3f}")
        print(f"   sidecard adds vs direct SDK            {via[0] - sdk[0]:+7.3f}  {via[1] - sdk[1]:+7.3f}")
        print(f"   sidecard adds vs direct pool           {via[0] - pool[0]:+7.3f}  {via[1] - pool[1]:+7.3f}")
        print(f"   daemon CPU per request: NDJSON {cpu_c1:.3f} ms, HTTP face {cpu_face:.3f} ms\n")

        cpu0 = cpu_seconds(proc.pid)
        ok, failed, wall = trio.run(load, path, 32, n32 // 32)
        cpu = (cpu_seconds(proc.pid) - cpu0) / max(1, ok + failed) * 1000
        print("2. concurrency 32 (32 connections)")
        print(f"   NDJSON:    {ok / wall:6.0f} requests/s   {failed} failed   daemon CPU {cpu:.3f} ms per request")
        cpu0 = cpu_seconds(proc.pid)
        ok, wall = trio.run(http_load, http_url, 32, n32 // 32)
        cpu = (cpu_seconds(proc.pid) - cpu0) / max(1, ok) * 1000
        print(f"   HTTP face: {ok / wall:6.0f} requests/s   daemon CPU {cpu:.3f} ms per request\n")

    burst()


if __name__ == "__main__":
    main()
