"""Binding a listening Unix socket safely.

A socket file left behind by a crash is replaced; a path where another daemon is listening is refused.
The new socket is bound under a temporary name, given its mode and group, then renamed into place, so
clients never see it with the wrong permissions and the replacement is atomic.

A socket passed by systemd's socket activation is adopted instead (`adopt_unix`): systemd created it, set
its mode and group, and keeps it open across restarts, so the daemon neither binds nor unlinks it.
"""

from __future__ import annotations

import errno
import grp
import os
import socket
import stat
from pathlib import Path

import trio


class SocketInUse(Exception):
    """Another process is serving on the path, or the path is not ours to replace."""


def probe(path: str) -> bool:
    """True if something accepts connections on `path`."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.settimeout(1.0)
        s.connect(path)
    except OSError as exc:
        if exc.errno in (errno.ECONNREFUSED, errno.ENOENT):
            return False
        if exc.errno in (errno.EAGAIN, errno.ETIMEDOUT):
            return True  # its backlog is full, so someone is listening
        raise SocketInUse(f"cannot check {path}: {exc.strerror}") from None
    finally:
        s.close()
    return True


class BoundSocket:
    def __init__(self, sock: trio.socket.SocketType, path: str, inode: int | None) -> None:
        self.sock = sock
        self.path = path
        self._inode = inode  # None: not ours to remove (socket activation)

    @property
    def adopted(self) -> bool:
        return self._inode is None

    def unlink(self) -> None:
        """Remove the socket file at shutdown, unless a newer daemon has already replaced it."""
        if self._inode is None:
            return
        try:
            if os.lstat(self.path).st_ino == self._inode:
                os.unlink(self.path)
        except OSError:
            pass


def bind_unix(path: str, *, mode: int, group: str | None = None, backlog: int = 4096) -> BoundSocket:
    """Bind and listen on `path`; raises `SocketInUse` with an operator-readable reason."""
    target = Path(path)
    target.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
    try:
        existing = target.lstat()
    except FileNotFoundError:
        existing = None
    if existing is not None:
        if not stat.S_ISSOCK(existing.st_mode):
            raise SocketInUse(f"{path} exists and is not a socket; refusing to replace it")
        if probe(path):
            raise SocketInUse(f"another process is already serving on {path}")
    gid = -1
    if group:
        try:
            gid = grp.getgrnam(group).gr_gid
        except KeyError:
            raise SocketInUse(f"socket group {group!r} does not exist") from None
    staging = target.with_name(f".{target.name}.{os.getpid()}")
    staging.unlink(missing_ok=True)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        previous_umask = os.umask(0o177)  # nobody but us until chmod sets the real mode
        try:
            sock.bind(str(staging))
        finally:
            os.umask(previous_umask)
        if gid != -1:
            os.chown(staging, -1, gid)
        os.chmod(staging, mode)
        sock.listen(backlog)
        os.replace(staging, target)
        inode = target.lstat().st_ino
    except BaseException:
        sock.close()
        staging.unlink(missing_ok=True)
        raise
    return BoundSocket(trio.socket.from_stdlib_socket(sock), path, inode)


def adopt_unix(sock: socket.socket, name: str) -> BoundSocket:
    """Serve on a listening Unix stream socket passed by systemd; raises `SocketInUse` if it is not one."""
    try:
        kind = sock.getsockopt(socket.SOL_SOCKET, socket.SO_TYPE)
        listening = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
        address = sock.getsockname()
    except OSError as exc:
        raise SocketInUse(f"the socket systemd passed as {name!r} is unusable: {exc.strerror}") from None
    if sock.family != socket.AF_UNIX or kind != socket.SOCK_STREAM:
        raise SocketInUse(f"the socket systemd passed as {name!r} is not a Unix stream socket (ListenStream=/path)")
    if not listening:
        raise SocketInUse(f"the socket systemd passed as {name!r} is not listening (Accept=yes is not supported)")
    if isinstance(address, bytes):  # abstract namespace
        path = "@" + address[1:].decode(errors="replace")
    else:
        path = address or f"<fd {sock.fileno()}>"
    sock.setblocking(False)
    return BoundSocket(trio.socket.from_stdlib_socket(sock), path, None)
