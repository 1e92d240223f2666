"""Test harness: the real daemon, in-process, on a real Unix socket, with the simulated upstream."""

from __future__ import annotations

import itertools
import os
import random
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import msgspec
import pytest
import trio
from prometheus_client import CollectorRegistry

from sidecard.config import Config, from_mapping
from sidecard.daemon import Daemon
from sidecard.sim import Simulator

_decoder = msgspec.json.Decoder()


def fake_api_key(tag: str) -> str:
    """A string shaped like an Anthropic API key, for redaction and key-handling tests. Built at run time, so no
    key-shaped literal sits in the repository for secret scanners to flag."""
    return "-".join(("sk", "ant", "api03", tag))


class LogCapture:
    def __init__(self) -> None:
        self.lines: list[bytes] = []

    def write(self, line: bytes) -> None:
        self.lines.append(line)

    @property
    def text(self) -> str:
        return b"".join(self.lines).decode()

    def events(self, name: str | None = None) -> list[dict[str, Any]]:
        records = [_decoder.decode(line) for line in self.lines]
        return [r for r in records if name is None or r.get("event") == name]


@pytest.fixture
def capture_log() -> LogCapture:
    return LogCapture()


@pytest.fixture
def sim() -> Simulator:
    return Simulator(seed=1)


def make_config(socket_dir: str, **sections: Any) -> Config:
    raw: dict[str, Any] = {
        "server": {"socket": os.path.join(socket_dir, "app.sock")},
        "metrics": {"enabled": False},
        "state": {"path": os.path.join(socket_dir, "state.json")},
        "spend": {"path": os.path.join(socket_dir, "spend.json"), "fleet_outage_path": os.path.join(socket_dir, "fleet-outage.json")},
        # Off by default; a test that turns them on keeps their files here, never in the working directory.
        "usage": {"path": os.path.join(socket_dir, "usage.sqlite3")},
        "anomaly": {"path": os.path.join(socket_dir, "anomaly.json")},
        # Judge calls would add upstream calls that other tests count; quality tests turn it on.
        "quality": {"enabled": False},
    }
    for section, values in sections.items():
        if isinstance(values, dict) and isinstance(raw.get(section), dict):
            raw[section] = {**raw[section], **values}
        else:
            raw[section] = values
    return from_mapping(raw, "<test>")


_BASES: dict[int, float] = {}


def _wall_base() -> float:
    """One wall-clock origin per trio run (per test): daemons restarted within a test share it."""
    clock = trio.lowlevel.current_clock()
    return _BASES.setdefault(id(clock), time.time() - trio.current_time())


def new_daemon(config: Config, sim: Simulator, log: LogCapture, **kwargs: Any) -> Daemon:
    """A daemon wired for tests: its own metrics registry, a seeded random source, and a wall clock that
    follows trio's (mock) clock — so times persisted across a restart age with virtual time — starting at
    the real time, like the simulator's rate-limit reset headers."""
    base = _wall_base()
    return Daemon(
        config,
        simulator=sim,
        log_write=log.write,
        registry=CollectorRegistry(),
        rng=random.Random(7),
        **{"wall_clock": lambda: base + trio.current_time(), **kwargs},
    )


async def start_from_file(nursery, sim: Simulator, log: LogCapture, directory: str, extra: str = "") -> tuple[Daemon, str]:
    """A daemon started from a config file in `directory` (its socket there, no metrics, `extra` appended), so a
    test can change the file and reload; returns the daemon and the file's path."""
    from sidecard.config import load

    path = f"{directory}/sidecard.toml"
    with open(path, "w") as f:
        f.write(f'[server]\nsocket = "{directory}/app.sock"\n[metrics]\nenabled = false\n{extra}')
    d = new_daemon(load(path), sim, log, config_path=path)
    await nursery.start(d.run)
    return d, path


@pytest.fixture
async def daemon_factory(nursery, sim, capture_log):
    """Start a daemon on a fresh socket: `await daemon_factory(routes=..., server=...)`.

    Teardown stops each daemon and waits for it to exit before removing its directory: a running daemon
    may still be flushing its state or spend file."""
    started: list[tuple[Daemon, trio.Event, str]] = []

    async def run_until_stopped(daemon: Daemon, stopped: trio.Event, *, task_status=trio.TASK_STATUS_IGNORED):
        try:
            await daemon.run(task_status=task_status)
        finally:
            stopped.set()

    async def start(simulator: Simulator | None = None, *, options: dict[str, Any] | None = None, **sections: Any) -> Daemon:
        """OPTIONS: the Daemon's own keyword arguments (e.g. `jobs_store_in_thread`)."""
        socket_dir = tempfile.mkdtemp(prefix="sc-", dir="/tmp")
        daemon = new_daemon(make_config(socket_dir, **sections), simulator or sim, capture_log, **(options or {}))
        stopped = trio.Event()
        started.append((daemon, stopped, socket_dir))
        return await nursery.start(run_until_stopped, daemon, stopped)

    yield start
    for daemon, _, _ in started:
        daemon.shutdown()
    for _, stopped, _ in started:
        await stopped.wait()
    for _, _, path in started:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
async def daemon(daemon_factory) -> Daemon:
    return await daemon_factory()


@pytest.fixture
async def persistent(nursery, sim, capture_log, short_tmp):
    """Start daemons sharing one directory and state file, as restarts of the same service would:
    `d = await persistent(**sections)`; `await persistent.stop(d)` drains it and waits for it to exit."""
    stopped: dict[int, trio.Event] = {}

    async def run(d, *, task_status=trio.TASK_STATUS_IGNORED):
        try:
            await d.run(task_status=task_status)
        finally:
            stopped[id(d)].set()

    async def start(*, options: dict[str, Any] | None = None, **sections: Any) -> Daemon:
        d = new_daemon(make_config(short_tmp, state={"path": f"{short_tmp}/state.json", **sections.pop("state", {})}, **sections),
                       sim, capture_log, **(options or {}))
        stopped[id(d)] = trio.Event()
        return await nursery.start(run, d)

    async def stop(d: Daemon) -> None:
        d.shutdown()
        await stopped[id(d)].wait()

    start.stop = stop  # type: ignore[attr-defined]
    return start


class AppClient:
    """A minimal async NDJSON client for tests: send frames, await replies by id."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self._ids = itertools.count(1)
        self._buffer = b""
        self._replies: dict[Any, list[dict[str, Any]]] = {}
        self._send_lock = trio.Lock()
        self._receive_lock = trio.Lock()
        self.closed = False

    @classmethod
    async def connect(cls, path: str) -> "AppClient":
        return cls(await trio.open_unix_socket(path))

    async def send_raw(self, data: bytes) -> None:
        async with self._send_lock:
            await self.stream.send_all(data)

    async def send(self, frame: dict[str, Any]) -> Any:
        frame = dict(frame)
        frame.setdefault("id", next(self._ids))
        await self.send_raw(msgspec.json.encode(frame) + b"\n")
        return frame["id"]

    async def next_frame(self) -> dict[str, Any]:
        while b"\n" not in self._buffer:
            data = await self.stream.receive_some(65536)
            if not data:
                self.closed = True
                raise EOFError("daemon closed the connection")
            self._buffer += data
        line, self._buffer = self._buffer.split(b"\n", 1)
        return _decoder.decode(line)

    async def reply(self, request_id: Any) -> dict[str, Any]:
        """The reply to `request_id`; safe to await from many tasks at once."""
        while True:
            if self._replies.get(request_id):
                return self._replies[request_id].pop(0)
            async with self._receive_lock:
                if self._replies.get(request_id):
                    continue
                frame = await self.next_frame()
                self._replies.setdefault(frame.get("id"), []).append(frame)

    async def call(self, frame: dict[str, Any]) -> dict[str, Any]:
        return await self.reply(await self.send(frame))

    async def complete(self, text: str = "Hello", **fields: Any) -> dict[str, Any]:
        frame = {"op": "complete", "messages": [{"role": "user", "content": text}], **fields}
        return await self.call(frame)

    async def aclose(self) -> None:
        await self.stream.aclose()


async def connect(d: Daemon) -> AppClient:
    return await AppClient.connect(d.socket_path)


async def admin(d: Daemon, frame: dict[str, Any]) -> dict[str, Any]:
    """One call on the admin socket, on a connection of its own (as sidecardctl makes it)."""
    client = await AppClient.connect(d.admin_socket_path)
    try:
        return await client.call(frame)
    finally:
        await client.aclose()


async def stream_frame(client: AppClient, frame: dict[str, Any]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Send `frame` as a streaming request; returns (its event frames, the final frame: done or error)."""
    request_id = await client.send({**frame, "stream": True})
    events = []
    while True:
        reply = await client.reply(request_id)
        if reply.get("event") in ("start", "block", "delta"):
            events.append(reply)
            continue
        return events, reply


async def until_idle(d: Daemon, sim: Simulator, step: float = 0) -> None:
    """Until neither the daemon nor the simulator has a request open: a cancelled request has stopped, its upstream
    call too. STEP: a virtual clock's, for a simulator that notices a call gone only as it writes its next event."""
    with trio.fail_after(5):
        while d.engine.in_flight or sim.stats_total()["in_flight"]:
            await trio.sleep(step)


def metric(d: Daemon, name: str, **labels: str) -> float:
    """A sample from the daemon's own registry; 0 when the series does not exist yet."""
    return d.metrics.registry.get_sample_value(name, labels) or 0.0


REPO_PROMPTS = Path(__file__).parents[1] / "prompts"
ECHO_VERSION = '''description = "echo, version {n}"
temperature = 0.0
system = "Version {n}."
[variables]
q = {{}}
[[messages]]
role = "user"
content = "[v{n}] {{q}}"
'''


def prompts_with_echo(short_tmp: str, versions: int) -> Path:
    """The repository's prompts plus `echo` v1..vN (stable v1), whose answers say which version rendered them."""
    root = Path(short_tmp) / "prompts"
    shutil.copytree(REPO_PROMPTS, root)
    (root / "echo").mkdir()
    for n in range(1, versions + 1):
        (root / "echo" / f"v{n}.toml").write_text(ECHO_VERSION.format(n=n))
    (root / "echo" / "release.toml").write_text("stable = 1\n")
    return root


async def http_get(host: str, port: int, path: str, method: str = "GET") -> tuple[int, str]:
    """A bare HTTP/1.0 GET (or another method), enough to read /metrics or the simulator's stats."""
    stream = await trio.open_tcp_stream(host, port)
    async with stream:
        await stream.send_all(f"{method} {path} HTTP/1.0\r\nHost: {host}\r\n\r\n".encode())
        data = b""
        while chunk := await stream.receive_some(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body.decode()
