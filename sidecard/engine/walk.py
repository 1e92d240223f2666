"""The route walk: a request's targets in order, under its deadline, until one answers.

Each target gets attempts under `min(per-attempt timeout, time left)`, retried with backoff while the retry budget
allows; a provider's retry-after (or rate-limit hold) is waited out only briefly while a later target could answer,
and not past `retry.max_retry_after_ms` on the last; once every target has had its turn, the walk goes back to the
one the provider lets back first, if that is within the same bound and the deadline; a target with an open breaker
is skipped at once; a slow attempt is hedged on the next target (`policies/hedge.py`). The walker owns the breakers
(users' and, apart, sidecard's own calls'), the retry budget, and each attempt's bookkeeping: its admission slot,
its breaker verdict, its metrics and its line in the log.

What an attempt calls is a `Leg`: a whole answer (`CreateLeg`) or a stream up to its first token (`stream.py`). An
attempt that succeeds hands its result back as `Won`, with the target's admission slot, which whoever consumes the
result gives back (`Won.release`); a failed attempt gives its slot back itself.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final, Generic, Protocol, TypeVar

import msgspec
import trio

from ..config import Config, Target
from ..errors import Code, SidecardError
from ..limits.queue import Overloaded
from ..observe.log import JsonLog
from ..observe.metrics import Counter, Metrics
from ..policies.breaker import Breaker, BreakerSettings, State
from ..policies.budget import RetryBudget
from ..policies.hedge import hedge_for
from ..policies.retry import Backoff, Disposition, Retry, classify, first_to_free
from ..protocol import Attempt
from ..scopes import timeout_scope
from ..traffic import Traffic, TargetSlot
from ..upstream import errors as upstream_errors
from ..upstream.client import Upstream, UpstreamReply
from ..upstream.errors import UpstreamError
from .types import Exhausted, Plan, TargetKey, Trace, last_call

R = TypeVar("R")
# Refusals about the target itself: every request through it gets the same answer until an operator acts.
_TARGET_REFUSALS: Final = frozenset({Code.UPSTREAM_AUTH, Code.UPSTREAM_FORBIDDEN, Code.MODEL_NOT_FOUND})


@dataclass(slots=True)
class TargetHealth:
    """Per-target state shared by all requests: the breaker, and the labels its metrics use."""

    target: Target
    breaker: Breaker
    labels: tuple[str, str]
    shared: bool = True  # False: the breaker of sidecard's own calls (the judge), kept apart from users'
    # Why the target refused its last call, when that was about the target itself (credentials, permissions, model
    # id): what a request skipping it on an open breaker is told, instead of an outage.
    refusal: SidecardError | None = None

    @property
    def name(self) -> str:
        return f"{self.target.provider}:{self.target.model}"


class Won(msgspec.Struct, Generic[R], gc=False):  # (nothing it holds refers back to it)
    """A successful attempt: its result, the target that gave it, and that target's admission slot (if traffic
    control gave it one), held until the result's consumer gives it back."""

    value: R
    served: TargetHealth
    slot: TargetSlot | None = None
    rtt_s: float = 0.0  # the attempt's own duration, for an adaptive concurrency limit
    attempt: Attempt | None = None  # its entry in the trace's attempts (a stream that breaks later says so there)
    attempts: Counter | None = None  # sidecard_upstream_attempts_total, counted when the result is given back

    def release(self, *, measured: bool = True) -> None:
        """Give the slot back; `measured` False for a stream, whose duration says nothing of the target's speed.
        The attempt is counted now, by its outcome then: a stream that broke after its first token as its log line
        says (`stream_broken:REASON`), not `ok`."""
        if self.slot is not None:
            self.slot.release(rtt_s=self.rtt_s if measured else None)
            self.slot = None
        if self.attempts is not None and self.attempt is not None:
            self.attempts(*self.served.labels, self.attempt.outcome).inc()
            self.attempts = None


class Leg(Protocol[R]):
    """One kind of upstream call an attempt makes."""

    async def call(self, plan: Plan, target: Target, body: dict[str, Any], timeout: float) -> R: ...

    def rate_limits(self, result: R) -> dict[str, str] | None:
        """The provider's rate-limit headers that came with RESULT (`THROTTLE_HEADERS`), for traffic control."""
        ...

    async def discard(self, won: Won[R]) -> None:
        """A result that won in the same instant as another (a hedge race): closed, paid for, its slot given back."""
        ...


class CreateLeg:
    """A whole answer in one call."""

    def __init__(self, upstream: Upstream) -> None:
        self.upstream = upstream

    async def call(self, plan: Plan, target: Target, body: dict[str, Any], timeout: float) -> UpstreamReply:
        # Called under `_attempt`'s scope, which ends it within `timeout`.
        return await self.upstream.create(target, body, timeout_s=timeout, headers=plan.headers, bounded=True)

    def rate_limits(self, result: UpstreamReply) -> dict[str, str] | None:
        return result.rate_limits

    async def discard(self, won: Won[UpstreamReply]) -> None:
        won.release()


class RouteWalker:
    def __init__(
        self,
        config: Config,
        *,
        metrics: Metrics,
        log: JsonLog,
        traffic: Traffic | None = None,
        rng: random.Random | None = None,
        clock: Callable[[], float] = trio.current_time,
    ) -> None:
        self.metrics = metrics
        self.log = log
        self.traffic = traffic
        self._rng = self.rng = rng or random.Random()  # `rng` also samples the guardrails' judge checks
        self._clock = clock
        self._health: dict[TargetKey, TargetHealth] = {}
        self._internal_health: dict[TargetKey, TargetHealth] = {}
        self.configure(config)

    def configure(self, config: Config) -> None:
        """Apply a (re)loaded config: retry and breaker settings (breaker state of targets that remain is kept)."""
        r = config.retry
        self.backoff = Backoff(r.base_delay_ms / 1000, r.max_delay_ms / 1000)
        self.failover_retry_after_s = r.failover_retry_after_ms / 1000
        self.max_retry_after_s = r.max_retry_after_ms / 1000
        self.budget = RetryBudget(ratio=r.budget_ratio, min_per_s=r.budget_min_per_s, window_s=r.budget_window_s)
        b = config.breaker
        self._breaker_settings = BreakerSettings(
            failure_rate=b.failure_rate,
            min_volume=b.min_volume,
            consecutive_failures=b.consecutive_failures,
            window_s=b.window_s,
            cooldown_s=b.cooldown_s,
            probes=b.half_open_probes,
        )

    # ------------------------------------------------------------------ breakers

    def health(self, target: Target, *, internal: bool = False) -> TargetHealth:
        key = (target.provider, target.model, target.base_url)
        table = self._internal_health if internal else self._health
        health = table.get(key)
        if health is None or health.breaker.settings != self._breaker_settings:
            breaker = Breaker(self._breaker_settings)
            if health is not None:  # settings changed on reload: keep an open breaker open
                breaker.state, breaker.opened_at = health.breaker.state, health.breaker.opened_at
            health = table[key] = TargetHealth(target, breaker, (target.provider, target.model), not internal)
            if not internal:
                self.metrics.breaker_state(*health.labels).set(breaker.state.value)
        return health

    def track(self, targets: list[Target]) -> None:
        """Give TARGETS breakers (and their gauges) before any request reaches them."""
        for target in targets:
            self.health(target)

    def forget(self, model: str) -> None:
        """Drop the breakers of every target of MODEL (a model no route has that no longer holds a slot)."""
        for table in (self._health, self._internal_health):
            for key in [key for key in table if key[1] == model]:
                del table[key]

    def breaker(self, target: Target) -> tuple[Breaker, float]:
        """TARGET's breaker, and seconds until an open one lets a probe through."""
        breaker = self.health(target).breaker
        return breaker, breaker.retry_after(self._clock())

    def breakers(self) -> list[tuple[TargetHealth, float]]:
        """Every known target with its breaker, and seconds until an open one lets a probe through."""
        now = self._clock()
        return [(h, h.breaker.retry_after(now)) for h in self._health.values()]

    # ------------------------------------------------------------------ the walk

    async def walk(self, trace: Trace, body: dict[str, Any], targets: list[Target], leg: Leg[R]) -> Won[R]:
        """Targets in order, each with retries under the budget and deadline; then, while the provider holds some
        of them, the one it lets back first (`_back`). Raises `Exhausted` (or, for a failure no other target can
        cure, its `SidecardError`)."""
        plan, internal = trace.plan, trace.internal
        assert plan is not None
        index, attempts = 0, 0
        # The attempts each target tried has made, and when the provider's hold on each ends: made at the first
        # failure, so a request its first target answers never builds them.
        made: dict[int, int] | None = None
        holds: dict[int, float] | None = None
        while True:
            target = targets[index]
            health = self.health(target, internal=internal)
            open_after = self._open_after(targets, index, internal, made, holds)
            patience = self._patience(open_after)
            if holds:  # no longer than until a target held before frees: the walk goes back to that one instead
                patience = max(0.0, min(patience, min(holds.values()) - self._clock()))
            retry = Retry(1 if internal else target.max_attempts, attempts, self.backoff, max_retry_after_s=patience)
            hedge = None if internal else hedge_for(targets, index)
            held: float | None = None  # the provider's hold on this target, as its last failure told it
            while True:
                if not self._admit(health, trace):
                    break
                if retry.attempts:
                    self.metrics.retries(*health.labels).inc()
                retry = retry.started()
                try:
                    if hedge is None:
                        return await self._attempt(health, body, trace, leg, share=1 + open_after, patience=patience)
                    partner = self.health(targets[hedge.partner])
                    patience_of = (patience, self._patience(self._open_after(targets, hedge.partner, internal)))
                    return await self._hedged(health, partner, hedge.after_s, body, trace, leg, patience_of)
                except Overloaded as refused:
                    trace.failures.refused = refused  # this target is full: the next one may have room
                    retry = retry.refused()
                    held = refused.retry_after_s if refused.reason == "paused" else None
                    break
                except UpstreamError as err:
                    held = err.retry_after_s if err.status == 429 else None
                    disposition = classify(err.status, err.should_retry)
                    if disposition is Disposition.FAIL:
                        raise upstream_errors.to_sidecard_error(err) from None
                    if disposition is Disposition.FAILOVER:
                        break
                    if err.kind == upstream_errors.TIMEOUT and plan.request.stream and not target.ttft_retry:
                        break  # slow to its first token: another try would be as slow, the next target may not
                    now = self._clock()
                    delay = retry.delay_before_retry(retry_after_s=err.retry_after_s, remaining_s=plan.deadline - now, rng=self._rng)
                    if delay is None:
                        break
                    if not self.budget.try_withdraw(now):
                        self.metrics.budget_refusals(*health.labels).inc()
                        break
                    await trio.sleep(delay)
            # The target failed, for now: the next one, or once each has had its turn, the one the provider frees first.
            now = self._clock()
            if made is None or holds is None:
                made, holds = {}, {}
            made[index] = retry.attempts
            # (sidecard's own calls try each target once: they never go back)
            if held is not None and math.isfinite(held) and not retry.exhausted and not internal:
                holds[index] = now + held
            else:
                holds.pop(index, None)
            if index + 1 < len(targets) and index + 1 not in made:
                index, attempts = index + 1, 0
            else:
                back = await self._back(targets, holds, made, plan.deadline)
                if back is None:
                    raise Exhausted
                index, attempts = back, made[back]

    async def _back(self, targets: list[Target], holds: dict[int, float], made: dict[int, int], deadline: float) -> int | None:
        """Every target has had its turn: of those the provider holds (`holds`: each with attempts left), the one it
        lets back first whose breaker will let the call through, once its hold is over, if that is within
        `retry.max_retry_after_ms` and leaves time for the call; going back to a target already called is a retry,
        from the retry budget. None: no target can be reached in time, and the walk is over.

        Each way back takes the target's hold off `holds`: the walk goes there again only on a new hold, which takes
        a call (an attempt) or is longer than the walk waits (a `paused` refusal), so the walk ends."""
        now = self._clock()
        free_at = {i: at for i, at in holds.items() if self.health(targets[i]).breaker.would_allow(max(now, at))}
        choice = first_to_free(free_at, now=now, remaining_s=deadline - now, max_wait_s=self.max_retry_after_s)
        if choice is None:
            return None
        index, wait = choice
        del holds[index]
        if made[index] and not self.budget.try_withdraw(now):
            self.metrics.budget_refusals(*self.health(targets[index]).labels).inc()
            return None
        await trio.sleep(wait)
        return index

    def _open_after(
        self, targets: list[Target], index: int, internal: bool,
        made: dict[int, int] | None = None, holds: dict[int, float] | None = None,
    ) -> int:
        """How many targets after `targets[index]` the walk can still reach and whose breakers would let the request
        through: those that share the time left with it, and whose presence makes a provider's wait on it not worth
        sitting out. Once the walk goes back (`made`: the targets it has tried), one tried is reachable only while
        the provider holds it (`holds`)."""
        table = self._internal_health if internal else self._health
        now = self._clock()
        count = 0
        for later_index in range(index + 1, len(targets)):
            if made is not None and later_index in made and (holds is None or later_index not in holds):
                continue  # tried, and nothing will send the walk there again
            health = table.get(_key(targets[later_index]))  # (none yet: a closed breaker, soon made)
            if health is None or health.breaker.would_allow(now):
                count += 1
        return count

    def _patience(self, open_after: int) -> float:
        """How long the provider's word (a retry-after, its rate-limit window's hold) may keep a request waiting on a
        target: briefly while a later target's breaker would let the request through (`open_after`; Anthropic's rate
        limits are per model: the next is likely to have room), else as long as the last target may. (The walk
        shortens it while a target it has tried frees sooner.)"""
        return self.failover_retry_after_s if open_after else self.max_retry_after_s

    def _admit(self, health: TargetHealth, trace: Trace) -> bool:
        """Whether the target's breaker lets an attempt through; if not, the skip is recorded."""
        now = self._clock()
        allowed, transition = health.breaker.allow(now)
        if transition is not None:
            self._breaker_moved(health, transition)
        if not allowed:
            wait = health.breaker.retry_after(now)
            trace.failures.causes[_key(health.target)] = health.refusal or SidecardError(
                Code.UPSTREAM_UNAVAILABLE, f"{health.name}: circuit breaker open", retry_after_ms=max(1, math.ceil(wait * 1000))
            )
            trace.attempts.append(Attempt(health.target.provider, health.target.model, "breaker_open", 0.0))
            self.metrics.attempts(*health.labels, "breaker_open").inc()
        return allowed

    async def _attempt(
        self, health: TargetHealth, body: dict[str, Any], trace: Trace, leg: Leg[R], hedge: bool = False, share: int = 1,
        patience: float = math.inf,
    ) -> Won[R]:
        """One call to one target, whose breaker has already admitted it, once its admission queue lets it go: a
        provider's hold longer than `patience` turns it away instead (`Overloaded`, reason `paused`).

        A streamed attempt is limited by the target's time-to-first-token timeout instead of its total one:
        it succeeds once the first token arrives, and what follows is the stream's own business. An unhedged
        attempt with targets after it gets at most its `share` of the time left (1/share, `share` counting itself and
        the targets after it whose breakers would let the request through), so that a target that hangs leaves its
        fallbacks time to answer, and one with no fallback to go to has all of it.
        """
        target, plan = health.target, trace.plan
        assert plan is not None
        if self._clock() >= plan.deadline:
            # The deadline passed before this attempt could start (a pipelined request with a tiny deadline): no
            # call and no verdict. The request's deadline scope ends it here; were it not ours to see, fail over.
            health.breaker.release()
            await trio.lowlevel.checkpoint()
            raise UpstreamError(upstream_errors.DEADLINE, should_retry=False)
        slot = None
        marks = trace.marks
        queued = self._clock() if marks is not None else 0.0  # (tracing: the attempt's span starts in the queue)
        if self.traffic is not None:
            try:
                slot = await self.traffic.acquire(target, priority=trace.request.priority, deadline=plan.deadline, max_hold_s=patience)
            except Overloaded as refused:
                health.breaker.release()
                trace.failures.causes[_key(target)] = _refusal_cause(health, refused)
                trace.attempts.append(Attempt(target.provider, target.model, f"overloaded:{refused.reason}", 0.0))
                self.metrics.attempts(*health.labels, "overloaded").inc()
                raise
            except BaseException:  # cancelled in the queue: a half-open breaker's probe must not stay out forever
                health.breaker.release()
                raise
        started = self._clock()
        limit = (target.ttft_timeout_s or target.timeout_s) if plan.request.stream else target.timeout_s
        timeout = max(0.0, min(limit, (plan.deadline - started) / share))
        # An attempt cut short by the request's deadline (or its share of it) says nothing about the target: no
        # breaker verdict, and the walk fails over.
        timeout_kind = upstream_errors.DEADLINE if timeout < limit else upstream_errors.TIMEOUT
        outcome = "cancelled"
        verdict: bool | None = None  # for the breaker: True success, False failure, None no verdict
        busy = False
        won: Won[R] | None = None
        try:
            with timeout_scope(timeout, now=started, bound=plan.deadline):  # (none when it ends with the request's deadline)
                try:
                    result = await leg.call(plan, target, body, timeout)
                except UpstreamError:
                    raise
                except Exception as exc:  # the target could not be built or called: its failure, not the request's
                    raise self.unusable(trace, target, exc) from None
                outcome, verdict = "ok", True
                health.refusal = None
                if self.traffic is not None:
                    self.traffic.observe(target, leg.rate_limits(result), retry_after_s=None, status=200)
                won = Won(result, health, slot)  # its rtt_s is set below, with the attempt's end
                return won
            raise UpstreamError(timeout_kind, should_retry=False if timeout_kind == upstream_errors.DEADLINE else None)
        except UpstreamError as err:
            outcome = err.outcome
            trace.failed(err)
            cause = upstream_errors.to_sidecard_error(err, health.name)
            trace.failures.causes[_key(target)] = cause
            health.refusal = cause if cause.code in _TARGET_REFUSALS else None
            # A 429 says the account is over its rate, not that the target is unwell: throttling holds the target
            # for its retry-after (below), and counting it would open the breaker exactly when the provider asks for
            # patience.
            caller_error = classify(err.status, err.should_retry) is Disposition.FAIL
            no_verdict = caller_error or err.status == 429 or err.kind == upstream_errors.DEADLINE
            verdict = None if no_verdict else False
            busy = err.status == 529
            if err.status in (401, 403):
                self._breaker_moved(health, health.breaker.force_open(self._clock()))
            if self.traffic is not None and err.status == 429:
                self.traffic.observe(target, None, retry_after_s=err.retry_after_s, status=429)
            raise
        finally:
            now = self._clock()
            if won is not None:  # its slot goes back with the result
                won.rtt_s = now - started
            elif slot is not None:
                slot.release(rtt_s=None if outcome == "cancelled" else now - started, dropped=outcome in ("429", "529", "timeout"))
            if verdict is None:
                health.breaker.release()
            else:
                self._breaker_moved(health, health.breaker.record(now, success=verdict, busy=busy))
            latency = now - started
            if marks is not None:
                marks.attempts.append((len(trace.attempts), queued, started, now, hedge))
            attempt = Attempt(target.provider, target.model, outcome, round(latency * 1000, 3))
            trace.attempts.append(attempt)
            if won is not None:  # counted as its consumer gives it back (`Won.release`)
                won.attempt, won.attempts = attempt, self.metrics.attempts
            else:
                self.metrics.attempts(*health.labels, outcome).inc()
            if outcome != "cancelled":
                self.metrics.upstream_seconds(*health.labels).observe(latency)

    async def _hedged(
        self, primary: TargetHealth, partner: TargetHealth, after_s: float, body: dict[str, Any], trace: Trace, leg: Leg[R],
        patience: tuple[float, float],
    ) -> Won[R]:
        """Race the primary against the partner, started if the primary is slower than its hedge delay.

        The first success wins and the other attempt is cancelled (its connection is closed, not reused).
        If no attempt succeeds, the primary's failure is raised for the walk to handle. `patience`: the primary's
        and the partner's, for their admission queues (see `_attempt`).
        """
        winners: list[Won[R]] = []
        primary_error: list[UpstreamError | Overloaded] = []
        primary_done = trio.Event()
        hedge_started = False

        try:
            async with trio.open_nursery() as race:

                async def run(health: TargetHealth, is_hedge: bool) -> None:
                    try:
                        won = await self._attempt(health, body, trace, leg, is_hedge, patience=patience[is_hedge])
                    except (UpstreamError, Overloaded) as err:
                        if not is_hedge:
                            primary_error.append(err)
                        return
                    finally:
                        if not is_hedge:
                            primary_done.set()
                    winners.append(won)
                    race.cancel_scope.cancel()

                race.start_soon(run, primary, False)
                with trio.move_on_after(after_s):
                    await primary_done.wait()
                if not primary_done.is_set() and self._admit(partner, trace):
                    if self.budget.try_withdraw(self._clock()):
                        hedge_started = True
                        race.start_soon(run, partner, True)
                    else:
                        partner.breaker.release()
                        self.metrics.budget_refusals(*partner.labels).inc()
        except BaseExceptionGroup as group:
            # An answer that came in the instant the walk was cancelled holds its slot (a stream, its connection):
            # given back, as a hedge race's second winner is, or its target never has the slot again.
            for won in winners:
                await leg.discard(won)
            # Cancelled from outside (the client left, the drain ended): one Cancelled, as for an unhedged attempt.
            cancelled, rest = group.split(trio.Cancelled)
            if rest is not None or cancelled is None:
                raise
            leaf: BaseException = cancelled
            while isinstance(leaf, BaseExceptionGroup):
                leaf = leaf.exceptions[0]
            raise leaf from None
        for loser in winners[1:]:  # both finished in the same instant: an open stream must not leak
            await leg.discard(loser)
        if winners:
            won = winners[0]
            if hedge_started:
                self.metrics.hedges(*partner.labels, "won" if won.served is partner else "lost").inc()
            return won
        raise primary_error[0]

    # ------------------------------------------------------------------ failures

    def unusable(self, trace: Trace, target: Target, exc: Exception) -> UpstreamError:
        """A target sidecard could not build or call (an SDK that refuses its settings, a missing credential):
        logged with what went wrong, and failed over like any failed target."""
        self.log.error(
            "target_unusable", request_id=trace.request_id, target=f"{target.provider}:{target.model}",
            exception=type(exc).__name__, message=self.log.redactor.exception(exc),
        )
        return UpstreamError(upstream_errors.UNUSABLE, should_retry=False)

    def failure(self, trace: Trace) -> SidecardError:
        """The error for a walk in which every target failed: the most decisive cause, not always an outage.

        When every target refused the request itself (credentials, permissions, model id), that refusal, which no
        retry can cure; when every target is rate-limited, `rate_limited`; when only sidecard's own queues turned it
        away, `overloaded`; else `upstream_unavailable`. The retryable ones carry the shortest wait a target asked for.
        """
        failures, plan = trace.failures, trace.plan
        assert plan is not None
        causes = list(failures.causes.values())
        if causes and not any(cause.retryable for cause in causes):
            return causes[-1]
        if self._clock() >= plan.deadline:
            return SidecardError(Code.DEADLINE_EXCEEDED, "the request's deadline passed before an answer")
        waits = [cause.retry_after_ms for cause in causes if cause.retry_after_ms]
        retry_after_ms = min(waits) if waits else 1000
        if causes and all(cause.code == Code.DEADLINE_EXCEEDED for cause in causes):
            return causes[-1]  # no target could answer within the time left, though none was busy
        if causes and all(cause.code == Code.RATE_LIMITED for cause in causes):
            return SidecardError(Code.RATE_LIMITED, f"every target is rate-limited (last: {causes[-1].message})", retry_after_ms=retry_after_ms)
        if failures.refused is not None and failures.last_error is None:
            return SidecardError(Code.OVERLOADED, f"sidecard is at capacity for this route ({failures.refused.reason})", retry_after_ms=retry_after_ms)
        # The decisive cause is the last call made: a target skipped for its open breaker was not called.
        last = last_call(trace.attempts) if failures.last_error is not None else None
        skipped = sorted({f"{a.provider}:{a.model}" for a in trace.attempts if a.outcome == "breaker_open"})
        if last is None:
            cause = "every target's circuit breaker is open"
        else:
            cause = f"last: {last.provider}:{last.model} {last.outcome}"
            if skipped:
                cause += f"; circuit breaker open: {', '.join(skipped)}"
        return SidecardError(Code.UPSTREAM_UNAVAILABLE, f"every target failed ({cause})", retry_after_ms=retry_after_ms)

    def _breaker_moved(self, health: TargetHealth, state: State | None) -> None:
        if state is None:
            return
        if not health.shared:  # the judge's own breaker: not the one the metrics (and operators) watch
            self.log.info("breaker", target=health.name, state=state.name.lower(), internal=True)
            return
        self.metrics.breaker_state(*health.labels).set(state.value)
        self.metrics.breaker_transitions(*health.labels, state.name.lower()).inc()
        self.log.warning("breaker", target=health.name, state=state.name.lower())


def _key(target: Target) -> TargetKey:
    return (target.provider, target.model, target.base_url)


def _refusal_cause(health: TargetHealth, refused: Overloaded) -> SidecardError:
    """A target turned away locally: paused by the provider's rate limit, or sidecard's own queue full."""
    retry_after_ms = max(1, math.ceil(refused.retry_after_s * 1000)) if math.isfinite(refused.retry_after_s) else 1000
    if refused.reason == "deadline_too_short":
        return SidecardError(Code.DEADLINE_EXCEEDED, f"{health.name}: the time left is shorter than one call takes")
    if refused.reason == "paused":
        return SidecardError(Code.RATE_LIMITED, f"{health.name}: held by the provider's rate limit", retry_after_ms=retry_after_ms)
    return SidecardError(Code.OVERLOADED, f"sidecard is at capacity for this route ({refused.reason})", retry_after_ms=retry_after_ms)
