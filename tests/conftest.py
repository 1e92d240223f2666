import os
import shutil
import tempfile

import pytest
from trio.testing import MockClock

os.environ.pop("ANTHROPIC_API_KEY", None)  # tests never reach the real API


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
        store = LocalStore(directory)
        store.start()
        try:
            yield store
        finally:
            store.stop()
    finally:
        shutil.rmtree(directory, ignore_errors=True)
