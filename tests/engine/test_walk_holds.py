"""The walk when the provider holds targets (a 429's retry-after, a spent window): it goes back to the target the
provider lets back first, within `retry.max_retry_after_ms` and the deadline, instead of ending `rate_limited`
while waiting would answer. Before, the walk never went back to an earlier target, and "another target left" was
judged by breakers alone, so a fallback the provider held ended the request at once."""

from __future__ import annotations

import pytest
import trio

from sidecard.engine.types import Exhausted
from sidecard.errors import Code
from sidecard.policies.retry import first_to_free
from tests.engine.test_walk import HAIKU, SONNET, TWO, ScriptedLeg, Walk, failed, outcomes


def hold(w: Walk, model: str, seconds: float) -> None:
    """What an earlier request's 429 told traffic control: no call to MODEL for SECONDS."""
    target = next(t for t in w.config.routes["default"].targets if t.model == model)
    w.traffic.observe(target, None, retry_after_s=seconds, status=429)


async def test_a_short_retry_after_on_the_primary_is_waited_out_when_the_fallback_is_held_longer(autojump_clock):
    w = Walk(TWO, traffic=True)
    hold(w, HAIKU, 30)
    leg = ScriptedLeg(claude_sonnet_4_6=[failed(429, retry_after_s=5.0), "answer"])
    trace, started = w.trace(), trio.current_time()
    won = await w.walk(trace, leg)
    assert won.value == "answer" and trio.current_time() - started == pytest.approx(5.0)
    assert outcomes(trace) == [(SONNET, "429"), (HAIKU, "overloaded:paused"), (SONNET, "ok")]
    assert w.count("sidecard_retries_total", provider="anthropic", model=SONNET) == 1  # a retry, from the budget


async def test_with_every_target_held_the_walk_goes_back_to_the_one_that_frees_first(autojump_clock):
    w = Walk(TWO, traffic=True)
    hold(w, SONNET, 5)
    hold(w, HAIKU, 30)
    leg = ScriptedLeg(claude_sonnet_4_6=["answer"])
    trace, started = w.trace(), trio.current_time()
    won = await w.walk(trace, leg)
    assert won.value == "answer" and leg.calls == [(SONNET, started + 5)]
    assert outcomes(trace) == [(SONNET, "overloaded:paused"), (HAIKU, "overloaded:paused"), (SONNET, "ok")]
    # Never called before: no retry, nothing from the budget.
    assert w.count("sidecard_retries_total", provider="anthropic", model=SONNET) == 0


async def test_the_last_target_is_not_waited_for_while_an_earlier_one_frees_sooner(autojump_clock):
    w = Walk(TWO, traffic=True)
    hold(w, SONNET, 3)
    hold(w, HAIKU, 7)  # within what the last target waits out (8 s), but the primary is back at 3 s
    leg = ScriptedLeg(claude_sonnet_4_6=["primary"], claude_haiku_4_5=["fallback"])
    started = trio.current_time()
    won = await w.walk(w.trace(), leg)
    assert won.value == "primary" and trio.current_time() - started == pytest.approx(3.0)


async def test_a_fallback_that_is_free_still_answers_at_once(autojump_clock):
    w = Walk(TWO, traffic=True)
    hold(w, SONNET, 5)
    leg = ScriptedLeg(claude_haiku_4_5=["fallback"])
    started = trio.current_time()
    assert (await w.walk(w.trace(), leg)).value == "fallback" and trio.current_time() == started


async def test_when_no_target_can_be_reached_in_time_the_walk_ends_at_once_with_the_soonest_wait(autojump_clock):
    w = Walk(TWO, traffic=True)
    hold(w, SONNET, 20)
    hold(w, HAIKU, 9)  # past max_retry_after_ms (8 s)
    trace, started = w.trace(), trio.current_time()
    with pytest.raises(Exhausted):
        await w.walk(trace, ScriptedLeg())
    limited = w.walker.failure(trace)
    assert trio.current_time() == started
    assert (limited.code, limited.retryable, limited.retry_after_ms) == (Code.RATE_LIMITED, True, 9000)
    # Within the bound, but not within the deadline: no wait either.
    w = Walk(TWO, traffic=True)
    hold(w, SONNET, 5)
    hold(w, HAIKU, 30)
    trace, started = w.trace(deadline_ms=4000), trio.current_time()
    with pytest.raises(Exhausted):
        await w.walk(trace, ScriptedLeg())
    assert trio.current_time() == started and w.walker.failure(trace).code == Code.RATE_LIMITED


async def test_going_back_ends_with_the_targets_attempts_and_draws_on_the_retry_budget(autojump_clock):
    """A primary that keeps answering 429 with a short retry-after, a fallback held long: each way back is one of
    the primary's attempts (3), then the walk ends `rate_limited`."""
    w = Walk(TWO, traffic=True)
    hold(w, HAIKU, 60)
    leg = ScriptedLeg(claude_sonnet_4_6=[failed(429, retry_after_s=2.0)] * 3)
    trace, started = w.trace(), trio.current_time()
    with pytest.raises(Exhausted):
        await w.walk(trace, leg)
    assert [at - started for _, at in leg.calls] == [0, 2, 4]
    assert trio.current_time() - started == pytest.approx(4) and w.walker.failure(trace).code == Code.RATE_LIMITED
    # With no retry budget left, no way back to a target already called.
    w = Walk(TWO, traffic=True, retry={"budget_ratio": 0.0, "budget_min_per_s": 0.0})
    hold(w, HAIKU, 60)
    leg = ScriptedLeg(claude_sonnet_4_6=[failed(429, retry_after_s=2.0)])
    with pytest.raises(Exhausted):
        await w.walk(w.trace(), leg)
    assert len(leg.calls) == 1 and w.count("sidecard_retry_budget_refusals_total", provider="anthropic", model=SONNET) == 1


async def test_without_traffic_control_the_providers_retry_after_alone_brings_the_walk_back(autojump_clock):
    w = Walk(TWO)
    leg = ScriptedLeg(claude_sonnet_4_6=[failed(429, retry_after_s=5.0), "primary"],
                      claude_haiku_4_5=[failed(429, retry_after_s=30.0)])
    started = trio.current_time()
    won = await w.walk(w.trace(), leg)
    assert won.value == "primary" and [(m, at - started) for m, at in leg.calls] == [(SONNET, 0), (HAIKU, 0), (SONNET, 5)]


async def test_sidecards_own_calls_do_not_go_back_and_wait_on_their_last_target_as_before(autojump_clock):
    w = Walk(TWO, traffic=True)
    hold(w, SONNET, 5)
    hold(w, HAIKU, 30)
    with pytest.raises(Exhausted):
        await w.walk(w.trace(internal=True), ScriptedLeg())
    w = Walk(TWO, traffic=True)
    hold(w, HAIKU, 5)
    leg = ScriptedLeg(claude_sonnet_4_6=[failed(429, retry_after_s=3.0)], claude_haiku_4_5=["judged"])
    started = trio.current_time()
    assert (await w.walk(w.trace(internal=True), leg)).value == "judged" and trio.current_time() - started == pytest.approx(5)


def test_first_to_free_is_the_soonest_within_the_bound_and_the_time_left():
    assert first_to_free({0: 15.0, 1: 12.0}, now=10.0, remaining_s=60, max_wait_s=8) == (1, 2.0)
    assert first_to_free({1: 12.0, 0: 12.0}, now=10.0, remaining_s=60, max_wait_s=8) == (0, 2.0)  # a tie: route order
    assert first_to_free({0: 5.0}, now=10.0, remaining_s=60, max_wait_s=8) == (0, 0.0)  # already over
    assert first_to_free({0: 19.0}, now=10.0, remaining_s=60, max_wait_s=8) is None
    assert first_to_free({0: 15.0}, now=10.0, remaining_s=5.01, max_wait_s=8) is None  # no time left for the call
    assert first_to_free({}, now=10.0, remaining_s=60, max_wait_s=8) is None


async def test_going_back_the_attempt_has_the_time_the_targets_it_can_still_reach_leave_it(autojump_clock):
    """Review: going back to the primary, the attempt still shared the time left with the fallback, which had failed
    for good (a 500, its one attempt spent, its breaker closed): a primary answering in 5 s was cut at 4 s, and the
    request ended with time to spare."""
    w = Walk({"targets": [{"model": SONNET}, {"model": HAIKU, "max_attempts": 1}]}, traffic=True)
    leg = ScriptedLeg(claude_sonnet_4_6=[failed(429, retry_after_s=2.0), (5.0, "answer")], claude_haiku_4_5=[failed(500)])
    trace, started = w.trace(deadline_ms=10_000), trio.current_time()
    won = await w.walk(trace, leg)
    assert won.value == "answer" and trio.current_time() - started == pytest.approx(7.0)
