"""sidecard.systemd: the notify protocol against a real datagram socket, and socket-activation parsing."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import uuid

import pytest

from sidecard.systemd import (
    Notifier,
    listen_fds,
    notify_address,
    parse_listen_environment,
    watchdog_interval,
)
from sidecard.unixsock import SocketInUse, adopt_unix


@pytest.fixture
def receiver(short_tmp):
    """A datagram socket at a path, as systemd's notify socket; yields (socket, path)."""
    path = os.path.join(short_tmp, "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(2)
    try:
        yield sock, path
    finally:
        sock.close()


def received(sock: socket.socket) -> list[str]:
    return sock.recv(4096).decode().split("\n")


def test_messages_go_to_a_path_socket_one_datagram_each(receiver):
    sock, path = receiver
    notifier = Notifier.from_environment({"NOTIFY_SOCKET": path})
    assert notifier.enabled and notifier.watchdog_interval_s is None
    notifier.ready("serving on /run/sidecard/app.sock")
    notifier.status("12 requests served")
    notifier.watchdog()
    notifier.stopping()
    notifier.reloaded()
    assert received(sock) == ["READY=1", "STATUS=serving on /run/sidecard/app.sock"]
    assert received(sock) == ["STATUS=12 requests served"]
    assert received(sock) == ["WATCHDOG=1"]
    assert received(sock) == ["STOPPING=1"]
    assert received(sock) == ["READY=1"]


def test_reloading_carries_the_monotonic_clock_in_microseconds(receiver):
    sock, path = receiver
    notifier = Notifier(path)
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    notifier.reloading()
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    first, second = received(sock)
    assert first == "RELOADING=1"
    key, value = second.split("=")
    assert key == "MONOTONIC_USEC" and before <= int(value) <= after


def test_abstract_namespace_socket():
    name = f"sidecard-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(2)
        Notifier.from_environment({"NOTIFY_SOCKET": "@" + name}).ready()
        assert received(sock) == ["READY=1"]


def test_a_newline_in_a_status_cannot_forge_another_field(receiver):
    sock, path = receiver
    Notifier(path).status("oops\nREADY=1")
    assert received(sock) == ["STATUS=oops READY=1"]


def test_without_notify_socket_everything_is_a_no_op():
    env = {"WATCHDOG_USEC": "1000000"}
    notifier = Notifier.from_environment(env)
    assert not notifier.enabled and notifier.watchdog_interval_s is None
    for call in (notifier.ready, notifier.reloading, notifier.reloaded, notifier.stopping, notifier.watchdog):
        call()
    notifier.status("x")
    assert notifier.send("READY=1") is False and notifier.error is None


def test_the_variables_are_removed_so_children_do_not_inherit_them(receiver):
    _, path = receiver
    env = {"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "2000000", "WATCHDOG_PID": "42", "OTHER": "kept"}
    Notifier.from_environment(env, pid=42)
    assert env == {"OTHER": "kept"}
    env = {"NOTIFY_SOCKET": path}
    Notifier.from_environment(env, unset=False)
    assert env == {"NOTIFY_SOCKET": path}


@pytest.mark.parametrize(
    "env, expected",
    [
        ({"WATCHDOG_USEC": "30000000"}, 15.0),
        ({"WATCHDOG_USEC": "200000", "WATCHDOG_PID": "42"}, 0.1),
        ({"WATCHDOG_USEC": "200000", "WATCHDOG_PID": "43"}, None),  # another process's watchdog
        ({"WATCHDOG_USEC": "200000", "WATCHDOG_PID": "x"}, None),
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "-5"}, None),
        ({"WATCHDOG_USEC": "soon"}, None),
        ({}, None),
    ],
)
def test_watchdog_interval_is_half_of_watchdog_usec_and_only_for_our_pid(env, expected):
    assert watchdog_interval(env, 42) == expected
    notifier = Notifier.from_environment({"NOTIFY_SOCKET": "/run/systemd/notify", **env}, pid=42)
    assert notifier.watchdog_interval_s == expected


def test_notify_addresses():
    assert notify_address("/run/systemd/notify") == "/run/systemd/notify"
    assert notify_address("@abstract") == b"\0abstract"
    assert notify_address("") is None and notify_address("@") is None
    assert notify_address("relative/path") is None and notify_address("vsock:2:1234") is None


def test_a_missing_socket_is_reported_once_and_never_raises(short_tmp):
    errors = []
    notifier = Notifier(os.path.join(short_tmp, "nobody-listens"))
    notifier.on_error = errors.append
    assert notifier.send("READY=1") is False
    notifier.watchdog()
    notifier.status("still fine")
    assert len(errors) == 1 and "No such file" in errors[0]


def test_a_full_receiver_never_blocks_the_sender(receiver):
    sock, path = receiver
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    errors = []
    notifier = Notifier(path)
    notifier.on_error = errors.append
    started = time.monotonic()
    results = [notifier.send("STATUS=" + "x" * 200) for _ in range(5000)]
    assert time.monotonic() - started < 5
    assert results[0] is True and results[-1] is False  # the queue filled up; the rest were dropped
    assert len(errors) == 1 and "errno 11" in errors[0]
    sock.recv(4096)
    assert notifier.send("WATCHDOG=1") is True  # and it recovers once the receiver reads


def test_an_on_error_that_raises_is_contained(short_tmp):
    notifier = Notifier(os.path.join(short_tmp, "nobody"))
    notifier.on_error = lambda reason: 1 / 0
    assert notifier.send("READY=1") is False


# ---------------------------------------------------------------------- socket activation


@pytest.mark.parametrize(
    "env, expected",
    [
        ({"LISTEN_PID": "42", "LISTEN_FDS": "2", "LISTEN_FDNAMES": "app:admin"}, [(3, "app"), (4, "admin")]),
        ({"LISTEN_PID": "42", "LISTEN_FDS": "1"}, [(3, "unknown")]),
        ({"LISTEN_PID": "42", "LISTEN_FDS": "2", "LISTEN_FDNAMES": "app"}, [(3, "unknown"), (4, "unknown")]),
        ({"LISTEN_PID": "42", "LISTEN_FDS": "2", "LISTEN_FDNAMES": ":admin"}, [(3, "unknown"), (4, "admin")]),
        ({"LISTEN_PID": "41", "LISTEN_FDS": "1", "LISTEN_FDNAMES": "app"}, []),  # meant for our parent
        ({"LISTEN_FDS": "1", "LISTEN_FDNAMES": "app"}, []),
        ({"LISTEN_PID": "42", "LISTEN_FDS": "0"}, []),
        ({"LISTEN_PID": "42", "LISTEN_FDS": "many"}, []),
        ({}, []),
    ],
)
def test_parse_listen_environment(env, expected):
    assert parse_listen_environment(env, 42) == expected


def test_listen_fds_without_socket_activation_is_empty_and_touches_nothing():
    env = {"LISTEN_PID": "1", "LISTEN_FDS": "1", "LISTEN_FDNAMES": "app", "PATH": "/bin"}
    assert listen_fds(env) == {}
    assert env == {"PATH": "/bin"}  # unset regardless, as sd_listen_fds does
    assert listen_fds({}) == {}


_CHILD = r"""
import fcntl, json, os, socket, sys
from sidecard.systemd import listen_fds
made = [socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) for _ in range(2)]
made.append(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
made[0].bind(sys.argv[1] + "/a.sock"); made[0].listen()
made[1].bind(sys.argv[1] + "/b.sock"); made[1].listen()
high = [fcntl.fcntl(s.fileno(), fcntl.F_DUPFD, 100) for s in made]
for i, fd in enumerate(high):
    os.dup2(fd, 3 + i)  # what systemd does: fds 3, 4, 5, inheritable
    os.close(fd)
os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS="3", LISTEN_FDNAMES="app:admin:app")
found = listen_fds()
print(json.dumps({
    "names": {name: [s.fileno() for s in socks] for name, socks in found.items()},
    "families": {name: [s.family.name for s in socks] for name, socks in found.items()},
    "paths": {name: [s.getsockname() if s.family == socket.AF_UNIX else "inet" for s in socks] for name, socks in found.items()},
    "cloexec": [bool(fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC) for fd in (3, 4, 5)],
    "env_left": [k for k in os.environ if k.startswith("LISTEN_")],
}))
"""


def test_listen_fds_adopts_the_passed_fds_by_name(short_tmp):
    result = subprocess.run([sys.executable, "-c", _CHILD, short_tmp], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    found = json.loads(result.stdout)
    assert found["names"] == {"app": [3, 5], "admin": [4]}
    assert found["families"] == {"app": ["AF_UNIX", "AF_INET"], "admin": ["AF_UNIX"]}
    assert found["paths"]["app"][0] == f"{short_tmp}/a.sock" and found["paths"]["admin"] == [f"{short_tmp}/b.sock"]
    assert found["cloexec"] == [True, True, True]
    assert found["env_left"] == []


async def test_adopt_unix_serves_a_listening_socket_and_never_unlinks_it(short_tmp):
    path = os.path.join(short_tmp, "app.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(path)
    sock.listen()
    bound = adopt_unix(sock, "app")
    assert bound.adopted and bound.path == path
    bound.unlink()
    assert os.path.exists(path)  # systemd's file, not ours
    bound.sock.close()


def test_adopt_unix_refuses_what_it_cannot_serve(short_tmp):
    idle = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    idle.bind(os.path.join(short_tmp, "idle.sock"))
    with pytest.raises(SocketInUse, match="not listening"):
        adopt_unix(idle, "app")
    datagram = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    with pytest.raises(SocketInUse, match="not a Unix stream socket"):
        adopt_unix(datagram, "app")
    tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    tcp.bind(("127.0.0.1", 0))
    tcp.listen()
    with pytest.raises(SocketInUse, match="not a Unix stream socket"):
        adopt_unix(tcp, "admin")
    for s in (idle, datagram, tcp):
        s.close()


async def test_abstract_activated_socket_gets_a_readable_path():
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    name = f"sidecard-test-{uuid.uuid4().hex}"
    sock.bind("\0" + name)
    sock.listen()
    bound = adopt_unix(sock, "app")
    assert bound.path == "@" + name
    bound.sock.close()
