"""What trio's own parts cost on this machine: the floor under each request's scopes, tasks and task switches.

    .venv/bin/python bench/trio_floor.py

Prints the CPU time of each primitive the request path uses, alone in a loop (best of 5 runs of 50,000). A
request on the NDJSON socket enters two cancel scopes (its deadline's and, with a fallback target, its
attempt's), starts one task and makes two or three task switches: compare their sum with the daemon's CPU per
request from `bench/overhead.py` in the same hour.
"""

from __future__ import annotations

import time

import trio

N = 50_000
RUNS = 5


async def _noop() -> None:
    pass


async def scope_without_deadline() -> None:
    for _ in range(N):
        with trio.CancelScope():
            pass


async def scope_with_deadline() -> None:
    for _ in range(N):
        with trio.CancelScope(deadline=trio.current_time() + 60):
            pass


async def spawn_and_exit() -> None:
    async with trio.open_nursery() as nursery:
        for i in range(N):
            nursery.start_soon(_noop)
            if i % 32 == 31:  # (a batch, as requests arrive at concurrency 32)
                await trio.lowlevel.checkpoint()


async def task_switch() -> None:
    for _ in range(N):
        await trio.lowlevel.checkpoint()


async def effective_deadline_8_deep() -> None:
    async def nested(depth: int) -> None:
        if depth:
            with trio.CancelScope():
                await nested(depth - 1)
            return
        for _ in range(N):
            trio.current_effective_deadline()

    await nested(8)


async def current_time() -> None:
    for _ in range(N):
        trio.current_time()


async def main() -> None:
    print(f"trio {trio.__version__}: CPU µs per operation, best of {RUNS} runs of {N:,}\n")
    for bench in (scope_without_deadline, scope_with_deadline, spawn_and_exit, task_switch, effective_deadline_8_deep, current_time):
        best = float("inf")
        for _ in range(RUNS):
            started = time.process_time()
            await bench()
            best = min(best, time.process_time() - started)
        print(f"{bench.__name__.replace('_', ' '):32} {best / N * 1e6:6.2f}")


if __name__ == "__main__":
    trio.run(main)
