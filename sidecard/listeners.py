"""The daemon's listening sockets: the app, admin and HTTP sockets (and the HTTP face's loopback port), the ones
systemd passed by socket activation adopted by role, the others bound; and TCP services started on an address.

Whatever cannot listen is a `StartupError` whose one line says what to change.
"""

from __future__ import annotations

import socket
from typing import Any

import trio

from .config import Config, parse_address
from .errors import StartupError, first_leaf
from .observe.log import JsonLog
from .systemd import UNNAMED
from .unixsock import BoundSocket, SocketInUse, adopt_unix, bind_unix

ROLES = ("app", "admin", "http")


class Sockets:
    """The Unix sockets the daemon serves, by role: each systemd passed (it keeps owning them), else bound."""

    def __init__(self, passed: dict[str, list[socket.socket]], log: JsonLog) -> None:
        self._passed = activated_sockets(passed, log)
        self.paths: dict[str, str] = {}  # role -> the path actually served
        self.activated: list[str] = []  # the roles systemd passed
        self.http_address: tuple[str, int] | None = None  # the HTTP face's loopback port, if it has one

    def listen(self, role: str, path: str, mode: int, group: str | None) -> BoundSocket:
        sock = self._passed.get(role)
        if sock is None:
            bound = _bind(path, mode, group)
        else:
            try:
                bound = adopt_unix(sock, role)
            except SocketInUse as exc:
                raise StartupError(str(exc)) from None
            self.activated.append(role)
        self.paths[role] = bound.path
        return bound

    def http(self, config: Config, *bound: BoundSocket) -> tuple[BoundSocket, list[trio.SocketListener]] | None:
        """The HTTP face's Unix socket (and loopback TCP port, if configured), or None when it is off; on failure the
        sockets already BOUND are removed."""
        if not config.http.enabled:
            return None
        try:
            http_socket = self.listen("http", config.http.socket, config.http.socket_mode, config.http.socket_group)
        except BaseException:
            for other in bound:
                other.unlink()
            raise
        listeners = [trio.SocketListener(http_socket.sock)]
        if config.http.address:
            host, port = parse_address(config.http.address)
            sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((host, port))
                sock.listen(4096)
            except OSError as exc:
                sock.close()
                http_socket.unlink()
                for other in bound:
                    other.unlink()
                raise StartupError(f"cannot serve HTTP on {config.http.address}: {reason(exc)} "
                                   "(choose another [http] address, or remove it to serve on the Unix socket alone)") from None
            self.http_address = sock.getsockname()[:2]
            listeners.append(trio.SocketListener(trio.socket.from_stdlib_socket(sock)))
        return http_socket, listeners


def activated_sockets(passed: dict[str, list[socket.socket]], log: JsonLog) -> dict[str, socket.socket]:
    """Sockets from systemd by role: `app`, `admin`, `http` (FileDescriptorName=); a lone unnamed fd is the app one."""
    if not passed:
        return {}
    if list(passed) == [UNNAMED] and len(passed[UNNAMED]) == 1:
        return {"app": passed[UNNAMED][0]}
    chosen: dict[str, socket.socket] = {}
    for name, socks in passed.items():
        if name not in ROLES:
            log.warning("socket_activation_ignored", name=name, fds=[s.fileno() for s in socks])
            for s in socks:
                s.close()  # our copy only: systemd keeps its own
            continue
        if len(socks) > 1:
            raise StartupError(f"systemd passed {len(socks)} sockets named {name!r}; give each its own FileDescriptorName=")
        chosen[name] = socks[0]
    return chosen


async def start_tcp(services: trio.Nursery, what: str, address: str, hint: str, serve: Any, *args: Any) -> Any:
    """Start a TCP service; an address it cannot bind is a `StartupError` saying what to do."""
    try:
        return await services.start(serve, *args)
    except* OSError as group:
        raise StartupError(f"cannot serve {what} on {address}: {reason(first_leaf(group))} ({hint})") from None


def reason(exc: BaseException) -> str:
    """An OSError in a few words (e.g. "AF_UNIX path too long" has no strerror)."""
    return getattr(exc, "strerror", None) or str(exc)


def _bind(path: str, mode: int, group: str | None) -> BoundSocket:
    try:
        return bind_unix(path, mode=mode, group=group)
    except SocketInUse as exc:
        raise StartupError(str(exc)) from None
    except OSError as exc:
        hint = "choose a shorter path" if exc.strerror is None else "choose a directory the daemon can write to"
        raise StartupError(f"cannot listen on {path}: {reason(exc)} ({hint}: --socket, or the socket keys "
                           "of [server], [admin] and [http])") from None
