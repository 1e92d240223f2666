"""Coalescing across the fleet: identical requests in flight on any sidecar share one upstream call.

The request script gives a missing cache key's lease to one caller (the leader); the others follow. A
follower waits until the cache channel names its key (the leader stored its answer, or gave the lease up) or
until the leader's lease would run out, then asks again: a hit, or the lease (the leader died, or gave up)
and it leads. So nobody waits on a dead leader longer than a lease, and nobody waits past its own deadline
(the caller's cancel scope).
"""

from __future__ import annotations

from collections.abc import Callable

import trio

from .errors import StoreError
from .pubsub import Subscriber
from .scripts import Admit, Admitted, CacheHit, RequestPath


class Landings:
    """Followers on this sidecar waiting for a leader elsewhere, by cache key."""

    def __init__(self, channel: str) -> None:
        self.channel = channel
        self._waiting: dict[bytes, trio.Event] = {}

    def attach(self, subscriber: Subscriber) -> None:
        subscriber.on(self.channel, self.heard)
        subscriber.on_connect.append(self.wake_all)  # a landing may have been missed while disconnected

    def heard(self, cache_key: bytes) -> None:
        event = self._waiting.pop(cache_key, None)
        if event is not None:
            event.set()

    def wake_all(self) -> None:
        for event in self._waiting.values():
            event.set()
        self._waiting.clear()

    async def wait(self, cache_key: str, timeout_s: float) -> None:
        """Until the key's leader lands or gives up, or `timeout_s`."""
        event = self._waiting.setdefault(cache_key.encode(), trio.Event())
        with trio.move_on_after(timeout_s):
            await event.wait()

    def __len__(self) -> int:
        return len(self._waiting)


async def keep_lease(path: RequestPath, cache_key: str, *, lease_token: str, lease_ms: int, wall: Callable[[], float]) -> None:
    """The leader's companion while its upstream call runs (start it in the call's nursery, cancel it when the
    call ends): renews the lease every third of `lease_ms`, so followers wait for a slow leader and take over
    only from a dead one. Returns if the lease was lost; a store error skips one renewal."""
    while True:
        await trio.sleep(lease_ms / 3000)
        try:
            if not await path.renew_lease(cache_key, lease_token, lease_ms=lease_ms, now=wall()):
                return
        except StoreError:
            pass


async def follow(
    path: RequestPath, landings: Landings, cache_key: str, *, lease_token: str, lease_ms: int, wall: Callable[[], float]
) -> CacheHit | None:
    """Wait for the leader's answer: the hit, or None when this caller now holds the lease and must lead.

    Limits and budgets were applied when the request was admitted: asking again takes nothing from them.
    """
    while True:
        result = await path.admit(Admit(wall(), cache_key=cache_key, cache_mode="lead", lease_token=lease_token, lease_ms=lease_ms))
        if isinstance(result, CacheHit):
            return result
        assert isinstance(result, Admitted)
        if result.lease == "leader":
            return None
        await landings.wait(cache_key, result.lease_ttl_ms / 1000)
