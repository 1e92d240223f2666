"""Binding a listening Unix socket safely.

A socket file left behind by a crash is replaced; a path where another daemon is listening is refused.
The new socket is bound under a temporary name, given its mode and group, then renamed into place, so
clients never see it with the wrong permissions and the replacement is atomic.

A socket is only as safe as its directory: whoever may write there can rename their own socket over ours and
read (and answer) what our clients send. So the directory is created 0700 (0710 with a socket group, whose
members need to pass through it), and an existing one must be owned by us or root and writable by nobody
else; each directory above it must be owned by us or root too, and if others may write there, sticky (as
/tmp is), so nobody else can rename what is in it. Anything else refuses to start, saying which directory
and why.

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

from .durable import file_kind


class SocketInUse(Exception):
    """Another process is serving on the path, or the path is not ours to replace."""


class UnsafeDirectory(SocketInUse):
    """The socket's directory (or one above it) could let another user replace the socket."""


def secure_directory(directory: Path, gid: int = -1) -> None:
    """Create DIRECTORY for sockets (0700, or 0710 and group GID), or check that an existing one is safe."""
    if not os.path.lexists(directory):
        directory.parent.mkdir(parents=True, exist_ok=True)
        try:
            directory.mkdir(mode=0o700)
        except FileExistsError:
            pass  # someone was quicker: checked below like any existing directory
        else:
            if gid != -1:
                os.chown(directory, -1, gid)
            os.chmod(directory, 0o700 if gid == -1 else 0o710)  # (mkdir's mode is cut by the umask)
    check_directory(directory)


def check_directory(directory: Path) -> None:
    """Raise `UnsafeDirectory` unless only we (or root) can change what DIRECTORY holds (see the module's doc)."""
    _check_chain(Path(os.path.abspath(directory)), strict=True)


def _check_chain(directory: Path, *, strict: bool) -> None:
    me = os.geteuid()
    for level, current in enumerate((directory, *directory.parents)):
        info = current.lstat()
        if info.st_uid not in (me, 0):
            raise UnsafeDirectory(
                f"{current} is owned by uid {info.st_uid}, not by this daemon's user (uid {me}) or root: another user "
                "could replace the socket in it; remove it or choose another socket directory"
            )
        if stat.S_ISLNK(info.st_mode):
            _check_chain(current.resolve(), strict=strict and level == 0)
            continue
        open_to_others = info.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
        if open_to_others and ((strict and level == 0) or not info.st_mode & stat.S_ISVTX):
            raise UnsafeDirectory(
                f"{current} (mode {stat.S_IMODE(info.st_mode):04o}) is writable by other users: they could replace "
                "the socket in it; chmod go-w it or choose another socket directory"
            )


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
    gid = -1
    if group:
        try:
            gid = grp.getgrnam(group).gr_gid
        except KeyError:
            raise SocketInUse(f"socket group {group!r} does not exist") from None
    secure_directory(target.parent, gid)
    try:
        existing = target.lstat()
    except FileNotFoundError:
        existing = None
    if existing is not None:
        if not stat.S_ISSOCK(existing.st_mode):
            raise SocketInUse(
                f"{path} exists and is {file_kind(existing.st_mode)}, not a socket; sidecard never replaces it: "
                "remove it if nothing needs it, or choose another path (--socket, or the socket keys of [server], "
                "[admin] and [http])"
            )
        if probe(path):
            raise SocketInUse(
                f"another process is already serving on {path}: stop it, or give this daemon paths of its own "
                "(--socket DIR/app.sock puts the admin and HTTP sockets beside it)"
            )
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
        if address:
            check_directory(Path(address).parent)  # systemd made it, but a client still connects through it
    sock.setblocking(False)
    return BoundSocket(trio.socket.from_stdlib_socket(sock), path, None)
