"""The simulated upstream's bookkeeping beyond answers: traffic limits, per-minute rate windows, the prompt cache."""

from __future__ import annotations

import math
from datetime import UTC, datetime
from typing import Any, Final

import msgspec

from .replies import Breakpoint, tokens

PROMPT_CACHE_ENTRIES: Final = 10_000


class Limits(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """What the simulator lets through before answering 429 (None: no limit). The per-minute limits count each
    model's calls (the API's limits are per model) in fixed windows of `window_s` of trio time (a minute unless a
    test wants a shorter one), and show in the `anthropic-ratelimit-*` headers, whose reset times name the
    window's end. The concurrency cap counts every model's calls."""

    concurrency_limit: int | None = None  # Messages calls being answered at once (a 429 with retry-after: 1 beyond)
    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None  # input and output tokens together
    input_tokens_per_minute: int | None = None
    output_tokens_per_minute: int | None = None
    window_s: float = 60.0  # the rate window's length: the limits above count per window

    def __post_init__(self) -> None:
        if not 0 < self.window_s < math.inf:
            raise ValueError("window_s must be a positive number of seconds")
        for name in self.__struct_fields__:
            value = getattr(self, name)
            if name == "window_s":
                continue
            if value is not None and (isinstance(value, bool) or value < 1):
                raise ValueError(f"{name} must be at least 1, or null for no limit")


class RateWindow:
    """What one model used in its current rate window (a minute, or `Limits.window_s`) of trio time."""

    __slots__ = ("_wall_base", "end", "index", "input_tokens", "output_tokens", "requests", "reset_at")

    def __init__(self) -> None:
        self.index = -1
        self.end = 0.0
        self.requests = self.input_tokens = self.output_tokens = 0
        self.reset_at = b""  # the window's end as the headers give it: RFC 3339, wall-clock time
        # Wall-clock time that moves with trio's clock (a mock clock too), so reset times stay consistent.
        self._wall_base: float | None = None

    def roll(self, now: float, length_s: float = 60.0) -> None:
        index = int(now // length_s)
        if index != self.index or self.end != (index + 1) * length_s:
            self.index, self.requests, self.input_tokens, self.output_tokens = index, 0, 0, 0
            self.end = (index + 1) * length_s
            if self._wall_base is None:
                self._wall_base = datetime.now(UTC).timestamp() - now
            reset = datetime.fromtimestamp(self._wall_base + self.end, UTC)
            self.reset_at = reset.strftime("%Y-%m-%dT%H:%M:%SZ").encode()

    def seconds_left(self, now: float) -> int:
        """Until the next window, rounded up: a 429's retry-after."""
        return max(1, math.ceil(self.end - now))


class PromptCache:
    """The prompt prefixes cached recently, by digest, with their expiry in trio time; the oldest go first
    beyond `max_entries`."""

    def __init__(self, max_entries: int = PROMPT_CACHE_ENTRIES) -> None:
        self.max_entries = max_entries
        self._expiry: dict[bytes, float] = {}

    def clear(self) -> None:
        self._expiry.clear()

    def usage(self, size: int, points: list[Breakpoint], now: float) -> dict[str, Any]:
        """The input side of `usage` for a prompt of SIZE characters with cache breakpoints POINTS, as the API
        counts it: the longest prefix cached and unexpired is read, the rest up to the last breakpoint is
        written (and every breakpoint's prefix is cached, or its TTL refreshed), what follows is plain input."""
        read_chars = 0
        for point in reversed(points):
            expiry = self._expiry.get(point.key)
            if expiry is not None and expiry > now:
                read_chars = point.chars
                break
        read = done = tokens(read_chars)
        written = {300.0: 0, 3600.0: 0}
        for point in points:
            if point.chars > read_chars:
                end = tokens(point.chars)
                written[point.ttl_s] = written.get(point.ttl_s, 0) + end - done
                done = end
            self._remember(point.key, now + point.ttl_s)
        return {
            "input_tokens": max(1, tokens(size)) - done,
            "cache_creation_input_tokens": done - read,
            "cache_read_input_tokens": read,
            "cache_creation": {
                "ephemeral_5m_input_tokens": written[300.0],
                "ephemeral_1h_input_tokens": written[3600.0],
            },
        }

    def _remember(self, key: bytes, expiry: float) -> None:
        self._expiry.pop(key, None)  # re-inserted last: the dict's order is the eviction order
        self._expiry[key] = expiry
        if len(self._expiry) > self.max_entries:
            del self._expiry[next(iter(self._expiry))]
