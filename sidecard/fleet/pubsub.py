"""The store's change messages: one subscriber connection per sidecar, dispatching by channel.

Pub/sub delivers at most once: a message sent while this sidecar was disconnected is lost. So every
(re)connection calls the `on_connect` hooks, whose owners resync in full (operator state) or look again
(coalescing followers); the state's periodic resync covers a message lost on a live connection.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

import trio

from ..policies.retry import Backoff
from .connection import CONNECT_ERRORS, RECEIVE_BYTES, RECONNECT_BACKOFF, ProtocolError, describe, dial, keep_connected
from .health import FleetHealth
from .settings import FleetSettings, StoreAddress

Handler = Callable[[bytes], object]


class Subscriber:
    def __init__(
        self,
        address: StoreAddress,
        *,
        name: str = "sidecard-sub",
        connect_timeout_s: float = 1.0,
        tls_ca_file: str | None = None,
        backoff: Backoff = RECONNECT_BACKOFF,
        health: FleetHealth | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.address = address
        self.name = name
        self.connect_timeout_s = connect_timeout_s
        self.tls_ca_file = tls_ca_file
        self.health = health or FleetHealth()
        self.handlers: dict[bytes, Handler] = {}
        self.on_connect: list[Callable[[], object]] = []
        self.subscribed = False
        self.last_error: str | None = None
        self._backoff = backoff
        self._rng = rng or random.Random()

    @classmethod
    def from_settings(cls, settings: FleetSettings, *, address: StoreAddress | None = None, **kwargs: Any) -> Subscriber:
        return cls(
            address or settings.address(), name=f"sidecard-sub:{settings.namespace}:{settings.instance_name()}",
            connect_timeout_s=settings.connect_timeout_ms / 1000, tls_ca_file=settings.tls_ca_file, **kwargs,
        )

    def on(self, channel: str, handler: Handler) -> None:
        """Call `handler(data)` for each message on `channel` (register before `run`)."""
        self.handlers[channel.encode()] = handler

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Subscribe, dispatch, resubscribe with backoff, until cancelled; `started` after the first attempt."""
        await keep_connected(self._session, self._backoff, self._rng, task_status)

    async def _session(self, announce: Callable[[], object]) -> bool:
        try:
            stream, reader, _ = await dial(
                self.address, name=self.name, timeout_s=self.connect_timeout_s, tls_ca_file=self.tls_ca_file,
                # SUBSCRIBE answers once per channel: the first answer comes with the handshake, the rest are
                # skipped by the dispatcher.
                then=[("SUBSCRIBE", *self.handlers)] if self.handlers else [],
            )
        except CONNECT_ERRORS as exc:
            self.last_error = f"cannot subscribe at {self.address}: {describe(exc)}"
            announce()
            return False
        try:
            self.subscribed = True
            for hook in self.on_connect:
                hook()
            announce()
            self.last_error = await self._dispatch(stream, reader)
            return True
        finally:
            self.subscribed = False
            await trio.aclose_forcefully(stream)

    async def _dispatch(self, stream: trio.abc.Stream, reader: Any) -> str:
        try:
            while True:
                data = await stream.receive_some(RECEIVE_BYTES)
                if not data:
                    return "the store closed the subscription"
                reader.feed(data)
                while (message := reader.gets()) is not False:
                    if isinstance(message, list) and len(message) == 3 and message[0] == b"message":
                        handler = self.handlers.get(message[1])
                        if handler is not None:
                            handler(message[2])
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError, ProtocolError) as exc:
            return describe(exc)
