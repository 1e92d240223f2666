"""Only a regular file is ever replaced or set aside: a mistaken path (a device, a directory, a pipe, a link)
is refused and left exactly as it was (issue 15: a test once pointed the state path at /dev/null)."""

import os

import pytest

from sidecard.durable import NotRegularFile, replace_file, set_aside
from sidecard.jobs.store import JobStore, StoreError
from sidecard.usage.store import open_store


@pytest.fixture(params=["directory", "named-pipe", "symlink"])
def odd_path(request, tmp_path):
    path = tmp_path / "kept"
    if request.param == "directory":
        path.mkdir()
    elif request.param == "named-pipe":
        os.mkfifo(path)
    else:
        (tmp_path / "elsewhere").write_text("{}")
        path.symlink_to(tmp_path / "elsewhere")
    before = os.lstat(path)
    yield path
    after = os.lstat(path)
    assert (after.st_ino, after.st_mode) == (before.st_ino, before.st_mode)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["kept", *(["elsewhere"] if path.is_symlink() else [])])


def test_replace_file_refuses(odd_path):
    with pytest.raises(NotRegularFile, match="not a regular file"):
        replace_file(odd_path, b"{}")


def test_set_aside_leaves_it(odd_path):
    assert set_aside(odd_path, 1.0) is None


def test_the_usage_store_refuses(odd_path):
    with pytest.raises(NotRegularFile):
        open_store(odd_path)


def test_the_job_store_refuses(odd_path):
    with pytest.raises(StoreError, match="not a regular file"):
        JobStore(odd_path)
