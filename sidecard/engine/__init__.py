"""The engine: one request's way from a typed `Complete` to a `Completion` or a `SidecardError`.

Every entry point (`complete`, `stream`, `count_tokens`) starts the same way (`_prelude`): plan the request
(`plan.py`), check the kill switches, look in the cache. A request that needs the upstream is then admitted by
traffic control and walks its route (`walk.py`): each target in order, attempts under the deadline, retries,
hedges, breakers. When every target has failed it gets a stale cached answer, else the static fallback, else a
typed error (`answers.py`). Streams have their own module (`stream.py`). However a request ends, it is accounted
for once (`account.py`). Nothing here knows about sockets or frames.

The engine is given everything it reads at construction: operator state through narrow readers (kill switches,
routes, a prompt's quality route switch), where cached answers are kept, where quality samples go.
"""

from __future__ import annotations

import itertools
import os
import random
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Final, Protocol, TypeVar

import trio

from ..cache import Entry, ResponseCache, SingleFlight
from ..config import Config
from ..errors import Code, SidecardError
from ..killswitch import KillSwitch
from ..observe.log import JsonLog
from ..observe.metrics import Metrics
from ..observe.redact import pseudonym
from ..policies.retry import Disposition, classify
from ..prompts.output import corrective_instruction
from ..prompts.registry import PromptStore
from ..protocol import Attempt, Complete, Completion, Message
from ..quality.checks import Sample
from ..tracing.spans import Ids
from ..traffic import Traffic
from ..upstream import errors as upstream_errors
from ..upstream.client import Upstream
from ..upstream.errors import UpstreamError
from .account import Accounting, QualitySampling, RequestLog, RequestMetrics, Sink, SpendSettlement
from .answers import Answers, disabled
from .plan import Planner, RouteSource, worst_cost_usd
from .stream import Streams
from .types import Emit, Exhausted, PartialAnswer, Trace
from .walk import CreateLeg, RouteWalker

__all__ = ["Engine", "KillSource", "PartialAnswer", "RouteSource"]

_R = TypeVar("_R")
_CANCELLED: Final = SidecardError("cancelled", "the request was cancelled")
# Fields of a messages request that the count-tokens endpoint does not take.
_NOT_COUNTED: Final = frozenset({"max_tokens", "temperature", "stop_sequences", "metadata", "top_p", "top_k", "stream", "service_tier"})


class KillSource(Protocol):
    """Kill switches in force (`killswitch.KillSwitches`)."""

    def match(self, feature: str, prompt: str | None, now: float) -> KillSwitch | None: ...


class Engine:
    def __init__(
        self,
        config: Config,
        upstream: Upstream,
        *,
        metrics: Metrics,
        log: JsonLog,
        kills: KillSource,
        routes: RouteSource,
        prompts: PromptStore | None = None,
        cache: ResponseCache | None = None,
        traffic: Traffic | None = None,
        route_for_prompt: Callable[[str], str | None] | None = None,
        on_cache_store: Callable[[str, Entry], None] | None = None,
        quality_sink: Callable[[Sample], None] | None = None,
        sinks: Sequence[Sink] = (),
        user_salt: bytes | None = None,
        span_ids: Ids | None = None,
        rng: random.Random | None = None,
        clock: Callable[[], float] = trio.current_time,
    ) -> None:
        """`kills`, `routes`, `route_for_prompt`: operator state, read on every request; `on_cache_store`: told each
        answer the cache keeps (a persistent store); `quality_sink`: takes fresh answers to check (never blocks);
        `sinks`: more accounting sinks, told of every request once it is over; `user_salt`: of user pseudonyms;
        `span_ids`: tracing on, every request gets trace ids and the marks its spans need (`Trace.marks`)."""
        self.upstream = upstream
        self.metrics = metrics
        self.log = log
        self.kills = kills
        self.cache = cache
        self.traffic = traffic
        self.flights = SingleFlight()
        self._clock = clock
        self._ids = itertools.count(1)
        self._id_prefix = os.urandom(3).hex()
        self.user_salt = user_salt or os.urandom(16)
        self.in_flight = 0
        self.span_ids = span_ids
        self.planner = Planner(config, prompts or PromptStore(None), routes, cache=cache is not None, route_for_prompt=route_for_prompt)
        self.walker = RouteWalker(config, metrics=metrics, log=log, traffic=traffic, rng=rng, clock=clock)
        self.answers = Answers(config, metrics=metrics, cache=cache, on_cache_store=on_cache_store, clock=clock)
        own: list[Sink] = [RequestMetrics(metrics)]
        if traffic is not None:
            own.insert(0, SpendSettlement(traffic))
        if quality_sink is not None:
            own.append(QualitySampling(config.quality, quality_sink))
        own.append(RequestLog(log, prefix_chars=config.log.prompt_prefix_chars, user_salt=self.user_salt))
        self.accounting = Accounting(config, metrics=metrics, sinks=[*own, *sinks], clock=clock)
        self.streams = Streams(config, upstream=upstream, walker=self.walker, answers=self.answers,
                               accounting=self.accounting, metrics=metrics, clock=clock)
        self._create = CreateLeg(upstream)
        self.configure(config)

    def configure(self, config: Config) -> None:
        """Apply a (re)loaded config; breaker state of targets that remain is kept."""
        self.config = config
        for part in (self.planner, self.answers, self.streams):
            part.config = config
        self.walker.configure(config)
        self.accounting.configure(config)
        routes = self.planner.routes
        for name in routes.names():
            self.walker.track(routes.get(name).targets)  # type: ignore[union-attr]

    # ------------------------------------------------------------------ entry points

    async def complete(self, request: Complete, *, internal: bool = False) -> Completion:
        """Answer one request. `internal` marks sidecard's own calls (the quality judge): they make one attempt
        per target, never hedge, never draw on the users' retry budget, and have breakers of their own, so a
        failing judge cannot open the breaker that users' fallbacks rely on."""
        return await self._run(self._trace(request, internal), self._complete)

    async def stream(self, request: Complete, emit: Emit, *, pings: bool = False) -> Completion:
        """Answer a streaming request: frames go out through `emit`; the assembled answer is returned.

        Failures before the first token are retried and failed over like any request; after it, a failure
        raises `PartialAnswer` (or, with `resume`, continues on the next target). `pings`: relay the API's `ping`
        events as `{"event": "ping"}` frames.
        """
        return await self._run(self._trace(request), lambda trace: self._stream(trace, emit, pings))

    async def count_tokens(self, request: Complete) -> tuple[int, str]:
        """Input tokens of a request, from the API's count-tokens endpoint on the route's targets in order."""
        return await self._run(self._trace(request), self._count)

    def _trace(self, request: Complete, internal: bool = False) -> Trace:
        trace = Trace(request, f"{self._id_prefix}-{next(self._ids):x}", self._clock(), internal)
        if self.span_ids is not None:
            trace.marks = self.span_ids.begin(request.traceparent)
        return trace

    async def _run(self, trace: Trace, run: Callable[[Trace], Awaitable[_R]]) -> _R:
        """One request from start to end: counted in flight, a bug turned into a typed `internal` error, and
        accounted for however it ends."""
        result: _R | None = None
        error: SidecardError | None = None
        self.in_flight += 1
        self.metrics.in_flight.inc()
        try:
            result = await run(trace)
            return result
        except SidecardError as exc:
            error = exc
            raise
        except Exception as exc:
            error = self._internal(trace, exc)
            raise error from exc
        except trio.Cancelled:
            error = _CANCELLED  # the client went away, or the daemon stopped waiting at shutdown
            raise
        finally:
            self.in_flight -= 1
            self.metrics.in_flight.dec()
            self.accounting.finish(trace, result, error)

    def _prelude(self, trace: Trace, *, stream: bool = False, counting: bool = False) -> Completion | None:
        """What every request does first: its plan, the kill switches, the cache. The answer, when one is due
        without an upstream call (a kill switch's, a cached one); raises when the request ends here."""
        request, marks = trace.request, trace.marks
        plan = trace.plan = self.planner.plan(request, trace.started, stream=stream)
        if marks is not None:
            marks.planned = self._clock()
        if plan.cache_key is None:
            trace.cache_result = "bypass"
        switch = self.kills.match(request.feature, plan.prompt, trace.started)
        if switch is not None:
            if counting:
                raise disabled(switch)  # counting is still an upstream call: a kill switch stops it too
            return self.answers.killed(trace, switch)
        if counting:
            return None
        if plan.cache_key is not None and request.cache in ("use", "only"):
            assert self.cache is not None
            hit = self.cache.get(plan.cache_key, trace.started)
            if marks is not None:
                marks.looked_up = self._clock()
            if hit is not None:
                trace.cache_result = "hit"
                return self.answers.cached(trace, hit.answer, stale=False)
            trace.cache_result = "miss"
        elif plan.cache_key is not None:
            trace.cache_result = "refresh"
        if request.cache == "only":
            raise SidecardError(Code.CACHE_MISS, "no cached answer for this request (cache policy `only`)")
        return None

    def _admit(self, trace: Trace) -> None:
        """Rate limits and budgets, before anything reaches the upstream (a soft budget may move the request to a
        cheaper route); the request counts towards the retry budget."""
        plan = trace.plan
        assert plan is not None
        traffic = self.traffic
        if traffic is not None:
            request = trace.request
            user = pseudonym(request.user, self.user_salt) if request.user is not None else None
            admission = trace.admission = traffic.admit(
                feature=request.feature, route=plan.route_name, user_key=user,
                estimated_tokens=plan.estimated_tokens, estimated_usd=worst_cost_usd(plan, self.accounting.prices),
            )
            if admission.route is not None and admission.route != plan.route_name:
                cheaper = self.planner.routes.get(admission.route)
                if cheaper is not None:
                    trace.plan = self.planner.reroute(plan, admission.route, cheaper)
                    if plan.cache_key is not None and trace.plan.cache_key is None:
                        trace.cache_result = "bypass"
        if not trace.internal:
            self.walker.budget.deposit(trace.started)

    # ------------------------------------------------------------------ a whole answer

    async def _complete(self, trace: Trace) -> Completion:
        answer = self._prelude(trace)
        if answer is not None:
            return answer
        self._admit(trace)
        plan = trace.plan
        assert plan is not None
        with trio.CancelScope(deadline=plan.deadline):
            if plan.cache_key is not None and trace.request.cache == "use":
                return await self._coalesced(trace)
            return await self._answer(trace)
        # Only reached when the deadline cancelled the walk.
        degraded = self.answers.degraded(trace)
        if degraded is None:
            raise SidecardError(Code.DEADLINE_EXCEEDED, "the request's deadline passed before an answer")
        return degraded

    async def _coalesced(self, trace: Trace) -> Completion:
        """Identical cacheable requests in flight share the leader's upstream call."""
        key = trace.plan.cache_key  # type: ignore[union-attr]
        assert key is not None
        while True:
            leader, flight = self.flights.lead_or_follow(key)
            if leader:
                try:
                    completion = await self._answer(trace)
                except SidecardError as err:
                    self.flights.land(key, flight, error=err)
                    raise
                except BaseException:
                    self.flights.land(key, flight)  # cancelled: a follower takes over
                    raise
                self.flights.land(key, flight, answer=completion)
                return completion
            await flight.done.wait()
            if flight.error is not None:
                raise flight.error
            if flight.answer is not None:
                trace.cache_result = "coalesced"
                return self.answers.shared(trace, flight.answer)

    async def _answer(self, trace: Trace) -> Completion:
        plan = trace.plan
        assert plan is not None
        completion = await self._walk(trace, plan.body)
        if plan.version is not None and not completion.degraded:
            completion = await self._checked_output(trace, completion)
        if plan.cache_key is not None and not completion.degraded and not completion.fallback:
            self.answers.store(trace, completion)
        return completion

    async def _checked_output(self, trace: Trace, completion: Completion) -> Completion:
        """An answer that breaks the prompt's declared format gets one corrective retry, then `bad_output`."""
        problem = self.answers.format_problem(trace, completion)
        if problem is None:
            return completion
        body = trace.plan.body  # type: ignore[union-attr]
        corrected = {
            **body,
            "messages": [
                *body["messages"],
                Message("assistant", completion.text.strip() or "(empty answer)"),
                Message("user", corrective_instruction(problem)),
            ],
        }
        second = await self._walk(trace, corrected)
        if second.degraded:
            return second
        problem = self.answers.format_problem(trace, second)
        if problem is not None:
            raise SidecardError(Code.BAD_OUTPUT, f"the answer did not match the prompt's output format twice: {problem}")
        return second

    async def _walk(self, trace: Trace, body: dict[str, Any]) -> Completion:
        try:
            won = await self.walker.walk(trace, body, trace.plan.route.targets, self._create)  # type: ignore[union-attr]
        except Exhausted:
            degraded = self.answers.degraded(trace)
            if degraded is None:
                raise self.walker.failure(trace) from None
            return degraded
        won.release()
        reply = won.value
        model = reply.message.model or won.served.target.model
        self.accounting.charge(trace, reply.message.usage, model)
        return self.answers.fresh(trace, reply, model, won.served)

    # ------------------------------------------------------------------ a stream

    async def _stream(self, trace: Trace, emit: Emit, pings: bool) -> Completion:
        answer = self._prelude(trace, stream=True)
        if answer is not None:
            return await self.streams.replay(trace, answer, emit)
        self._admit(trace)
        return await self.streams.run(trace, emit, pings=pings)

    # ------------------------------------------------------------------ token counting

    async def _count(self, trace: Trace) -> tuple[int, str]:
        """The route's targets in order, one try each: counting is cheap, and a failure is not worth a retry."""
        self._prelude(trace, counting=True)
        plan = trace.plan
        assert plan is not None
        body = {k: v for k, v in plan.body.items() if k not in _NOT_COUNTED}
        failures = trace.failures
        with trio.CancelScope(deadline=plan.deadline):
            for target in plan.route.targets:
                started = self._clock()
                try:
                    tokens = await self.upstream.count_tokens(target, body, timeout_s=target.timeout_s, headers=plan.headers)
                except UpstreamError as err:
                    failures.last_error = err
                except Exception as exc:  # e.g. an SDK that cannot count for this provider: the next target may
                    failures.last_error = self.walker.unusable(trace, target, exc)
                else:
                    trace.attempts.append(Attempt(target.provider, target.model, "ok", round((self._clock() - started) * 1000, 3)))
                    return tokens, target.model
                err = failures.last_error
                trace.attempts.append(Attempt(target.provider, target.model, err.outcome, round((self._clock() - started) * 1000, 3)))
                if classify(err.status, err.should_retry) is Disposition.FAIL:
                    raise upstream_errors.to_sidecard_error(err)
        if failures.last_error is None or self._clock() >= plan.deadline:
            raise SidecardError(Code.DEADLINE_EXCEEDED, "the request's deadline passed before an answer")
        raise upstream_errors.to_sidecard_error(failures.last_error)

    def _internal(self, trace: Trace, exc: Exception) -> SidecardError:
        """A bug: the client gets a typed error naming the request, the log gets what happened."""
        self.log.internal_error("engine", exc, trace.request.id, request_id=trace.request_id)
        return SidecardError(Code.INTERNAL, f"internal error (request {trace.request_id}; the daemon's log has the details)")
