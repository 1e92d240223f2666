import os
import shutil
import tempfile
from pathlib import Path

import pytest
from trio.testing import MockClock

os.environ.pop("ANTHROPIC_API_KEY", None)  # tests never reach the real API
STRAY_DUMP = Path(__file__).parents[1] / "dump.rdb"


@pytest.fixture(autouse=True)
def no_store_writes_into_the_checkout():
    """A redis-server started outside a temporary directory (or asked to save there) leaves dump.rdb in the
    checkout: the test that did it fails, by name."""
    existed = STRAY_DUMP.exists()
    yield
    if not existed and STRAY_DUMP.exists():
        STRAY_DUMP.unlink()
        pytest.fail("this test left a redis dump.rdb in the checkout: start servers in a temporary directory (--dir) with --save \"\"")


@pytest.fixture
def short_tmp():
    """A temporary directory with a short path: a Unix socket path must fit in 108 bytes."""
    path = tempfile.mkdtemp(prefix="sc-", dir="/tmp")
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def autojump_clock():
    """Virtual time that jumps when the loop is idle.

    The daemon and the simulated upstream talk over real loopback sockets in these tests, so the clock waits
    a few real milliseconds of idleness before jumping: a reply in transit is never mistaken for idleness.
    """
    return MockClock(autojump_threshold=0.005)


@pytest.fixture(scope="session")
def store_server():
    """One real redis-server (or valkey-server) for the whole session, started on first use: a Unix socket in a
    temporary directory, nothing kept on disk. Tests give themselves a namespace each (tests/fleet/conftest.py).
    No server installed is an error saying what to install (`make test` installs one), never a skip."""
    from sidecard.fleet.devserver import LocalStore

    directory = tempfile.mkdtemp(prefix="scs-", dir="/tmp")
    try:
        with LocalStore(directory) as store:
            yield store
    finally:
        shutil.rmtree(directory, ignore_errors=True)
