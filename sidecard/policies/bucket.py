"""Rate limits as GCRA (the generic cell rate algorithm): a token bucket kept as one number.

A bucket allows `rate_per_s` sustained and up to `burst` at once. Instead of a token count refilled on a
timer it keeps the theoretical arrival time (TAT): when the bucket would be full again if nothing more were
taken. Taking `amount` pushes the TAT by `amount / rate_per_s`; a take is allowed when the pushed TAT is at
most `burst / rate_per_s` ahead of now. So a refusal knows exactly how long to wait, and an idle bucket costs
nothing.

An amount larger than the whole bucket (one big request against a tokens-per-minute limit) would otherwise
never fit: it is allowed when the bucket is full, and the bucket goes into debt that later takes wait out, so
the long-run rate still holds.
"""

from __future__ import annotations

import math
from collections import OrderedDict


class TokenBucket:
    """GCRA: `rate_per_s` sustained, up to `burst` at once (burst >= 1)."""

    __slots__ = ("_tat", "burst", "rate_per_s")

    def __init__(self, rate_per_s: float, burst: float) -> None:
        if not rate_per_s > 0 or not 1 <= burst < math.inf:
            raise ValueError("a token bucket needs rate_per_s > 0 and 1 <= burst < inf")
        self.rate_per_s = rate_per_s
        self.burst = burst
        self._tat = -math.inf  # full

    def delay(self, now: float, amount: float = 1.0) -> float:
        """Seconds until `amount` would be allowed (0.0: now); takes nothing. Above `burst`: until full."""
        if amount < 0:
            raise ValueError("amount must not be negative")
        if amount > self.burst:
            return max(0.0, self._tat - now)
        allowed_at = max(self._tat, now) + (amount - self.burst) / self.rate_per_s
        return max(0.0, allowed_at - now)

    def try_take(self, now: float, amount: float = 1.0) -> float:
        """0.0: allowed, and taken. Otherwise: seconds until `amount` would be allowed; nothing taken.

        An amount above `burst` is allowed only when the bucket is full, and leaves it in debt.
        """
        wait = self.delay(now, amount)
        if wait == 0.0:
            self._tat = max(self._tat, now) + amount / self.rate_per_s
        return wait

    def adjust(self, now: float, amount: float) -> None:
        """Correct an earlier take once the real figure is known (tokens per minute: estimate vs usage).

        A positive amount is charged even beyond the burst: the bucket goes into debt and later takes wait
        it out. A negative amount gives tokens back, never beyond full.
        """
        self._tat = max(now, max(self._tat, now) + amount / self.rate_per_s)  # a TAT before now would be above full

    def peek(self, now: float) -> float:
        """Tokens available now (for status displays)."""
        return max(0.0, self.burst - max(0.0, self._tat - now) * self.rate_per_s)


class BucketSet:
    """Buckets by key (e.g. per user key), created on first use, bounded: least recently used keys beyond
    `max_keys` are dropped.

    A dropped key starts full again, so a key evicted while in debt gets a fresh burst. That is the accepted
    trade-off for bounded memory: the least recently used key is almost always already full again (it has
    been idle longest), and it takes more than `max_keys` distinct active keys to evict one at all.
    """

    def __init__(self, rate_per_s: float, burst: float, *, max_keys: int = 100_000) -> None:
        TokenBucket(rate_per_s, burst)  # validates the parameters once, here
        if max_keys < 1:
            raise ValueError("max_keys must be at least 1")
        self.rate_per_s = rate_per_s
        self.burst = burst
        self.max_keys = max_keys
        self._buckets: OrderedDict[str, TokenBucket] = OrderedDict()

    def _bucket(self, key: str) -> TokenBucket:
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = TokenBucket(self.rate_per_s, self.burst)
            if len(self._buckets) > self.max_keys:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(key)
        return bucket

    def delay(self, key: str, now: float, amount: float = 1.0) -> float:
        """Seconds until `amount` would be allowed for `key`; takes nothing and creates no bucket.

        Lets a caller check several limits first and take from all of them only if all allow.
        """
        bucket = self._buckets.get(key)
        if bucket is None:
            return TokenBucket(self.rate_per_s, self.burst).delay(now, amount)
        return bucket.delay(now, amount)

    def try_take(self, key: str, now: float, amount: float = 1.0) -> float:
        return self._bucket(key).try_take(now, amount)

    def adjust(self, key: str, now: float, amount: float) -> None:
        """`TokenBucket.adjust` for `key`; a key no longer held is full, and stays so."""
        bucket = self._buckets.get(key)
        if bucket is not None:
            bucket.adjust(now, amount)

    def peek(self, key: str, now: float) -> float:
        bucket = self._buckets.get(key)
        return self.burst if bucket is None else bucket.peek(now)

    def __len__(self) -> int:
        return len(self._buckets)
