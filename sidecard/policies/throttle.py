"""What a provider says about one target's rate limits, and when the next call to it may start.

The Anthropic API reports with each answer `anthropic-ratelimit-requests-limit`, `-remaining` and `-reset` (when
the window is whole again), the same for tokens, and with a 429 a `retry-after`. `ProviderWindow` keeps the
newest of these and answers one question, `delay(now)`, for the target's admission queue:

- a `retry-after` holds every call until it has passed; a newer one replaces it, shorter or longer;
- a window with `min_requests` or fewer requests left (our calls in flight counted as spent), or
  `min_tokens` or fewer tokens, holds calls until its reset as the answers give it. Never a guess: an answer
  on a new window that shows room ends the hold at once, one with an earlier reset shortens it. Answers come
  out of order, so within one window the lowest count stands;
- once a reset has passed the window is whole again (`limit` requests, less our calls in flight); when it
  resets next is unknown until an answer says so;
- after a hold, calls are paced rather than released in a burst that would draw fresh 429s: one at a time, at
  the rate the provider advertises (`limit` a minute), until an answer shows room. Without an advertised limit,
  the next call waits for the previous paced one to end (its answer tells more).

Times are the caller's clock (`now`); the caller turns the headers' wall-clock reset times into it.
"""

from __future__ import annotations

import math

MINUTE_S = 60.0  # the API advertises its limits per minute
SAME_WINDOW_S = 1.0  # reset times come in whole seconds: two within a second name the same window


class ProviderWindow:
    def __init__(self, *, min_requests: int = 0, min_tokens: int = 0) -> None:
        self.min_requests = min_requests
        self.min_tokens = min_tokens
        self.limit: int | None = None  # requests a minute, as last advertised
        self.remaining: int | None = None  # requests the window still allows, our calls in flight counted
        self.reset: float | None = None  # when the request window is whole again; None: unknown
        self.tokens_remaining: int | None = None
        self.tokens_reset: float | None = None
        self.outstanding = 0  # our calls started and not ended
        self.pacing = False
        self.holds = 0  # holds begun (a retry-after, a spent window): for a metric
        self._retry_until = -math.inf
        self._held = False
        self._paced_out = 0  # paced calls not ended yet
        self._last_paced = -math.inf

    @property
    def pace_s(self) -> float:
        """Seconds between paced calls (0: not pacing; inf: each waits for the previous one's end)."""
        if not self.pacing:
            return 0.0
        return MINUTE_S / self.limit if self.limit else math.inf

    def delay(self, now: float) -> float:
        """Seconds until the next call may start: 0 now, inf once a paced call in flight has ended."""
        wait = self.held(now)
        if wait > 0:
            if not self._held:
                self._held = True
                self.holds += 1
            return wait
        self._held = False
        if not self.pacing or self._paced_out == 0:
            return 0.0
        return max(0.0, self._last_paced + self.pace_s - now)

    def held(self, now: float) -> float:
        """Seconds until the provider's hold ends (a retry-after, a spent window): `delay` without the pacing."""
        self._roll(now)
        wait = max(0.0, self._retry_until - now)
        if self.remaining is not None and self.remaining <= self.min_requests:
            self.pacing = True  # with no reset known (our own count ran out), the pace meters us
            if self.reset is not None:
                wait = max(wait, self.reset - now)
        if self.tokens_remaining is not None and self.tokens_remaining <= self.min_tokens and self.tokens_reset is not None:
            self.pacing = True
            wait = max(wait, self.tokens_reset - now)
        return wait

    def start(self, now: float) -> bool:
        """A call starts (after `delay` said 0); returns whether it is paced (pass that to `finish`)."""
        self.outstanding += 1
        if self.remaining is not None:
            self.remaining -= 1
        if not self.pacing:
            return False
        self._paced_out += 1
        self._last_paced = now
        return True

    def finish(self, paced: bool) -> None:
        """A call ended, however."""
        self.outstanding = max(0, self.outstanding - 1)
        if paced:
            self._paced_out = max(0, self._paced_out - 1)

    def answered(
        self,
        now: float,
        *,
        limit: int | None = None,
        remaining: int | None = None,
        reset: float | None = None,
        tokens_remaining: int | None = None,
        tokens_reset: float | None = None,
    ) -> None:
        """An answer's rate-limit headers (none at all: a provider that sends none), while its call is in flight.

        Room in the window ends pacing, unless a retry-after is still running: an answer to a call sent before
        the 429 says nothing about what the provider will take after it."""
        if limit is not None:
            self.limit = limit
        room = False
        if remaining is not None and reset is not None:
            # Our other calls in flight will still count against what the provider reports as left.
            counted = remaining - max(0, self.outstanding - 1)
            self.remaining, self.reset = _newest(self.remaining, self.reset, counted, reset, now)
            room = self.remaining is not None and self.remaining > self.min_requests
        elif limit is None and self.limit is None:
            room = True  # nothing advertised: a success is all the provider will say
        if room and now >= self._retry_until:
            self.pacing = False
        if tokens_remaining is not None and tokens_reset is not None:
            self.tokens_remaining, self.tokens_reset = _newest(
                self.tokens_remaining, self.tokens_reset, tokens_remaining, tokens_reset, now)

    def retry_after(self, now: float, seconds: float) -> None:
        """A 429 with `retry-after`: no call before then, and paced after."""
        self._retry_until = now + max(0.0, seconds)
        self.pacing = True

    def _roll(self, now: float) -> None:
        if self.reset is not None and now >= self.reset:
            self.remaining = None if self.limit is None else self.limit - self.outstanding
            self.reset = None
        if self.tokens_reset is not None and now >= self.tokens_reset:
            self.tokens_remaining = self.tokens_reset = None


def _newest(
    remaining: int | None, reset: float | None, reported: int, reported_reset: float, now: float
) -> tuple[int | None, float | None]:
    """What is left of a window and when it resets, given one more answer's report.

    Answers arrive out of order: within one window, the lowest count is the newest (an answer that reports more
    left was counted before others the provider has seen since). A report on a window already over says nothing;
    one on another window, earlier or later, replaces what was known."""
    if reported_reset <= now:
        return remaining, reset
    if reset is not None and remaining is not None and abs(reported_reset - reset) < SAME_WINDOW_S:
        return min(remaining, reported), reset
    return reported, reported_reset
