"""Overload: offered load at 0.5x to 4x what the upstream can serve, in five modes: sidecard's concurrency
limit and queue with shedding (the default), the same without shedding (so shedding's own effect shows),
adaptive limits (AIMD, gradient) that must find the upstream's cap themselves, and no limit at all (the
provider's own cap answers 429s).

    .venv/bin/python bench/overload.py [--seconds 8] [--mode NAME ...]

The simulated upstream serves at most 16 calls at once, each taking 200 ms: 80 requests/s. Requests arrive
open-loop (at a fixed rate, whatever the replies do), half interactive and half batch, each with a 3 s
deadline. Goodput counts successful replies that arrived within their deadline, per second of the time from
the first request to the last reply (queued requests finish after the offering window closes).

Per run it also prints how fast refusals came (`overloaded` replies: p50 and p99 of their latency as the client
saw it, and p99 as the daemon logged it, which leaves out the client's and the socket's own delays on a busy
machine) and how many admitted requests ended past their deadline (`late`, by the daemon's clock: a success
after it, or a failure other than a refusal). The goal for the default mode: goodput at 4x at least 90% of
goodput at 1x, refusals' p99 under 10 ms, nothing late.
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
import urllib.request
from pathlib import Path

import msgspec
import trio

from _common import daemon, percentile, simulator

UPSTREAM_CONCURRENCY = 16
UPSTREAM_LATENCY_MS = 200
CAPACITY = UPSTREAM_CONCURRENCY / (UPSTREAM_LATENCY_MS / 1000)
DEADLINE_MS = 3000
_decoder = msgspec.json.Decoder()

# The default queue settings (max_queue 1000: deadlines, not the queue's length, bound the wait), but the limit.
MODES = {
    "queue + shedding (default)": f"[queue]\nmax_concurrency = {UPSTREAM_CONCURRENCY}\n",
    "queue, no shedding": f"[queue]\nmax_concurrency = {UPSTREAM_CONCURRENCY}\nshed = false\n",
    "aimd (max 64) + shedding": "[queue]\nmax_concurrency = 64\nadaptive = \"aimd\"\n",
    "gradient (max 64) + shedding": "[queue]\nmax_concurrency = 64\nadaptive = \"gradient\"\n",
    "no limit, no shedding": "[queue]\nmax_concurrency = 100000\nshed = false\n",
}
# The quality judge stays off: its calls would share the simulator's cap of 16 and draw the 429s this measures.
ROUTE = '[quality]\nenabled = false\n[routes.default]\ntargets = [{ model = "claude-sonnet-4-6", timeout_s = 3.0 }]\n'


def control(url: str, path: str, body: dict) -> None:
    request = urllib.request.Request(url + path, data=json.dumps(body).encode(), method="POST",
                                     headers={"content-type": "application/json"})
    urllib.request.urlopen(request, timeout=10).read()


class Client:
    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.waiting: dict[int, trio.Event] = {}
        self.replies: dict[int, dict] = {}
        self.lock = trio.Lock()

    async def read(self) -> None:
        buffer = b""
        while data := await self.stream.receive_some(1 << 16):
            buffer += data
            *lines, buffer = buffer.split(b"\n")
            for line in lines:
                frame = _decoder.decode(line)
                self.replies[frame["id"]] = frame
                self.waiting.pop(frame["id"]).set()

    async def call(self, request_id: int, priority: str) -> dict:
        event = self.waiting[request_id] = trio.Event()
        frame = {"op": "complete", "id": request_id, "priority": priority, "deadline_ms": DEADLINE_MS, "max_tokens": 32,
                 "messages": [{"role": "user", "content": f"overload {request_id}"}]}
        async with self.lock:
            await self.stream.send_all(msgspec.json.encode(frame) + b"\n")
        await event.wait()
        return self.replies.pop(request_id)


async def offer(path: str, rate: float, seconds: float) -> tuple[list[tuple[str, dict, float]], float]:
    """(priority, reply, latency) per request, and the time from the first request to the last reply."""
    results: list[tuple[str, dict, float]] = []
    ids = itertools.count(1)
    async with trio.open_nursery() as outer:
        clients = []
        for _ in range(16):
            client = Client(await trio.open_unix_socket(path))
            outer.start_soon(client.read)
            clients.append(client)

        async def one(client: Client, priority: str) -> None:
            started = time.perf_counter()
            reply = await client.call(next(ids), priority)
            results.append((priority, reply, time.perf_counter() - started))

        async with trio.open_nursery() as requests:
            start = trio.current_time()
            for n in range(int(rate * seconds)):
                await trio.sleep_until(start + n / rate)
                requests.start_soon(one, clients[n % len(clients)], "interactive" if n % 2 == 0 else "batch")
        span = trio.current_time() - start  # the nursery ends with the last reply
        outer.cancel_scope.cancel()
    return results, span


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--mode", action="append", choices=list(MODES), help="only these modes (default: all)")
    parser.add_argument("--load", action="append", type=float, help="only these multiples of capacity (default: 0.5 1 2 4)")
    args = parser.parse_args()
    print(f"overload benchmark: upstream capacity {CAPACITY:.0f} requests/s ({UPSTREAM_CONCURRENCY} at once, "
          f"{UPSTREAM_LATENCY_MS} ms each), deadline {DEADLINE_MS} ms, {args.seconds:g} s per run\n")
    print(f"{'mode':30} {'load':>5} {'goodput/s':>10} {'p50 ms':>8} {'p99 ms':>8} {'ok int/batch':>13} {'refused':>8} "
          f"{'ref p50':>8} {'ref p99':>8} {'in sc':>8} {'late':>6}")
    for mode in args.mode or MODES:
        extra = MODES[mode]
        goodput = {}
        for multiple in args.load or (0.5, 1.0, 2.0, 4.0):
            with simulator() as (url, _sim), daemon(url, ROUTE + extra) as (path, _proc):
                control(url, "/_sim/limits", {"concurrency_limit": UPSTREAM_CONCURRENCY})
                control(url, "/_sim/faults", {"model": "*", "latency_ms": UPSTREAM_LATENCY_MS})
                results, span = trio.run(offer, path, CAPACITY * multiple, args.seconds)
                logged = [_decoder.decode(line) for line in (Path(path).with_name("sidecard.log")).read_bytes().splitlines()]
            requests = [e for e in logged if e.get("event") == "request"]
            refused_in_daemon = [e["latency_ms"] for e in requests if e["outcome"] == "overloaded"]
            good = [t for _, r, t in results if r.get("ok") and t * 1000 <= DEADLINE_MS]
            refusals = [t * 1000 for _, r, t in results if not r.get("ok") and r["error"]["code"] == "overloaded"]
            late = sum(1 for e in requests if e["outcome"] not in ("ok", "overloaded")
                       or (e["outcome"] == "ok" and e["latency_ms"] > DEADLINE_MS))
            ok_latencies = [t * 1000 for _, r, t in results if r.get("ok")]
            refused = len(refusals)
            ok_int = sum(1 for p, r, _ in results if r.get("ok") and p == "interactive")
            ok_batch = sum(1 for p, r, _ in results if r.get("ok") and p == "batch")
            p50 = percentile(ok_latencies, 50) if ok_latencies else float("nan")
            p99 = percentile(ok_latencies, 99) if ok_latencies else float("nan")
            r50 = percentile(refusals, 50) if refusals else float("nan")
            r99 = percentile(refusals, 99) if refusals else float("nan")
            d99 = percentile(refused_in_daemon, 99) if refused_in_daemon else float("nan")
            goodput[multiple] = len(good) / span
            print(f"{mode:30} {multiple:4.1f}x {goodput[multiple]:10.1f} {p50:8.0f} {p99:8.0f} "
                  f"{ok_int:6d}/{ok_batch:<6d} {refused:8d} {r50:8.1f} {r99:8.1f} {d99:8.1f} {late:6d}")
        if 1.0 in goodput and 4.0 in goodput:
            print(f"{mode:30} goodput at 4x: {goodput[4.0] / goodput[1.0]:.0%} of 1x")


if __name__ == "__main__":
    main()
