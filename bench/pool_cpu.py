"""Client CPU per upstream call: the raw pool, the SDK on TrioTransport, and the SDK's default stack.

    .venv/bin/python bench/pool_cpu.py [--requests N]

A minimal h11 server runs in a subprocess (its CPU is not counted); the client measures its own CPU with
`time.process_time()` over N requests at concurrency 1 and 32, after a warm-up.
"""

from __future__ import annotations

import argparse
import functools
import json
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable

import h11
import trio

REPLY = json.dumps({
    "id": "msg_bench", "type": "message", "role": "assistant", "model": "claude-bench",
    "content": [{"type": "text", "text": "Hello! How can I help you today?"}],
    "stop_reason": "end_turn", "stop_sequence": None,
    "usage": {"input_tokens": 12, "output_tokens": 9},
}).encode()
MESSAGES = [{"role": "user", "content": "Say hello"}]


# ------------------------------------------------------------ server (subprocess)

async def _serve_connection(stream: trio.SocketStream) -> None:
    conn = h11.Connection(h11.SERVER)
    head = h11.Response(status_code=200, headers=[
        (b"content-type", b"application/json"), (b"content-length", b"%d" % len(REPLY)),
        (b"request-id", b"req_bench"),
    ])
    try:
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                data = await stream.receive_some(65536)
                conn.receive_data(data)
                if not data:
                    return
            elif type(event) is h11.EndOfMessage:
                await stream.send_all(conn.send(head) + conn.send(h11.Data(data=REPLY)) + conn.send(h11.EndOfMessage()))
                conn.start_next_cycle()
            elif type(event) is h11.ConnectionClosed:
                return
    except (trio.BrokenResourceError, h11.ProtocolError):
        pass


async def _serve() -> None:
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(functools.partial(trio.serve_tcp, _serve_connection, 0, host="127.0.0.1"))
        print(listeners[0].socket.getsockname()[1], flush=True)


# ------------------------------------------------------------ client

async def _measure(call: Callable[[], Awaitable[object]], requests: int, concurrency: int) -> tuple[float, float]:
    """(CPU µs per request, requests per second)."""
    async def worker(n: int) -> None:
        for _ in range(n):
            await call()

    async def run(total: int) -> None:
        async with trio.open_nursery() as nursery:
            for i in range(concurrency):
                nursery.start_soon(worker, total // concurrency + (i < total % concurrency))

    await run(max(concurrency * 4, requests // 10))  # warm-up: connections, SDK platform detection
    cpu, wall = time.process_time(), time.perf_counter()
    await run(requests)
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    return cpu / requests * 1e6, requests / wall


async def _bench(port: int, requests: int) -> None:
    import anthropic
    import httpx2

    from sidecard.upstream.pool import ConnectionPool, Origin
    from sidecard.upstream.transport import TrioTransport

    base_url = f"http://127.0.0.1:{port}"
    pool = ConnectionPool()
    origin = Origin.from_url(base_url)
    headers = [
        (b"x-api-key", b"bench"), (b"anthropic-version", b"2023-06-01"),
        (b"content-type", b"application/json"), (b"accept", b"application/json"),
    ]
    body = json.dumps({"model": "claude-bench", "max_tokens": 64, "messages": MESSAGES}).encode()

    async def raw_pool() -> None:
        response = await pool.request(origin, b"POST", b"/v1/messages", headers, body, read_timeout=60)
        await response.read()

    common = {"api_key": "bench", "base_url": base_url, "max_retries": 0, "open_telemetry": False}
    sdk_trio = anthropic.AsyncAnthropic(http_client=httpx2.AsyncClient(transport=TrioTransport(pool)), **common)
    sdk_default = anthropic.AsyncAnthropic(**common)

    def sdk_call(client: anthropic.AsyncAnthropic) -> Callable[[], Awaitable[object]]:
        async def call() -> None:
            await client.messages.with_raw_response.create(model="claude-bench", max_tokens=64, messages=MESSAGES)
        return call

    cases = [
        ("pool.request + read", raw_pool, requests),
        ("SDK on TrioTransport", sdk_call(sdk_trio), requests // 4),
        ("SDK default (httpx2+anyio)", sdk_call(sdk_default), requests // 4),
    ]
    print(f"{'client':<28} {'conc':>4} {'requests':>8} {'CPU µs/req':>11} {'req/s':>8}")
    try:
        for name, call, n in cases:
            for concurrency in (1, 32):
                try:
                    cpu_us, rate = await _measure(call, n, concurrency)
                except Exception as exc:  # the default stack may not run under Trio: report, go on
                    print(f"{name:<28} {concurrency:>4} skipped: {type(exc).__name__}: {exc}")
                    break
                print(f"{name:<28} {concurrency:>4} {n:>8} {cpu_us:>11.0f} {rate:>8.0f}")
    finally:
        for client in (sdk_trio, sdk_default):
            await client.close()
        await pool.aclose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=4000)
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        trio.run(_serve)
        return
    server = subprocess.Popen([sys.executable, __file__, "--serve"], stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout is not None
        port = int(server.stdout.readline())
        trio.run(_bench, port, args.requests)
    finally:
        server.terminate()
        server.wait()


if __name__ == "__main__":
    main()
