"""Hostile input against `sidecard serve` in its own process: what an operator would see is its pid.

The daemon runs as a real process here (not in-process as in the other e2e tests) for two reasons: a crash
must show up the way it does in production (the process gone, its pid changed under a supervisor), not as an
exception in the test's own event loop that pytest might attribute elsewhere; and descriptor exhaustion needs
a process whose `nofile` limit can be lowered without starving the test runner. The fuzzing stays fast by
pipelining: each connection's frames are written in one stream while a second task reads the replies, so the
daemon is never idle waiting on a round trip.
"""

from __future__ import annotations

import json
import os
import random
import re
import resource
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import msgspec
import pytest
import trio

from sidecard.admin import AdminOp
from sidecard.protocol import Complete, Hello, Ping
from tests.e2e.test_process import LogLines

_decode = msgspec.json.Decoder().decode
FUZZ_FRAMES = 100_000
CONNECTIONS = 4
WAIT_S = 20.0  # a generous bound on real time, for a daemon that has stopped answering


class DaemonProcess:
    def __init__(self, proc: subprocess.Popen, directory: str, log: LogLines) -> None:
        self.proc = proc
        self.app = f"{directory}/app.sock"
        self.admin = f"{directory}/admin.sock"
        self.http = f"{directory}/http.sock"
        self.log = log


def call(path: str, frame: dict, timeout: float = WAIT_S) -> dict:
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(timeout)
        s.connect(path)
        s.sendall(json.dumps(frame).encode() + b"\n")
        data = b""
        while not data.endswith(b"\n"):
            chunk = s.recv(65536)
            assert chunk, "the daemon closed the connection"
            data += chunk
    return json.loads(data)


@pytest.fixture
def start_process(short_tmp) -> Iterator[Callable[..., DaemonProcess]]:
    started: list[subprocess.Popen] = []

    def start(nofile: tuple[int, int] | None = None) -> DaemonProcess:
        """NOFILE: the (soft, hard) open-file limit the daemon starts with."""
        config = Path(short_tmp) / "sidecard.toml"
        config.write_text(f'[server]\nsocket = "{short_tmp}/app.sock"\n[metrics]\nenabled = false\n'
                          '[quality]\nenabled = false\n')
        env = {k: v for k, v in os.environ.items() if k not in ("SIDECARD_CONFIG", "ANTHROPIC_API_KEY")}

        def limit() -> None:
            if nofile is not None:
                resource.setrlimit(resource.RLIMIT_NOFILE, nofile)

        proc = subprocess.Popen(
            [sys.executable, "-m", "sidecard", "serve", "--simulate", "--config", str(config)],
            stderr=subprocess.PIPE, text=True, env=env, cwd=short_tmp, preexec_fn=limit,
        )
        started.append(proc)
        log = LogLines(proc.stderr)
        log.wait_for('"event":"started"')
        return DaemonProcess(proc, short_tmp, log)

    yield start
    for proc in started:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def open_fds(d: DaemonProcess) -> int:
    return len(os.listdir(f"/proc/{d.proc.pid}/fd"))


def wait_for_fds(d: DaemonProcess, done: Callable[[list[int]], bool]) -> None:
    """Poll the daemon's open descriptors (every 10 ms, the counts so far to DONE) until DONE says so."""
    counts = [open_fds(d)]
    deadline = time.monotonic() + WAIT_S
    while not done(counts):
        assert time.monotonic() < deadline, counts[-20:]
        time.sleep(0.01)
        counts.append(open_fds(d))


def assert_alive(d: DaemonProcess) -> None:
    """The same process still answers on every socket, and never logged a bug or a traceback."""
    assert d.proc.poll() is None
    assert call(d.admin, {"op": "status", "id": 1})["result"]["pid"] == d.proc.pid
    assert call(d.app, {"op": "ping", "id": 1})["ok"]
    assert not [line for line in d.log.lines if "internal_error" in line or "Traceback" in line]


# ---------------------------------------------------------------- descriptors


def test_idle_http_connections_cannot_starve_the_app_and_admin_sockets(start_process):
    d = start_process(nofile=(128, 256))  # the daemon raises its soft limit to the hard one
    before = open_fds(d)
    idle = []
    try:
        for _ in range(300):  # more than the daemon has descriptors
            s = socket.socket(socket.AF_UNIX)
            s.connect(d.http)
            idle.append(s)
        # Until the daemon took all it will: every descriptor, or the HTTP face's cap (and no more for 50 ms).
        wait_for_fds(d, lambda counts: counts[-1] == 256 or counts[-5:] == [before + 64] * 5)
        assert call(d.app, {"op": "ping", "id": 1}, timeout=5)["ok"]
        assert call(d.admin, {"op": "status", "id": 2}, timeout=5)["ok"]
    finally:
        for s in idle:
            s.close()
    started = json.loads(d.log.wait_for('"event":"started"'))
    assert started["nofile"] == 256 and started["http_max_connections"] == 64  # a quarter of the raised limit


def test_the_admin_socket_accepts_when_app_connections_took_every_descriptor(start_process):
    d = start_process(nofile=(256, 256))
    app = []
    try:
        for _ in range(300):  # the app socket's own cap (4096) is above the process's limit
            s = socket.socket(socket.AF_UNIX)
            s.connect(d.app)
            app.append(s)
        wait_for_fds(d, lambda counts: counts[-1] == 256)  # every one taken (the admin socket's reserve among them)
        for n in range(3):  # the reserve lets an operator in, more than once
            assert call(d.admin, {"op": "status", "id": n}, timeout=5)["ok"]
        d.log.wait_for('"event":"accept_exhausted"')
        time.sleep(0.5)  # real time: the listener retries every 100 ms meanwhile
    finally:
        for s in app:
            s.close()
    assert_alive(d)
    # One line as an episode begins and one as it ends, per listener; not trio's error line ten times a second.
    # (The app listener may have several episodes while descriptors come and go: wait for its last to end.)
    deadline = time.monotonic() + WAIT_S
    while True:
        episodes = [json.loads(line) for line in list(d.log.lines) if '"event":"accept_' in line]
        if [e["event"] for e in episodes if e["listener"] == "app"][-1:] == ["accept_recovered"]:
            break
        assert time.monotonic() < deadline, episodes
        time.sleep(0.01)
    for listener in ("app", "admin"):
        events = [e["event"] for e in episodes if e["listener"] == listener]
        assert events[::2] == ["accept_exhausted"] * len(events[::2]) and "accept_exhausted" not in events[1::2]
    assert [e["event"] for e in episodes if e["listener"] == "app"][-1] == "accept_recovered"
    assert not [line for line in d.log.lines if "accept returned" in line]


# ---------------------------------------------------------------- fuzzing


def _deep(kind: str, depth: int) -> bytes:
    if kind == "array":
        return b"[" * depth + b"]" * depth
    if kind == "object":
        return b'{"a":' * depth + b"null" + b"}" * depth
    return b'[{"a":' * (depth // 2) + b"0" + b"}]" * (depth // 2)  # mixed


class Fuzzer:
    """Hostile frames: every field of every op, each given a value from `values` (deep nesting at the top of
    the field and inside objects, wrong types, edge numbers and strings), plus frames broken as bytes."""

    def __init__(self, rng: random.Random, ops: dict[str, list[str]]) -> None:
        self.rng = rng
        self.ops = ops
        deep = [_deep(kind, depth) for kind in ("array", "object", "mixed") for depth in (1_000, 1_100)]
        self.deep = [
            *deep,  # at the top of the field, and below where the field's own type allows anything:
            *(b'[{"role":"user","content":[{"type":"text","text":"x","extra":%b}]}]' % d for d in deep[:2]),
            *(b'{"k":%b}' % d for d in deep[2:4]),
        ]
        self.values = [
            b"null", b"true", b"0", b"-1", b"1e400", b"-0.0", b"18446744073709551616", b"1" * 400, b'""',
            b'"' + b"x" * 5_000 + b'"', b'"\\u0000\\ud800"', b'"\xff\xfe"', b"[]", b"{}", b'[null]',
            b'{"":{"":[]}}', b'"' + "é€😀".encode() * 50 + b'"', b'[[],[[]],{"a":[{}]}]',
        ]

    def frame(self, request_id: int) -> bytes:
        rng = self.rng
        op = rng.choice(list(self.ops))
        fields = rng.sample(self.ops[op], k=min(len(self.ops[op]), rng.choice((1, 1, 2, 3))))
        parts = [b'"op":"%b"' % op.encode(), b'"id":%d' % request_id]
        for field in fields:
            value = rng.choice(self.deep) if rng.random() < 0.3 else rng.choice(self.values)
            parts.append(b'"%b":%b' % (field.encode(), value))
        rng.shuffle(parts)
        frame = b"{" + b",".join(parts) + b"}"
        mangle = rng.random()
        if mangle < 0.05:
            frame = frame[: rng.randrange(1, len(frame))]  # cut short
        elif mangle < 0.10:
            at = rng.randrange(len(frame))
            frame = frame[:at] + bytes([rng.randrange(256)]) + frame[at + 1 :]  # one byte changed
        elif mangle < 0.12:
            frame = rng.choice(self.deep)  # not even an object
        return frame.replace(b"\n", b" ") + b"\n"


def _fields(*types: type) -> list[str]:
    return sorted({f.encode_name for t in types for f in msgspec.structs.fields(t)} | {"x"})


async def _pipeline(path: str, frames: list[bytes], last: bytes) -> list[bytes]:
    """Send FRAMES then LAST on one connection while reading replies; every reply line, up to LAST's."""
    stream = await trio.open_unix_socket(path)
    replies: list[bytes] = []
    async with stream:
        async with trio.open_nursery() as nursery:

            async def send() -> None:
                batch = 256
                for start in range(0, len(frames), batch):
                    await stream.send_all(b"".join(frames[start : start + batch]))
                await stream.send_all(last)

            nursery.start_soon(send)
            buffer = b""
            marker = last.split(b'"id":', 1)[1].split(b"}", 1)[0]
            while True:
                chunk = await stream.receive_some(1 << 20)
                assert chunk, "the daemon closed the connection"
                buffer += chunk
                lines = buffer.split(b"\n")
                buffer = lines.pop()
                replies += lines
                # (a request the engine answers may finish after LAST's reply: replies come in any order)
                if any(line.startswith(b'{"id":' + marker + b",") for line in lines):
                    return replies


def _check_replies(replies: list[bytes]) -> None:
    for line in replies:
        reply = _decode(line)
        assert isinstance(reply["ok"], bool), line[:200]
        if not reply["ok"]:
            assert reply["error"]["code"] not in ("internal", "shutting_down"), line[:300]


async def _fuzz_http(path: str, rng: random.Random, fuzzer: Fuzzer, count: int) -> None:
    """COUNT pipelined POST /v1/messages with hostile bodies and `x-sidecard-vars` headers on one connection."""
    requests = []
    for _ in range(count):
        body = fuzzer.frame(0)[:-1].replace(b'"op":', b'"x_op":').replace(b'"id":', b'"x_id":')
        header = b"x-sidecard-vars: %b\r\n" % rng.choice(fuzzer.deep) if rng.random() < 0.3 else b""
        requests.append(b"POST /v1/messages HTTP/1.1\r\nhost: s\r\ncontent-length: %d\r\n%b\r\n%b" % (len(body), header, body))
    stream = await trio.open_unix_socket(path)
    async with stream, trio.open_nursery() as nursery:
        nursery.start_soon(stream.send_all, b"".join(requests))
        data, answered = b"", 0
        while answered < count:
            head_end = data.find(b"\r\n\r\n")
            if head_end >= 0:
                head = data[:head_end].decode("latin-1")
                length = int(head.lower().split("content-length: ", 1)[1].split("\r\n", 1)[0])
                if len(data) >= head_end + 4 + length:
                    status = int(head.split(" ", 2)[1])
                    body = json.loads(data[head_end + 4 : head_end + 4 + length])
                    assert status < 500 or body["error"]["sidecard_code"] == "ai_disabled", (status, body)
                    data = data[head_end + 4 + length :]
                    answered += 1
                    continue
            chunk = await stream.receive_some(1 << 20)
            assert chunk, f"the HTTP face closed the connection after {answered} answers"
            data += chunk


def _admin_fuzz(rng: random.Random, fuzzer: Fuzzer, count: int) -> list[bytes]:
    """Frames for every admin op, each with a field too deep to decode: never a valid op (none may drain)."""
    ops = {t.__struct_config__.tag: _fields(t) for t in AdminOp.__args__}
    frames = []
    for n in range(count):
        op = rng.choice(list(ops))
        field = rng.choice(ops[op])
        frames.append(b'{"op":"%b","id":%d,"%b":%b}\n' % (op.encode(), n, field.encode(), rng.choice(fuzzer.deep)))
    return frames


async def test_a_hundred_thousand_hostile_frames_never_change_the_daemons_pid(start_process):
    d = start_process()
    pid = d.proc.pid
    # Any frame that happens to be a valid request is answered at once, without an upstream call.
    assert call(d.admin, {"op": "kill", "id": 1, "scope": "global", "mode": "error"})["ok"]
    rng = random.Random(15)
    app_ops = {"ping": _fields(Ping), "hello": _fields(Hello), "complete": _fields(Complete),
               "count_tokens": _fields(Complete)}
    fuzzer = Fuzzer(rng, app_ops)
    frames = [fuzzer.frame(n) for n in range(FUZZ_FRAMES)]
    admin_frames = _admin_fuzz(rng, fuzzer, 2_000)
    per_connection = FUZZ_FRAMES // CONNECTIONS
    results: list[list[bytes]] = []

    async def app_connection(n: int) -> None:
        last = b'{"op":"ping","id":"end-%d"}\n' % n
        results.append(await _pipeline(d.app, frames[n * per_connection : (n + 1) * per_connection], last))

    async def admin_connection() -> None:
        results.append(await _pipeline(d.admin, admin_frames, b'{"op":"status","id":"end-admin"}\n'))

    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            for n in range(CONNECTIONS):
                nursery.start_soon(app_connection, n)
            nursery.start_soon(admin_connection)
            for _ in range(2):
                nursery.start_soon(_fuzz_http, d.http, random.Random(rng.random()), fuzzer, 500)
    for replies in results:
        _check_replies(replies)
    assert sum(map(len, results)) >= FUZZ_FRAMES
    assert d.proc.pid == pid
    assert_alive(d)
    assert os.path.exists(d.app) and os.path.exists(d.admin) and os.path.exists(d.http)


# ---------------------------------------------------------------- the socket directory, as the operator sees it

DOCS = Path(__file__).parents[2] / "docs"


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root, to make a directory another user owns")
def test_a_socket_directory_another_user_made_first_stops_the_daemon_with_one_clear_line(short_tmp):
    theirs = Path(short_tmp) / "sidecard-0"  # as /tmp/sidecard-$UID would be, made by someone else first
    theirs.mkdir(mode=0o777)
    os.chmod(theirs, 0o777)
    os.chown(theirs, 1001, 1001)
    env = {k: v for k, v in os.environ.items() if k not in ("SIDECARD_CONFIG", "XDG_RUNTIME_DIR")}
    env["SIDECARD_SOCKET"] = f"{theirs}/app.sock"
    result = subprocess.run([sys.executable, "-m", "sidecard", "serve", "--simulate", "--metrics", "off"],
                            capture_output=True, text=True, timeout=60, env=env, cwd=short_tmp)
    assert result.returncode == 2 and "Traceback" not in result.stderr and not os.listdir(theirs)
    # The line docs/security.md shows, for this directory and these users.
    shown = next(line for line in (DOCS / "security.md").read_text().splitlines() if line.startswith("sidecard: /tmp/"))
    expected = shown.replace("/tmp/sidecard-1000", str(theirs)).replace("uid 1000", "uid 0")
    assert result.stderr.splitlines()[-1] == expected


def test_the_config_examples_in_the_security_and_http_docs_pass_check_config(tmp_path):
    for doc in ("security.md", "http.md"):
        for i, block in enumerate(re.findall(r"```toml\n(.*?)```", (DOCS / doc).read_text(), re.DOTALL)):
            path = tmp_path / f"{doc}-{i}.toml"
            path.write_text(block)
            result = subprocess.run([sys.executable, "-m", "sidecard", "check-config", str(path)],
                                    capture_output=True, text=True, timeout=60)
            assert result.returncode == 0, f"{doc} example {i}: {result.stderr}"
