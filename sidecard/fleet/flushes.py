"""`sidecardctl cache flush` for the whole fleet: the shared cache and every sidecar's own.

A flush is a mark, not a deletion: `{ns}:cf` holds, per filter ("feature\\tprompt", "" for any), the unix time
of its last flush, and the request script treats a shared entry stored at or before a mark that applies to the
request as absent (its next leader's answer replaces it). So a flush is one write whatever the cache holds, and
no sidecar can serve a flushed shared entry however late it hears of the flush. The sidecars' own caches are
flushed when they hear of it: a message on `{ns}:flush`, and (a message missed while disconnected, or lost)
a read of the marks at every (re)subscription and every `resync_interval_s` (`FlushFollower`).
"""

from __future__ import annotations

from collections.abc import Callable

import trio

from ..cache import ResponseCache
from .connection import ADMIN_TIMEOUT_S, Connection
from .errors import StoreDataError, StoreError
from .keys import Keys
from .pubsub import Subscriber


def flush_field(feature: str | None, prompt: str | None) -> str:
    return f"{feature or ''}\t{prompt or ''}"


def applying(feature: str, prompt: str | None) -> list[str]:
    """The flush marks that cover an answer of FEATURE (and PROMPT)."""
    fields = [flush_field(None, None), flush_field(feature, None)]
    if prompt is not None:
        fields += [flush_field(None, prompt), flush_field(feature, prompt)]
    return fields


async def flush_shared(connection: Connection, keys: Keys, *, feature: str | None, prompt: str | None, now: float) -> None:
    """Mark the shared cache flushed (for FEATURE and PROMPT, None: any) at NOW, and tell every sidecar."""
    field = flush_field(feature, prompt)
    await connection.pipeline([("HSET", keys.cache_flushes, field, repr(now)), ("PUBLISH", keys.flush_channel, field)],
                              op="cache_flush", timeout_s=ADMIN_TIMEOUT_S)


async def read_marks(connection: Connection, keys: Keys) -> dict[str, float]:
    reply = await connection.call("HGETALL", keys.cache_flushes, op="cache_flushes", timeout_s=ADMIN_TIMEOUT_S)
    if not isinstance(reply, list) or len(reply) % 2:
        raise StoreDataError(f"{keys.cache_flushes} is not a hash")
    try:
        return {reply[i].decode(): float(reply[i + 1]) for i in range(0, len(reply), 2)}
    except (AttributeError, UnicodeDecodeError, ValueError):
        raise StoreDataError(f"{keys.cache_flushes} holds something else than flush times") from None


class FlushFollower:
    """Flushes this sidecar's own cache as the fleet's flushes come: entries stored at or before each new mark."""

    def __init__(
        self, connection: Connection, keys: Keys, cache: ResponseCache, *, resync_interval_s: float, wall: Callable[[], float],
        clock: Callable[[], float] = trio.current_time,
    ) -> None:
        self.connection = connection
        self.keys = keys
        self.cache = cache
        self.resync_interval_s = resync_interval_s
        self._wall = wall
        self._clock = clock
        self.applied: dict[str, float] = {}  # filter -> the last mark applied
        self._wake = trio.Event()

    def attach(self, subscriber: Subscriber) -> None:
        subscriber.on(self.keys.flush_channel, lambda _: self._wake.set())
        subscriber.on_connect.append(self._wake.set)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            try:
                self.apply(await read_marks(self.connection, self.keys))
            except StoreError:
                pass  # counted by the connection's health; the next message or resync reads again
            with trio.move_on_after(self.resync_interval_s):
                await self._wake.wait()
            self._wake = trio.Event()

    def apply(self, marks: dict[str, float]) -> int:
        """Flush what each mark newer than the last applied covers; returns how many entries left."""
        shift = self._wall() - self._clock()  # marks are wall time; the cache's times the daemon's clock
        dropped = 0
        for field, at in marks.items():
            if at <= self.applied.get(field, float("-inf")):
                continue
            self.applied[field] = at
            feature, _, prompt = field.partition("\t")
            dropped += len(self.cache.flush(feature=feature or None, prompt=prompt or None, stored_before=at - shift))
        return dropped
