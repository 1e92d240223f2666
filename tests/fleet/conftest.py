"""Fleet tests run against a real redis-server: the session's (`store_server`), each test in a namespace of its
own, or a private one (`private_store`) for tests that stop, slow or restart it."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

import pytest
import trio

from sidecard.fleet import scripts
from sidecard.fleet.connection import Connection
from sidecard.fleet.devserver import LocalStore
from sidecard.fleet.keys import Keys
from sidecard.fleet.settings import parse_url

_namespaces = itertools.count(1)


@pytest.fixture
def namespace() -> str:
    return f"test-{next(_namespaces)}"


@pytest.fixture
def keys(namespace: str) -> Keys:
    return Keys(namespace)


@pytest.fixture
def private_store(short_tmp: str):
    """A server of this test's own, to stop, slow (DEBUG SLEEP), freeze and restart."""
    with LocalStore(short_tmp) as store:
        yield store


@pytest.fixture
def connect(nursery: trio.Nursery, store_server: LocalStore) -> Callable[..., Any]:
    """`await connect(store=..., url=..., **Connection kwargs)`: a running connection (the session's server by
    default), with the scripts loaded, and a generous timeout unless the test sets one."""

    async def open_connection(store: LocalStore | None = None, *, url: str | None = None, **kwargs: Any) -> Connection:
        kwargs.setdefault("op_timeout_s", 5.0)
        kwargs.setdefault("scripts", scripts.ALL)
        connection = Connection(parse_url(url or (store or store_server).url), **kwargs)
        await nursery.start(connection.run)
        return connection

    return open_connection
