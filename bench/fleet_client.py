"""Which Redis client for fleet mode's request path: CPU and latency per round trip, on Trio, on a real server.

    .venv/bin/python bench/fleet_client.py [--quick]

Starts a throwaway redis-server on a Unix socket, then runs one request-shaped EVALSHA (4 keys, 8 arguments,
an 8-element reply, like the request script) N times at concurrency 1 and 32 on:
  1. hiredis raw: hiredis's Reader over a bare Trio socket, one call at a time (the floor for any client);
  2. sidecard.fleet.connection: hiredis's Reader behind our multiplexer (the one we ship: deadline, breaker,
     many tasks pipelined on one socket);
  3. coredis under Trio (through anyio), one client shared by all tasks.
Prints client CPU µs per round trip (process time: the server is another process) and latency p50/p99.
coredis is not a dependency of sidecard: `.venv/bin/pip install coredis` to include it (skipped otherwise).
"""

from __future__ import annotations

import statistics
import time

import hiredis
import trio

from _common import round_trips_from_args, throwaway_store

from sidecard.fleet.connection import Connection, Script, new_reader
from sidecard.fleet.devserver import LocalStore
from sidecard.fleet.settings import parse_url

SCRIPT = Script("bench", b"""
local a = tonumber(redis.call('GET', KEYS[1]) or '0')
local b = tonumber(redis.call('GET', KEYS[2]) or '0')
redis.call('SET', KEYS[1], a + 1, 'PX', 60000)
local h = redis.call('HGET', KEYS[3], 'spent')
local c = redis.call('EXISTS', KEYS[4])
return {1, tostring(a), tostring(b), h or '', c, ARGV[1], ARGV[2], ARGV[8]}
""")
KEYS = ["{bench}:rl:user:ab12:r", "{bench}:rl:global:r", "{bench}:b:day:global", "{bench}:c:0123456789abcdef"]
ARGS = ["1700000000.123456", "sidecard-fleet/1", "0.5", "10", "1", "0.0125", "86400", "req-000001"]


def report(name: str, concurrency: int, n: int, cpu_s: float, latencies: list[float]) -> None:
    latencies.sort()
    p50 = statistics.median(latencies) * 1e6
    p99 = latencies[int(len(latencies) * 0.99) - 1] * 1e6
    print(f"  {name:<28} c={concurrency:<3} CPU {cpu_s / n * 1e6:7.1f} µs/op   latency p50 {p50:7.1f} µs  p99 {p99:7.1f} µs")


async def measure(name: str, concurrency: int, n: int, one_call) -> None:
    """`n` calls spread over `concurrency` tasks, after a warm-up."""
    for _ in range(200):
        await one_call()
    latencies: list[float] = []

    async def worker(count: int) -> None:
        for _ in range(count):
            t = time.perf_counter()
            await one_call()
            latencies.append(time.perf_counter() - t)

    cpu = time.process_time()
    async with trio.open_nursery() as nursery:
        for _ in range(concurrency):
            nursery.start_soon(worker, n // concurrency)
    report(name, concurrency, len(latencies), time.process_time() - cpu, latencies)


async def raw_hiredis(store: LocalStore, n: int) -> None:
    stream = await trio.open_unix_socket(store.socket_path)
    reader = new_reader()
    await stream.send_all(hiredis.pack_command(("SCRIPT", "LOAD", SCRIPT.source)))
    while reader.gets() is False:
        reader.feed(await stream.receive_some(65536))

    async def one_call() -> None:
        await stream.send_all(hiredis.pack_command(("EVALSHA", SCRIPT.sha, 4, *KEYS, *ARGS)))
        while (reply := reader.gets()) is False:
            reader.feed(await stream.receive_some(65536))
        assert reply[0] == 1

    await measure("hiredis raw (sequential)", 1, n, one_call)
    await stream.aclose()


async def ours(store: LocalStore, n: int, concurrency: int) -> None:
    connection = Connection(parse_url(store.url), op_timeout_s=5.0, scripts=[SCRIPT])
    async with trio.open_nursery() as nursery:
        await nursery.start(connection.run)

        async def one_call() -> None:
            reply = await connection.run_script(SCRIPT, KEYS, ARGS)
            assert reply[0] == 1

        await measure("sidecard.fleet (hiredis)", concurrency, n, one_call)
        nursery.cancel_scope.cancel()


async def with_coredis(store: LocalStore, n: int, concurrency: int) -> None:
    try:
        import coredis
    except ImportError:
        print("  coredis                      (not installed: .venv/bin/pip install coredis)")
        return
    async with coredis.Redis(unix_socket_path=store.socket_path, decode_responses=False) as client:
        sha = await client.script_load(SCRIPT.source)

        async def one_call() -> None:
            reply = await client.evalsha(sha, keys=KEYS, args=ARGS)
            assert reply[0] == 1

        await measure(f"coredis {coredis.__version__}", concurrency, n, one_call)


def main() -> None:
    n = round_trips_from_args()
    with throwaway_store() as store:
        print(f"one request-shaped EVALSHA, {n} round trips, on {store.binary} over a Unix socket")
        for concurrency in (1, 32):
            if concurrency == 1:
                trio.run(raw_hiredis, store, n)
            trio.run(ours, store, n, concurrency)
            trio.run(with_coredis, store, n, concurrency)


if __name__ == "__main__":
    main()
