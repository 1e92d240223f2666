import math

import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from trio.testing import MockClock, wait_all_tasks_blocked

from sidecard.limits.queue import AdmissionQueue, Overloaded
from sidecard.policies.concurrency import AIMDLimit, StaticLimit
from sidecard.policies.throttle import ProviderWindow

INTERACTIVE, BATCH = 0, 1


class Request:
    """One caller of `acquire`, run as its own task."""

    def __init__(self, name: str, priority: int, deadline: float, max_hold_s: float = math.inf) -> None:
        self.name, self.priority, self.deadline, self.max_hold_s = name, priority, deadline, max_hold_s
        self.scope = trio.CancelScope()
        self.slot = self.error = None
        self.cancelled = self.finished = self.handed_over = False

    async def run(self, queue: AdmissionQueue) -> None:
        with self.scope:
            try:
                self.slot = await queue.acquire(priority=self.priority, deadline=self.deadline, max_hold_s=self.max_hold_s)
            except Overloaded as exc:
                self.error = exc
        self.cancelled = self.scope.cancelled_caught
        self.finished = True


async def arrive(nursery, queue, name="r", priority=INTERACTIVE, deadline=math.inf, max_hold_s=math.inf) -> Request:
    request = Request(name, priority, deadline, max_hold_s)
    nursery.start_soon(request.run, queue)
    await wait_all_tasks_blocked()
    return request


def make(limit, **kwargs) -> AdmissionQueue:
    """A queue whose CoDel stays out of the way (calls of a second here), unless a test asks for it."""
    return AdmissionQueue(limit, **{"codel_target_s": 100.0, **kwargs})


async def hold(queue, priority=INTERACTIVE):
    return await queue.acquire(priority=priority, deadline=math.inf)


async def test_a_free_slot_is_granted_at_once(nursery, mock_clock):
    q = make(StaticLimit(2))
    a, b = await hold(q), await hold(q, BATCH)
    assert a.waited_s == b.waited_s == 0 and b.priority == BATCH
    assert (q.in_flight, q.queued) == (2, 0)
    c = await arrive(nursery, q)
    assert not c.finished and q.queued == 1
    mock_clock.jump(1.5)
    a.release(rtt_s=1.5)
    await wait_all_tasks_blocked()
    assert c.slot.waited_s == 1.5 and c.slot.granted_at == trio.current_time()
    assert (q.in_flight, q.queued) == (2, 0)


async def test_interactive_before_batch_and_fifo_within_a_priority(nursery, mock_clock):
    q = make(StaticLimit(1))
    slot = await hold(q)
    waiting = [await arrive(nursery, q, name, priority) for name, priority in
               [("b1", BATCH), ("i1", INTERACTIVE), ("b2", BATCH), ("i2", INTERACTIVE), ("b3", BATCH)]]
    order = []
    for _ in waiting:
        mock_clock.jump(1)
        slot.release(rtt_s=1)
        await wait_all_tasks_blocked()
        (winner,) = [r for r in waiting if r.slot is not None and r.name not in order]
        order.append(winner.name)
        slot = winner.slot
    assert order == ["i1", "i2", "b1", "b2", "b3"]
    assert [r.slot.waited_s for r in waiting] == [3, 1, 4, 2, 5]


async def test_refuses_at_once_a_request_that_would_miss_its_deadline(nursery, mock_clock):
    q = make(StaticLimit(2), service_time_s=1.0)  # a call's bound: 1.1 s (a tenth more than the mean)
    await hold(q), await hold(q)  # both slots taken now: they free up in 1.1 s, then every 1.1 s
    for name in ("i1", "i2"):
        await arrive(nursery, q, name, INTERACTIVE)
    await arrive(nursery, q, "b1", BATCH)
    now = trio.current_time()
    # an interactive request would be third in line (the batch one does not count): a slot in 2.2 s, then its
    # own call of 1.1 s
    with pytest.raises(Overloaded) as refused:
        await q.acquire(priority=INTERACTIVE, deadline=now + 3.29)
    assert refused.value.reason == "would_miss_deadline" and refused.value.retry_after_s == pytest.approx(2.2)
    await arrive(nursery, q, "i3", INTERACTIVE, deadline=now + 3.31)  # just enough: queued
    assert q.queued == 4
    # a batch request waits behind all four, and behind the interactive work still to come: five interactive
    # admissions in the last moments, about 0.5 a second over the 10 s the rate is counted on, each taking a
    # slot for 1.1 s of 2 slots: 27.5% of the capacity
    batch_wait = 3.3 / (1 - 0.5 * 1.1 / 2)
    with pytest.raises(Overloaded) as refused:
        await q.acquire(priority=BATCH, deadline=now + batch_wait + 1.09)
    assert refused.value.retry_after_s == pytest.approx(batch_wait)
    await arrive(nursery, q, "b2", BATCH, deadline=now + batch_wait + 1.11)
    assert q.queued == 5 and q.stats()["refused"] == 2


async def test_a_newcomer_never_pushes_an_admitted_request_past_its_deadline(nursery, mock_clock):
    q = make(StaticLimit(1), service_time_s=1.0)
    slot = await hold(q)
    now = trio.current_time()
    batch = await arrive(nursery, q, "batch", BATCH, deadline=now + 2.5)  # a slot in 1.1 s, done by 2.2
    first = await arrive(nursery, q, "first", INTERACTIVE, deadline=now + 10)  # ahead of it would end it at 3.3
    assert not first.finished and not batch.finished  # behind it instead: still in time
    with pytest.raises(Overloaded):  # third in line: a slot in 3.3 s, done by 4.4
        await q.acquire(priority=INTERACTIVE, deadline=now + 4.3)
    order = []
    for _ in range(2):
        mock_clock.jump(1)
        slot.release(rtt_s=1)
        await wait_all_tasks_blocked()
        (winner,) = [r for r in (batch, first) if r.slot is not None and r.name not in order]
        order.append(winner.name)
        slot = winner.slot
    assert order == ["batch", "first"]
    second = await arrive(nursery, q, "second", INTERACTIVE, deadline=trio.current_time() + 10)
    late_batch = await arrive(nursery, q, "late batch", BATCH, deadline=trio.current_time() + 10)
    third = await arrive(nursery, q, "third", INTERACTIVE, deadline=trio.current_time() + 10)
    assert [w.priority for w in q._line] == [INTERACTIVE, INTERACTIVE, BATCH]  # with time to spare, priority first
    assert not (second.finished or late_batch.finished or third.finished)


async def test_the_service_time_estimate_follows_the_calls(nursery, mock_clock):
    q = make(StaticLimit(1))
    slot = await hold(q)
    assert q.stats()["service_time_s"] is None
    # nothing measured yet: no refusal on a guess, the deadline alone bounds the wait
    r = await arrive(nursery, q, deadline=trio.current_time() + 10)
    assert not r.finished
    slot.release(rtt_s=2.0)  # the first measurement: the mean, and half of it as the deviation (RFC 6298)
    await wait_all_tasks_blocked()
    assert (q.stats()["service_time_s"], q.stats()["service_bound_s"]) == (2.0, 6.0)
    r.slot.release(rtt_s=4.5)
    # then EWMAs: mean 2 + 0.2 * (4.5 - 2), deviation 1 + 0.25 * (2.5 - 1); the bound is mean + 4 deviations
    assert (q.stats()["service_time_s"], q.stats()["service_bound_s"]) == (2.5, 8.0)
    with pytest.raises(Overloaded) as refused:  # a free slot, but not even a mean call fits
        await q.acquire(priority=INTERACTIVE, deadline=trio.current_time() + 2.4)
    assert refused.value.reason == "deadline_too_short"
    r = await arrive(nursery, q, deadline=trio.current_time() + 3)
    assert r.slot is not None  # a free slot is granted when a mean call fits
    with pytest.raises(Overloaded) as refused:  # queued, it must fit its wait (the call in flight: 8) and its own 8
        await q.acquire(priority=INTERACTIVE, deadline=trio.current_time() + 15.9)
    assert refused.value.retry_after_s == 8
    await arrive(nursery, q, deadline=trio.current_time() + 16)
    assert q.queued == 1


async def test_a_waiter_leaves_the_queue_at_its_deadline(nursery, mock_clock):
    q = make(StaticLimit(1))
    held = await hold(q)
    r = await arrive(nursery, q, deadline=trio.current_time() + 5)
    later = await arrive(nursery, q, "later")
    mock_clock.jump(4.5)
    await wait_all_tasks_blocked()
    assert not r.finished
    mock_clock.jump(0.5)
    await wait_all_tasks_blocked()
    assert r.error.reason == "would_miss_deadline"
    assert q.queued == 1 and q.stats()["expired"] == 1
    held.release(rtt_s=5)
    await wait_all_tasks_blocked()
    assert later.slot is not None and q.in_flight == 1


async def test_a_slot_freed_at_the_very_deadline_goes_to_the_next_waiter(nursery, mock_clock):
    q = make(StaticLimit(1))
    held = await hold(q)
    r = await arrive(nursery, q, deadline=trio.current_time() + 5)
    later = await arrive(nursery, q, "later")
    mock_clock.jump(5)
    held.release(rtt_s=5)  # before r's own timer has run: a slot now is no use to r
    await wait_all_tasks_blocked()
    assert r.error.reason == "would_miss_deadline"
    assert later.slot is not None and (q.in_flight, q.queued) == (1, 0)


async def test_a_full_queue_sheds_the_newest_lowest_priority_waiter(nursery, mock_clock):
    q = make(StaticLimit(1), max_queue=3)
    await hold(q)
    i1 = await arrive(nursery, q, "i1", INTERACTIVE)
    b1 = await arrive(nursery, q, "b1", BATCH)
    b2 = await arrive(nursery, q, "b2", BATCH)
    with pytest.raises(Overloaded) as refused:  # a batch newcomer outranks nobody
        await q.acquire(priority=BATCH, deadline=math.inf)
    assert refused.value.reason == "queue_full"
    await arrive(nursery, q, "i2", INTERACTIVE)
    assert b2.error.reason == "shed" and not b1.finished
    await arrive(nursery, q, "i3", INTERACTIVE)
    assert b1.error.reason == "shed" and not i1.finished
    with pytest.raises(Overloaded) as refused:  # only interactive requests queued: nobody to push out
        await q.acquire(priority=INTERACTIVE, deadline=math.inf)
    assert refused.value.reason == "queue_full"
    assert q.queued == 3
    assert (q.stats()["shed"], q.stats()["refused"]) == (2, 2)


async def test_without_shedding_a_full_queue_only_refuses(nursery, mock_clock):
    q = make(StaticLimit(1), max_queue=1, shed=False)
    await hold(q)
    b1 = await arrive(nursery, q, "b1", BATCH)
    with pytest.raises(Overloaded) as refused:
        await q.acquire(priority=INTERACTIVE, deadline=math.inf)
    assert refused.value.reason == "queue_full" and not b1.finished


async def test_no_queue_at_all(nursery, mock_clock):
    q = make(StaticLimit(1), max_queue=0)
    await hold(q)
    with pytest.raises(Overloaded) as refused:
        await q.acquire(priority=INTERACTIVE, deadline=math.inf)
    assert refused.value.reason == "queue_full"


async def release_at(mock_clock, slot, when):
    mock_clock.jump(when - trio.current_time())
    slot.release(rtt_s=1)
    await wait_all_tasks_blocked()


def holder(requests):
    """The slot of the one request that holds one and has not been asked for it yet."""
    (r,) = [r for r in requests if r.slot is not None and not r.handed_over]
    r.handed_over = True
    return r.slot


async def test_codel_refuses_long_waits_at_the_door_under_a_standing_queue(nursery, mock_clock):
    q = AdmissionQueue(StaticLimit(1), codel_target_s=0.05, codel_interval_s=0.5, service_time_s=0.1)
    slot = await hold(q)
    t0 = trio.current_time()
    rs = [await arrive(nursery, q, name, priority) for name, priority in
          [("i1", 0), ("i2", 0), ("i3", 0), ("i4", 0), ("b1", 1), ("b2", 1)]]
    await release_at(mock_clock, slot, t0 + 0.1)  # i1 waited 0.1 s: above target, the interval starts
    await release_at(mock_clock, holder(rs), t0 + 0.3)  # i2 waited 0.3 s, still within the interval
    assert not q.stats()["dropping"]
    await release_at(mock_clock, holder(rs), t0 + 0.6)  # i3: a whole interval above target
    assert q.stats()["dropping"] and not any(r.finished for r in rs[3:])  # those in line keep their places
    with pytest.raises(Overloaded) as refused:  # a newcomer that would wait longer than the target
        await q.acquire(priority=INTERACTIVE, deadline=math.inf)
    assert refused.value.reason == "shed" and q.stats()["shed"] == 1
    for _ in range(3):  # the line drains: i4, b1, b2
        await release_at(mock_clock, holder(rs), trio.current_time() + 0.1)
    assert all(r.slot is not None for r in rs)
    await release_at(mock_clock, holder(rs), trio.current_time() + 0.1)
    after = await arrive(nursery, q, "after")  # granted at once: the standing queue is gone
    assert after.slot is not None and not q.stats()["dropping"]





async def test_codel_leaves_a_short_burst_alone(nursery, mock_clock):
    q = AdmissionQueue(StaticLimit(1), codel_target_s=0.05, codel_interval_s=0.5)
    slot = await hold(q)
    t0 = trio.current_time()
    rs = [await arrive(nursery, q, f"r{i}") for i in range(4)]
    for step in range(1, 5):  # each waits longer than the target, but the queue drains within the interval
        await release_at(mock_clock, slot, t0 + 0.1 * step)
        slot = holder(rs)
    await release_at(mock_clock, slot, t0 + 0.7)
    r = await arrive(nursery, q, "after")  # granted at once: a zero wait ends the episode
    mock_clock.jump(0.3)
    rs = [await arrive(nursery, q, f"s{i}") for i in range(2)]
    await release_at(mock_clock, r.slot, t0 + 1.1)  # above target again, but a new interval starts
    assert q.stats()["shed"] == 0 and all(not r.error for r in rs)


async def test_without_shedding_codel_is_off(nursery, mock_clock):
    q = AdmissionQueue(StaticLimit(1), codel_target_s=0.05, codel_interval_s=0.5, shed=False)
    slot = await hold(q)
    t0 = trio.current_time()
    rs = [await arrive(nursery, q, f"r{i}") for i in range(10)]
    for step in range(1, 11):
        await release_at(mock_clock, slot, t0 + 0.25 * step)
        slot = holder(rs)
    assert q.stats()["shed"] == 0 and all(r.slot is not None for r in rs)


async def test_the_gate_holds_grants_and_newer_news_moves_the_hold(nursery, mock_clock):
    window = ProviderWindow()
    q = make(StaticLimit(1), gate=window)
    now = trio.current_time()
    window.retry_after(now, 2)
    assert q.stats()["paused_for_s"] == 2
    with pytest.raises(Overloaded) as refused:
        await q.acquire(priority=INTERACTIVE, deadline=now + 1)
    assert (refused.value.reason, refused.value.retry_after_s) == ("paused", 2)
    r = await arrive(nursery, q, deadline=now + 10)
    assert not r.finished
    mock_clock.jump(0.5)
    window.retry_after(now + 0.5, 3)  # the provider's newest word: longer
    q.poke()
    mock_clock.jump(2)
    await wait_all_tasks_blocked()
    assert not r.finished
    window.retry_after(now + 2.5, 0.5)  # and now shorter
    q.poke()
    mock_clock.jump(0.5)
    await wait_all_tasks_blocked()
    assert r.slot.waited_s == 3 and q.stats()["paused_for_s"] is None  # paced: the next waits for this one


async def test_a_caller_waits_out_no_hold_longer_than_it_said_on_arrival_or_in_line(nursery, mock_clock):
    """`max_hold_s`: the engine's patience with the provider (short while another target could take the request)."""
    window = ProviderWindow()
    q = make(StaticLimit(2), gate=window)
    now = trio.current_time()
    window.retry_after(now, 2)
    with pytest.raises(Overloaded) as refused:
        await q.acquire(priority=INTERACTIVE, deadline=now + 60, max_hold_s=1.5)
    assert (refused.value.reason, refused.value.retry_after_s) == ("paused", 2) and q.stats()["refused"] == 1
    patient = await arrive(nursery, q, "patient", deadline=now + 60, max_hold_s=2)
    brief = await arrive(nursery, q, "brief", deadline=now + 60, max_hold_s=3)
    mock_clock.jump(0.5)
    window.retry_after(now + 0.5, 2.5)  # newer news, longer: past what `patient` waits for, within `brief`'s
    q.poke()
    await wait_all_tasks_blocked()
    assert (patient.error.reason, patient.error.retry_after_s) == ("paused", 2.5) and not brief.finished
    mock_clock.jump(2.5)
    await wait_all_tasks_blocked()
    assert brief.slot.waited_s == 3


async def test_a_hold_our_own_calls_begin_sends_away_the_waiters_it_would_keep_too_long(nursery, mock_clock):
    window = ProviderWindow()
    q = make(StaticLimit(1), gate=window)
    now = trio.current_time()
    window.answered(now, limit=3, remaining=2, reset=now + 30)
    slot = await hold(q)
    first = await arrive(nursery, q, "first", deadline=now + 60, max_hold_s=1)
    second = await arrive(nursery, q, "second", deadline=now + 60, max_hold_s=1)
    slot.release(rtt_s=0.5)
    await wait_all_tasks_blocked()
    assert first.slot is not None and not second.finished  # the window's last request: the next waits for its reset
    first.slot.release(rtt_s=0.5)
    await wait_all_tasks_blocked()
    assert second.error.reason == "paused" and second.error.retry_after_s == pytest.approx(30)


async def test_a_hold_keeps_the_waiters_whose_deadline_allows(nursery, mock_clock):
    window = ProviderWindow()
    q = make(StaticLimit(1), service_time_s=1.0, gate=window)
    held = await hold(q)
    now = trio.current_time()
    r1 = await arrive(nursery, q, "r1", deadline=now + 100)
    r2 = await arrive(nursery, q, "r2", deadline=now + 6.5)
    r3 = await arrive(nursery, q, "r3", deadline=now + 4.5)
    r4 = await arrive(nursery, q, "r4", deadline=now + 100)
    assert q.queued == 4  # each fits: slots in 1.1, 2.2, 3.3 and 4.4 s, each call at most 1.1 s
    window.retry_after(now, 5)
    q.poke()
    await wait_all_tasks_blocked()
    # after the hold: r1 starts at 5, r2 at 6.1 (a mean call: done at 7.1, beyond its deadline); r3's deadline
    # is in the hold
    assert r2.error.reason == "would_miss_deadline" and r2.error.retry_after_s == pytest.approx(6.1)
    assert r3.error.reason == "paused" and r3.error.retry_after_s == pytest.approx(6.1)
    assert not r1.finished and not r4.finished and q.stats()["expired"] == 2
    mock_clock.jump(1)
    held.release(rtt_s=1)  # held: the slot stays free
    await wait_all_tasks_blocked()
    assert r1.slot is None and q.in_flight == 0
    mock_clock.jump(4)  # the hold ends with nothing else happening: a waiter wakes and hands out the slot
    await wait_all_tasks_blocked()
    assert r1.slot.waited_s == 5 and not r4.finished


async def test_news_that_holds_nobody_takes_back_no_promise(nursery, mock_clock):
    """Predictions drift as calls run a little long; only a provider's hold may send an admitted waiter away."""
    window = ProviderWindow()
    q = make(StaticLimit(1), service_time_s=1.0, gate=window)
    slot = await hold(q)
    t0 = trio.current_time()
    first = await arrive(nursery, q, "first")
    second = await arrive(nursery, q, "second", deadline=t0 + 3.31)  # a slot in 2.2 s, its call 1.1: just in
    mock_clock.jump(1.15)
    slot.release(rtt_s=1.15)  # a little long: now second looks due at 3.36
    await wait_all_tasks_blocked()
    window.answered(trio.current_time(), limit=100, remaining=50, reset=t0 + 30)
    q.poke()
    await wait_all_tasks_blocked()
    assert not second.finished
    mock_clock.jump(1.0)
    first.slot.release(rtt_s=1.0)
    await wait_all_tasks_blocked()
    assert second.slot is not None and trio.current_time() + 1.0 < second.deadline


class Unresolvable:
    """A gate whose wait is below the clock's resolution, as float rounding can leave one."""

    def delay(self, now):
        return 1e-14 if now > 100 else 0.0  # at a clock past 100 s, 1e-14 is no time at all

    def held(self, now):
        return self.delay(now)

    def start(self, now):
        return False

    def finish(self, paced):
        pass


async def test_a_wait_too_short_for_the_clock_is_no_wait(nursery, mock_clock):
    q = make(StaticLimit(1), gate=Unresolvable())
    slot = await hold(q)
    mock_clock.jump(200)
    waiting = await arrive(nursery, q, deadline=trio.current_time() + 10)
    slot.release(rtt_s=None)
    await wait_all_tasks_blocked()  # (it used to spin here: a timer set for now, again and again)
    assert waiting.slot is not None


async def test_a_hold_can_be_extended_and_survives_its_timer_leaving(nursery, mock_clock):
    window = ProviderWindow()
    q = make(StaticLimit(2), gate=window)
    now = trio.current_time()
    window.retry_after(now, 2)
    r1 = await arrive(nursery, q, "r1")  # the first waiter wakes at the hold's end
    r2 = await arrive(nursery, q, "r2")
    mock_clock.jump(1)
    window.retry_after(now + 1, 3)
    q.poke()
    r1.scope.cancel()
    await wait_all_tasks_blocked()
    assert r1.cancelled and q.queued == 1
    mock_clock.jump(1)
    await wait_all_tasks_blocked()
    assert not r2.finished
    mock_clock.jump(2)
    await wait_all_tasks_blocked()
    assert r2.slot.waited_s == 4


async def test_cancelled_in_the_instant_it_is_granted_passes_the_slot_on(nursery, mock_clock):
    q = make(StaticLimit(1))
    held = await hold(q)
    w1 = await arrive(nursery, q, "w1")
    w2 = await arrive(nursery, q, "w2")
    w1.scope.cancel()  # delivered at once: w1 will raise Cancelled, but has not run yet ...
    held.release(rtt_s=1)  # ... and is handed the slot first
    await wait_all_tasks_blocked()
    assert w1.cancelled and w1.slot is None
    assert w2.slot is not None
    assert (q.in_flight, q.queued) == (1, 0)


async def test_granted_then_cancelled_keeps_the_slot_for_the_caller_to_release(nursery, mock_clock):
    q = make(StaticLimit(1))
    held = await hold(q)
    w1 = await arrive(nursery, q, "w1")
    w2 = await arrive(nursery, q, "w2")
    held.release(rtt_s=1)  # w1 is woken with its slot ...
    w1.scope.cancel()  # ... so the cancellation comes too late to take it away
    await wait_all_tasks_blocked()
    assert w1.slot is not None and not w1.cancelled
    w1.slot.release(rtt_s=None)
    await wait_all_tasks_blocked()
    assert w2.slot is not None and q.in_flight == 1


async def test_a_cancelled_waiter_leaves_cleanly(nursery, mock_clock):
    q = make(StaticLimit(1))
    held = await hold(q)
    w1 = await arrive(nursery, q, "w1")
    w2 = await arrive(nursery, q, "w2")
    w1.scope.cancel()
    await wait_all_tasks_blocked()
    assert w1.cancelled and q.queued == 1
    held.release(rtt_s=None)
    await wait_all_tasks_blocked()
    assert w2.slot is not None and q.in_flight == 1
    with trio.CancelScope() as scope:  # a caller already cancelled never gets a slot
        scope.cancel()
        await q.acquire(priority=INTERACTIVE, deadline=math.inf)
    assert scope.cancelled_caught and (q.in_flight, q.queued) == (1, 0)


async def test_a_slot_is_released_once(mock_clock):
    q = make(StaticLimit(1))
    slot = await hold(q)
    slot.release(rtt_s=1)
    with pytest.raises(RuntimeError):
        slot.release(rtt_s=1)
    assert q.in_flight == 0


async def test_releases_feed_the_limit(nursery, mock_clock):
    q = make(AIMDLimit(1))
    a = await hold(q)
    b = await arrive(nursery, q, "b")
    mock_clock.jump(1)
    a.release(rtt_s=1)  # 1 in flight of limit 1: +1, so b and one more fit
    await wait_all_tasks_blocked()
    assert b.slot is not None and q.stats()["limit"] == 2
    c = await hold(q)
    b.slot.release(rtt_s=0.5, dropped=True)  # 2 * 0.9 -> 1
    d = await arrive(nursery, q, "d")
    assert q.stats()["limit"] == 1 and not d.finished
    c.release(rtt_s=None)  # cancelled: no sample
    await wait_all_tasks_blocked()
    assert d.slot is not None and q.stats()["limit"] == 1


async def test_reconfigure_keeps_waiters_and_applies_at_once(nursery, mock_clock):
    q = make(StaticLimit(1), max_queue=10)
    slot = await hold(q)
    waiting = [await arrive(nursery, q, f"w{i}") for i in range(3)]
    settings = {"codel_target_s": 100.0, "codel_interval_s": 1.0}
    q.reconfigure(limit=StaticLimit(3), max_queue=1, shed=False, **settings)
    await wait_all_tasks_blocked()
    assert [w.slot is not None for w in waiting] == [True, True, False]  # the larger limit hands out slots now
    assert (q.in_flight, q.queued, q.stats()["limit"]) == (3, 1, 3)  # over the new max_queue, nobody dropped
    late = await arrive(nursery, q, "late")
    assert late.error.reason == "queue_full"  # until the queue drains below the new bound
    assert not q.shed
    q.reconfigure(limit=StaticLimit(1), max_queue=10, shed=True, **settings)
    slot.release(rtt_s=1)
    await wait_all_tasks_blocked()
    assert not waiting[2].finished  # a smaller limit: still two in flight
    assert q.queued == 1 and q.in_flight == 2
    q.reconfigure(max_queue=10, shed=True, **settings)  # no new limit: the current one stays
    assert q.stats()["limit"] == 1
    with pytest.raises(ValueError):
        q.reconfigure(max_queue=-1, shed=True, **settings)


async def test_stats(nursery, mock_clock):
    window = ProviderWindow()
    q = make(StaticLimit(1), service_time_s=2.0, gate=window)
    await hold(q)
    await arrive(nursery, q, "r", BATCH)
    window.retry_after(trio.current_time(), 3)
    assert q.stats() == {
        "in_flight": 1, "queued": 1, "limit": 1, "paused_for_s": 3, "service_time_s": 2.0, "service_bound_s": 2.2,
        "granted": 1, "shed": 0, "refused": 0, "expired": 0, "dropping": False,
    }


# -- a model check: random arrivals, releases, cancellations, deadlines, provider holds and answers

ARRIVE = st.tuples(st.just("arrive"), st.sampled_from([INTERACTIVE, BATCH]), st.sampled_from([0.0, 0.5, 1.0, 3.0, math.inf]))
OPS = st.one_of(
    ARRIVE,
    ARRIVE,
    st.tuples(st.just("release"), st.integers(0, 9), st.sampled_from([None, 0.2, 1.0, 3.0])),
    st.tuples(st.just("cancel"), st.integers(0, 9)),
    st.tuples(st.just("race"), st.integers(0, 9)),  # cancel the next waiter in line as a slot is released
    st.tuples(st.just("jump"), st.sampled_from([0.05, 0.25, 1.0, 2.0])),
    st.tuples(st.just("hold"), st.sampled_from([0.5, 2.0])),
    st.tuples(st.just("answer"), st.sampled_from([0, 3])),  # the provider's window: requests left
)


async def model(limit, max_queue, shed, service_time_s, ops):
    clock = trio.lowlevel.current_clock()
    window = ProviderWindow()
    q = make(StaticLimit(limit), max_queue=max_queue, shed=shed, service_time_s=service_time_s,
             codel_target_s=0.1, codel_interval_s=0.5, gate=window)
    requests: list[Request] = []
    released: set[int] = set()

    def held():
        return [r for r in requests if r.slot is not None and id(r) not in released]

    def pending():
        return [r for r in requests if not r.finished]

    def release(r, rtt):
        released.add(id(r))
        r.slot.release(rtt_s=rtt, dropped=rtt == 3.0)

    async with trio.open_nursery() as nursery:
        for op in ops:
            before = pending()
            now = trio.current_time()
            if op[0] == "arrive":
                requests.append(await arrive(nursery, q, f"r{len(requests)}", op[1], now + op[2]))
            elif op[0] == "release" and held():
                release(held()[op[1] % len(held())], op[2])
            elif op[0] == "cancel" and before:
                before[op[1] % len(before)].scope.cancel()
            elif op[0] == "race" and before and held():
                min(before, key=lambda r: (r.priority, requests.index(r))).scope.cancel()
                release(held()[op[1] % len(held())], 1.0)
            elif op[0] == "jump":
                clock.jump(op[1])
            elif op[0] == "hold":
                window.retry_after(now, op[1])
                q.poke()
            elif op[0] == "answer" and held():
                window.answered(now, limit=5, remaining=op[1], reset=now + 1.0)
                q.poke()
            await wait_all_tasks_blocked()

            now = trio.current_time()
            for r in requests:
                if r.finished:  # exactly one outcome each
                    assert (r.slot is not None) + (r.error is not None) + r.cancelled == 1
                else:
                    assert r.deadline > now  # nobody waits past their deadline
                if r.error is not None and not shed:
                    assert r.error.reason != "shed"
            assert q.in_flight == len(held()) <= limit  # no leaked slot, never over the limit
            assert q.queued == len(pending())  # no lost waiter
            if q.queued:  # work-conserving: nobody waits while a slot is free, unless the provider holds them
                assert q.in_flight == limit or q.stats()["paused_for_s"] != 0
            granted_now = [r for r in before if r.slot is not None]
            for r in granted_now:  # FIFO within a priority; priority first, but promises made earlier are kept
                assert not [o for o in before if not o.finished and
                            o.priority <= r.priority and requests.index(o) < requests.index(r)]
        for r in pending():
            r.scope.cancel()
        for r in held():
            release(r, None)
        await wait_all_tasks_blocked()
        assert (q.in_flight, q.queued) == (0, 0)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    limit=st.integers(1, 3),
    max_queue=st.integers(0, 4),
    shed=st.booleans(),
    service_time_s=st.sampled_from([None, 0.5, 2.0]),
    ops=st.lists(OPS, max_size=30),
)
def test_queue_model(limit, max_queue, shed, service_time_s, ops):
    trio.run(model, limit, max_queue, shed, service_time_s, ops, clock=MockClock())


async def test_waiting_out_a_provider_hold_is_not_congestion_for_codel(nursery, mock_clock):
    window = ProviderWindow()
    q = AdmissionQueue(StaticLimit(1), codel_target_s=0.1, codel_interval_s=0.5, gate=window)
    window.retry_after(trio.current_time(), 60)  # the provider said: a minute
    waiting = [await arrive(nursery, q, name=f"r{i}") for i in range(5)]
    mock_clock.jump(60)
    await wait_all_tasks_blocked()
    for request in waiting:  # served one by one, each quickly, after the hold
        assert request.slot is not None and request.slot.waited_s >= 60
        mock_clock.jump(0.05)
        request.slot.release(rtt_s=0.05)
        await wait_all_tasks_blocked()
    assert q.stats()["shed"] == 0 and not q.stats()["dropping"]  # a minute in the queue, but none of it congestion


async def test_a_slot_is_not_given_to_a_waiter_that_could_not_finish_in_time(nursery, mock_clock):
    q = make(StaticLimit(1), service_time_s=2.0)
    slot = await hold(q)
    short = await arrive(nursery, q, deadline=trio.current_time() + 3)  # fits the 2 s estimate when queued
    patient = await arrive(nursery, q, deadline=trio.current_time() + 60)
    mock_clock.jump(1.5)  # by the time the slot frees, 1.5 s are left: less than a call takes
    slot.release(rtt_s=2.0)
    await wait_all_tasks_blocked()
    assert short.slot is None and short.error.reason == "would_miss_deadline"
    assert patient.slot is not None  # the slot went to someone who can use it
