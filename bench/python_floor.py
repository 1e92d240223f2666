"""How far sidecard's CPU per request is above the floor for Python: paired rounds in one run, beside TensorZero.

    .venv/bin/python bench/python_floor.py [--requests N] [--rounds R]

Uses the peers' fake upstream and load generator (`../shared/bench-peers`, node), and TensorZero when
`peers-setup.sh` installed it under /tmp/peers. Each process serves the same exchange at concurrency 32:

  floor          this file's `serve`: a proxy with nothing but the exchange (Trio, llhttp through httptools, msgspec;
                 a keep-alive upstream pool, one timeout per request), on a Unix socket (NDJSON) and on HTTP
  sidecard bare  the daemon with what `bench/feature_cost.py` can switch off switched off (quality checks and the
                 judge, the request log line, the rate-limit headers); deadlines, retries, breakers, budgets,
                 traffic control, the cache lookup and metrics stay
  sidecard       the daemon as deployed (the peers run's config)
  tensorzero     the Rust gateway, HTTP only

Each round sends N/R requests to each (the order rotates every round) and reads the CPU of each process tree from
/proc. Printed: the median CPU per request of each, and its ratio to TensorZero's when there is one. What
sidecard costs above the floor is what its features cost in Python; the floor is what no Python proxy goes under.
"""

from __future__ import annotations

import argparse
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
from contextlib import ExitStack, contextmanager
from functools import partial
from pathlib import Path

import httptools
import msgspec
import trio

from _common import BIN, ROOT, cpu_seconds, free_port, wait_for

PEERS = ROOT.parent / "shared" / "bench-peers"
TENSORZERO = Path("/tmp/peers/tz-venv/bin/python")
MODEL = "claude-sonnet-4-6"
BODY = '{"model":"%s","max_tokens":10,"messages":[{"role":"user","content":"hi"}]}' % MODEL
FRAME = '{"op":"complete","model":"%s","max_tokens":10,"messages":[{"role":"user","content":"hi"}],"cache":"bypass"}' % MODEL
TIMEOUT_S = 60.0


# ------------------------------------------------------------------ the floor: the exchange and nothing else


class Message(msgspec.Struct):
    role: str
    content: str


class Frame(msgspec.Struct):
    id: str
    model: str
    max_tokens: int
    messages: list[Message]
    op: str = "complete"
    cache: str | None = None


class Ask(msgspec.Struct):
    model: str
    max_tokens: int
    messages: list[Message]


class Block(msgspec.Struct):
    type: str
    text: str = ""


class Usage(msgspec.Struct):
    input_tokens: int
    output_tokens: int


class Reply(msgspec.Struct):
    id: str
    model: str
    content: list[Block]
    stop_reason: str | None
    usage: Usage


_encoder = msgspec.json.Encoder()
_frames = msgspec.json.Decoder(Frame)
_asks = msgspec.json.Decoder(Ask)
_replies = msgspec.json.Decoder(Reply)


class _Message:
    """What httptools hands over of one request or response: its body, and whether it is whole."""

    def __init__(self) -> None:
        self.body = bytearray()
        self.done = False

    def on_body(self, data: bytes) -> None:
        self.body += data

    def on_message_complete(self) -> None:
        self.done = True


class Upstream:
    """Keep-alive connections to one origin; a request's head rendered once."""

    def __init__(self, host: str, port: int) -> None:
        self.address = (host, port)
        self.idle: list[socket.socket] = []
        self.head = (
            f"POST /v1/messages HTTP/1.1\r\nhost: {host}:{port}\r\nx-api-key: sk-fake\r\n"
            "anthropic-version: 2023-06-01\r\ncontent-type: application/json\r\ncontent-length: "
        ).encode()

    async def call(self, body: bytes) -> bytes:
        sock = self.idle.pop() if self.idle else await self._connect()
        try:
            sock.send(self.head + b"%d\r\n\r\n" % len(body) + body)
            response = _Message()
            parser = httptools.HttpResponseParser(response)
            while not response.done:
                await trio.lowlevel.wait_readable(sock)
                data = sock.recv(65536)
                if not data:
                    raise ConnectionError("upstream closed")
                parser.feed_data(data)
        except BaseException:
            sock.close()
            raise
        self.idle.append(sock)
        return bytes(response.body)

    async def _connect(self) -> socket.socket:
        sock = socket.socket()
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setblocking(False)
        try:
            sock.connect(self.address)
        except BlockingIOError:
            await trio.lowlevel.wait_writable(sock)
        return sock


async def _exchange(upstream: Upstream, ask: Frame | Ask) -> Reply:
    with trio.fail_after(TIMEOUT_S):
        body = _encoder.encode(Ask(ask.model, ask.max_tokens, ask.messages))
        return _replies.decode(await upstream.call(body))


async def _serve_ndjson(upstream: Upstream, stream: trio.SocketStream) -> None:
    buffer = b""
    while data := await stream.receive_some(65536):
        buffer += data
        *lines, buffer = buffer.split(b"\n")
        for line in lines:
            frame = _frames.decode(line)
            reply = await _exchange(upstream, frame)
            answer = {"id": frame.id, "ok": True, "text": reply.content[0].text, "model": reply.model,
                      "stop_reason": reply.stop_reason, "usage": reply.usage}
            await stream.send_all(_encoder.encode(answer) + b"\n")


async def _serve_http(upstream: Upstream, stream: trio.SocketStream) -> None:
    request = _Message()
    parser = httptools.HttpRequestParser(request)
    while data := await stream.receive_some(65536):
        parser.feed_data(data)
        if request.done:
            reply = await _exchange(upstream, _asks.decode(request.body))
            body = _encoder.encode(reply)
            head = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n" % len(body)
            await stream.send_all(head + body)
            request = _Message()
            parser = httptools.HttpRequestParser(request)


async def serve(
    upstream_url: str, socket_path: str, http_port: int, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED
) -> None:
    """Serve both faces until cancelled; `started` with the HTTP port (HTTP_PORT 0: one the system picks)."""
    host, port = upstream_url.removeprefix("http://").split(":")
    upstream = Upstream(host, int(port))
    async with trio.open_nursery() as nursery:
        unix = trio.socket.socket(socket.AF_UNIX)
        await unix.bind(socket_path)
        unix.listen(128)
        nursery.start_soon(trio.serve_listeners, partial(_serve_ndjson, upstream), [trio.SocketListener(unix)])
        listeners = await nursery.start(partial(trio.serve_tcp, partial(_serve_http, upstream), http_port, host="127.0.0.1"))
        task_status.started(listeners[0].socket.getsockname()[1])


# ------------------------------------------------------------------ the run


def _tree_cpu(pid: int) -> float:
    """CPU seconds of PID and its children (TensorZero runs in its own process; node has none that work)."""
    total = cpu_seconds(pid)
    for child in subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True).stdout.split():
        total += _tree_cpu(int(child))
    return total


def _load(target: list[str], n: int) -> None:
    out = subprocess.run(["node", str(PEERS / "load.js"), *target, str(n), "32"], capture_output=True, text=True, check=True)
    if '"errors":0' not in out.stdout:
        raise SystemExit(f"bench: errors in {target[:2]}: {out.stdout.strip()}")


@contextmanager
def _process(argv: list[str], *, cwd: Path, env: dict[str, str] | None = None):
    with (cwd / "out.log").open("wb") as out:
        proc = subprocess.Popen(argv, cwd=cwd, env={**os.environ, **(env or {})}, stdout=out, stderr=subprocess.STDOUT)
    try:
        yield proc
    finally:
        proc.terminate()
        proc.wait()


def _directory(stack: ExitStack) -> Path:
    """A temporary directory, removed at the end of the run (after the processes in it stop)."""
    return Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="scb-", dir="/tmp")))


def _sidecard(stack: ExitStack, upstream: str, extra: str, log_level: str) -> tuple[int, str, str]:
    tmp = _directory(stack)
    http = free_port()
    (tmp / "sc.toml").write_text(
        f'[upstream]\nbase_url = "{upstream}"\n[http]\naddress = "127.0.0.1:{http}"\n[log]\nlevel = "{log_level}"\n' + extra
    )
    proc = stack.enter_context(_process(
        [str(BIN / "sidecard"), "serve", "--config", "sc.toml", "--socket", "s.sock", "--metrics", f"127.0.0.1:{free_port()}"],
        cwd=tmp, env={"ANTHROPIC_API_KEY": "sk-fake"},
    ))
    wait_for(lambda: (tmp / "s.sock").exists(), "sidecard")
    return proc.pid, str(tmp / "s.sock"), f"http://127.0.0.1:{http}/v1/messages"


def _tensorzero(stack: ExitStack, upstream: str) -> str | None:
    if not TENSORZERO.exists():
        return None
    tmp = _directory(stack)
    (tmp / "tz.toml").write_text(
        f'[gateway]\ndisable_pseudonymous_usage_analytics = true\n[models.{MODEL}]\nrouting = ["anthropic"]\n'
        f'[models.{MODEL}.providers.anthropic]\ntype = "anthropic"\nmodel_name = "{MODEL}"\napi_base = "{upstream}/v1/"\n'
        'api_key_location = "env::ANTHROPIC_API_KEY"\n'
    )
    (tmp / "tz.py").write_text(
        "import sys, time\nfrom tensorzero import _start_http_gateway\n"
        "gw = _start_http_gateway(config_file=sys.argv[1], clickhouse_url=None, postgres_url=None, valkey_url=None,\n"
        "                         async_setup=False)\n"
        "print(gw.base_url, flush=True)\nwhile True: time.sleep(3600)\n"
    )
    proc = stack.enter_context(_process(
        [str(TENSORZERO), "tz.py", "tz.toml"], cwd=tmp,
        env={"ANTHROPIC_API_KEY": "sk-fake", "TENSORZERO_DISABLE_PSEUDONYMOUS_USAGE_ANALYTICS": "1", "RUST_LOG": "error"},
    ))
    wait_for(lambda: "http://" in (tmp / "out.log").read_text(), "TensorZero", timeout=60)
    base = re.search(r"http://[\d.]+:\d+", (tmp / "out.log").read_text()).group(0)  # (it prints its OpenAI path too)
    return f"{proc.pid} {base}"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=24_000)
    parser.add_argument("--rounds", type=int, default=6)
    args = parser.parse_args()
    if not (PEERS / "load.js").exists():
        raise SystemExit(f"bench: needs the peers' load generator and fake upstream in {PEERS}")
    per_round = args.requests // args.rounds
    with ExitStack() as stack:
        tmp = _directory(stack)
        port = free_port()
        upstream = f"http://127.0.0.1:{port}"
        stack.enter_context(_process(["node", str(PEERS / "fake_anthropic.js")], cwd=tmp, env={"PORT": str(port)}))
        wait_for(lambda: socket.create_connection(("127.0.0.1", port), timeout=0.2).close() or True, "the fake upstream")
        floor_http = free_port()
        floor = stack.enter_context(_process(
            [sys.executable, __file__, "serve", upstream, str(tmp / "floor.sock"), str(floor_http)], cwd=tmp,
        ))
        wait_for(lambda: (tmp / "floor.sock").exists(), "the floor proxy")
        bare_pid, bare_sock, bare_http = _sidecard(
            stack, upstream, "[quality]\nenabled = false\n[throttle]\nenabled = false\n", "warning"
        )
        full_pid, full_sock, full_http = _sidecard(stack, upstream, "", "info")
        bypass = '{"x-sidecard-cache":"bypass"}'
        systems: dict[str, tuple[int, list[str]]] = {
            "floor, NDJSON": (floor.pid, ["uds", str(tmp / "floor.sock"), FRAME]),
            "sidecard bare, NDJSON": (bare_pid, ["uds", bare_sock, FRAME]),
            "sidecard, NDJSON": (full_pid, ["uds", full_sock, FRAME]),
            "floor, HTTP": (floor.pid, ["http", f"http://127.0.0.1:{floor_http}/v1/messages", "{}", BODY]),
            "sidecard bare, HTTP": (bare_pid, ["http", bare_http, bypass, BODY]),
            "sidecard, HTTP": (full_pid, ["http", full_http, bypass, BODY]),
        }
        if (tz := _tensorzero(stack, upstream)) is not None:
            pid, base = tz.split()
            tz_body = BODY.replace(f'"{MODEL}"', f'"tensorzero::model_name::{MODEL}"')
            systems["tensorzero, HTTP"] = (int(pid), ["http", f"{base}/openai/v1/chat/completions", "{}", tz_body])
        for _, target in systems.values():
            _load(target, 500)  # warm: connections, caches, the first GC passes
        cpu: dict[str, list[float]] = {name: [] for name in systems}
        names = list(systems)
        for round_ in range(args.rounds):
            for name in names[round_ % len(names):] + names[: round_ % len(names)]:
                pid, target = systems[name]
                before = _tree_cpu(pid)
                _load(target, per_round)
                cpu[name].append((_tree_cpu(pid) - before) / per_round * 1e6)
    tz = statistics.median(cpu["tensorzero, HTTP"]) if "tensorzero, HTTP" in cpu else None
    print(f"CPU per request at concurrency 32, {args.rounds} rounds of {per_round}, median\n")
    print(f"{'system':<24}{'CPU µs':>8}{'vs TensorZero':>15}")
    for name, values in cpu.items():
        median = statistics.median(values)
        print(f"{name:<24}{median:>8.1f}{f'{median / tz:.2f}x' if tz else '-':>15}")


if __name__ == "__main__":
    if sys.argv[1:2] == ["serve"]:
        trio.run(serve, *sys.argv[2:4], int(sys.argv[4]))
    else:
        main()
