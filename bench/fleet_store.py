"""What fleet mode's store adds to a request: the request path's one round trip, against doing it all locally.

    .venv/bin/python bench/fleet_store.py [--quick]

Starts a throwaway redis-server on a Unix socket, then prints:
  1. per request, no store: the local work fleet mode moves to the store (three GCRA buckets, two budgets,
     a cache miss), CPU µs;
  2. per request, fleet: the request script (the same three buckets and two budgets with a reservation, the
     shared cache lookup and the coalescing lease) on one multiplexed connection, at concurrency 1 and 32:
     client CPU µs, latency p50/p99, requests/s, and the server's own µs per script run; then with the settle
     that follows each request. At 32 the loop is closed and saturated: latency there is queueing, read the rate;
  3. the budget bound: two sidecars (two connections), 32 requests in flight each, against a $1 hard limit,
     each request costing exactly its estimate, with reservations and without (check-then-spend): the final spend.
Goals (issue 19): p50 under 0.3 ms and under 0.15 ms CPU over local mode. The machine is shared: compare
medians, run it twice.
"""

from __future__ import annotations

import itertools
import statistics
import time
from functools import partial

import trio

from _common import round_trips_from_args, throwaway_store

from sidecard.cache import ResponseCache
from sidecard.fleet import scripts
from sidecard.fleet.connection import Connection
from sidecard.fleet.devserver import LocalStore
from sidecard.fleet.keys import Keys
from sidecard.fleet.scripts import Admit, Admitted, BudgetCheck, RateCheck, RequestPath, Settle
from sidecard.fleet.settings import parse_url
from sidecard.limits.spend import Budget, SpendLedger
from sidecard.policies.bucket import BucketSet

T0 = 1_773_480_000.0
RATES = [RateCheck("user:ab12cd34", "requests", 1e6, 1e7), RateCheck("user:ab12cd34", "tokens", 1e9, 1e10, 1200.0),
         RateCheck("global", "requests", 1e6, 1e7)]
BUDGETS = [BudgetCheck("global", "day", 1e9, 5e8), BudgetCheck("user:ab12cd34", "hour", 1e9)]


def local_cpu_us(n: int) -> float:
    """The local equivalent of the request script: buckets, budgets, a cache lookup."""
    buckets = [BucketSet(1e6, 1e7), BucketSet(1e9, 1e10), BucketSet(1e6, 1e7)]
    budgets = [Budget(scope="global", window="day", hard_usd=1e9, soft_usd=5e8), Budget(scope="user", window="hour", hard_usd=1e9)]
    ledger = SpendLedger(budgets)
    cache = ResponseCache(max_entries=10_000, max_bytes=64 << 20)
    started = time.process_time()
    for i in range(n):
        now = T0 + i * 0.001
        if cache.get(f"{i:032x}", now) is not None:
            raise AssertionError
        waits = [b.delay("k", now, 1.0) for b in buckets]
        if max(waits) == 0:
            for b in buckets:
                b.try_take("k", now, 1.0)
        verdict = ledger.check([(budgets[0], "global"), (budgets[1], "user:ab12cd34")], 0.01, now)
        assert verdict.allowed
    return (time.process_time() - started) / n * 1e6


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(len(values) * q))]


async def fleet(store: LocalStore, n: int, concurrency: int, *, settle: bool) -> tuple[float, float, float, float]:
    connection = Connection(parse_url(store.url), op_timeout_s=5.0, scripts=scripts.ALL)
    path = RequestPath(connection, Keys(f"bench-{concurrency}-{settle}"))
    ids = itertools.count()
    latencies: list[float] = []

    async def one() -> None:
        i = next(ids)
        now = T0 + i * 0.001
        op = Admit(now, rates=RATES, budgets=BUDGETS, estimate_usd=0.01, reservation_id=f"bench:{i}", reservation_ttl_s=630,
                   cache_key=f"{i:032x}", cache_mode="lead", lease_token=f"bench:{i}", lease_ms=3000)
        started = time.perf_counter()
        result = await path.admit(op)
        latencies.append(time.perf_counter() - started)
        assert isinstance(result, Admitted) and result.lease == "leader"
        if settle:
            await path.settle(Settle(now, f"bench:{i}", 0.008, budgets=BUDGETS, token_adjustments=[(RATES[1], -200.0)]))

    async def worker(count: int) -> None:
        for _ in range(count):
            await one()

    async with trio.open_nursery() as nursery:
        await nursery.start(connection.run)
        for _ in range(200):
            await one()
        latencies.clear()
        cpu, wall = time.process_time(), time.perf_counter()
        async with trio.open_nursery() as workers:
            for _ in range(concurrency):
                workers.start_soon(worker, n // concurrency)
        cpu_us = (time.process_time() - cpu) / len(latencies) * 1e6
        rate = len(latencies) / (time.perf_counter() - wall)
        nursery.cancel_scope.cancel()
    return cpu_us, statistics.median(latencies) * 1e6, percentile(latencies, 0.99) * 1e6, rate


def server_us_per_script(store: LocalStore) -> str:
    """What the server spent per script run since the last reset (INFO commandstats)."""
    stats = store.command("INFO", "commandstats").decode()
    line = next((row for row in stats.splitlines() if row.startswith("cmdstat_evalsha:")), "")
    fields = dict(part.split("=") for part in line.partition(":")[2].split(",") if "=" in part)
    return fields.get("usec_per_call", "?")


async def overshoot(store: LocalStore, *, reserve: bool) -> tuple[int, float]:
    """Two sidecars, 32 requests in flight each, $0.03 each (exactly the estimate), a $1 hard limit."""
    keys = Keys(f"overshoot-{reserve}")
    budget = BudgetCheck("global", "day", 1.0)
    admitted = 0
    async with trio.open_nursery() as nursery:
        paths = []
        for _ in range(2):
            connection = Connection(parse_url(store.url), op_timeout_s=5.0, scripts=scripts.ALL)
            await nursery.start(connection.run)
            paths.append(RequestPath(connection, keys))

        async def request(path: RequestPath, rid: str) -> None:
            nonlocal admitted
            rid = rid if reserve else ""
            result = await path.admit(Admit(T0, budgets=[budget], estimate_usd=0.03, reservation_id=rid, reservation_ttl_s=600))
            if isinstance(result, Admitted):
                admitted += 1
                await trio.sleep(0.001)  # the upstream call
                await path.settle(Settle(T0, rid, 0.03, budgets=[budget]))

        for round_ in range(3):
            async with trio.open_nursery() as requests:
                for s, path in enumerate(paths):
                    for i in range(32):
                        requests.start_soon(request, path, f"{round_}-{s}-{i}")
        spent = (await paths[0].admit(Admit(T0, budgets=[budget]))).usage[0].spent_usd
        nursery.cancel_scope.cancel()
    return admitted, spent


def main() -> None:
    n = round_trips_from_args()
    with throwaway_store() as store:
        local = local_cpu_us(n)
        print(f"request path, {n} requests, {store.binary} on a Unix socket")
        print(f"  no store (local buckets, budgets, cache)   CPU {local:6.1f} µs/request")
        for settle in (False, True):
            for concurrency in (1, 32):
                store.command("CONFIG", "RESETSTAT")
                cpu, p50, p99, rate = trio.run(partial(fleet, store, n, concurrency, settle=settle))
                what = "fleet: admit + settle" if settle else "fleet: admit (one round trip)"
                print(f"  {what:<30} c={concurrency:<3} CPU {cpu:6.1f} µs/request (+{cpu - local:5.1f} over local)"
                      f"   latency p50 {p50:7.1f} µs  p99 {p99:7.1f} µs   {rate:6.0f} requests/s"
                      f"   server {server_us_per_script(store)} µs/script")
        print("budget bound: two sidecars, 32 in flight each, $0.03 a request (= its estimate), hard limit $1.00")
        for reserve in (True, False):
            admitted, spent = trio.run(partial(overshoot, store, reserve=reserve))
            what = "with reservations" if reserve else "check, then spend (no reservation)"
            print(f"  {what:<36} admitted {admitted:3d}   spent ${spent:.2f}   overshoot ${max(0.0, spent - 1.0):.2f}")


if __name__ == "__main__":
    main()
