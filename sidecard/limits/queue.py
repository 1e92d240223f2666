"""The admission queue in front of one upstream target: at most `limit.limit` calls in flight, the rest wait.

Waiting requests are ordered by priority (lower number first: 0 interactive, 1 batch), then arrival. The queue
is bounded in length and in time, and it sheds load rather than let a standing queue grow:

- a request that would miss its deadline is refused on arrival (`would_miss_deadline`, or `paused` when the
  provider's pause alone is too long), and one whose deadline arrives while it waits leaves then;
- a full queue turns newcomers away (`queue_full`), unless the newcomer outranks someone waiting: then the
  lowest-priority, newest waiter is pushed out (`shed`);
- CoDel: when every request taken from the queue over `codel_interval_s` waited longer than
  `codel_target_s`, the queue is standing rather than absorbing a burst. Waiters of the lowest priority
  present are then shed, newest first (they have the longest wait ahead), at CoDel's increasing rate
  (`interval / sqrt(n)` after the n-th) until a request gets through in less than the target;
- `pause_until` holds every grant until the provider's rate limit resets; waiters stay queued if their
  deadline allows, and the ones whose deadline does not leave at once, so the engine can fail over.

Each waiter waits on its own event: a released slot wakes exactly one waiter, in O(1) (the number of
distinct priorities is tiny). No I/O and no background task: during a pause one waiter (the "timer") wakes
at the pause's end and hands out the slots.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, Final, Literal

import trio

from ..policies.concurrency import ConcurrencyLimit

Reason = Literal["queue_full", "would_miss_deadline", "shed", "paused"]

SERVICE_EWMA: Final = 0.2  # weight of the newest call duration in the service-time estimate


def _check_settings(max_queue: int, codel_target_s: float, codel_interval_s: float) -> None:
    if max_queue < 0 or codel_target_s <= 0 or codel_interval_s <= 0:
        raise ValueError("an admission queue needs max_queue >= 0 and positive CoDel times")


class Overloaded(Exception):
    """The request gets no slot; `retry_after_s` is the queue's estimate of when it could."""

    def __init__(self, reason: Reason, retry_after_s: float) -> None:
        super().__init__(f"{reason} (retry after {retry_after_s:.3f} s)")
        self.reason = reason
        self.retry_after_s = retry_after_s


class Slot:
    """Permission for one call. Release it exactly once, in a `finally` right after `acquire` returns."""

    __slots__ = ("_in_flight", "_queue", "_released", "granted_at", "priority", "waited_s")

    def __init__(self, queue: AdmissionQueue, priority: int, granted_at: float, waited_s: float, in_flight: int) -> None:
        self._queue = queue
        self.priority = priority
        self.granted_at = granted_at
        self.waited_s = waited_s  # time spent queued
        self._in_flight = in_flight  # calls in flight once this one started, itself included
        self._released = False

    def release(self, *, rtt_s: float | None, dropped: bool = False) -> None:
        """Give the slot back. `rtt_s`: how long the call took, fed to the limit and the service-time
        estimate; `dropped`: the provider refused it (429, 529) or it timed out. `rtt_s=None`: the call was
        cancelled or never made, so there is no sample."""
        if self._released:
            raise RuntimeError("slot released twice")
        self._released = True
        self._queue._release(self, rtt_s, dropped)


class _Waiter:
    __slots__ = ("deadline", "enqueued_at", "event", "outcome", "paused_before", "priority", "seq")

    def __init__(self, priority: int, seq: int, enqueued_at: float, deadline: float, paused_before: float) -> None:
        self.priority = priority
        self.seq = seq
        self.enqueued_at = enqueued_at
        self.deadline = deadline
        self.paused_before = paused_before  # the queue's paused time so far, when this waiter arrived
        self.event = trio.Event()
        self.outcome: Slot | Overloaded | None = None


class AdmissionQueue:
    def __init__(
        self,
        limit: ConcurrencyLimit,
        *,
        max_queue: int = 1000,
        codel_target_s: float = 0.05,
        codel_interval_s: float = 0.5,
        shed: bool = True,
        clock: Callable[[], float] = trio.current_time,
        service_time_s: float | None = None,
    ) -> None:
        """`clock` must tell trio time: deadlines are waited for with trio's timers. `service_time_s` is a
        first guess of a call's duration, replaced by measurements; without one, waits are predicted from
        the pause alone until the first call has finished."""
        _check_settings(max_queue, codel_target_s, codel_interval_s)
        self._limit = limit
        self.max_queue = max_queue
        self.codel_target_s = codel_target_s
        self.codel_interval_s = codel_interval_s
        self.shed = shed
        self._clock = clock
        self._service_s = service_time_s
        self._waiting: dict[int, OrderedDict[int, _Waiter]] = {}  # priority -> waiters by arrival
        self._queued = 0
        self._seq = 0
        self._in_flight = 0
        self._paused_until = -math.inf
        self._pause_from = 0.0  # when the current (or last) pause began
        self._paused_done = 0.0  # paused seconds before that
        self._timer: _Waiter | None = None  # the waiter that wakes when the pause ends
        # CoDel
        self._first_above: float | None = None
        self._dropping = False
        self._drop_next = 0.0
        self._drops = 0
        # counters
        self._granted = self._shed_count = self._refused = self._expired = 0

    @property
    def in_flight(self) -> int:
        return self._in_flight

    @property
    def queued(self) -> int:
        return self._queued

    @property
    def limit(self) -> int:
        return self._limit.limit

    def stats(self) -> dict[str, Any]:
        return {
            "in_flight": self._in_flight,
            "queued": self._queued,
            "limit": self._limit.limit,
            "paused_for_s": max(0.0, self._paused_until - self._clock()),
            "service_time_s": self._service_s,
            "granted": self._granted,
            "shed": self._shed_count,  # pushed out of the queue: by a more important newcomer, or by CoDel
            "refused": self._refused,  # turned away on arrival
            "expired": self._expired,  # left the queue because their deadline came or could not be met
            "dropping": self._dropping,  # CoDel is shedding
        }

    def reconfigure(
        self, *, limit: ConcurrencyLimit | None = None, max_queue: int, codel_target_s: float, codel_interval_s: float, shed: bool
    ) -> None:
        """New settings for a queue in use (a config reload). Nobody is dropped: waiters stay queued and calls
        in flight keep their slots. A smaller queue or limit only holds newcomers back until it drains below
        them; a larger limit hands out slots at once. `limit`: a new limit (None: keep the current one)."""
        _check_settings(max_queue, codel_target_s, codel_interval_s)
        if limit is not None:
            self._limit = limit
        self.max_queue = max_queue
        self.codel_target_s = codel_target_s
        self.codel_interval_s = codel_interval_s
        if not shed:
            self._dropping = False
            self._first_above = None
        self.shed = shed
        self._dispatch(self._clock())

    # -- the caller's side

    async def acquire(self, *, priority: int, deadline: float) -> Slot:
        """A slot, at once if one is free, else after waiting in the queue; or `Overloaded`.

        A cancellation point: a caller already cancelled gets `Cancelled`, never a slot it cannot release.
        """
        await trio.lowlevel.checkpoint_if_cancelled()
        now = self._clock()
        self._dispatch(now)
        if not self._queued and now >= self._paused_until and self._in_flight < self._limit.limit:
            slot = self._grant(now, priority, 0.0)
            await trio.lowlevel.cancel_shielded_checkpoint()
            return slot
        wait = self._predict(priority, now)
        if wait > deadline - now:
            self._refused += 1
            raise Overloaded("paused" if self._paused_until - now > deadline - now else "would_miss_deadline", wait)
        if self._queued >= self.max_queue:
            if not (self.shed and self._waiting and priority < max(self._waiting)):
                self._refused += 1
                raise Overloaded("queue_full", wait)
            self._shed_newest(now)
        waiter = _Waiter(priority, self._seq, now, deadline, self._paused_time(now))
        self._seq += 1
        self._waiting.setdefault(priority, OrderedDict())[waiter.seq] = waiter
        self._queued += 1
        self._arm_timer(now)
        try:
            await self._wait(waiter)
        except BaseException:
            self._abandon(waiter)
            raise
        if isinstance(waiter.outcome, Slot):
            return waiter.outcome
        assert waiter.outcome is not None
        raise waiter.outcome

    async def _wait(self, waiter: _Waiter) -> None:
        while waiter.outcome is None:
            now = self._clock()
            if now >= waiter.deadline:
                self._take(waiter)
                self._expire(waiter, "would_miss_deadline", self._predict(waiter.priority, now))
                self._arm_timer(now)
                return
            wake = waiter.deadline
            if waiter is self._timer and now < self._paused_until:
                wake = min(wake, self._paused_until)
            waiter.event = trio.Event()
            with trio.move_on_at(wake):
                await waiter.event.wait()
            if waiter.outcome is None:
                self._dispatch(self._clock())  # woken by the pause's end, or a poke: nothing to do otherwise

    def _abandon(self, waiter: _Waiter) -> None:
        """The waiting task was cancelled (or failed) and will not take a slot."""
        if waiter.outcome is None:
            self._take(waiter)
            self._arm_timer(self._clock())
        elif isinstance(waiter.outcome, Slot):
            # Granted in the same instant as the cancellation was delivered: pass the slot on.
            waiter.outcome.release(rtt_s=None)

    def pause_until(self, when: float) -> None:
        """The provider said "slow down" (429 retry-after, or its rate-limit headers say none remain until
        the reset): no slot is granted before `when`. Only ever extends a pause.

        Waiters whose deadline would pass before their predicted turn leave now, so they can fail over.
        """
        now = self._clock()
        if when <= max(self._paused_until, now):
            return
        if now >= self._paused_until:  # a new pause: bank the last one's length
            self._paused_done = self._paused_time(now)
            self._pause_from = now
        self._paused_until = when
        free = max(0, self._limit.limit - self._in_flight)
        position = 0  # waiters staying, ahead of the one looked at
        for priority in sorted(self._waiting):
            for waiter in list(self._waiting[priority].values()):
                wait = when - now + max(0, position + 1 - free) * self._per_turn()
                if wait <= waiter.deadline - now:
                    position += 1
                    continue
                self._take(waiter)
                self._expire(waiter, "paused" if when > waiter.deadline else "would_miss_deadline", wait)
        if self._timer is not None:
            self._timer.event.set()  # re-arm its wake-up at the new end
        self._arm_timer(now)

    # -- the inside

    def _per_turn(self) -> float:
        """Expected time between two slots freeing up."""
        return 0.0 if self._service_s is None else self._service_s / self._limit.limit

    def _predict(self, priority: int, now: float) -> float:
        """How long a request of `priority` arriving now would wait, behind everyone of its priority or better."""
        ahead = sum(len(waiters) for p, waiters in self._waiting.items() if p <= priority)
        free = max(0, self._limit.limit - self._in_flight)
        return max(0.0, self._paused_until - now) + max(0, ahead + 1 - free) * self._per_turn()

    def _grant(self, now: float, priority: int, waited_s: float, congested_s: float | None = None) -> Slot:
        self._in_flight += 1
        self._granted += 1
        if self.shed:
            self._codel(now, waited_s if congested_s is None else congested_s)
        return Slot(self, priority, now, waited_s, self._in_flight)

    def _paused_time(self, now: float) -> float:
        """Seconds this queue has spent paused, up to `now`."""
        return self._paused_done + max(0.0, min(now, self._paused_until) - self._pause_from)

    def _release(self, slot: Slot, rtt_s: float | None, dropped: bool) -> None:
        now = self._clock()
        self._in_flight -= 1
        if rtt_s is not None:
            self._limit.on_sample(now, rtt_s, slot._in_flight, dropped)
            self._service_s = rtt_s if self._service_s is None else self._service_s + SERVICE_EWMA * (rtt_s - self._service_s)
        self._dispatch(now)

    def _dispatch(self, now: float) -> None:
        """Hand free slots to the first waiters, most important first."""
        if now < self._paused_until:
            return
        while self._queued and self._in_flight < self._limit.limit:
            waiters = self._waiting[min(self._waiting)]
            waiter = waiters[next(iter(waiters))]
            self._take(waiter)
            if waiter.deadline - now <= (self._service_s or 0.0):
                # It could not finish in time: a slot now would spend the provider's capacity on an answer
                # nobody waits for (and a call cancelled client-side still occupies the provider's slot).
                self._expire(waiter, "would_miss_deadline", self._predict(waiter.priority, now))
                continue
            waited = now - waiter.enqueued_at
            # Time the provider made everyone wait is not congestion: CoDel must not shed for it.
            congested = waited - (self._paused_time(now) - waiter.paused_before)
            waiter.outcome = self._grant(now, waiter.priority, waited, congested)
            waiter.event.set()

    def _take(self, waiter: _Waiter) -> None:
        """Remove a waiter from the queue."""
        waiters = self._waiting[waiter.priority]
        del waiters[waiter.seq]
        if not waiters:
            del self._waiting[waiter.priority]
        self._queued -= 1
        if waiter is self._timer:
            self._timer = None

    def _expire(self, waiter: _Waiter, reason: Reason, retry_after_s: float) -> None:
        self._expired += 1
        waiter.outcome = Overloaded(reason, retry_after_s)
        waiter.event.set()

    def _shed_newest(self, now: float) -> None:
        """Push out the newest waiter of the lowest priority present."""
        priority = max(self._waiting)
        waiters = self._waiting[priority]
        waiter = waiters[next(reversed(waiters))]
        self._take(waiter)
        self._shed_count += 1
        waiter.outcome = Overloaded("shed", self._predict(priority, now))
        waiter.event.set()
        self._arm_timer(now)

    def _arm_timer(self, now: float) -> None:
        """While paused, one waiter must wake at the pause's end to hand out the slots."""
        if self._timer is None and self._queued and now < self._paused_until:
            waiters = self._waiting[min(self._waiting)]
            self._timer = waiters[next(iter(waiters))]
            self._timer.event.set()  # a poke: it re-parks with the pause's end as its wake-up

    def _codel(self, now: float, sojourn: float) -> None:
        """Controlled delay: measure each grant's time in the queue (0 for an immediate grant)."""
        if sojourn < self.codel_target_s:
            self._first_above = None
            self._dropping = False
            return
        if not self._dropping:
            if self._first_above is None:
                self._first_above = now + self.codel_interval_s
                return
            if now < self._first_above:
                return
            self._dropping = True
            self._drops = 0
            self._drop_next = now
        while self._queued and now >= self._drop_next:
            self._shed_newest(now)
            self._drops += 1
            self._drop_next += self.codel_interval_s / math.sqrt(self._drops)
        if not self._queued:
            self._dropping = False  # nothing left standing
            self._first_above = None
