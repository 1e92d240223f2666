"""What to do after a failed upstream attempt, and how long to wait first.

Like urllib3's `Retry`, the policy is an immutable value: `classify` gives the decision, `started()` the next
value and `delay_before_retry()` the wait; unlike it, nothing here sleeps: the engine does, under the request's
deadline. `first_to_free` picks, once every target of a route has failed, the one the provider lets back soonest.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from enum import Enum
from typing import Final

# Statuses that say "try again later" about the provider, not "your request is wrong".
TRANSIENT_STATUSES: Final = frozenset({408, 409, 429, 500, 502, 503, 504, 529})
# The request itself is at fault: no target can answer it, so fail at once.
CALLER_STATUSES: Final = frozenset({400, 413, 422})
# This target is misconfigured (credentials, permissions, model id): another target may work.
MISCONFIGURED_STATUSES: Final = frozenset({401, 403, 404})
# A retry is only worth it if some of the deadline is left for the attempt itself.
MIN_ATTEMPT_S: Final = 0.05


class Disposition(Enum):
    RETRY = "retry"  # the same target may succeed on another attempt
    FAILOVER = "failover"  # try the next target now
    FAIL = "fail"  # the caller's error: stop and report it


def classify(status: int | None, should_retry: bool | None) -> Disposition:
    """`status` None means the attempt got no HTTP response (connect error, reset, timeout, bad body)."""
    if status in CALLER_STATUSES:
        return Disposition.FAIL
    if status in MISCONFIGURED_STATUSES:
        return Disposition.FAILOVER
    if should_retry is not None:  # the provider's own word (x-should-retry) beats our table
        return Disposition.RETRY if should_retry else Disposition.FAILOVER
    if status is None or status in TRANSIENT_STATUSES or status >= 500:
        return Disposition.RETRY
    return Disposition.FAIL


@dataclass(frozen=True, slots=True)
class Backoff:
    """Exponential backoff with full jitter (AWS architecture blog, "Exponential Backoff And Jitter")."""

    base_s: float = 0.25
    cap_s: float = 8.0

    def delay(self, retry_number: int, rng: random.Random) -> float:
        """Delay before retry `retry_number` (1 for the first retry)."""
        # The exponent is bounded: past the cap it changes nothing, and 2**1024 is no float (a loop that retries for
        # as long as it fails, such as the fleet store's reconnection, gets there after about 1,000 attempts).
        ceiling = min(self.cap_s, self.base_s * 2.0 ** min(retry_number - 1, 64))
        return rng.uniform(0.0, ceiling)


@dataclass(frozen=True, slots=True)
class Retry:
    """Retry state for one target within one request."""

    max_attempts: int = 3
    attempts: int = 0  # attempts made so far
    backoff: Backoff = Backoff()
    min_attempt_s: float = MIN_ATTEMPT_S
    # The longest `retry-after` worth sitting out on this target: the walker makes it short while a later target
    # can take the request, longer on the last one.
    max_retry_after_s: float = math.inf

    def started(self) -> Retry:
        # (built directly: `dataclasses.replace` costs microseconds, once per attempt)
        return Retry(self.max_attempts, self.attempts + 1, self.backoff, self.min_attempt_s, self.max_retry_after_s)

    def refused(self) -> Retry:
        """The attempt just started was turned away before any call (a queue, a provider's hold): it does not count."""
        return Retry(self.max_attempts, self.attempts - 1, self.backoff, self.min_attempt_s, self.max_retry_after_s)

    @property
    def exhausted(self) -> bool:
        return self.attempts >= self.max_attempts

    def delay_before_retry(
        self, *, retry_after_s: float | None, remaining_s: float, rng: random.Random
    ) -> float | None:
        """Seconds to wait before the next attempt on this target, or None: move on instead.

        None when attempts are exhausted, when the provider's `retry-after` is longer than `max_retry_after_s`, or
        when the wait (that `retry-after`, else jittered backoff) would not leave `min_attempt_s` of the deadline
        for the attempt.
        """
        if self.exhausted:
            return None
        if retry_after_s is None:
            delay = self.backoff.delay(self.attempts, rng)
        elif retry_after_s > self.max_retry_after_s:
            return None
        else:
            delay = retry_after_s
        if delay + self.min_attempt_s > remaining_s:
            return None
        return delay


def first_to_free(
    free_at: dict[int, float], *, now: float, remaining_s: float, max_wait_s: float, min_attempt_s: float = MIN_ATTEMPT_S
) -> tuple[int, float] | None:
    """Of the targets a provider holds (by index in the route: when its hold ends), the one it lets back first
    (the earlier in the route on a tie) and the seconds until then; None when that wait is longer than
    `max_wait_s` or would not leave `min_attempt_s` of the time left for the call."""
    if not free_at:
        return None
    index = min(free_at, key=lambda i: (free_at[i], i))
    wait = max(0.0, free_at[index] - now)
    if wait > max_wait_s or wait + min_attempt_s > remaining_s:
        return None
    return index, wait
