"""Operator state shared by the fleet: kill switches, route overrides, prompt release overrides.

The document is the local state file's own `sidecard.control.backend.State`, so the file stays what it is: the last
fleet state this sidecar saw, which it honours when it starts while the store is down. In the store it is
one hash (`{ns}:state`: version, document, the instance that wrote it), written by compare-and-set on the
version (`save`), each new version announced on the `{ns}:state` channel.

`StateWatcher` keeps a local copy current: a message with a newer version, a reconnection of the subscriber
(messages sent meanwhile are lost) and a periodic full read (`resync_interval_s`: a message lost on a live
connection) all lead to one `load`; a changed version calls `on_change`. A store that comes back empty (a
restart without persistence) is given back the newest last-known copy (`seed`): sidecars that race to do so
converge on the highest version, and a command taken after the restart is never overwritten by a seed.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Final

import msgspec
import trio

from ..control.backend import FORMAT, State
from ..policies.retry import Backoff
from .connection import ADMIN_TIMEOUT_S, Connection
from .errors import StateConflict, StoreDataError, StoreError
from .keys import SCHEMA, Keys
from .pubsub import Subscriber
from .scripts import STATE

_encoder: Final = msgspec.json.Encoder()
_decoder: Final = msgspec.json.Decoder(State)
# After a full read (or the write of what was kept during an outage) that failed while the store is connected (it is
# loading its data after a restart, or slow), the next comes after this backoff rather than at the next resync: kept
# commands reach the fleet within seconds of the store answering. Not connected, the reconnection asks for the read.
RESYNC_RETRY: Final = Backoff(base_s=0.5, cap_s=8.0)


def encode(document: State) -> bytes:
    return _encoder.encode(document)


def decode(data: bytes) -> State:
    try:
        document = _decoder.decode(data)
    except msgspec.MsgspecError as exc:
        raise StoreDataError(f"the operator state in the store is not a sidecard state document: {exc}") from None
    if document.format != FORMAT:
        raise StoreDataError(f"the operator state in the store has format {document.format}; this sidecard reads {FORMAT}")
    return document


class FleetStateStore:
    def __init__(self, connection: Connection, keys: Keys, *, instance: str, timeout_s: float = ADMIN_TIMEOUT_S) -> None:
        self.connection = connection
        self.keys = keys
        self.instance = instance
        self.timeout_s = timeout_s
        self.written_by: str | None = None  # who wrote the document `load` last returned

    async def load(self) -> tuple[int, State | None]:
        """(version, document); (0, None) when the store holds none."""
        schema, (version, data, by) = await self.connection.pipeline(
            [("GET", self.keys.schema), ("HMGET", self.keys.state, "v", "doc", "by")], op="state_load", timeout_s=self.timeout_s
        )
        if schema not in (None, SCHEMA.encode()):
            raise StoreDataError(f"{self.keys.schema} is {schema!r:.40}; this sidecard speaks {SCHEMA!r}")
        if version is None and data is None:
            return 0, None
        if version is None or data is None or not version.isdigit():
            raise StoreDataError(f"{self.keys.state} is not a versioned operator state")
        self.written_by = by.decode(errors="replace") if by else None
        return int(version), decode(data)

    async def save(self, document: State, expected_version: int) -> int:
        """Write if the stored version is still `expected_version` (0: none yet); returns the new version, or
        raises `StateConflict` (another sidecar wrote first: load, reapply, save again)."""
        written, version = await self._write("cas", expected_version, document)
        if not written:
            raise StateConflict(expected_version, version)
        return version

    async def seed(self, document: State, version: int) -> bool:
        """Put a last-known document back into a store that lost its own; False if the store has a newer one."""
        return (await self._write("seed", version, document))[0] == 1

    async def _write(self, mode: str, version: int, document: State) -> tuple[int, int]:
        reply = await self.connection.run_script(
            STATE, [self.keys.schema, self.keys.state],
            [SCHEMA, mode, version, encode(document), self.keys.state_channel, self.instance], timeout_s=self.timeout_s,
        )
        if not (isinstance(reply, list) and len(reply) == 2 and all(isinstance(v, int) for v in reply)):
            raise StoreDataError(f"the state script answered something this sidecard cannot read: {reply!r:.80}")
        return reply[0], reply[1]

    async def watch(
        self, subscriber: Subscriber, on_change: Callable[[int, State], object], *, resync_interval_s: float,
        version: int = 0, document: State | None = None, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Keep `on_change` told of every new version until cancelled (see `StateWatcher`)."""
        watcher = StateWatcher(self, on_change, resync_interval_s=resync_interval_s, version=version, document=document)
        watcher.attach(subscriber)
        await watcher.run(task_status=task_status)


class StateWatcher:
    """The local copy of the fleet's operator state, and what keeps it current."""

    def __init__(
        self, store: FleetStateStore, on_change: Callable[[int, State], object], *, resync_interval_s: float,
        version: int = 0, document: State | None = None, on_error: Callable[[str], object] | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.store = store
        self.on_change = on_change
        self.on_error = on_error
        self.resync_interval_s = resync_interval_s
        self.version = version  # what this sidecar last saw (the local file's, at start)
        self.document = document
        self.resyncs = 0
        self.failures = 0  # reads failed in a row while the store was connected
        self._rng = rng or random.Random()
        self._wake = trio.Event()

    def attach(self, subscriber: Subscriber) -> None:
        subscriber.on(self.store.keys.state_channel, self.heard)
        subscriber.on_connect.append(self.poke)

    def heard(self, data: bytes) -> None:
        """A change message: resync unless it is a version already seen (anything unreadable: resync)."""
        if not (data.isdigit() and int(data) == self.version):
            self.poke()

    def poke(self) -> None:
        self._wake.set()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            read = await self.resync()
            await self.wait(failed=not read)

    async def wait(self, *, failed: bool) -> None:
        """Until a change message, a reconnection, or the next full read is due (`RESYNC_RETRY` after a failure)."""
        self.failures = self.failures + 1 if failed and self.store.connection.connected else 0
        due_s = self.resync_interval_s if not self.failures else RESYNC_RETRY.delay(self.failures, self._rng)
        with trio.move_on_after(min(due_s, self.resync_interval_s)):
            await self._wake.wait()
        self._wake = trio.Event()

    async def resync(self) -> bool:
        """One full read; a store error is reported (`on_error`), the local copy kept, and False returned."""
        self.resyncs += 1
        try:
            version, document = await self.store.load()
            if document is None:
                if self.document is not None:
                    await self.store.seed(self.document, max(self.version, 1))
                return True
        except StoreError as exc:
            if self.on_error is not None:
                self.on_error(str(exc))
            return False
        if version != self.version or self.document is None:
            self.version, self.document = version, document
            self.on_change(version, document)
        return True
