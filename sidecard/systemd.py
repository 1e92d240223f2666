"""systemd integration without a dependency: the notify protocol and socket activation.

`Notifier` speaks sd_notify(3): one datagram of newline-separated `KEY=VALUE` lines to the `AF_UNIX`
socket named by `$NOTIFY_SOCKET`. Every method is a no-op when the daemon was not started by systemd, and
sending never blocks (a non-blocking socket; a full buffer drops the message) and never raises: the first
failure is reported once through `on_error`, later ones are silent.

`listen_fds()` is sd_listen_fds_with_names(3): the sockets systemd passed as fds 3, 4, … with
`$LISTEN_FDS`, `$LISTEN_PID` and `$LISTEN_FDNAMES`, grouped by name.

Both read their variables once and remove them from the environment, as sd_notify's `unset_environment`
does, so a child process never mistakes them for its own.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import time
from collections.abc import Callable, Mapping, MutableMapping
from typing import Final

SD_LISTEN_FDS_START: Final = 3
NOTIFY_VARIABLES: Final = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")
LISTEN_VARIABLES: Final = ("LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES")
UNNAMED: Final = "unknown"  # the name systemd gives an fd without FileDescriptorName=


def notify_address(value: str) -> str | bytes | None:
    """`$NOTIFY_SOCKET` as a `sendto` address: a path, or `@name` for the abstract namespace."""
    if value.startswith("/"):
        return value
    if value.startswith("@") and len(value) > 1:
        return b"\0" + value[1:].encode()
    return None  # empty, relative, or a transport we do not speak (vsock:…)


def watchdog_interval(environ: Mapping[str, str], pid: int) -> float | None:
    """Seconds between watchdog pings (half of `$WATCHDOG_USEC`), or None when no watchdog is ours."""
    usec = environ.get("WATCHDOG_USEC", "")
    if not usec.isdigit() or int(usec) == 0:
        return None
    owner = environ.get("WATCHDOG_PID", "")
    if owner and (not owner.isdigit() or int(owner) != pid):
        return None  # the watchdog belongs to another process (our parent, say)
    return int(usec) / 2 / 1_000_000


class Notifier:
    """Tells the service manager what the daemon is doing; does nothing without `$NOTIFY_SOCKET`."""

    def __init__(self, address: str | bytes | None = None, *, watchdog_interval_s: float | None = None) -> None:
        self.address = address
        self.watchdog_interval_s = watchdog_interval_s if address is not None else None
        self.on_error: Callable[[str], object] | None = None  # told about the first failed send
        self.error: str | None = None
        self._sock: socket.socket | None = None

    @classmethod
    def from_environment(
        cls, environ: MutableMapping[str, str] | None = None, *, pid: int | None = None, unset: bool = True
    ) -> Notifier:
        env = os.environ if environ is None else environ
        address = notify_address(env.get("NOTIFY_SOCKET", ""))
        interval = watchdog_interval(env, os.getpid() if pid is None else pid)
        if unset:
            for name in NOTIFY_VARIABLES:
                env.pop(name, None)
        return cls(address, watchdog_interval_s=interval)

    @property
    def enabled(self) -> bool:
        return self.address is not None

    # -- the messages

    def ready(self, status: str | None = None) -> None:
        self.send("READY=1", *([f"STATUS={status}"] if status else []))

    def status(self, text: str) -> None:
        self.send(f"STATUS={text}")

    def reloading(self, status: str | None = None) -> None:
        monotonic_usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self.send("RELOADING=1", f"MONOTONIC_USEC={monotonic_usec}", *([f"STATUS={status}"] if status else []))

    def reloaded(self, status: str | None = None) -> None:
        self.ready(status)

    def stopping(self, status: str | None = None) -> None:
        self.send("STOPPING=1", *([f"STATUS={status}"] if status else []))

    def watchdog(self) -> None:
        self.send("WATCHDOG=1")

    # -- the wire

    def send(self, *lines: str) -> bool:
        """Send one datagram; True if it left. Never blocks, never raises."""
        if self.address is None:
            return False
        message = "\n".join(line.replace("\n", " ") for line in lines).encode()
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                self._sock.setblocking(False)
            self._sock.sendto(message, self.address)
            return True
        except OSError as exc:
            if self.error is None:
                self.error = f"{exc.strerror or exc} (errno {exc.errno or 0})"
                if self.on_error is not None:
                    try:
                        self.on_error(self.error)
                    except Exception:  # noqa: BLE001 (reporting must not become the failure)
                        pass
            if exc.errno not in (errno.EAGAIN, errno.ENOBUFS) and self._sock is not None:
                self._sock.close()  # start afresh next time (systemd re-executed, say)
                self._sock = None
            return False

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


# ---------------------------------------------------------------------- socket activation


def parse_listen_environment(environ: Mapping[str, str], pid: int) -> list[tuple[int, str]]:
    """(fd, name) for each socket systemd passed to `pid`; [] if none were, or they were not for `pid`."""
    owner, count = environ.get("LISTEN_PID", ""), environ.get("LISTEN_FDS", "")
    if not owner.isdigit() or int(owner) != pid or not count.isdigit() or int(count) == 0:
        return []
    n = int(count)
    names = environ.get("LISTEN_FDNAMES", "")
    listed = names.split(":") if names else []
    if len(listed) != n:
        listed = [UNNAMED] * n  # as sd_listen_fds_with_names does when the names do not add up
    return [(SD_LISTEN_FDS_START + i, listed[i] or UNNAMED) for i in range(n)]


def listen_fds(
    environ: MutableMapping[str, str] | None = None, *, pid: int | None = None, unset: bool = True
) -> dict[str, list[socket.socket]]:
    """The sockets passed by socket activation, by `FileDescriptorName=`; {} without socket activation.

    Each fd gets `FD_CLOEXEC` (a child must not hold our listening sockets open).
    """
    env = os.environ if environ is None else environ
    try:
        passed = parse_listen_environment(env, os.getpid() if pid is None else pid)
    finally:
        if unset:
            for name in LISTEN_VARIABLES:
                env.pop(name, None)
    sockets: dict[str, list[socket.socket]] = {}
    for fd, name in passed:
        try:
            flags = fcntl.fcntl(fd, fcntl.F_GETFD)
            fcntl.fcntl(fd, fcntl.F_SETFD, flags | fcntl.FD_CLOEXEC)
            sock = socket.socket(fileno=fd)  # family, type and protocol come from the fd itself
        except OSError:
            continue  # not open, or not a socket: nothing to adopt
        sockets.setdefault(name, []).append(sock)
    return sockets
