"""The resilience engine under fault mixes, through a real daemon and the simulated upstream.

    .venv/bin/python bench/chaos.py [--requests N]

For each mix: success rate, p50/p99 latency, upstream calls per request, and the share of replies that
arrived after their deadline (which must be 0).
"""

from __future__ import annotations

import argparse
import json
import time
import urllib.request

import trio

from _common import Client, daemon, percentile, simulator

DEADLINE_MS = 5000
ROUTE = """
[routes.default]
targets = [
  { model = "claude-sonnet-4-6", timeout_s = 2.0, hedge_after_ms = 400 },
  { model = "claude-haiku-4-5-20251001", timeout_s = 2.0 },
]
[breaker]
cooldown_s = 5
"""
FRAME = (
    b'{"op":"complete","id":0,"deadline_ms":%d,"max_tokens":64,"messages":[{"role":"user","content":"chaos"}]}\n'
    % DEADLINE_MS
)
MIXES = {
    "healthy": {},
    "30% 529 (retry-after 0.2 s)": {"claude-sonnet-4-6": {"status": 529, "rate": 0.3, "retry_after_s": 0.2}},
    "30% 529 on every model": {"*": {"status": 529, "rate": 0.3}},
    "30% 429 (no retry-after)": {"claude-sonnet-4-6": {"status": 429, "rate": 0.3}},
    "30% 429 (retry-after 2 s)": {"claude-sonnet-4-6": {"status": 429, "rate": 0.3, "retry_after_s": 2}},
    "primary down (529)": {"claude-sonnet-4-6": {"status": 529}},
    "primary slow (3 s)": {"claude-sonnet-4-6": {"latency_ms": 3000}},
    "primary hangs": {"claude-sonnet-4-6": {"hang": True}},
    "all down (503)": {"*": {"status": 503}},
}


def control(url: str, method: str, path: str, body: dict | None = None) -> dict:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url + path, data=data, method=method, headers={"content-type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


async def drive(path: str, n: int, concurrency: int) -> list[tuple[bool, float]]:
    results: list[tuple[bool, float]] = []

    async def worker(client: Client, count: int) -> None:
        for _ in range(count):
            started = time.perf_counter()
            reply = await client.call(FRAME)
            results.append((bool(reply.get("ok")), time.perf_counter() - started))

    async with trio.open_nursery() as outer:
        clients = [await Client.open(path, outer) for _ in range(concurrency)]
        async with trio.open_nursery() as workers:
            for client in clients:
                workers.start_soon(worker, client, n // concurrency)
        outer.cancel_scope.cancel()
    return results


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=480)
    parser.add_argument("--concurrency", type=int, default=16)
    args = parser.parse_args()
    print(f"chaos benchmark: {args.requests} requests per mix, concurrency {args.concurrency}, deadline {DEADLINE_MS} ms")
    print("route: sonnet (2 s per attempt, hedge after 400 ms) -> haiku\n")
    print(f"{'mix':32} {'success':>8} {'p50 ms':>8} {'p99 ms':>8} {'calls/req':>10} {'late':>6}")
    for name, faults in MIXES.items():
        with simulator() as (url, _sim), daemon(url, ROUTE) as (path, _proc):
            for model, fault in faults.items():
                control(url, "POST", "/_sim/faults", {"model": model, **fault})
            results = trio.run(drive, path, args.requests, args.concurrency)
            calls = control(url, "GET", "/_sim/stats")["total"]["requests"]
        latencies = [t * 1000 for _, t in results]
        ok = sum(1 for good, _ in results if good)
        late = sum(1 for t in latencies if t > DEADLINE_MS)
        print(
            f"{name:32} {ok / len(results):8.1%} {percentile(latencies, 50):8.1f} {percentile(latencies, 99):8.1f}"
            f" {calls / len(results):10.2f} {late / len(results):6.1%}"
        )


if __name__ == "__main__":
    main()
