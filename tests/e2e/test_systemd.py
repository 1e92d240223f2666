"""The daemon under systemd: readiness, watchdog, reload and stop notifications, socket activation, units.

In-process tests drive the real daemon with a recording notifier on trio's virtual clock. Process tests run
`sidecard serve --simulate` as systemd would: a real NOTIFY_SOCKET datagram socket, real WATCHDOG_USEC, and
listening sockets passed as fds 3, 4… with LISTEN_FDS/LISTEN_PID/LISTEN_FDNAMES (set by a tiny exec wrapper,
so LISTEN_PID is the daemon's own pid).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import tomllib
from pathlib import Path

import pytest
import trio

from sidecard.config import load
from sidecard.errors import StartupError
from sidecard.errors import SidecardError
from sidecard.systemd import Notifier
from tests.harness import AppClient, make_config, new_daemon

ROOT = Path(__file__).parents[2]
UNITS = ROOT / "systemd"


class RecordingNotifier(Notifier):
    """Records what would go to systemd, with trio's clock, and what the app socket did at READY=1."""

    def __init__(self, watchdog_interval_s: float | None = None, app_path: str | None = None) -> None:
        super().__init__("/run/notify-for-tests", watchdog_interval_s=watchdog_interval_s)
        self.messages: list[tuple[float, tuple[str, ...]]] = []
        self.app_path = app_path
        self.accepting_at_ready: list[bool] = []

    def send(self, *lines: str) -> bool:
        self.messages.append((trio.current_time(), lines))
        if "READY=1" in lines and self.app_path is not None:
            with socket.socket(socket.AF_UNIX) as probe:
                try:
                    probe.connect(self.app_path)
                    self.accepting_at_ready.append(True)
                except OSError:
                    self.accepting_at_ready.append(False)
        return True

    def with_field(self, field: str) -> list[tuple[float, tuple[str, ...]]]:
        return [(t, lines) for t, lines in self.messages if any(line.startswith(field) for line in lines)]

    def kinds(self) -> list[str]:
        """The first line of each message, watchdog pings and status lines left out."""
        return [lines[0] for _, lines in self.messages if lines[0] not in ("WATCHDOG=1",) and not lines[0].startswith("STATUS=")]


@pytest.fixture
def start(nursery, sim, capture_log, short_tmp):
    async def start(notifier: Notifier | None = None, **kwargs):
        config = make_config(short_tmp, **kwargs.pop("sections", {}))
        d = new_daemon(config, sim, capture_log, notifier=notifier or RecordingNotifier(), **kwargs)
        return await nursery.start(d.run)

    return start


async def wait_for(condition, timeout: float = 30) -> None:
    with trio.fail_after(timeout):
        while not condition():
            await trio.sleep(0.01)


# ---------------------------------------------------------------------- notifications, in process


async def test_ready_only_once_the_app_socket_accepts(start, short_tmp):
    notifier = RecordingNotifier(app_path=f"{short_tmp}/app.sock")
    d = await start(notifier)
    assert notifier.kinds() == ["READY=1"]
    assert notifier.accepting_at_ready == [True]
    _, lines = notifier.with_field("READY=1")[0]
    assert lines[1] == f"STATUS=serving on {d.socket_path}"
    client = await AppClient.connect(d.socket_path)
    assert (await client.call({"op": "ping"}))["ok"]
    await client.aclose()


async def test_watchdog_pings_at_the_interval_from_the_loop(start, autojump_clock):
    notifier = RecordingNotifier(watchdog_interval_s=5.0)
    await start(notifier)
    await trio.sleep(21)
    pings = [t for t, _ in notifier.with_field("WATCHDOG=1")]
    assert len(pings) == 5  # at 0, 5, 10, 15 and 20 s
    assert all(abs((b - a) - 5.0) < 0.01 for a, b in zip(pings, pings[1:]))


async def test_no_watchdog_task_without_a_watchdog(start, autojump_clock):
    notifier = RecordingNotifier(watchdog_interval_s=None)
    await start(notifier)
    await trio.sleep(30)
    assert notifier.with_field("WATCHDOG=1") == []


async def test_status_lines_report_requests_in_flight_and_breakers(start, autojump_clock):
    notifier = RecordingNotifier()
    d = await start(notifier)
    client = await AppClient.connect(d.socket_path)
    for _ in range(3):
        assert (await client.complete("hi"))["ok"]
    await trio.sleep(d.STATUS_INTERVAL_S + 0.5)
    statuses = [lines[0] for _, lines in notifier.messages if lines[0].startswith("STATUS=")]
    assert statuses == ["STATUS=requests: 3 served, 0 in flight; 1 connections; breakers: 2 closed"]
    for health, _ in d.engine.walker.breakers():
        if health.target.model == "claude-sonnet-4-6":
            health.breaker.state = type(health.breaker.state).OPEN
    await trio.sleep(d.STATUS_INTERVAL_S)
    assert notifier.messages[-1][1] == (
        "STATUS=requests: 3 served, 0 in flight; 1 connections; breakers: 1 closed, 1 open (anthropic:claude-sonnet-4-6)",
    )
    await client.aclose()


async def test_reload_is_bracketed_by_reloading_and_ready_even_when_refused(start, short_tmp):
    path = Path(short_tmp) / "sidecard.toml"
    path.write_text("[retry]\nbudget_ratio = 0.3\n")
    notifier = RecordingNotifier()
    d = await start(notifier, config_path=str(path))
    await d.reload()
    assert notifier.kinds() == ["READY=1", "RELOADING=1", "READY=1"]
    reloading = notifier.messages[1][1]
    assert reloading[1].startswith("MONOTONIC_USEC=") and int(reloading[1].split("=")[1]) > 0
    assert notifier.messages[2][1][1].startswith("STATUS=reloaded; requests: 0 served")

    path.write_text("[retry]\nbudget_ratio = 7\n")
    with pytest.raises(SidecardError):
        await d.reload()
    assert notifier.kinds()[3:] == ["RELOADING=1", "READY=1"]  # still serving: systemd must not wait
    assert notifier.messages[-1][1][1].startswith("STATUS=reload refused, the running config stays")


async def test_drain_says_stopping(start):
    notifier = RecordingNotifier()
    d = await start(notifier)
    d.shutdown()
    await wait_for(lambda: "STOPPING=1" in notifier.kinds())
    assert notifier.kinds() == ["READY=1", "STOPPING=1"]
    assert notifier.with_field("STOPPING=1")[0][1][1].startswith("STATUS=draining: 0 requests in flight")


async def test_without_systemd_nothing_is_sent_and_no_task_runs(start, autojump_clock, capture_log):
    d = await start(Notifier())  # what from_environment() gives without NOTIFY_SOCKET
    assert not d.notifier.enabled
    await trio.sleep(60)
    assert d.activated == [] and "socket_activated" not in capture_log.events("started")[0]


# ---------------------------------------------------------------------- socket activation, in process


def listening(path: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(path)
    sock.listen(16)
    return sock


async def test_both_activated_sockets_are_served_and_left_in_place(start, short_tmp, capture_log):
    app, admin = f"{short_tmp}/sd-app.sock", f"{short_tmp}/sd-admin.sock"
    d = await start(listen_sockets={"app": [listening(app)], "admin": [listening(admin)]})
    assert d.socket_path == app and d.admin_socket_path == admin
    assert sorted(d.activated) == ["admin", "app"]
    started = capture_log.events("started")[0]
    assert started["socket"] == app and started["admin_socket"] == admin
    assert sorted(started["socket_activated"]) == ["admin", "app"]
    assert not os.path.exists(f"{short_tmp}/app.sock")  # the configured path was not bound
    client = await AppClient.connect(app)
    assert (await client.complete("hi"))["ok"]
    await client.aclose()
    ctl = await AppClient.connect(admin)
    assert (await ctl.call({"op": "status"}))["ok"]
    await ctl.aclose()
    d.shutdown()
    await wait_for(lambda: capture_log.events("stopped"))
    assert os.path.exists(app) and os.path.exists(admin)  # systemd's files: never unlinked by the daemon


async def test_a_lone_unnamed_socket_is_the_app_socket(start, short_tmp):
    app = f"{short_tmp}/sd-app.sock"
    d = await start(listen_sockets={"unknown": [listening(app)]})
    assert d.activated == ["app"] and d.socket_path == app
    assert d.admin_socket_path == f"{short_tmp}/admin.sock"  # bound by the daemon as before
    client = await AppClient.connect(app)
    assert (await client.call({"op": "ping"}))["ok"]
    await client.aclose()


async def test_unknown_names_are_ignored_and_duplicates_refused(start, short_tmp, capture_log):
    d = await start(listen_sockets={"metrics": [listening(f"{short_tmp}/m.sock")]})
    assert d.activated == [] and capture_log.events("socket_activation_ignored")[0]["name"] == "metrics"
    two = [listening(f"{short_tmp}/a1.sock"), listening(f"{short_tmp}/a2.sock")]
    with pytest.raises(BaseExceptionGroup) as raised:
        await start(listen_sockets={"app": two})
    leaf = raised.value
    while isinstance(leaf, BaseExceptionGroup):
        leaf = leaf.exceptions[0]
    assert isinstance(leaf, StartupError) and "2 sockets named 'app'" in str(leaf)


# ---------------------------------------------------------------------- the real process


def daemon_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("SIDECARD_CONFIG", "ANTHROPIC_API_KEY")}
    for name in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES"):
        env.pop(name, None)
    env.update(extra)
    return env


class Collector:
    """Collects lines (of stderr, or datagrams) in a thread, so a test can wait for one."""

    def __init__(self) -> None:
        self.items: list[tuple[float, str]] = []
        self._changed = threading.Condition()

    def add(self, item: str) -> None:
        with self._changed:
            self.items.append((time.monotonic(), item))
            self._changed.notify_all()

    def wait_for(self, predicate, timeout: float = 30.0, after: int = 0) -> int:
        """Index of the first item from `after` on that satisfies `predicate`."""

        def find() -> int | None:
            return next((i for i in range(after, len(self.items)) if predicate(self.items[i][1])), None)

        with self._changed:
            self._changed.wait_for(lambda: find() is not None, timeout)
            found = find()
        assert found is not None, f"never seen; got {[item for _, item in self.items]}"
        return found


def pump_lines(stream, collector: Collector) -> None:
    threading.Thread(target=lambda: [collector.add(line) for line in stream], daemon=True).start()


class NotifyListener(Collector):
    """systemd's side of NOTIFY_SOCKET. At READY=1 it immediately checks that the app socket accepts."""

    def __init__(self, path: str, app_path: str) -> None:
        super().__init__()
        self.path = path
        self.app_path = app_path
        self.accepting_at_ready: list[bool] = []
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(path)
        threading.Thread(target=self._receive, daemon=True).start()

    def _receive(self) -> None:
        while True:
            try:
                data = self.sock.recv(4096).decode()
            except OSError:
                return
            if data.startswith("READY=1") and not self.accepting_at_ready:
                try:
                    request(self.app_path, {"op": "ping", "id": "ready"}, timeout=5)
                    self.accepting_at_ready.append(True)
                except OSError:
                    self.accepting_at_ready.append(False)
            self.add(data)

    def close(self) -> None:
        self.sock.close()


def request(path: str, frame: dict, timeout: float = 30) -> dict:
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(timeout)
        s.connect(path)
        s.sendall(json.dumps(frame).encode() + b"\n")
        data = b""
        while not data.endswith(b"\n"):
            chunk = s.recv(65536)
            if not chunk:
                raise ConnectionError(f"closed without a reply: {data!r}")
            data += chunk
    return json.loads(data)


def http_post(path: str, body: dict, timeout: float = 30, sock: socket.socket | None = None) -> tuple[int, dict]:
    """POST /v1/messages over the HTTP face's Unix socket (or on an already connected `sock`)."""
    payload = json.dumps(body).encode()
    s = sock or socket.socket(socket.AF_UNIX)
    with s:
        if sock is None:
            s.settimeout(timeout)
            s.connect(path)
        s.sendall(b"POST /v1/messages HTTP/1.1\r\nhost: sidecard\r\ncontent-type: application/json\r\n"
                  b"connection: close\r\ncontent-length: %d\r\n\r\n%s" % (len(payload), payload))
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(rest)


MESSAGE = {"model": "claude-sonnet-4-6", "max_tokens": 50, "messages": [{"role": "user", "content": "hi"}]}


def serve_args(app_path: str) -> list[str]:
    return ["serve", "--simulate", "--socket", app_path, "--metrics", "off"]


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def test_a_real_daemon_tells_systemd_ready_watchdog_reloading_stopping(short_tmp):
    app = f"{short_tmp}/app.sock"
    listener = NotifyListener(f"{short_tmp}/notify", app)
    env = daemon_env(NOTIFY_SOCKET=listener.path, WATCHDOG_USEC="200000")  # a ping every 100 ms
    proc = subprocess.Popen(
        [sys.executable, "-m", "sidecard", *serve_args(app)], stderr=subprocess.PIPE, text=True, env=env, cwd=short_tmp
    )
    log = Collector()
    pump_lines(proc.stderr, log)
    try:
        ready = listener.wait_for(lambda m: m.startswith("READY=1"))
        assert listener.accepting_at_ready == [True]  # READY=1 came once the socket served
        assert f"STATUS=serving on {app}" in listener.items[ready][1]
        assert log.wait_for(lambda line: '"event":"started"' in line) >= 0

        time.sleep(0.7)
        pings = [t for t, m in listener.items if m == "WATCHDOG=1"]
        assert len(pings) >= 4, pings
        gaps = [b - a for a, b in zip(pings, pings[1:])]
        assert 0.05 <= statistics.median(gaps) <= 0.2, gaps

        mark = len(listener.items)
        proc.send_signal(signal.SIGHUP)
        reloading = listener.wait_for(lambda m: m.startswith("RELOADING=1"), after=mark)
        fields = dict(line.split("=", 1) for line in listener.items[reloading][1].split("\n"))
        now_usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        assert 0 < now_usec - int(fields["MONOTONIC_USEC"]) < 30_000_000  # the same clock as ours
        listener.wait_for(lambda m: m.startswith("READY=1") and "reloaded" in m, after=reloading)
        assert request(app, {"op": "ping", "id": 1})["ok"]

        mark = len(listener.items)
        proc.send_signal(signal.SIGTERM)
        listener.wait_for(lambda m: m.startswith("STOPPING=1"), after=mark)
        assert proc.wait(timeout=30) == 0
        assert [m for _, m in listener.items if m.startswith("READY=1")][0].startswith("READY=1\nSTATUS=serving")
    finally:
        stop(proc)
        listener.close()


# A stand-in for systemd's exec: move the passed sockets to fds 3, 4, …, set LISTEN_* for our own pid
# (which exec keeps), then become the daemon.
_EXEC_AS_SYSTEMD = r"""
import fcntl, os, sys
names, fds, args = sys.argv[1].split(":"), [int(fd) for fd in sys.argv[2].split(",")], sys.argv[3:]
high = [fcntl.fcntl(fd, fcntl.F_DUPFD, 100) for fd in fds]
for fd in fds:
    os.close(fd)
for i, fd in enumerate(high):
    os.dup2(fd, 3 + i)
    os.close(fd)
os.environ.update(LISTEN_FDS=str(len(fds)), LISTEN_PID=str(os.getpid()), LISTEN_FDNAMES=":".join(names))
os.execv(sys.executable, [sys.executable, "-m", "sidecard", *args])
"""


def spawn_activated(sockets: dict[str, socket.socket], args: list[str], cwd: str, **env: str) -> tuple[subprocess.Popen, Collector]:
    fds = [s.fileno() for s in sockets.values()]
    proc = subprocess.Popen(
        [sys.executable, "-c", _EXEC_AS_SYSTEMD, ":".join(sockets), ",".join(map(str, fds)), *args],
        pass_fds=fds, stderr=subprocess.PIPE, text=True, env=daemon_env(**env), cwd=cwd,
    )
    log = Collector()
    pump_lines(proc.stderr, log)
    return proc, log


def started_line(log: Collector) -> dict:
    return json.loads(log.items[log.wait_for(lambda line: '"event":"started"' in line)][1])


def test_sockets_passed_as_fds_are_served_and_outlive_a_restart_with_their_queued_connections(short_tmp):
    app, http = f"{short_tmp}/sd-app.sock", f"{short_tmp}/sd-http.sock"
    held = {"app": listening(app), "http": listening(http)}  # what sidecard-app.socket and sidecard-http.socket hold
    first, log = spawn_activated(held, serve_args(app), short_tmp)
    try:
        started = started_line(log)
        assert sorted(started["socket_activated"]) == ["app", "http"]
        assert started["socket"] == app and started["http_socket"] == http
        assert request(app, {"op": "complete", "id": 1, "messages": [{"role": "user", "content": "hi"}]})["ok"]
        status, message = http_post(http, MESSAGE)
        assert status == 200 and message["type"] == "message", message
        assert not os.path.exists(f"{short_tmp}/http.sock")  # the configured path was not bound
        first.send_signal(signal.SIGTERM)
        assert first.wait(timeout=30) == 0
        assert os.path.exists(app) and os.path.exists(http)  # systemd's socket files outlive the daemon
        assert not os.path.exists(f"{short_tmp}/admin.sock")  # the one it bound itself is cleaned up
    finally:
        stop(first)

    # No daemon runs now; the sockets still listen, so the connections wait in their backlogs.
    waiting = socket.socket(socket.AF_UNIX)
    waiting.settimeout(30)
    waiting.connect(app)
    frame = {"op": "complete", "id": "queued", "messages": [{"role": "user", "content": "are you there?"}]}
    waiting.sendall(json.dumps(frame).encode() + b"\n")
    waiting_http = socket.socket(socket.AF_UNIX)
    waiting_http.settimeout(30)
    waiting_http.connect(http)

    second, log = spawn_activated(held, serve_args(app), short_tmp)
    try:
        assert started_line(log)["pid"] != started["pid"]
        data = b""
        while not data.endswith(b"\n"):
            chunk = waiting.recv(65536)
            assert chunk, f"closed without a reply: {data!r}"
            data += chunk
        reply = json.loads(data)
        assert reply["id"] == "queued" and reply["ok"], reply
        status, message = http_post(http, MESSAGE, sock=waiting_http)
        assert status == 200 and message["content"][0]["text"], message
    finally:
        waiting.close()
        waiting_http.close()
        stop(second)
        for sock in held.values():
            sock.close()


_WITH_MDWE = r"""
import ctypes, os, sys
PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN = 65, 1
if ctypes.CDLL(None, use_errno=True).prctl(PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN, 0, 0, 0) != 0:
    sys.exit(77)
os.execv(sys.executable, [sys.executable, "-m", "sidecard", *sys.argv[1:]])
"""


def test_the_daemon_runs_under_memory_deny_write_execute(short_tmp):
    """MemoryDenyWriteExecute=yes in the unit: the kernel's MDWE (Linux 6.3+) refuses the same mappings."""
    app = f"{short_tmp}/app.sock"
    proc = subprocess.Popen(
        [sys.executable, "-c", _WITH_MDWE, *serve_args(app)],
        stderr=subprocess.PIPE, text=True, env=daemon_env(), cwd=short_tmp,
    )
    log = Collector()
    pump_lines(proc.stderr, log)
    try:
        deadline = time.monotonic() + 30
        while not any('"event":"started"' in line for _, line in log.items):
            if proc.poll() == 77:
                pytest.skip("this kernel has no PR_SET_MDWE (Linux < 6.3)")
            assert proc.poll() is None, [line for _, line in log.items]
            assert time.monotonic() < deadline
            time.sleep(0.02)
        for i in range(3):
            reply = request(app, {"op": "complete", "id": i, "messages": [{"role": "user", "content": "hi"}]})
            assert reply["ok"], reply
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        stop(proc)


# ---------------------------------------------------------------------- the unit files


def unit_copies(tmp: Path) -> list[Path]:
    """The units, with ExecStart= pointing at this checkout's `sidecard` (verify wants it to exist)."""
    sidecard = Path(sys.executable).parent / "sidecard"
    if not sidecard.exists():
        sidecard = Path(shutil.which("sidecard") or "/nonexistent")
    if not sidecard.exists():
        pytest.skip("no installed `sidecard` command to point ExecStart= at")
    copies = []
    for name in ("sidecard.service", "sidecard-app.socket", "sidecard-admin.socket", "sidecard-http.socket"):
        text = (UNITS / name).read_text().replace("/usr/local/bin/sidecard", str(sidecard))
        (tmp / name).write_text(text)
        copies.append(tmp / name)
    return copies


needs_systemd_analyze = pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")


@needs_systemd_analyze
def test_units_pass_systemd_analyze_verify(tmp_path):
    copies = unit_copies(tmp_path)
    result = subprocess.run(
        ["systemd-analyze", "verify", *map(str, copies)], capture_output=True, text=True, timeout=60, cwd=tmp_path
    )
    assert result.returncode == 0 and not result.stdout.strip() and not result.stderr.strip(), result.stdout + result.stderr


@needs_systemd_analyze
def test_exposure_score_stays_low(tmp_path):
    unit_copies(tmp_path)
    result = subprocess.run(
        ["systemd-analyze", "security", "--offline=true", "--no-pager", "sidecard.service"],
        capture_output=True, text=True, timeout=60, cwd=tmp_path,
    )
    score = re.search(r"Overall exposure level for sidecard\.service: ([0-9.]+)", result.stdout)
    if score is None:
        pytest.skip(f"this systemd-analyze cannot review unit files offline: {result.stderr.strip()[:200]}")
    assert float(score.group(1)) <= 2.0, result.stdout


def unit_settings(name: str) -> dict[str, list[str]]:
    settings: dict[str, list[str]] = {}
    for line in (UNITS / name).read_text().splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, value = line.split("=", 1)
            settings.setdefault(key.strip(), []).append(value.strip())
    return settings


def test_the_units_the_example_config_and_the_daemon_agree():
    service = unit_settings("sidecard.service")
    app, admin = unit_settings("sidecard-app.socket"), unit_settings("sidecard-admin.socket")
    http = unit_settings("sidecard-http.socket")
    config = tomllib.loads((ROOT / "deploy" / "sidecard.toml").read_text())
    assert app["ListenStream"] == [config["server"]["socket"]] and app["FileDescriptorName"] == ["app"]
    assert admin["ListenStream"] == [config["admin"]["socket"]] and admin["FileDescriptorName"] == ["admin"]
    assert http["ListenStream"] == [config["http"]["socket"]] and http["FileDescriptorName"] == ["http"]
    assert app["SocketGroup"] == [config["server"]["socket_group"]] and app["SocketMode"] == ["0660"]
    # SDK apps are the same apps: the HTTP socket opens to the same group, whoever binds it
    assert http["SocketGroup"] == app["SocketGroup"] == [config["http"]["socket_group"]] and http["SocketMode"] == ["0660"]
    assert http["Backlog"] == app["Backlog"] and http["RemoveOnStop"] == ["no"]
    assert admin["SocketMode"] == ["0600"]
    assert app["Service"] == admin["Service"] == http["Service"] == ["sidecard.service"]
    units = "sidecard-app.socket sidecard-admin.socket sidecard-http.socket"
    assert service["Sockets"] == [units] and service["Also"] == [units]
    assert set(service["SupplementaryGroups"]) == {config["http"]["socket_group"]}
    loaded = load(ROOT / "deploy" / "sidecard.toml")
    assert loaded.http.enabled and loaded.http.socket_group == "sidecard-clients"
    assert service["Type"] == ["notify"] and service["Restart"] == ["on-failure"]
    state_dir = "/var/lib/" + service["StateDirectory"][0]
    assert config["state"]["path"].startswith(state_dir + "/") and config["cache"]["path"].startswith(state_dir + "/")
    assert Path(config["server"]["socket"]).parent == Path("/run") / service["RuntimeDirectory"][0]
    assert service["LoadCredential"] == ["anthropic_api_key:/etc/sidecard/anthropic_api_key"]
    assert "ANTHROPIC_API_KEY" not in (UNITS / "sidecard.service").read_text()
    assert "--config /etc/sidecard/sidecard.toml" in service["ExecStart"][0]
    # drain_grace_s must fit in TimeoutStopSec= or systemd kills the drain
    assert config["server"]["drain_grace_s"] < float(service["TimeoutStopSec"][0].rstrip("s"))


def test_the_example_config_is_valid():
    result = subprocess.run(
        [sys.executable, "-m", "sidecard", "check-config", str(ROOT / "deploy" / "sidecard.toml")],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stderr


@pytest.mark.skipif(
    shutil.which("systemd-sysusers") is None or shutil.which("systemd-tmpfiles") is None or os.geteuid() != 0,
    reason="needs systemd-sysusers, systemd-tmpfiles and root (to chown in a scratch root)",
)
def test_sysusers_and_tmpfiles_create_the_user_groups_and_run_directory(tmp_path):
    """Applied to a scratch root with --root=, never to this host."""
    for directory in ("etc/sysusers.d", "etc/tmpfiles.d", "run"):
        (tmp_path / directory).mkdir(parents=True)
    for name in ("passwd", "group", "shadow", "gshadow"):
        (tmp_path / "etc" / name).touch()
    shutil.copy(UNITS / "sidecard.sysusers", tmp_path / "etc/sysusers.d/sidecard.conf")
    shutil.copy(UNITS / "sidecard.tmpfiles", tmp_path / "etc/tmpfiles.d/sidecard.conf")
    for command in (["systemd-sysusers", f"--root={tmp_path}", "sidecard.conf"],
                    ["systemd-tmpfiles", f"--root={tmp_path}", "--create", "sidecard.conf"]):
        result = subprocess.run(command, capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr
    users = {line.split(":")[0]: line.split(":") for line in (tmp_path / "etc/passwd").read_text().splitlines()}
    groups = {line.split(":")[0]: line.split(":") for line in (tmp_path / "etc/group").read_text().splitlines()}
    assert set(groups) >= {"sidecard", "sidecard-clients"}
    assert users["sidecard"][5] == "/var/lib/sidecard" and users["sidecard"][6].endswith("nologin")
    run = (tmp_path / "run/sidecard").stat()
    assert run.st_uid == int(users["sidecard"][2]) and run.st_gid == int(groups["sidecard"][2])
    assert run.st_mode & 0o7777 == 0o755
