"""Streaming overhead: time to first token through sidecard minus direct, and delta frames per second.

    .venv/bin/python bench/streaming.py
"""

from __future__ import annotations

import asyncio
import itertools
import time

import anthropic
import msgspec
import trio

from _common import cpu_seconds, daemon, percentile, simulator

QUESTION = "Stream me one sentence about reliable systems."
_decoder = msgspec.json.Decoder()


def direct_ttft(url: str, n: int, concurrency: int) -> list[float]:
    async def run() -> list[float]:
        client = anthropic.AsyncAnthropic(api_key="bench", base_url=url, max_retries=0)
        out: list[float] = []

        async def one() -> None:
            started = time.perf_counter()
            stream = await client.messages.create(
                model="claude-sonnet-4-6", max_tokens=64, messages=[{"role": "user", "content": QUESTION}], stream=True
            )
            first = None
            async for event in stream:
                if first is None and event.type == "content_block_delta":
                    first = time.perf_counter() - started
            out.append(first or 0.0)

        for _ in range(n // concurrency):
            await asyncio.gather(*(one() for _ in range(concurrency)))
        await client.close()
        return out

    return asyncio.run(run())


class StreamClient:
    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.ids = itertools.count(1)
        self.queues: dict[int, trio.MemorySendChannel] = {}

    @classmethod
    async def open(cls, path: str, nursery: trio.Nursery) -> StreamClient:
        client = cls(await trio.open_unix_socket(path))
        nursery.start_soon(client._read)
        return client

    async def _read(self) -> None:
        buffer = b""
        while data := await self.stream.receive_some(1 << 16):
            buffer += data
            *lines, buffer = buffer.split(b"\n")
            for line in lines:
                frame = _decoder.decode(line)
                self.queues[frame["id"]].send_nowait(frame)

    async def run(self, content: str, max_tokens: int) -> tuple[float, int]:
        """(seconds to the first delta, number of delta frames)."""
        request_id = next(self.ids)
        send, receive = trio.open_memory_channel[dict](10_000)
        self.queues[request_id] = send
        frame = {"op": "complete", "id": request_id, "stream": True, "max_tokens": max_tokens,
                 "messages": [{"role": "user", "content": content}]}
        started = time.perf_counter()
        await self.stream.send_all(msgspec.json.encode(frame) + b"\n")
        first, deltas = None, 0
        async for event in receive:
            if event.get("event") == "delta":
                deltas += 1
                if first is None:
                    first = time.perf_counter() - started
            elif event.get("event") != "start" and event.get("event") != "block":
                break
        del self.queues[request_id]
        return first or 0.0, deltas


async def sidecard_ttft(path: str, n: int, concurrency: int) -> list[float]:
    out: list[float] = []
    async with trio.open_nursery() as outer:
        clients = [await StreamClient.open(path, outer) for _ in range(concurrency)]

        async def worker(client: StreamClient) -> None:
            for _ in range(n // concurrency):
                ttft, _ = await client.run(QUESTION, 64)
                out.append(ttft)

        async with trio.open_nursery() as workers:
            for client in clients:
                workers.start_soon(worker, client)
        outer.cancel_scope.cancel()
    return out


async def delta_rate(path: str, streams: int, concurrency: int) -> tuple[int, float]:
    total = 0
    async with trio.open_nursery() as outer:
        clients = [await StreamClient.open(path, outer) for _ in range(concurrency)]
        started = time.perf_counter()

        async def worker(client: StreamClient, k: int) -> None:
            nonlocal total
            for i in range(streams // concurrency):
                _, deltas = await client.run(f"long {k}-{i} [[sim:long]]", 1500)
                total += deltas

        async with trio.open_nursery() as workers:
            for k, client in enumerate(clients):
                workers.start_soon(worker, client, k)
        elapsed = time.perf_counter() - started
        outer.cancel_scope.cancel()
    return total, elapsed


def main() -> None:
    print("streaming benchmark (simulated upstream, zero added latency)\n")
    print(f"{'time to first token, ms':34} {'p50':>7} {'p99':>7}")
    with simulator() as (url, _sim), daemon(url) as (path, proc):
        for concurrency in (1, 32):
            n = 640 if concurrency == 32 else 400
            direct = [t * 1000 for t in direct_ttft(url, n, concurrency)]
            via = [t * 1000 for t in trio.run(sidecard_ttft, path, n, concurrency)]
            d50, d99 = percentile(direct, 50), percentile(direct, 99)
            s50, s99 = percentile(via, 50), percentile(via, 99)
            print(f"  C={concurrency:<3} direct SDK stream               {d50:7.2f} {d99:7.2f}")
            print(f"  C={concurrency:<3} through sidecard                {s50:7.2f} {s99:7.2f}")
            print(f"  C={concurrency:<3} sidecard minus direct           {s50 - d50:+7.2f} {s99 - d99:+7.2f}")
        cpu0 = cpu_seconds(proc.pid)
        deltas, elapsed = trio.run(delta_rate, path, 64, 32)
        cpu = cpu_seconds(proc.pid) - cpu0
        print(f"\ndelta frames through one daemon: {deltas / elapsed:,.0f} per second "
              f"({deltas:,} frames, 32 concurrent long streams, daemon CPU {cpu / deltas * 1e6:.0f} us per frame)")


if __name__ == "__main__":
    main()
