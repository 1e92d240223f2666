"""The response cache: an exact-match LRU bounded by entries and bytes, with a stale window, and
single-flight coalescing of identical requests in flight.

Time is passed in (`now`), so TTLs are tested exactly. Memory is accounted as the stored bytes plus a fixed
per-entry overhead measured for this structure, so the byte bound holds for many small entries too.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass
from collections.abc import Callable
from typing import Any, Final

import msgspec
import trio

from .protocol import ServedBy, Usage

# Python objects behind one entry besides its payload: the key string, the Entry, the OrderedDict node.
ENTRY_OVERHEAD: Final = 400

_key_encoder: Final = msgspec.json.Encoder(order="deterministic")


def cache_key(parts: dict[str, Any]) -> str:
    """A hash of everything that decides the answer; the parts themselves never leave this function."""
    return hashlib.blake2b(_key_encoder.encode(parts), digest_size=16).hexdigest()


class CachedAnswer(msgspec.Struct, array_like=True):
    """What a hit replays; stored as msgpack (compact, and as fast to decode as it gets). Fields are appended with
    defaults, so an older entry (a persistent file's, a fleet's shared cache's) still reads, and an older daemon (a
    rollback, a fleet mid-upgrade) reads a newer one: msgspec drops the fields an array-like struct lacks."""

    text: str
    content: bytes  # the API's content blocks, as JSON
    model: str
    usage: Usage
    stop_reason: str | None
    stop_sequence: str | None
    served_by: ServedBy
    upstream_request_id: str | None
    extra: dict[str, Any] | None = None  # the message's fields sidecard does not model (never a container)


_pack: Final = msgspec.msgpack.Encoder()
_unpack: Final = msgspec.msgpack.Decoder(CachedAnswer)


def pack(answer: CachedAnswer) -> bytes:
    return _pack.encode(answer)


def unpack(payload: bytes) -> CachedAnswer:
    return _unpack.decode(payload)


@dataclass(slots=True)
class Entry:
    payload: bytes
    stored_at: float
    expires_at: float
    stale_until: float
    labels: tuple[str, str | None]  # (feature, prompt): for flushing one feature's or prompt's entries

    @property
    def size(self) -> int:
        return len(self.payload) + ENTRY_OVERHEAD


@dataclass(frozen=True, slots=True)
class Hit:
    answer: CachedAnswer
    stale: bool
    age_s: float


class ResponseCache:
    def __init__(self, *, max_entries: int, max_bytes: int, max_entry_bytes: int | None = None) -> None:
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.max_entry_bytes = max_entry_bytes if max_entry_bytes is not None else max(1, max_bytes // 16)
        self._entries: OrderedDict[str, Entry] = OrderedDict()
        self.bytes = 0
        self.evictions = 0
        self.undecodable = 0  # entries dropped because they could not be decoded
        self.on_undecodable: Callable[[int], None] | None = None  # told the count so far
        # Told the keys that leave by eviction, expiry or a flush (a persistent store deletes them too); not
        # replacements.
        self.on_drop: Callable[[list[str]], None] | None = None

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: str, now: float, *, allow_stale: bool = False) -> Hit | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        if now >= entry.stale_until:
            self._remove(key)
            self._dropped([key])
            return None
        stale = now >= entry.expires_at
        if stale and not allow_stale:
            return None
        try:
            answer = unpack(entry.payload)
        except msgspec.MsgspecError:
            # A row damaged on disk, or stored by a version with another layout: a miss, never an error.
            self._remove(key)
            self.undecodable += 1
            self._dropped([key])
            if self.on_undecodable is not None:
                self.on_undecodable(self.undecodable)
            return None
        self._entries.move_to_end(key)
        return Hit(answer, stale, now - entry.stored_at)

    def put(self, key: str, entry: Entry) -> bool:
        """Store (or replace) an entry; False if it is too large to keep."""
        if entry.size > self.max_entry_bytes:
            return False
        if key in self._entries:
            self._remove(key)
        self._entries[key] = entry
        self.bytes += entry.size
        evicted = []
        while len(self._entries) > self.max_entries or self.bytes > self.max_bytes:
            oldest = next(iter(self._entries))
            self._remove(oldest)
            evicted.append(oldest)
        self.evictions += len(evicted)
        self._dropped(evicted)
        return key in self._entries

    def items(self) -> list[tuple[str, Entry]]:
        return list(self._entries.items())

    def flush(self, *, feature: str | None = None, prompt: str | None = None, stored_before: float | None = None) -> list[str]:
        """Drop all entries, or those of one feature or prompt, or those stored at or before `stored_before`;
        returns the dropped keys."""
        keys = [
            k
            for k, e in self._entries.items()
            if (feature is None or e.labels[0] == feature) and (prompt is None or e.labels[1] == prompt)
            and (stored_before is None or e.stored_at <= stored_before)
        ]
        for key in keys:
            self._remove(key)
        self._dropped(keys)
        return keys

    def _remove(self, key: str) -> None:
        entry = self._entries.pop(key)
        self.bytes -= entry.size

    def _dropped(self, keys: list[str]) -> None:
        if keys and self.on_drop is not None:
            self.on_drop(keys)


class _Flight:
    __slots__ = ("done", "answer", "error", "followers")

    def __init__(self) -> None:
        self.done = trio.Event()
        self.answer: CachedAnswer | None = None
        self.error: Exception | None = None
        self.followers = 0


class SingleFlight:
    """Identical requests in flight at once share one upstream call.

    The first caller leads; the others wait for it. If the leader fails with an error, followers get that
    error; if the leader is cancelled (its client left, its deadline passed), a follower takes over, so
    nobody is left waiting on a call that will never finish.
    """

    def __init__(self) -> None:
        self._flights: dict[str, _Flight] = {}

    def __len__(self) -> int:
        return len(self._flights)

    def lead_or_follow(self, key: str) -> tuple[bool, _Flight]:
        flight = self._flights.get(key)
        if flight is None:
            flight = self._flights[key] = _Flight()
            return True, flight
        flight.followers += 1
        return False, flight

    def land(self, key: str, flight: _Flight, *, answer: CachedAnswer | None = None, error: Exception | None = None) -> None:
        """The leader is done: with an answer, an error, or neither (it was cancelled)."""
        if self._flights.get(key) is flight:
            del self._flights[key]
        flight.answer, flight.error = answer, error
        flight.done.set()
