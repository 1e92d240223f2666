"""Shared pieces of the benchmarks: processes to measure, a lean NDJSON client, statistics."""

from __future__ import annotations

import argparse
import itertools
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import msgspec
import trio

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
_decoder = msgspec.json.Decoder()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(check, what: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except OSError:
            pass
        time.sleep(0.05)
    raise SystemExit(f"bench: {what} did not come up")


@contextmanager
def simulator(latency_ms: float = 0.0):
    port = free_port()
    proc = subprocess.Popen(
        # Limits no run reaches: the advertised defaults (4,000 requests and 2M tokens a minute) would make sidecard
        # pause the target (as it should), and the benchmark would measure that pause instead of sidecard.
        [BIN / "sidecard", "sim", "--port", str(port), "--latency-ms", str(latency_ms),
         "--requests-per-minute", "100000000", "--tokens-per-minute", "100000000000"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        wait_for(lambda: socket.create_connection(("127.0.0.1", port), timeout=0.2).close() or True, "the simulator")
        yield f"http://127.0.0.1:{port}", proc
    finally:
        proc.terminate()
        proc.wait()


@contextmanager
def daemon(sim_url: str, extra_toml: str = "", *, source: str | None = None, log_level: str = "info"):
    """The daemon as deployed (metrics on, JSON log to a file), on the given upstream; `source`: run the code of
    another checkout (an earlier commit, for a paired before/after run); `log_level` "warning": no request lines."""
    tmp = Path(tempfile.mkdtemp(prefix="scb-", dir="/tmp"))
    config = tmp / "sidecard.toml"
    config.write_text(
        f'[server]\nsocket = "{tmp}/app.sock"\n[metrics]\naddress = "127.0.0.1:{free_port()}"\n'
        f'[upstream]\nbase_url = "{sim_url}"\n[log]\ndestination = "{tmp}/sidecard.log"\nlevel = "{log_level}"\n'
        f'[state]\npath = "{tmp}/state.json"\n[prompts]\nwatch = false\n' + extra_toml
    )
    env = {**os.environ, "ANTHROPIC_API_KEY": "bench-key-not-secret", **({"PYTHONPATH": source} if source else {})}
    proc = subprocess.Popen([BIN / "sidecard", "serve", "--config", str(config)], env=env, stderr=subprocess.PIPE)
    try:
        wait_for(lambda: (tmp / "app.sock").exists() and _ping(str(tmp / "app.sock")), "the daemon")
        yield str(tmp / "app.sock"), proc
    finally:
        proc.terminate()
        proc.wait()


def _ping(path: str) -> bool:
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(path)
        s.sendall(b'{"op":"ping","id":1}\n')
        return b'"ok":true' in s.recv(4096)


@contextmanager
def throwaway_store():
    """A redis-server of its own (sidecard.fleet.devserver) in a temporary directory, stopped after."""
    from sidecard.fleet.devserver import LocalStore

    with tempfile.TemporaryDirectory(prefix="scb-", dir="/tmp") as directory, LocalStore(directory) as store:
        yield store


def round_trips_from_args() -> int:
    """How many round trips a store bench makes: `--quick` for a short run."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    return 2_000 if parser.parse_args().quick else 20_000


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def current_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(p / 100 * (len(ordered) - 1))))]


def summary(latencies_s: list[float]) -> tuple[float, float]:
    ms = [v * 1000 for v in latencies_s]
    return statistics.median(ms), percentile(ms, 99)


class Client:
    """A lean NDJSON client over one connection, with pipelining (one reader task per connection)."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.ids = itertools.count(1)
        self.waiting: dict[int, trio.Event] = {}
        self.replies: dict[int, dict] = {}
        self.send_lock = trio.Lock()

    @classmethod
    async def open(cls, path: str, nursery: trio.Nursery) -> Client:
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
                self.replies[frame["id"]] = frame
                self.waiting.pop(frame["id"]).set()

    async def call(self, frame_template: bytes) -> dict:
        request_id = next(self.ids)
        event = self.waiting[request_id] = trio.Event()
        async with self.send_lock:
            await self.stream.send_all(frame_template.replace(b'"id":0', b'"id":%d' % request_id))
        await event.wait()
        return self.replies.pop(request_id)
