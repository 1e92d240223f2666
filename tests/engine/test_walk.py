"""The route walker with a scripted upstream, virtual time and a seeded random source: retries, failover,
breakers, hedging, the retry budget and admission slots, without a daemon or a socket."""

from __future__ import annotations

import random

import pytest
import trio
from prometheus_client import CollectorRegistry

from sidecard.config import from_mapping
from sidecard.engine.plan import Planner
from sidecard.engine.types import Exhausted, Trace
from sidecard.engine.walk import RouteWalker, Won
from sidecard.errors import Code, SidecardError
from sidecard.limits.spend import SpendLedger
from sidecard.observe.log import JsonLog
from sidecard.observe.metrics import Metrics
from sidecard.policies.breaker import State
from sidecard.policies.retry import Backoff
from sidecard.prompts.registry import PromptStore
from sidecard.protocol import Complete, Message
from sidecard.routes import RouteTable
from sidecard.traffic import Traffic
from sidecard.upstream import errors as upstream_errors
from sidecard.upstream.errors import UpstreamError

SONNET, HAIKU = "claude-sonnet-4-6", "claude-haiku-4-5"
SEED = 3


def failed(status: int, retry_after_s: float | None = None) -> UpstreamError:
    return UpstreamError(upstream_errors.STATUS, status=status, retry_after_s=retry_after_s)


class ScriptedLeg:
    """Answers each target from its script, in order: a value, an exception to raise, or (seconds, then either)."""

    def __init__(self, **script: list) -> None:
        self.script = {model.replace("_", "-"): list(steps) for model, steps in script.items()}
        self.calls: list[tuple[str, float]] = []
        self.discarded: list[Won] = []

    async def call(self, plan, target, body, timeout):
        self.calls.append((target.model, trio.current_time()))
        step = self.script[target.model].pop(0)
        if isinstance(step, tuple):
            delay, step = step
            await trio.sleep(delay)
        if isinstance(step, Exception):
            raise step
        return step

    def rate_limits(self, result):
        return None

    async def discard(self, won):
        self.discarded.append(won)
        won.release()


class Walk:
    """A walker and what it needs, on one config."""

    def __init__(self, routes: dict, traffic: bool = False, **sections) -> None:
        self.config = from_mapping({"routes": {"default": routes}, **sections})
        self.metrics = Metrics(CollectorRegistry())
        self.lines: list[bytes] = []
        log = JsonLog(self.lines.append)
        self.traffic = Traffic(self.config, SpendLedger([]), metrics=self.metrics, log=log) if traffic else None
        self.walker = RouteWalker(self.config, metrics=self.metrics, log=log, traffic=self.traffic, rng=random.Random(SEED))
        self.planner = Planner(self.config, PromptStore(None), RouteTable(self.config.routes), cache=False)

    def trace(self, *, internal: bool = False, **fields) -> Trace:
        trace = Trace(Complete(id=1, messages=[Message("user", "hi")], **fields), "r-1", trio.current_time(), internal)
        trace.plan = self.planner.plan(trace.request, trace.started)
        return trace

    async def walk(self, trace: Trace, leg: ScriptedLeg) -> Won:
        return await self.walker.walk(trace, trace.plan.body, trace.plan.route.targets, leg)

    def count(self, name: str, **labels: str) -> float:
        return self.metrics.registry.get_sample_value(name, labels) or 0.0


def outcomes(trace: Trace) -> list[tuple[str, str]]:
    return [(a.model, a.outcome) for a in trace.attempts]


TWO = {"targets": [{"model": SONNET}, {"model": HAIKU}]}


async def test_the_first_target_that_answers_wins(autojump_clock):
    w, leg = Walk(TWO), ScriptedLeg(claude_sonnet_4_6=["answer"])
    trace = w.trace()
    won = await w.walk(trace, leg)
    assert won.value == "answer" and won.served.target.model == SONNET and outcomes(trace) == [(SONNET, "ok")]


async def test_a_transient_failure_is_retried_after_a_jittered_backoff_from_the_retry_budget(autojump_clock):
    w, leg = Walk(TWO), ScriptedLeg(claude_sonnet_4_6=[failed(529), "answer"])
    trace = w.trace()
    balance = w.walker.budget.balance(trio.current_time())
    won = await w.walk(trace, leg)
    (_, first), (_, second) = leg.calls
    assert won.value == "answer" and outcomes(trace) == [(SONNET, "529"), (SONNET, "ok")]
    assert second - first == pytest.approx(Backoff(0.25, 8.0).delay(1, random.Random(SEED)))  # the seeded jitter
    assert w.walker.budget.balance(trio.current_time()) == balance - 1
    assert w.count("sidecard_retries_total", provider="anthropic", model=SONNET) == 1


async def test_a_short_retry_after_is_waited_out_a_longer_one_moves_to_the_next_target_at_once(autojump_clock):
    """`retry.failover_retry_after_ms` (1 s): a longer retry-after fails over rather than be sat out. Before, every
    retry-after that fitted in the deadline was waited for, on each attempt, with a healthy fallback left."""
    w = Walk(TWO)
    leg = ScriptedLeg(claude_sonnet_4_6=[failed(429, retry_after_s=1.0), "answer"])
    await w.walk(w.trace(), leg)
    assert leg.calls[1][1] - leg.calls[0][1] == pytest.approx(1.0)
    for status in (429, 529):
        leg = ScriptedLeg(claude_sonnet_4_6=[failed(status, retry_after_s=2.0)], claude_haiku_4_5=["fallback"])
        won = await w.walk(w.trace(), leg)
        assert won.served.target.model == HAIKU and leg.calls[1][1] == leg.calls[0][1]


async def test_on_the_last_target_a_retry_after_is_waited_out_up_to_max_retry_after_and_a_longer_one_ends_the_walk(autojump_clock):
    w = Walk({"targets": [{"model": SONNET}]}, retry={"max_retry_after_ms": 8000})
    leg = ScriptedLeg(claude_sonnet_4_6=[failed(429, retry_after_s=8.0), "answer"])
    await w.walk(w.trace(), leg)
    assert leg.calls[1][1] - leg.calls[0][1] == pytest.approx(8.0)
    trace, started = w.trace(), trio.current_time()
    with pytest.raises(Exhausted):
        await w.walk(trace, ScriptedLeg(claude_sonnet_4_6=[failed(429, retry_after_s=9.0)]))
    limited = w.walker.failure(trace)
    assert trio.current_time() == started and (limited.code, limited.retry_after_ms) == (Code.RATE_LIMITED, 9000)
    # One that fits the bound but not the deadline: no wait either.
    trace = w.trace(deadline_ms=5000)
    with pytest.raises(Exhausted):
        await w.walk(trace, ScriptedLeg(claude_sonnet_4_6=[failed(429, retry_after_s=6.0)]))
    assert trio.current_time() == started


async def test_a_fallback_whose_breaker_is_open_is_no_reason_to_skip_the_wait(autojump_clock):
    w = Walk(TWO)
    haiku = w.config.routes["default"].targets[1]
    w.walker.health(haiku).breaker.force_open(trio.current_time())
    leg = ScriptedLeg(claude_sonnet_4_6=[failed(429, retry_after_s=2.0), "answer"])
    won = await w.walk(w.trace(), leg)
    assert won.value == "answer" and leg.calls[1][1] - leg.calls[0][1] == pytest.approx(2.0)


async def test_a_target_held_by_the_providers_retry_after_is_skipped_while_another_can_answer(autojump_clock):
    """The retry-after goes to traffic control's window: the requests after it do not call the target meanwhile,
    nor wait in its queue; on the last target, a hold longer than `max_retry_after_ms` ends the walk at once."""
    w = Walk(TWO, traffic=True)
    leg = ScriptedLeg(claude_sonnet_4_6=[failed(429, retry_after_s=30.0)], claude_haiku_4_5=["first", "second"])
    assert (await w.walk(w.trace(), leg)).value == "first"
    trace = w.trace()
    assert (await w.walk(trace, leg)).value == "second" and [m for m, _ in leg.calls] == [SONNET, HAIKU, HAIKU]
    assert outcomes(trace) == [(SONNET, "overloaded:paused"), (HAIKU, "ok")]
    leg = ScriptedLeg(claude_haiku_4_5=[failed(429, retry_after_s=20.0)])
    with pytest.raises(Exhausted):
        await w.walk(w.trace(), leg)
    trace, started = w.trace(), trio.current_time()
    with pytest.raises(Exhausted):
        await w.walk(trace, leg)
    limited = w.walker.failure(trace)
    assert trio.current_time() == started and len(leg.calls) == 1
    assert limited.code == Code.RATE_LIMITED and limited.retry_after_ms == 20_000  # the sooner of the two holds


async def test_a_refusal_of_the_request_itself_ends_the_walk_at_once(autojump_clock):
    w, leg = Walk(TWO), ScriptedLeg(claude_sonnet_4_6=[failed(400)], claude_haiku_4_5=["never"])
    with pytest.raises(SidecardError) as refused:
        await w.walk(w.trace(), leg)
    assert refused.value.code == Code.INVALID_REQUEST and [model for model, _ in leg.calls] == [SONNET]


async def test_a_misconfigured_target_fails_over_opens_its_breaker_and_is_skipped_with_its_reason(autojump_clock):
    w = Walk(TWO)
    won = await w.walk(w.trace(), ScriptedLeg(claude_sonnet_4_6=[failed(401)], claude_haiku_4_5=["fallback"]))
    assert won.served.target.model == HAIKU
    breaker, retry_in = w.walker.breaker(w.config.routes["default"].targets[0])
    assert breaker.state is State.OPEN and retry_in > 0
    trace = w.trace()
    with pytest.raises(Exhausted):
        await w.walk(trace, ScriptedLeg(claude_haiku_4_5=[failed(401)]))
    assert outcomes(trace) == [(SONNET, "breaker_open"), (HAIKU, "401")]
    refusal = w.walker.failure(trace)  # every target refused sidecard's credentials: no retry can cure that
    assert refusal.code == Code.UPSTREAM_AUTH and not refusal.retryable


async def test_when_every_target_fails_the_final_error_is_the_most_decisive_cause(autojump_clock):
    w = Walk({"targets": [{"model": SONNET, "max_attempts": 1}, {"model": HAIKU, "max_attempts": 1}]})
    trace = w.trace()
    with pytest.raises(Exhausted):
        await w.walk(trace, ScriptedLeg(claude_sonnet_4_6=[failed(429, 3.0)], claude_haiku_4_5=[failed(429, 1.0)]))
    limited = w.walker.failure(trace)
    assert limited.code == Code.RATE_LIMITED and limited.retry_after_ms == 1000
    trace = w.trace()
    with pytest.raises(Exhausted):
        await w.walk(trace, ScriptedLeg(claude_sonnet_4_6=[failed(529)], claude_haiku_4_5=[failed(500)]))
    outage = w.walker.failure(trace)
    assert outage.code == Code.UPSTREAM_UNAVAILABLE and outage.message == f"every target failed (last: anthropic:{HAIKU} 500)"


async def test_consecutive_failures_open_the_breaker_and_a_probe_after_the_cooldown_closes_it(autojump_clock):
    w = Walk({"targets": [{"model": SONNET, "max_attempts": 1}]}, breaker={"consecutive_failures": 2, "cooldown_s": 10})
    for _ in range(2):
        with pytest.raises(Exhausted):
            await w.walk(w.trace(), ScriptedLeg(claude_sonnet_4_6=[failed(500)]))
    trace = w.trace()
    with pytest.raises(Exhausted):
        await w.walk(trace, ScriptedLeg(claude_sonnet_4_6=[]))  # skipped: no call
    assert outcomes(trace) == [(SONNET, "breaker_open")]
    assert w.walker.failure(trace).retry_after_ms == 10_000
    await trio.sleep(10)
    won = await w.walk(w.trace(), ScriptedLeg(claude_sonnet_4_6=["probe"]))
    assert won.value == "probe" and w.walker.breaker(won.served.target)[0].state is State.CLOSED


async def test_a_slow_target_is_hedged_on_the_next_and_the_first_answer_wins(autojump_clock):
    w = Walk({"targets": [{"model": SONNET, "hedge_after_ms": 500}, {"model": HAIKU}]})
    leg = ScriptedLeg(claude_sonnet_4_6=[(5.0, "slow")], claude_haiku_4_5=[(0.1, "fast")])
    trace, started = w.trace(), trio.current_time()
    won = await w.walk(trace, leg)
    assert won.value == "fast" and won.served.target.model == HAIKU
    assert [(model, at - started) for model, at in leg.calls] == [(SONNET, 0.0), (HAIKU, 0.5)]
    assert trio.current_time() - started == pytest.approx(0.6)
    assert sorted(outcomes(trace)) == [(HAIKU, "ok"), (SONNET, "cancelled")]  # the primary's call is cut short
    assert w.count("sidecard_hedges_total", provider="anthropic", model=HAIKU, result="won") == 1


async def test_a_primary_that_answers_as_its_request_is_cancelled_is_given_back_not_leaked(autojump_clock):
    """The primary of a hedged walk answers in the same instant the request is cancelled (its client left, the
    drain ended): the result that came is discarded (its slot given back, a stream closed) as the walk ends
    cancelled. Before, it was dropped with its slot, which its target never had back."""
    answered = trio.Event()

    class Gated(ScriptedLeg):
        async def call(self, plan, target, body, timeout):
            await answered.wait()
            return "answer"

    w, leg = Walk({"targets": [{"model": SONNET, "hedge_after_ms": 500}, {"model": HAIKU}]}, traffic=True), Gated()
    trace, request = w.trace(), trio.CancelScope()

    async def walk() -> None:
        with request:
            await w.walk(trace, leg)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(walk)
        await trio.sleep(0.1)
        answered.set()  # (the call has its answer: no cancellation reaches it now)
        request.cancel()
    assert request.cancelled_caught and outcomes(trace) == [(SONNET, "ok")]
    assert [won.value for won in leg.discarded] == ["answer"]
    assert w.count("sidecard_upstream_attempts_total", provider="anthropic", model=SONNET, outcome="ok") == 1
    assert w.traffic.queue(trace.plan.route.targets[0]).stats()["in_flight"] == 0  # (1 for good, before)


async def test_a_hedge_draws_on_the_retry_budget_and_none_starts_without_it(autojump_clock):
    w = Walk({"targets": [{"model": SONNET, "hedge_after_ms": 500}, {"model": HAIKU}]},
             retry={"budget_ratio": 0.0, "budget_min_per_s": 0.0})
    leg = ScriptedLeg(claude_sonnet_4_6=[(2.0, "slow")], claude_haiku_4_5=["never"])
    won = await w.walk(w.trace(), leg)
    assert won.value == "slow" and [model for model, _ in leg.calls] == [SONNET]
    assert w.count("sidecard_retry_budget_refusals_total", provider="anthropic", model=HAIKU) == 1


async def test_sidecards_own_calls_try_each_target_once_never_hedge_and_keep_their_breakers_apart(autojump_clock):
    w = Walk({"targets": [{"model": SONNET, "hedge_after_ms": 100}, {"model": HAIKU}]}, breaker={"consecutive_failures": 1})
    leg = ScriptedLeg(claude_sonnet_4_6=[(1.0, failed(503))], claude_haiku_4_5=["judged"])
    trace = w.trace(internal=True)
    won = await w.walk(trace, leg)
    assert won.value == "judged" and outcomes(trace) == [(SONNET, "503"), (HAIKU, "ok")]  # no retry, no hedge
    assert w.walker.breaker(w.config.routes["default"].targets[0])[0].state is State.CLOSED  # the users' breaker
    assert w.walker.health(w.config.routes["default"].targets[0], internal=True).breaker.state is State.OPEN


async def test_an_attempt_that_cannot_start_before_the_deadline_makes_no_call(autojump_clock):
    w, leg = Walk(TWO), ScriptedLeg()
    trace = w.trace(deadline_ms=1)
    await trio.sleep(0.01)
    with pytest.raises(Exhausted):
        await w.walk(trace, leg)
    assert leg.calls == [] and w.walker.failure(trace).code == Code.DEADLINE_EXCEEDED


async def test_a_won_attempt_hands_its_slot_back_with_its_result_and_a_failed_one_gives_its_own_back(autojump_clock):
    w = Walk(TWO, traffic=True, queue={"max_concurrency": 1})
    sonnet = w.config.routes["default"].targets[0]
    won = await w.walk(w.trace(), ScriptedLeg(claude_sonnet_4_6=[failed(529), (0.2, "answer")]))
    queue = w.traffic.queue(sonnet)
    assert queue.stats()["in_flight"] == 1  # held by the result's consumer
    won.release()
    won.release()  # once only
    assert queue.stats()["in_flight"] == 0


async def test_a_loser_that_also_answered_in_the_same_instant_is_discarded(autojump_clock):
    w = Walk({"targets": [{"model": SONNET, "hedge_after_ms": 500}, {"model": HAIKU}]})
    both = trio.Event()
    answered: list[str] = []

    class SameInstant(ScriptedLeg):
        async def call(self, plan, target, body, timeout):
            result = await super().call(plan, target, body, timeout)
            answered.append(result)
            if len(answered) == 2:
                both.set()
            else:
                await both.wait()  # the first to answer waits for the second, so both win
            return result

    leg = SameInstant(claude_sonnet_4_6=[(0.6, "primary")], claude_haiku_4_5=["hedge"])
    won = await w.walk(w.trace(), leg)
    assert {won.value, *(loser.value for loser in leg.discarded)} == {"primary", "hedge"} and len(leg.discarded) == 1

