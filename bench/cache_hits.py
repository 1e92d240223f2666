"""Cache hits through the daemon's socket: latency at concurrency 1, hits/s at 32, memory per cached KiB.

    .venv/bin/python bench/cache_hits.py
"""

from __future__ import annotations

import json
import socket
import time

import trio

from _common import Client, cpu_seconds, current_rss_mb, daemon, simulator, summary

PING = b'{"op":"ping","id":0}\n'  # the floor: this client and the socket hop, no engine
HIT = b'{"op":"complete","id":0,"temperature":0,"max_tokens":64,"messages":[{"role":"user","content":"cached question"}]}\n'


def admin_status(admin_path: str) -> dict:
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(admin_path)
        s.sendall(b'{"op":"status","id":1}\n')
        data = b""
        while not data.endswith(b"\n"):
            data += s.recv(1 << 16)
    return json.loads(data)["result"]


async def latency(path: str, n: int, frame: bytes = HIT) -> list[float]:
    out = []
    async with trio.open_nursery() as nursery:
        client = await Client.open(path, nursery)
        assert (await client.call(frame))["ok"]  # for a hit: the miss that fills the entry
        for _ in range(n):
            t = time.perf_counter()
            reply = await client.call(frame)
            out.append(time.perf_counter() - t)
            assert frame is PING or reply["cached"], reply
        nursery.cancel_scope.cancel()
    return out


async def throughput(path: str, connections: int, per_connection: int) -> float:
    async def worker(client: Client) -> None:
        for _ in range(per_connection):
            await client.call(HIT)

    async with trio.open_nursery() as outer:
        clients = [await Client.open(path, outer) for _ in range(connections)]
        started = time.perf_counter()
        async with trio.open_nursery() as workers:
            for client in clients:
                workers.start_soon(worker, client)
        elapsed = time.perf_counter() - started
        outer.cancel_scope.cancel()
    return connections * per_connection / elapsed


async def fill(path: str, entries: int) -> None:
    async with trio.open_nursery() as nursery:
        client = await Client.open(path, nursery)
        for i in range(entries):
            frame = (
                b'{"op":"complete","id":0,"temperature":0,"max_tokens":600,'
                b'"messages":[{"role":"user","content":"fill %d [[sim:long]]"}]}\n' % i
            )
            assert (await client.call(frame))["ok"]
        nursery.cancel_scope.cancel()


def main() -> None:
    print("cache-hit benchmark\n")
    with simulator() as (url, _sim), daemon(url, "[cache]\nmax_bytes = 268435456\nmax_entries = 100000\n") as (path, proc):
        p50, p99 = summary(trio.run(latency, path, 5000))
        print(f"concurrency 1: hit round trip p50 {p50 * 1000:.0f} us, p99 {p99 * 1000:.0f} us")
        floor50, floor99 = summary(trio.run(latency, path, 5000, PING))
        print(f"               ping round trip p50 {floor50 * 1000:.0f} us, p99 {floor99 * 1000:.0f} us (this client + socket)")
        cpu0 = cpu_seconds(proc.pid)
        rate = trio.run(throughput, path, 32, 2000)
        cpu = (cpu_seconds(proc.pid) - cpu0) / (32 * 2000) * 1e6
        print(f"concurrency 32: {rate:,.0f} hits/s, daemon CPU {cpu:.0f} us per hit")

        admin = path.replace("app.sock", "admin.sock")
        before_rss, before = current_rss_mb(proc.pid), admin_status(admin)["cache"]["bytes"]
        trio.run(fill, path, 3000)
        after_rss, after = current_rss_mb(proc.pid), admin_status(admin)["cache"]["bytes"]
        stored_kib = (after - before) / 1024
        print(
            f"memory: {stored_kib:,.0f} KiB accounted for 3,000 answers of ~4 KiB; "
            f"RSS grew {after_rss - before_rss:.1f} MB = {(after_rss - before_rss) * 1024 / stored_kib:.2f} KiB of RSS per cached KiB"
        )


if __name__ == "__main__":
    main()
