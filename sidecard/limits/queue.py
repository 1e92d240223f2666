"""The admission queue in front of one upstream target: at most `limit.limit` calls in flight, the rest wait.

Waiting requests stand in one line, in the order they will be served: by priority (lower number first: 0
interactive, 1 batch), then arrival — except that a newcomer never pushes an admitted request past its
deadline. Admission is a promise, decided at once:

- a newcomer is admitted only if its predicted wait plus the call's own duration fits in the time it has left,
  so an admitted request finishes within its deadline and an unservable one is refused on arrival
  (`would_miss_deadline`, or `paused` when the provider's hold alone is too long; `deadline_too_short` when a
  slot is free but the time left is shorter than a call of the usual duration). The wait is predicted from
  the line ahead and when the calls in flight should end: slots are taken in the order they free up, each
  call lasting at most its bound, the mean of recent durations (from grant to release) plus four mean
  deviations or a tenth of the mean, whichever is more (as TCP bounds a round trip). So the variation of
  calls, and the small error of every prediction that adds up over a long wait, break no promise;
- it takes its place by priority only if every request behind that place still makes its deadline one turn
  later; otherwise it stands behind the last one that would not. A newcomer's predicted wait counts the more
  important work still to come (at the rate it has been admitted lately), which will go ahead of it: under
  sustained overload, less important requests are refused at the door rather than promised a place they
  would lose;
- a full queue turns newcomers away (`queue_full`), unless the newcomer outranks someone waiting: then the
  lowest-priority, newest waiter is pushed out (`shed`) — the one case where a request refused has waited;
- CoDel, at the door: when every request taken from the queue over `codel_interval_s` waited longer than
  `codel_target_s`, the queue is standing rather than absorbing a burst. Until a request gets through in less
  than the target, newcomers predicted to wait longer than the target are refused (`shed`); those in line keep
  their places and drain;
- the `gate` (the provider's rate limits: `policies.throttle.ProviderWindow`) says when the next call may start;
  `poke` re-reads it after news from the provider, and waiters who can no longer make their deadline then
  leave at once, so the engine can fail over; so do those a hold would keep longer than they would wait for
  the provider (`max_hold_s`, the engine's word: short while another target could take the request). A waiter
  also leaves once too little time is left for a call of the usual duration (mean), rather than take a slot for
  an answer nobody will wait for.

Each waiter waits on its own event: a released slot wakes exactly the waiter it goes to. No I/O and no
background task: while the gate is closed, one waiter (the "timer") wakes when it opens and hands out slots.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Final, Literal, Protocol

import trio

from ..policies.concurrency import ConcurrencyLimit

Reason = Literal["queue_full", "would_miss_deadline", "shed", "paused", "deadline_too_short"]

SERVICE_EWMA: Final = 0.2  # weight of the newest call duration in the mean
DEVIATION_EWMA: Final = 0.25  # and in the mean deviation (TCP's RTO uses the same pair)
DEVIATIONS: Final = 4.0  # a call's duration is bounded by mean + 4 deviations ...
FLOOR: Final = 0.1  # ... or by mean + 10%, whichever is longer
RATE_WINDOW_S: Final = 10.0  # admissions per priority are counted over about this long (exponential decay)


class Gate(Protocol):
    """When the provider lets the next call start (see `policies.throttle.ProviderWindow`)."""

    def delay(self, now: float) -> float: ...

    def held(self, now: float) -> float: ...

    def start(self, now: float) -> bool: ...

    def finish(self, paced: bool) -> None: ...


class _Open:
    """A gate that never holds a call."""

    def delay(self, now: float) -> float:
        return 0.0

    def held(self, now: float) -> float:
        return 0.0

    def start(self, now: float) -> bool:
        return False

    def finish(self, paced: bool) -> None:
        pass


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

    __slots__ = ("_in_flight", "_paced", "_queue", "_released", "granted_at", "priority", "waited_s")

    def __init__(self, queue: AdmissionQueue, priority: int, granted_at: float, waited_s: float, in_flight: int, paced: bool) -> None:
        self._queue = queue
        self.priority = priority
        self.granted_at = granted_at
        self.waited_s = waited_s  # time spent queued
        self._in_flight = in_flight  # calls in flight once this one started, itself included
        self._paced = paced  # started while the gate paced calls
        self._released = False

    def release(self, *, rtt_s: float | None, dropped: bool = False) -> None:
        """Give the slot back. `rtt_s`: how long the call took, fed to the limit and the duration estimate;
        `dropped`: the provider refused it (429, 529) or it timed out. `rtt_s=None`: the call was cancelled or
        never made, so there is no sample."""
        if self._released:
            raise RuntimeError("slot released twice")
        self._released = True
        self._queue._release(self, rtt_s, dropped)


class _Waiter:
    __slots__ = ("deadline", "enqueued_at", "event", "max_hold_s", "outcome", "paused_before", "priority", "seq")

    def __init__(
        self, priority: int, seq: int, enqueued_at: float, deadline: float, paused_before: float, max_hold_s: float
    ) -> None:
        self.priority = priority
        self.seq = seq
        self.enqueued_at = enqueued_at
        self.deadline = deadline
        self.paused_before = paused_before  # the queue's gate-closed time so far, when this waiter arrived
        self.max_hold_s = max_hold_s  # the longest provider hold it waits out
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
        gate: Gate | None = None,
    ) -> None:
        """`clock` must tell trio time: deadlines are waited for with trio's timers. `service_time_s` is a
        first guess of a call's duration, replaced by measurements; without one, nothing is assumed about a
        call's duration until the first call has finished."""
        _check_settings(max_queue, codel_target_s, codel_interval_s)
        self._limit = limit
        self.max_queue = max_queue
        self.codel_target_s = codel_target_s
        self.codel_interval_s = codel_interval_s
        self.shed = shed
        self._clock = clock
        self._gate: Gate = gate or _Open()
        self._service_s = service_time_s
        self._deviation_s = 0.0
        self._line: list[_Waiter] = []  # in the order they will be served
        self._seq = 0
        self._in_flight = 0
        self._flying: dict[Slot, None] = {}  # the slots of the calls in flight, in the order they were granted
        self._opens_at = -math.inf  # when the gate opens, as it last said (inf: when a call in flight ends)
        self._closed_since: float | None = None  # the gate held waiters back from then
        self._closed_done = 0.0  # gate-closed seconds before that
        self._timer: _Waiter | None = None  # the waiter that wakes when the gate opens
        self._admitted: dict[int, tuple[float, float]] = {}  # priority -> (admissions, decayed; when last counted)
        # CoDel
        self._first_above: float | None = None
        self._dropping = False
        # counters
        self._granted = self._shed_count = self._refused = self._expired = 0

    @property
    def in_flight(self) -> int:
        return self._in_flight

    @property
    def queued(self) -> int:
        return len(self._line)

    @property
    def limit(self) -> int:
        return self._limit.limit

    def stats(self) -> dict[str, Any]:
        held = self._gate.delay(self._clock())
        return {
            "in_flight": self._in_flight,
            "queued": len(self._line),
            "limit": self._limit.limit,
            "paused_for_s": held if math.isfinite(held) else None,  # None: until a paced call ends
            "service_time_s": self._service_s,
            "service_bound_s": None if self._service_s is None else self._bound(),
            "granted": self._granted,
            "shed": self._shed_count,  # pushed out of a full queue by a more important newcomer, or refused by CoDel
            "refused": self._refused,  # turned away on arrival
            "expired": self._expired,  # left the queue because their deadline could no longer be met
            "dropping": self._dropping,  # CoDel refuses long waits
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

    async def acquire(self, *, priority: int, deadline: float, max_hold_s: float = math.inf) -> Slot:
        """A slot, at once if one is free, else after waiting in the queue; or `Overloaded`, at once.

        `max_hold_s`: the longest hold of the gate (the provider's retry-after, its spent window; not its pacing) the
        caller waits out, now or while in line; a longer one sends it away (`paused`), for another target.
        A cancellation point: a caller already cancelled gets `Cancelled`, never a slot it cannot release.
        """
        await trio.lowlevel.checkpoint_if_cancelled()
        now = self._clock()
        self._dispatch(now)
        if not self._line and self._in_flight < self._limit.limit and self._gate.delay(now) == 0:
            if deadline - now < (self._service_s or 0.0):
                # Even a free slot cannot give it an answer in time: the provider's capacity would be spent on
                # a call nobody waits for. Not overload: the deadline is shorter than a call takes.
                self._refused += 1
                raise Overloaded("deadline_too_short", 0.0)
            slot = self._grant(now, priority, 0.0)
            self._count_admission(priority, now)
            return slot  # no schedule point: the upstream call that follows has its own (a task switch less)
        if max_hold_s < math.inf:
            held = self._gate.held(now)
            if held > max_hold_s:
                self._refused += 1
                raise Overloaded("paused", held)
        place, wait = self._place(priority, deadline, now)
        if place is None:
            self._refused += 1
            raise Overloaded("paused" if self._gate_wait(now) > deadline - now else "would_miss_deadline", wait)
        if self.shed and self._dropping and wait > self.codel_target_s:
            self._refused += 1
            self._shed_count += 1
            raise Overloaded("shed", wait)
        if len(self._line) >= self.max_queue:
            if not (self.shed and self._line and priority < max(w.priority for w in self._line)):
                self._refused += 1
                raise Overloaded("queue_full", wait)
            self._shed_newest(now)
            place, wait = self._place(priority, deadline, now)
            if place is None:  # cannot happen (one fewer in line only brings starts forward); refuse if it does
                self._refused += 1
                raise Overloaded("queue_full", wait)
        waiter = _Waiter(priority, self._seq, now, deadline, self._closed_time(now), max_hold_s)
        self._seq += 1
        self._line.insert(place, waiter)
        self._count_admission(priority, now)
        self._dispatch(now)  # a closed gate learns it holds someone, and arms the timer
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
            last_start = waiter.deadline - (self._service_s or 0.0)  # after it, an answer would come too late
            if now >= last_start:
                self._take(waiter)
                self._expire(waiter, "would_miss_deadline", self._gate_wait(now))
                self._dispatch(now)
                return
            wake = last_start
            if waiter is self._timer and self._opens_at > now:  # (an opening already past waits for a free slot)
                wake = min(wake, self._opens_at)
            waiter.event = trio.Event()
            with trio.move_on_at(wake):
                await waiter.event.wait()
            if waiter.outcome is None:
                self._dispatch(self._clock())  # woken by the gate's opening, or a poke: nothing to do otherwise

    def _abandon(self, waiter: _Waiter) -> None:
        """The waiting task was cancelled (or failed) and will not take a slot."""
        if waiter.outcome is None:
            self._take(waiter)
            self._arm_timer(self._clock())
        elif isinstance(waiter.outcome, Slot):
            # Granted in the same instant as the cancellation was delivered: pass the slot on.
            waiter.outcome.release(rtt_s=None)

    def poke(self) -> None:
        """The gate has news (the provider answered, or said to wait): hand out what it allows now, and let the
        waiters who can no longer make their deadline, or who will not wait out so long a hold, leave at once, so
        they can fail over."""
        if not self._line:  # nobody waits: the news is read by the next acquire
            if self._closed_since is not None:
                self._reopen(self._clock())
            return
        now = self._clock()
        self._dispatch(now)
        gate_wait = self._gate_wait(now)
        if gate_wait <= 0:
            return  # the provider holds nobody: the promises made stand
        self._send_away_held(now)
        slots = self._slots(now)
        duration = self._service_s or 0.0
        position = 0  # waiters staying, ahead of the one looked at
        for waiter in list(self._line):
            start = self._start_in(position, gate_wait, slots)
            if now + start + duration <= waiter.deadline:
                position += 1
                continue
            self._take(waiter)
            self._expire(waiter, "paused" if now + gate_wait > waiter.deadline else "would_miss_deadline", start)
        self._arm_timer(now)

    # -- the inside

    def _bound(self) -> float:
        """How long a call may take: the mean of recent durations and four mean deviations, or a tenth of the
        mean when calls vary less than that (as TCP's timeout keeps a floor for its clock's granularity: here,
        the event loop's own delays under load)."""
        mean = self._service_s or 0.0
        return mean + max(DEVIATIONS * self._deviation_s, mean * FLOOR)

    def _gate_wait(self, now: float) -> float:
        """How long until the gate opens; a paced call's end is expected within a call's duration."""
        wait = self._gate.delay(now)
        return wait if math.isfinite(wait) else self._service_s or 0.0

    def _slots(self, now: float) -> tuple[int, list[float]]:
        """Slots free now, and when each busy slot is expected to free up, from now, soonest first: a call in
        flight ends at the latest a call's bound after it began (at once, if it is overrunning). Over a lowered
        limit, the first calls to end free no slot."""
        limit = self._limit.limit
        if self._service_s is None:
            return limit, []
        bound = self._bound()
        ends = [max(0.0, slot.granted_at + bound - now) for slot in self._flying]  # granted in time order
        if len(ends) >= limit:
            return 0, ends[len(ends) - limit :]
        return limit - len(ends), ends

    def _start_in(self, position: int, gate_wait: float, slots: tuple[int, list[float]]) -> float:
        """When the waiter at `position` in line (0: first) is expected to start, from now: slots are taken in
        the order they free up (not before the gate opens), each again a call's bound later. A gate's pacing
        is not counted: it lasts until the provider's first answer shows room, usually one call."""
        free, ends = slots
        rounds, index = divmod(position, self._limit.limit)
        return max(gate_wait, 0.0 if index < free else ends[index - free]) + rounds * self._bound()

    def _place(self, priority: int, deadline: float, now: float) -> tuple[int | None, float]:
        """Where a newcomer stands in line, and its predicted wait; no place if it cannot make its deadline.

        Its place by priority, unless someone behind that place would then miss their deadline: then behind the
        last such waiter (whose promise stands)."""
        line = self._line
        gate_wait = self._gate_wait(now)
        slots = self._slots(now)
        bound = self._bound()
        place = 0
        for index in range(len(line) - 1, -1, -1):
            if line[index].priority <= priority:
                place = index + 1
                break
        for index in range(len(line) - 1, place - 1, -1):
            if now + self._start_in(index + 1, gate_wait, slots) + bound > line[index].deadline:
                place = index + 1
                break
        wait = self._start_in(place, gate_wait, slots)
        # More important work keeps coming while it waits, and goes ahead of it: at the rate such work has been
        # admitted lately, it takes that share of the capacity (`limit` calls per bound).
        share = self._rate_ahead(priority, now) * bound / self._limit.limit
        if share >= 1:
            return None, wait
        wait /= 1 - share
        return (place if now + wait + bound <= deadline else None), wait

    def _count_admission(self, priority: int, now: float) -> None:
        count, at = self._admitted.get(priority, (0.0, now))
        self._admitted[priority] = (count * math.exp((at - now) / RATE_WINDOW_S) + 1.0, now)

    def _rate_ahead(self, priority: int, now: float) -> float:
        """Admissions a second, lately, of the priorities served before `priority`."""
        counts = (count * math.exp((at - now) / RATE_WINDOW_S) for p, (count, at) in self._admitted.items() if p < priority)
        return sum(counts) / RATE_WINDOW_S

    def _grant(self, now: float, priority: int, waited_s: float, congested_s: float | None = None) -> Slot:
        self._in_flight += 1
        self._granted += 1
        if self.shed:
            self._codel(now, waited_s if congested_s is None else congested_s)
        slot = Slot(self, priority, now, waited_s, self._in_flight, self._gate.start(now))
        self._flying[slot] = None
        return slot

    def _closed_time(self, now: float) -> float:
        """Seconds the gate has held this queue's waiters back, up to `now`."""
        return self._closed_done + (0.0 if self._closed_since is None else now - self._closed_since)

    def _release(self, slot: Slot, rtt_s: float | None, dropped: bool) -> None:
        now = self._clock()
        self._in_flight -= 1
        self._flying.pop(slot, None)
        self._gate.finish(slot._paced)
        if rtt_s is not None:
            self._limit.on_sample(now, rtt_s, slot._in_flight, dropped)
            # A slot is held a little longer than its call lasts (the waiter must run, the engine prepare the
            # call): the duration a promise must cover runs from the grant to the release.
            held = max(rtt_s, now - slot.granted_at)
            if self._service_s is None:
                self._service_s, self._deviation_s = held, held / 2  # RFC 6298's first sample
            else:
                self._deviation_s += DEVIATION_EWMA * (abs(held - self._service_s) - self._deviation_s)
                self._service_s += SERVICE_EWMA * (held - self._service_s)
        self._dispatch(now)

    def _dispatch(self, now: float) -> None:
        """Hand free slots to the first waiters, as far as the gate allows."""
        while self._line and self._in_flight < self._limit.limit:
            wait = self._gate.delay(now)
            if now + wait > now:  # (a wait below the clock's resolution is none: a timer could not wait for it)
                self._close(now, wait)
                return
            self._reopen(now)
            waiter = self._line[0]
            self._take(waiter)
            if waiter.deadline - now <= (self._service_s or 0.0):
                # It could not finish in time: a slot now would spend the provider's capacity on an answer
                # nobody waits for (and a call cancelled client-side still occupies the provider's slot).
                self._expire(waiter, "would_miss_deadline", self._gate_wait(now))
                continue
            waited = now - waiter.enqueued_at
            # Time the provider made everyone wait is not congestion: CoDel must not shed for it.
            congested = waited - (self._closed_time(now) - waiter.paused_before)
            waiter.outcome = self._grant(now, waiter.priority, waited, congested)
            waiter.event.set()
        if not self._line:
            self._reopen(now)  # nobody is held back: a closed gate costs no one time

    def _reopen(self, now: float) -> None:
        if self._closed_since is not None:
            self._closed_done += now - self._closed_since
            self._closed_since = None
        self._opens_at = -math.inf

    def _close(self, now: float, wait: float) -> None:
        """The gate holds the waiters for `wait` (inf: until a call in flight ends)."""
        if self._closed_since is None:
            self._closed_since = now
        opens_at = now + wait
        if opens_at != self._opens_at:
            self._opens_at = opens_at
            if self._timer is not None:
                self._timer.event.set()  # re-park at the new time, earlier or later
            self._send_away_held(now)  # a hold our own calls began (the window's last request), with no news
        self._arm_timer(now)

    def _send_away_held(self, now: float) -> None:
        """The waiters who will not wait out the gate's hold leave (`paused`), for a target with room."""
        held = self._gate.held(now)
        if held > 0:
            for waiter in [w for w in self._line if held > w.max_hold_s]:
                self._take(waiter)
                self._expire(waiter, "paused", held)

    def _take(self, waiter: _Waiter) -> None:
        """Remove a waiter from the line."""
        self._line.remove(waiter)
        if waiter is self._timer:
            self._timer = None

    def _expire(self, waiter: _Waiter, reason: Reason, retry_after_s: float) -> None:
        self._expired += 1
        waiter.outcome = Overloaded(reason, retry_after_s)
        waiter.event.set()

    def _shed_newest(self, now: float) -> None:
        """Push out the newest waiter of the lowest priority present."""
        lowest = max(w.priority for w in self._line)
        waiter = max((w for w in self._line if w.priority == lowest), key=lambda w: w.seq)
        self._take(waiter)
        self._shed_count += 1
        waiter.outcome = Overloaded("shed", self._gate_wait(now))
        waiter.event.set()
        self._arm_timer(now)

    def _arm_timer(self, now: float) -> None:
        """While the gate is closed, one waiter must wake when it opens to hand out the slots."""
        if self._timer is None and self._line and now < self._opens_at < math.inf:
            self._timer = self._line[0]
            self._timer.event.set()  # a poke: it re-parks with the gate's opening as its wake-up

    def _codel(self, now: float, sojourn: float) -> None:
        """Controlled delay: measure each grant's time in the queue (0 for an immediate grant)."""
        if sojourn < self.codel_target_s:
            self._first_above = None
            self._dropping = False
            return
        if self._first_above is None:
            self._first_above = now + self.codel_interval_s
        elif now >= self._first_above:
            self._dropping = True
