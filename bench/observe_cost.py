"""What tracing and usage recording cost on the real path: daemon CPU per request, paired in one run.

    .venv/bin/python bench/observe_cost.py [--requests N] [--rounds R] [--before CHECKOUT] [--only V,V]

Three daemons (their own processes) on one simulated upstream (zero added latency):

  off      the defaults: tracing, usage and the spend watch off
  tracing  [tracing] on, every request sampled, spans to an OTLP/HTTP collector stand-in (another process)
  usage    [usage] and [anomaly] on: the usage sink, the SQLite rollups' writer, the spend watch
  before   with --before: the defaults on the code of another checkout (`git worktree add DIR COMMIT` of the
           commit before tracing was wired in): what tracing off costs the request path

Each round sends N/R requests at concurrency 32 (32 NDJSON connections) to each daemon in turn (the order
rotates every round) and reads the daemon's CPU time (every thread: the span exporter's and the SQLite
writer's included) before and after. Printed: each variant's median CPU per request over the rounds and the
median of the paired per-round differences against `off`. The machine is noisy (2 cores shared by client,
daemons, simulator and collector): compare the paired differences, run it twice.
"""

from __future__ import annotations

import argparse
import socket
import statistics
import subprocess
import sys
from contextlib import ExitStack

import trio

from _common import ROOT, cpu_seconds, daemon, free_port, simulator, wait_for
from overhead import load

VARIANTS = ("off", "tracing", "usage")
COLLECTOR = """
import functools, sys, trio
from sidecard.httpserver import serve_tcp_http
async def answer(request, responder):
    await responder.send(200, [("content-type", "application/json")], b"{}")
trio.run(functools.partial(serve_tcp_http, answer, "127.0.0.1", int(sys.argv[1])))
"""


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=48_000, help="per variant, over all rounds")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--before", metavar="CHECKOUT", help="also run the defaults on this checkout's code")
    parser.add_argument("--only", metavar="V,V", help="run only these variants (off always), e.g. --only before")
    args = parser.parse_args()
    variants = VARIANTS + (("before",) if args.before else ())
    if args.only:
        variants = tuple(v for v in variants if v == "off" or v in args.only.split(","))
    per_round = args.requests // args.rounds
    port = free_port()
    collector = subprocess.Popen([sys.executable, "-c", COLLECTOR, str(port)], cwd=ROOT)
    try:
        wait_for(lambda: socket.create_connection(("127.0.0.1", port), timeout=0.2).close() or True, "the collector")
        extra = {
            "off": "",
            "tracing": f'[tracing]\nenabled = true\nendpoint = "http://127.0.0.1:{port}/v1/traces"\n',
            "usage": '[usage]\nenabled = true\n[anomaly]\nenabled = true\n',
            "before": "",
        }
        with simulator() as (url, _sim), ExitStack() as stack:
            daemons = {name: stack.enter_context(daemon(url, extra[name], source=args.before if name == "before" else None))
                       for name in variants}
            for path, _ in daemons.values():  # warm up: connections, caches, imports
                trio.run(load, path, 32, 100 // 32 + 1)
            cpu: dict[str, list[float]] = {name: [] for name in variants}
            for round_ in range(args.rounds):
                order = variants[round_ % len(variants):] + variants[: round_ % len(variants)]
                for name in order:
                    path, proc = daemons[name]
                    before = cpu_seconds(proc.pid)
                    ok, failed, _ = trio.run(load, path, 32, per_round // 32)
                    assert failed == 0, f"{name}: {failed} requests failed"
                    cpu[name].append((cpu_seconds(proc.pid) - before) / ok * 1e6)
    finally:
        collector.terminate()
        collector.wait()
    print(f"daemon CPU per request, concurrency 32, {args.rounds} rounds of {per_round // 32 * 32} requests per variant\n")
    print("variant    median µs   paired difference vs off, median µs (min..max); before: off minus before")
    for name in variants:
        diffs = [a - b for a, b in zip(cpu[name], cpu["off"])]
        if name == "before":  # what the code with tracing off adds to the code before it
            diffs = [-d for d in diffs]
        paired = "" if name == "off" else f"{statistics.median(diffs):+8.1f}  ({min(diffs):+.1f}..{max(diffs):+.1f})"
        print(f"{name:9}  {statistics.median(cpu[name]):9.1f}   {paired}")


if __name__ == "__main__":
    main()
