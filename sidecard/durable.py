"""Files that must survive a crash (operator state, spend): replaced atomically, and set aside when unreadable.

Only a regular file is ever replaced or set aside: a path naming a directory, a device (`/dev/null`), a pipe, a
socket or a symbolic link is refused, so a mistaken path can never move something that is not sidecard's.
"""

from __future__ import annotations

import errno
import glob
import os
import stat
from pathlib import Path
from collections.abc import Collection, Iterable
from typing import TYPE_CHECKING, Final

from .errors import StartupError

if TYPE_CHECKING:
    from .config import Written

_KINDS: Final = (
    (stat.S_ISREG, "a regular file"),
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISLNK, "a symbolic link"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISFIFO, "a named pipe"),
    (stat.S_ISSOCK, "a socket"),
)


class NotRegularFile(OSError):
    """The path exists and is not a regular file: sidecard neither replaces it nor moves it aside."""


def not_regular(path: str | os.PathLike[str]) -> str | None:
    """What PATH is when it exists and is not a regular file ("a directory", "a character device", ...); None for a
    regular file, or for nothing there (or nothing sidecard may look at: opening it will say why)."""
    try:
        mode = os.lstat(path).st_mode
    except OSError:
        return None
    return None if stat.S_ISREG(mode) else file_kind(mode)


def file_kind(mode: int) -> str:
    """What a file of MODE (`os.lstat`) is, in words: "a regular file", "a directory", "a character device", ..."""
    return next((kind for test, kind in _KINDS if test(mode)), "an unknown kind of file")


def check_regular(path: str | os.PathLike[str]) -> None:
    """Raise `NotRegularFile` when PATH exists and is not a regular file."""
    if kind := not_regular(path):
        raise NotRegularFile(errno.EINVAL, f"{kind}, not a regular file", os.fspath(path))


def require_regular(path: str | os.PathLike[str], setting: str) -> None:
    """Refuse the start (`StartupError`, one line) when PATH, configured by SETTING, exists and is not a regular
    file."""
    if kind := not_regular(path):
        raise StartupError(
            f"{os.fspath(path)} ({setting}) is {kind}, not a regular file; sidecard never replaces or moves it aside: "
            f"set {setting} to a file of its own (created if missing)"
        )


def unwritable(path: Path, how: str) -> str | None:
    """Why the daemon could not write PATH the way HOW says (`config.Written`: "replaced", "database",
    "appended", "directory"), as "<where> is <what>"; None when it can. A missing directory is judged by the nearest one that
    exists (it would be made there). A few access(2) calls: cheap enough for every start."""
    exists = os.path.lexists(path)
    if how != "replaced" and exists and not os.access(path, os.W_OK | (os.X_OK if how == "directory" else 0)):
        return f"{path} is {_why(path)}"
    if how == "appended" and exists:
        return None  # appended to: its directory may be another's (/var/log)
    directory = path if how == "directory" else path.parent
    while not os.path.lexists(directory) and directory != directory.parent:
        directory = directory.parent
    if not os.path.isdir(directory):
        return f"{directory} is not a directory"
    if not os.access(directory, os.W_OK | os.X_OK):
        return f"{directory} is {_why(directory)}"
    return None


def _why(path: Path) -> str:
    try:
        if os.statvfs(path).f_flag & os.ST_RDONLY:
            return "on a read-only file system"  # what systemd's ProtectSystem=strict makes of /etc and /usr
    except OSError:
        pass
    return f"not writable by uid {os.getuid()}"


def require_written(written: Iterable[Written], *, besides: Collection[Written] = ()) -> None:
    """`require_writable` for each file the daemon cannot serve without (`Written.needed`), but those BESIDES."""
    for entry in written:
        if entry.needed and entry not in besides:
            require_writable(entry.path, entry.setting, entry.how)


def require_writable(path: Path, setting: str, how: str) -> None:
    """Refuse the start (`StartupError`, one line) when the daemon could not write PATH, configured by SETTING."""
    if problem := unwritable(path, how):
        raise StartupError(f"{setting} {path} cannot be written: {problem}; set {setting} to a path sidecard's user may "
                           "write (under the systemd unit: in /var/lib/sidecard, its StateDirectory)")


def replace_file(path: Path, data: bytes) -> None:
    """Replace PATH with DATA, mode 0600, atomically: a temp file beside it, fsync, rename, fsync of the directory
    (blocking). A crash leaves the old file or the new one, never a mix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # see remove_leftovers
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        try:
            os.fchmod(fd, 0o600)  # O_CREAT's mode does not apply to a leftover temp file
            view = memoryview(data)
            while view:  # os.write may write less than asked
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        check_regular(path)  # os.replace would put the file in place of a device, a link, ...
        os.replace(temp, path)
    except OSError:
        temp.unlink(missing_ok=True)
        raise
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def set_aside(path: Path, wall_now: float) -> str | None:
    """Rename PATH `<path>.corrupt-<unix time>`, for an operator to inspect; the new name, or None if it could
    not be moved (or is not a regular file)."""
    if not_regular(path):
        return None
    moved = f"{path}.corrupt-{int(wall_now)}"
    try:
        os.replace(path, moved)
    except OSError:
        return None
    return moved


def remove_leftovers(path: Path) -> list[str]:
    """Delete the temp files of PATH's writers killed mid-write (a live process's own are left alone); their names."""
    removed = []
    for temp in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        pid = temp.name[len(path.name) + 2 : -len(".tmp")]
        if not pid.isdigit() or (int(pid) != os.getpid() and _alive(int(pid))):
            continue
        try:
            temp.unlink()
        except OSError:
            continue
        removed.append(str(temp))
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True
