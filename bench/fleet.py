"""Fleet mode with real processes: N sidecard daemons (10 by default) on one redis-server, against one simulated
upstream, beside N daemons in local mode in the same run.

    .venv/bin/python bench/fleet.py [--instances 10] [--quick] [--rounds R] [--only-cost] [--source DIR]

Prints:
  1. added latency and CPU per request in fleet mode (the store round trip: rate limits, a budget reservation,
     the shared cache and its lease, and the settle after), against local mode: the same requests, the same
     limits, rounds alternating between the two fleets, all N daemons busy at once;
  2. kill-switch propagation: a kill set on one daemon, until each other daemon has applied it (its log line);
  3. a rate limit and a hard budget under concurrent load on every daemon: what was admitted against the limit;
  4. the fleet-wide cache hit ratio against per-instance caches, for one workload spread over the daemons;
  5. an outage of the primary model: upstream calls per request across the fleet (each daemon's retry budget).
The machine is small and shared (2 cores for N daemons, the store, the upstream and the client): compare the
paired figures of one run, and run it twice.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
import urllib.request
from contextlib import ExitStack
from datetime import datetime
from pathlib import Path

import trio

from _common import Client, cpu_seconds, daemon, percentile, simulator
from sidecard.fleet.devserver import LocalStore

LIMITS = """
[[rate_limits]]
scope = "global"
requests_per_minute = 6000000
[[rate_limits]]
scope = "user"
requests_per_minute = 600000
[[budgets]]
scope = "global"
window = "day"
hard_usd = 1000000.0
"""
ROUTES = """
[routes.default]
targets = [{ model = "claude-sonnet-4-6" }, { model = "claude-haiku-4-5-20251001" }]
"""


def frame(text: str, *, user: str = "u1", cache: str = "use") -> bytes:
    body = {"op": "complete", "id": 0, "max_tokens": 64, "temperature": 0.0, "user": user, "cache": cache,
            "messages": [{"role": "user", "content": text}]}
    return json.dumps(body, separators=(",", ":")).encode() + b"\n"


def fleet_toml(store: LocalStore, namespace: str, instance: str, op_timeout_ms: float = 1000.0) -> str:
    """A patient store (the default is 5 ms): on a small shared machine a saturated moment must not turn the fleet's
    decisions into local ones, which would skip the very round trip measured here (the figures count them)."""
    return (f'[fleet]\nurl = "{store.url}"\nnamespace = "{namespace}"\ninstance = "{instance}"\n'
            f"op_timeout_ms = {op_timeout_ms}\nexpected_instances = 10\nheartbeat_interval_s = 1.0\nheartbeat_ttl_s = 3.0\n")


def sim_post(url: str, path: str, body: dict | None, method: str = "POST") -> dict:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url + path, data=data, method=method, headers={"content-type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as reply:
        return json.loads(reply.read())


def fleet_counters(sockets: list[str]) -> dict[str, float]:
    """Fallbacks to local state and store errors, summed over the daemons (their metrics endpoints)."""
    totals: dict[str, float] = {"fallbacks": 0.0, "errors": 0.0}
    for path in sockets:
        toml = Path(path).with_name("sidecard.toml").read_text()
        address = toml.split('[metrics]\naddress = "')[1].split('"')[0]
        with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as reply:
            for line in reply.read().decode().splitlines():
                for name, prefix in (("fallbacks", "sidecard_fleet_fallbacks_total{"), ("errors", "sidecard_fleet_store_errors_total{")):
                    if line.startswith(prefix):
                        totals[name] += float(line.rsplit(" ", 1)[1])
    return totals


async def load(sockets: list[str], frames: list[list[bytes]], concurrency: int) -> tuple[list[float], list[dict]]:
    """Each daemon's frames, `concurrency` at a time per daemon, all daemons at once: latencies and replies."""
    latencies: list[float] = []
    replies: list[dict] = []
    async with trio.open_nursery() as nursery:
        clients = [await Client.open(path, nursery) for path in sockets]

        async def worker(client: Client, queue: list[bytes]) -> None:
            while queue:
                f = queue.pop()
                t = time.perf_counter()
                replies.append(await client.call(f))
                latencies.append(time.perf_counter() - t)

        async with trio.open_nursery() as workers:
            for client, own in zip(clients, frames):
                queue = list(own)
                for _ in range(concurrency):
                    workers.start_soon(worker, client, queue)
        nursery.cancel_scope.cancel()
    return latencies, replies


async def sequential(sockets: list[str], frames: list[list[bytes]]) -> list[float]:
    """One request at a time over all the daemons in turn: each request's latency on a machine not saturated."""
    latencies: list[float] = []
    async with trio.open_nursery() as nursery:
        clients = [await Client.open(path, nursery) for path in sockets]
        for i in range(max(len(f) for f in frames)):
            for client, own in zip(clients, frames):
                if i < len(own):
                    t = time.perf_counter()
                    reply = await client.call(own[i])
                    latencies.append(time.perf_counter() - t)
                    if not reply.get("ok"):
                        raise SystemExit(f"bench: a request failed: {reply}")
        nursery.cancel_scope.cancel()
    return latencies


def per_request(sockets, pids, frames, concurrency) -> tuple[float, float, float]:
    cpu = sum(cpu_seconds(p) for p in pids)
    latencies, replies = trio.run(load, sockets, frames, concurrency)
    cpu = sum(cpu_seconds(p) for p in pids) - cpu
    failed = [r for r in replies if not r.get("ok")]
    if failed:
        raise SystemExit(f"bench: {len(failed)} requests failed, e.g. {failed[0]}")
    return cpu / len(replies) * 1e6, statistics.median(latencies) * 1000, percentile(latencies, 99) * 1000


def overhead(local, fleet, store, n_requests: int, rounds: int) -> None:
    print(f"1. per request: CPU with {len(local)} daemons busy at once ({n_requests} requests a daemon a round), latency one "
          f"request at a time over the daemons in turn; {rounds} rounds each mode, alternating")
    print("   (unique prompts: every request a shared-cache miss with a lease and a cache write; rate limits and a budget)")
    store_pid = store.process.pid
    figures: dict[str, list[tuple[float, float, float]]] = {"local": [], "fleet": []}
    before_counters = fleet_counters([s for s, _ in fleet])
    server: list[float] = []
    for r in range(rounds):
        for mode, fleet_of in (("local", local), ("fleet", fleet)) if r % 2 == 0 else (("fleet", fleet), ("local", local)):
            sockets, pids = [s for s, _ in fleet_of], [p.pid for _, p in fleet_of]
            frames = [[frame(f"{mode}-{r}-{d}-{i}", user=f"u{i % 50}") for i in range(n_requests)] for d in range(len(sockets))]
            before = cpu_seconds(store_pid)
            cpu, _, _ = per_request(sockets, pids, frames, concurrency=2)
            if mode == "fleet":
                server.append((cpu_seconds(store_pid) - before) / (n_requests * len(sockets)) * 1e6)
            one_by_one = [[frame(f"{mode}-seq-{r}-{d}-{i}", user=f"u{i % 50}") for i in range(n_requests // 3)] for d in range(len(sockets))]
            latencies = trio.run(sequential, sockets, one_by_one)
            figures[mode].append((cpu, statistics.median(latencies) * 1000, percentile(latencies, 99) * 1000))
    for mode in ("local", "fleet"):
        cpu, p50, p99 = (statistics.median(f[i] for f in figures[mode]) for i in range(3))
        print(f"   {mode:5}  daemon CPU {cpu:7.1f} µs/request   latency p50 {p50:6.2f} ms  p99 {p99:6.2f} ms")
    added_cpu = [f[0] - l[0] for f, l in zip(figures["fleet"], figures["local"])]
    added_p50 = [f[1] - l[1] for f, l in zip(figures["fleet"], figures["local"])]
    after = fleet_counters([s for s, _ in fleet])
    print(f"   fleet mode adds (paired rounds, median): CPU {statistics.median(added_cpu):+.1f} µs/request, "
          f"latency p50 {statistics.median(added_p50) * 1000:+.0f} µs; the store spends {statistics.median(server):.1f} µs/request; "
          f"{after['fallbacks'] - before_counters['fallbacks']:.0f} local fallbacks")


def propagation(fleet, logs: list[Path], kills: int) -> None:
    admin = [str(Path(s).with_name("admin.sock")) for s, _ in fleet]
    delays: list[float] = []

    async def command(path: str, body: dict) -> float:
        stream = await trio.open_unix_socket(path)
        sent = time.time()
        await stream.send_all(json.dumps({"id": 1, **body}).encode() + b"\n")
        await stream.receive_some(65536)
        await stream.aclose()
        return sent

    def applied_since(log: Path, since: float, version_seen: set) -> float | None:
        for line in log.read_text().splitlines():
            record = json.loads(line)
            if record.get("event") == "fleet_state_applied" and (log, record["version"]) not in version_seen:
                at = datetime.fromisoformat(record["ts"].replace("Z", "+00:00")).timestamp()
                if at >= since - 0.001:
                    version_seen.add((log, record["version"]))
                    return at
        return None

    seen: set = set()
    for k in range(kills):
        op = {"op": "kill", "scope": f"feature:bench{k}"} if k % 2 == 0 else {"op": "unkill", "scope": f"feature:bench{k - 1}"}
        sent = trio.run(command, admin[k % len(admin)], op)
        others = [log for i, log in enumerate(logs) if i != k % len(admin)]
        deadline = time.monotonic() + 5
        pending = {log: None for log in others}
        while any(v is None for v in pending.values()) and time.monotonic() < deadline:
            time.sleep(0.02)
            for log in others:
                if pending[log] is None:
                    pending[log] = applied_since(log, sent, seen)
        delays += [(at - sent) * 1000 for at in pending.values() if at is not None]
        missing = sum(v is None for v in pending.values())
        if missing:
            print(f"   kill {k}: {missing} daemons did not apply it within 5 s")
    print(f"2. kill-switch propagation, {kills} changes x {len(fleet) - 1} daemons: p50 {statistics.median(delays):.1f} ms, "
          f"p99 {percentile(delays, 99):.1f} ms, max {max(delays):.1f} ms")


def accuracy(store, sim_url: str, n: int, stack: ExitStack) -> None:
    print("3. limits under concurrent load on every daemon (4 requests in flight per daemon)")
    rate = '[[rate_limits]]\nscope = "global"\nrequests_per_minute = 600\nburst_s = 1.0\n'
    daemons = [stack.enter_context(daemon(sim_url, ROUTES + rate + fleet_toml(store, "bench-rate", f"r{i}")))
               for i in range(n)]
    sockets = [s for s, _ in daemons]
    started = time.monotonic()
    _, replies = trio.run(load, sockets, [[frame(f"rate {d} {i}", cache="bypass") for i in range(60)] for d in range(n)], 4)
    elapsed = time.monotonic() - started
    admitted = sum(r.get("ok", False) for r in replies)
    allowed = 10 + 10 * elapsed  # a burst of 1 s at 10 a second, then 10 a second
    counters = fleet_counters(sockets)
    print(f"   rate limit 600/min, burst 1 s: {admitted} admitted of {len(replies)} in {elapsed:.2f} s; "
          f"the limit allows {allowed:.1f}: overshoot {admitted - allowed:+.1f} requests; {counters['fallbacks']:.0f} local decisions")
    hard = 0.05
    budget = f'[[budgets]]\nscope = "global"\nwindow = "day"\nhard_usd = {hard}\n'
    daemons = [stack.enter_context(daemon(sim_url, ROUTES + budget + fleet_toml(store, "bench-budget", f"b{i}"))) for i in range(n)]
    _, replies = trio.run(load, [s for s, _ in daemons], [[frame(f"spend {d} {i}", cache="bypass") for i in range(40)] for d in range(n)], 4)
    spent = sum(r["cost_usd"] for r in replies if r.get("ok"))
    refused = sum(r.get("error", {}).get("code") == "budget_exceeded" for r in replies)
    counters = fleet_counters([s for s, _ in daemons])
    print(f"   hard budget ${hard}: ${spent:.4f} spent by {len(replies) - refused} requests, {refused} refused: "
          f"{'within' if spent <= hard + 1e-9 else 'OVER'} the limit ({spent / hard:.1%} of it); "
          f"{counters['fallbacks']:.0f} decisions on a local share (store errors: {counters['errors']:.0f})")


def cache_ratio(local, fleet, n_distinct: int, n_requests: int) -> None:
    rng = random.Random(7)
    workload = [rng.randrange(n_distinct) for _ in range(n_requests)]
    for mode, fleet_of in (("per-instance", local), ("fleet-wide", fleet)):
        sockets = [s for s, _ in fleet_of]
        frames: list[list[bytes]] = [[] for _ in sockets]
        for q in workload:
            frames[rng.randrange(len(sockets))].append(frame(f"faq {mode} {q}"))
        _, replies = trio.run(load, sockets, frames, 1)
        hits = sum(r.get("cached", False) for r in replies)
        print(f"4. cache, {n_requests} requests over {n_distinct} distinct prompts spread over {len(sockets)} daemons, "
              f"{mode:12}: hit ratio {hits / len(replies):.1%}")


def outage(fleet, sim_url: str, n_requests: int) -> None:
    sim_post(sim_url, "/_sim/reset", {})
    sim_post(sim_url, "/_sim/faults", {"model": "claude-sonnet-4-6", "status": 529})
    sockets = [s for s, _ in fleet]
    _, replies = trio.run(load, sockets, [[frame(f"outage {d} {i}", cache="bypass") for i in range(n_requests)] for d in range(len(sockets))], 2)
    calls = sim_post(sim_url, "/_sim/stats", None, method="GET")["total"]["requests"]
    ok = sum(r.get("ok", False) for r in replies)
    print(f"5. primary failing (529), {len(replies)} requests over {len(sockets)} daemons: {ok} answered by the fallback, "
          f"{calls / len(replies):.2f} upstream calls per request (each daemon's retry budget caps its own amplification)")
    sim_post(sim_url, "/_sim/faults", None, method="DELETE")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--instances", type=int, default=10)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--rounds", type=int, help="rounds of the per-request figures (default 4, --quick 2)")
    parser.add_argument("--only-cost", action="store_true", help="the per-request figures (1.) only")
    parser.add_argument("--source", help="run the daemons from another checkout (an earlier commit, for before/after)")
    args = parser.parse_args()
    n = args.instances
    requests, rounds = (40, 2) if args.quick else (150, 4)
    rounds = args.rounds or rounds
    with ExitStack() as stack:
        directory = stack.enter_context(tempfile.TemporaryDirectory(prefix="scbf-", dir="/tmp"))
        store = stack.enter_context(LocalStore(directory))
        sim_url, _ = stack.enter_context(simulator())
        print(f"{n} daemons per mode, {store.binary} on a Unix socket, {sys.executable}")
        local = [stack.enter_context(daemon(sim_url, ROUTES + LIMITS, source=args.source)) for i in range(n)]
        fleet = [stack.enter_context(daemon(sim_url, ROUTES + LIMITS + fleet_toml(store, "bench", f"f{i}"), source=args.source))
                 for i in range(n)]
        overhead(local, fleet, store, requests, rounds)
        if args.only_cost:
            return
        logs = [Path(s).with_name("sidecard.log") for s, _ in fleet]
        propagation(fleet, logs, 10 if args.quick else 40)
        accuracy(store, sim_url, n, stack)
        cache_ratio(local, fleet, 50, 400 if args.quick else 1000)
        outage(fleet, sim_url, 20 if args.quick else 50)


if __name__ == "__main__":
    main()
