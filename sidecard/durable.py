"""Files that must survive a crash (operator state, spend): replaced atomically, and set aside when unreadable."""

from __future__ import annotations

import glob
import os
from pathlib import Path


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
    not be moved."""
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
