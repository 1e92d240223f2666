"""What each feature that is on by default costs a request: daemon CPU per request, paired in one run.

    .venv/bin/python bench/feature_cost.py [--requests N] [--rounds R]

Daemons (their own processes) on one simulated upstream (zero added latency), the same code, each with one
default switched off:

  defaults       as deployed
  no judge       [quality] sample_rate = 0: the cheap checks on every answer, no judge calls (5 % by default)
  no quality     [quality] enabled = false: neither
  no log line    [log] level = "warning": no `request` line per request
  no throttle    [throttle] enabled = false: the provider's rate-limit headers not read
  none of them   quality, log line and throttle off together

Each round sends N/R requests at concurrency 32 (32 NDJSON connections) to each daemon in turn (the order
rotates every round). Printed: each variant's median CPU per request and the median of its paired per-round
differences against `defaults`. The machine is noisy (2 cores shared by client, daemons and simulator): a
difference under 3 µs is noise; run it twice.
"""

from __future__ import annotations

import argparse
import statistics
from contextlib import ExitStack

import trio

from _common import cpu_seconds, daemon, simulator
from overhead import load

QUALITY_OFF = "[quality]\nenabled = false\n"
THROTTLE_OFF = "[throttle]\nenabled = false\n"
VARIANTS = {  # name: (extra config, log level)
    "defaults": ("", "info"),
    "no judge": ("[quality]\nsample_rate = 0.0\ncanary_sample_rate = 0.0\n", "info"),
    "no quality": (QUALITY_OFF, "info"),
    "no log line": ("", "warning"),
    "no throttle": (THROTTLE_OFF, "info"),
    "none of them": (QUALITY_OFF + THROTTLE_OFF, "warning"),
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=24_000, help="per variant, over all rounds")
    parser.add_argument("--rounds", type=int, default=6)
    args = parser.parse_args()
    per_round = args.requests // args.rounds
    names = list(VARIANTS)
    with simulator() as (url, _sim), ExitStack() as stack:
        daemons = {name: stack.enter_context(daemon(url, extra, log_level=level)) for name, (extra, level) in VARIANTS.items()}
        for path, _ in daemons.values():  # warm up: connections, caches
            trio.run(load, path, 32, 1000 // 32)
        cpu: dict[str, list[float]] = {name: [] for name in names}
        for round_ in range(args.rounds):
            for name in names[round_ % len(names):] + names[: round_ % len(names)]:
                path, proc = daemons[name]
                before = cpu_seconds(proc.pid)
                ok, failed, _ = trio.run(load, path, 32, per_round // 32)
                assert failed == 0, f"{name}: {failed} requests failed"
                cpu[name].append((cpu_seconds(proc.pid) - before) / ok * 1e6)
    print(f"daemon CPU per request, NDJSON socket, concurrency 32, {args.rounds} rounds of {per_round // 32 * 32}\n")
    print("variant         CPU µs   paired vs defaults, median µs")
    for name in names:
        diffs = [a - b for a, b in zip(cpu[name], cpu["defaults"])]
        print(f"{name:14} {statistics.median(cpu[name]):7.1f}   {statistics.median(diffs):+7.1f}")


if __name__ == "__main__":
    main()
