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

import contextlib
import itertools
import os
import random
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from functools import partial
from typing import Any, Final, Protocol, TypeVar

import msgspec
import trio

from ..cache import Entry, ResponseCache, SingleFlight, unpack
from ..config import Config
from ..errors import Code, SidecardError, shutting_down
from ..killswitch import KillSwitch
from ..observe.log import JsonLog
from ..observe.metrics import Metrics
from ..observe.redact import pseudonym
from ..policies.retry import Disposition, classify
from ..prompts.output import corrective_instruction
from ..prompts.registry import PromptStore
from ..protocol import Attempt, Complete, Completion, Message, TokenCount
from ..quality.checks import Sample
from ..quality.judge import JUDGE_PROMPT
from ..fleet.errors import StoreError
from ..fleet.gate import FleetGate
from ..fleet.scripts import CacheHit
from ..routes import no_route
from ..safety.access import ANYONE, Identity
from ..safety.audit import AuditSink
from ..safety.guardrails import Guard
from ..safety.rules import SafetyRules, check
from ..tracing.spans import Ids
from ..traffic import Admission, Traffic
from ..upstream import errors as upstream_errors
from ..upstream.client import Upstream
from ..upstream.errors import UpstreamError
from .account import Accounting, QualitySampling, RequestLog, RequestMetrics, Sink, SpendSettlement
from .answers import Answers, disabled, has_container
from .names import FeatureNames
from .plan import ArmSource, Planner, RouteModelSource, RouteSource, worst_cost_usd
from .safety import AppUse, AuditTrail, Gate, Marks, with_text
from .stream import Streams
from .types import Emit, Exhausted, JobRun, PartialAnswer, Trace
from .walk import CreateLeg, RouteWalker

__all__ = ["Engine", "KillSource", "PartialAnswer", "RouteSource"]

_R = TypeVar("_R")
_CANCELLED: Final = SidecardError(Code.CANCELLED, "the request was cancelled")
CANCELLED_BY_CLIENT: Final = SidecardError(Code.CANCELLED, "cancelled by the client")
# A request the daemon stopped, its drain's grace over: the faces tell its client so, and its log line says so (a
# client that left is `cancelled`). The replacement daemon takes the next connection, under systemd within a second.
STOPPED: Final = shutting_down("the daemon stopped before the answer")
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
        audit: AuditSink | None = None,
        wall: Callable[[], float] = time.time,
        span_ids: Ids | None = None,
        rng: random.Random | None = None,
        arms: ArmSource | None = None,
        route_models: RouteModelSource | None = None,
        clock: Callable[[], float] = trio.current_time,
        fleet: FleetGate | None = None,
        named_features: Callable[[str], bool] | None = None,
    ) -> None:
        """`kills`, `routes`, `route_for_prompt`: operator state, read on every request; `on_cache_store`: told each
        answer the cache keeps (a persistent store); `quality_sink`: takes fresh answers to check (never blocks);
        `sinks`: more accounting sinks, told of every request once it is over; `user_salt`: of user pseudonyms;
        `audit`: where audited requests' records go (the audit writer's queue), stamped with `wall` time;
        `arms`: the experiment arm serving a request, `route_models`: the model a route's rollout gives it (both
        read by the planner);
        `fleet`: fleet mode's request path (shared cache, limits and budgets in one round trip to the store);
        `named_features`: whether operator state beyond the config and the kill switches names a feature (a running
        experiment's subject), so that it is accounted under its own name past requests.max_named_features;

        `span_ids`: tracing on, every request gets trace ids and the marks its spans need (`Trace.marks`)."""
        self.upstream = upstream
        self.metrics = metrics
        self.log = log
        self.kills = kills
        self.cache = cache
        self.traffic = traffic
        self.fleet = fleet
        self.flights = SingleFlight()
        self._clock = clock
        self._ids = itertools.count(1)
        self._id_prefix = os.urandom(3).hex()
        self.user_salt = user_salt or os.urandom(16)
        self.in_flight = 0
        self.stopped = False  # the daemon's drain is over: a request cancelled now ends `shutting_down` (`stop`)
        self.span_ids = span_ids
        self._experiment_features = named_features or (lambda feature: False)
        self.features = FeatureNames(log=log, named=self._named_feature)
        self.planner = Planner(config, prompts or PromptStore(None), routes, cache=cache is not None, route_for_prompt=route_for_prompt,
                               arms=arms, route_models=route_models)
        self.walker = RouteWalker(config, metrics=metrics, log=log, traffic=traffic, rng=rng, clock=clock)
        self.answers = Answers(config, metrics=metrics, cache=cache, on_cache_store=on_cache_store, clock=clock)
        own: list[Sink] = [RequestMetrics(metrics)]
        if traffic is not None:
            own.insert(0, SpendSettlement(fleet if fleet is not None else traffic))
        if quality_sink is not None:
            own.append(QualitySampling(config.quality, quality_sink))
        own.append(RequestLog(log, prefix_chars=config.log.prompt_prefix_chars, user_salt=self.user_salt))
        self.app_use = AppUse(metrics)
        own.append(self.app_use)
        if audit is not None:
            own.append(AuditTrail(lambda: self.gate, audit, metrics=metrics, user_salt=self.user_salt, wall=wall))
        self.accounting = Accounting(config, metrics=metrics, sinks=[*own, *sinks], clock=clock, model_ended=self._model_ended)
        self.streams = Streams(config, upstream=upstream, walker=self.walker, answers=self.answers,
                               accounting=self.accounting, metrics=metrics, clock=clock)
        self._create = CreateLeg(upstream)
        self.gate: Gate | None = None
        self.configure(config)

    def configure(self, config: Config) -> None:
        """Apply a (re)loaded config; breaker state of targets that remain is kept."""
        self.config = config
        for part in (self.planner, self.answers, self.streams):
            part.config = config
        self.walker.configure(config)
        self.accounting.configure(config)
        # Checked where the config was loaded (start, reload): compiled once here, for every request.
        rules = SafetyRules.build(check(config))
        self.log.redactor.mask_also(rules.named_patterns())  # no rule's match reaches a log line or the audit trail
        self.gate = Gate(rules, metrics=self.metrics, log=self.log, judge=self._judge, judge_route=config.quality.judge_route,
                         rng=self.walker.rng)
        self.planner.delimited = rules.delimited
        self.planner.safety_scopes = rules.scopes
        self.features.configure(config, rules.settings)
        routes = self.planner.routes
        for name in routes.names():
            self.walker.track(routes.get(name).targets)  # type: ignore[union-attr]

    def release_named_models(self) -> list[str]:
        """A reload: the models requests named that no route has and the upstream never answered give back their
        slots (their breakers, queues and series forgotten); a model a route now has holds none. Returns those."""
        released = self.planner.models.reconfigure(self.planner.on_a_route)
        for model in released:
            self._forget_model(model)
        return released

    def _model_ended(self, model: str, trace: Trace) -> bool:
        """A request that named MODEL is over (`Accounting.finish`): when MODEL holds no slot now, what it made is
        forgotten (again, for a request that was on its way when another gave the slot back)."""
        planner = self.planner
        if not planner.models.ended(model, trace.attempts, planner.on_a_route):
            return False
        self._forget_model(model)
        return True

    def _forget_model(self, model: str) -> None:
        """Forget the breakers, queues and series of MODEL, a model no route has that holds no slot."""
        self.walker.forget(model)
        if self.traffic is not None:
            self.traffic.forget(model)
        self.metrics.forget("model", model)

    def _named_feature(self, feature: str) -> bool:
        """Whether operator state names FEATURE: a kill switch on it, or an experiment's."""
        switch = self.kills.match(feature, None, self._clock())
        return (switch is not None and switch.scope == f"feature:{feature}") or self._experiment_features(feature)

    def stop(self) -> None:
        """The daemon stops what is still in flight (its drain's grace is over): a request cancelled from now on was
        stopped by the daemon (`STOPPED`), not left by its client (`cancelled`)."""
        self.stopped = True

    def models(self) -> list[str]:
        """The models the routes call (operators' overrides included), each once: the default route's first."""
        routes = self.planner.routes
        names = sorted(routes.names(), key=lambda name: name != self.config.requests.default_route)
        return list(dict.fromkeys(t.model for name in names for t in routes.get(name).targets))  # type: ignore[union-attr]

    # ------------------------------------------------------------------ entry points

    async def complete(
        self, request: Complete, *, internal: bool = False, identity: Identity = ANYONE, about: dict[str, str | int] | None = None,
        job: JobRun | None = None, begun: Trace | None = None,
    ) -> Completion:
        """Answer one request. `internal` marks sidecard's own calls (the quality judge): they make one attempt
        per target, never hedge, never draw on the users' retry budget, and have breakers of their own, so a
        failing judge cannot open the breaker that users' fallbacks rely on. `about`: fields an internal call's
        `request` log line adds, saying what it was about. `job`: the async job this request runs. `begun`: what
        `begin` returned for REQUEST (its first step is done)."""
        if begun is not None:
            return await self._run(begun, self._after_prelude)
        trace = self._trace(request, internal, identity, job)
        trace.about = about
        return await self._run(trace, self._complete)

    def begin(self, request: Complete, *, identity: Identity = ANYONE) -> Completion | Trace:
        """A whole answer's first step, done without waiting: the answer, when one is due at once (a cache hit, a
        kill switch's), the request then over and accounted for; else its trace, which `complete(begun=...)`
        continues. Raises the `SidecardError` it ended with, accounted for too. (A face answers a hit in the
        turn it read the request in: no task, no scheduler round trip.)"""
        trace = self._trace(request, identity=identity)
        try:
            answer = self._prelude(trace)
        except Exception as exc:
            error = self._failure(trace, exc)
            self.accounting.finish(trace, None, error)
            raise error from exc
        if answer is None:
            return trace
        self.accounting.finish(trace, answer, None)
        return answer

    def open(self, request: Complete, *, identity: Identity = ANYONE) -> Trace:
        """A stream's or a token count's trace, before anything is done: a face that holds it can name the request
        however it ends (a client's cancel, the drain's last word); `stream` or `count_tokens` (`begun`) runs it."""
        return self._trace(request, identity=identity)

    async def stream(
        self, request: Complete, emit: Emit, *, pings: bool = False, identity: Identity = ANYONE, begun: Trace | None = None
    ) -> Completion:
        """Answer a streaming request: frames go out through `emit`; the assembled answer is returned.

        Failures before the first token are retried and failed over like any request; after it, a failure
        raises `PartialAnswer` (or, with `resume`, continues on the next target). `pings`: relay the API's `ping`
        events as `{"event": "ping"}` frames. `begun`: its trace, from `open`.
        """
        trace = begun or self._trace(request, identity=identity)
        return await self._run(trace, lambda trace: self._stream(trace, emit, pings))

    async def count_tokens(self, request: Complete, *, identity: Identity = ANYONE, begun: Trace | None = None) -> TokenCount:
        """Input tokens of a request, from the API's count-tokens endpoint on the route's targets in order. `begun`:
        its trace, from `open`."""
        return await self._run(begun or self._trace(request, identity=identity), self._count)

    def _trace(self, request: Complete, internal: bool = False, identity: Identity = ANYONE, job: JobRun | None = None) -> Trace:
        feature = request.feature
        if feature not in self.features.seen and not internal:  # (sidecard's own calls name their own features)
            feature = self.features.label(feature)
        trace = Trace(request, f"{self._id_prefix}-{next(self._ids):x}", self._clock(), internal, job=job, feature=feature)
        if identity is not ANYONE:
            trace.safety = Marks(identity)
        if self.span_ids is not None:
            trace.marks = self.span_ids.begin(request.traceparent)
        return trace

    async def _run(self, trace: Trace, run: Callable[[Trace], Awaitable[_R]]) -> _R:
        """One request from start to end: counted in flight, a bug turned into a typed `internal` error, an error
        naming the request (`_failure`), and accounted for however it ends."""
        result: _R | None = None
        error: SidecardError | None = None
        self.in_flight += 1
        self.metrics.in_flight.inc()
        try:
            result = await run(trace)
            return result
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            error = _CANCELLED  # a stream's client went away mid-answer (its face's writes fail): not a bug
            raise
        except Exception as exc:
            error = self._failure(trace, exc)
            raise error from exc
        except trio.Cancelled:
            error = STOPPED if self.stopped else _CANCELLED  # the daemon stopped it at shutdown, or the client went away
            raise
        finally:
            self.in_flight -= 1
            self.metrics.in_flight.dec()
            self.accounting.finish(trace, result, error)

    def _prelude(self, trace: Trace, *, stream: bool = False, counting: bool = False) -> Completion | None:
        """What every request does first: its plan, the kill switches, the cache. The answer, when one is due
        without an upstream call (a kill switch's, a cached one); raises when the request ends here."""
        request, marks = trace.request, trace.marks
        if trace.safety is not None and trace.safety.identity.app is not None:
            self.gate.precheck(trace)  # type: ignore[union-attr]
        plan = trace.plan = self.planner.plan(request, trace.started, stream=stream, arm=trace.job.arm if trace.job else None)
        if marks is not None:
            marks.planned = self._clock()
        if plan.cache_key is None:
            trace.cache_result = "bypass"
        gate = self.gate
        assert gate is not None
        if not trace.internal and (trace.safety is not None or not gate.idle):
            gate.admit(trace, lambda route: self._reroute(trace, route))  # (it marks the trace: `trace.safety`)
            plan = trace.plan
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
        traffic, admission = self.traffic, None
        if traffic is not None:
            request = trace.request
            user = pseudonym(request.user, self.user_salt) if request.user is not None else None
            admission = traffic.admit(
                feature=trace.feature, route=plan.route_name, user_key=user, estimated_tokens=plan.estimated_tokens,
                estimate_usd=partial(worst_cost_usd, plan, self.accounting.prices), app=_app_of(trace),
                prepaid=trace.job.prepaid if trace.job is not None else None, own=trace.internal,
            )
        self._admitted(trace, admission)

    def _admitted(self, trace: Trace, admission: Admission | None) -> None:
        plan = trace.plan
        assert plan is not None
        if admission is not None:
            trace.admission = admission
            if admission.route is not None and admission.route != plan.route_name:
                cheaper = self.planner.routes.get(admission.route)
                if cheaper is not None:
                    trace.plan = self.planner.reroute(plan, admission.route, cheaper)
                    if plan.cache_key is not None and trace.plan.cache_key is None:
                        trace.cache_result = "bypass"
        if not trace.internal:
            self.walker.budget.deposit(trace.started)
            if trace.safety is not None:  # the gate saw the request
                self.gate.pin(trace)  # type: ignore[union-attr]

    def _reroute(self, trace: Trace, name: str) -> None:
        """Move a planned request to route NAME (an injection policy's stricter route)."""
        route = self.planner.routes.get(name)
        if route is None:
            raise no_route(name, self.planner.routes.names())
        plan = trace.plan
        assert plan is not None
        trace.plan = self.planner.reroute(plan, name, route)
        if plan.cache_key is not None and trace.plan.cache_key is None:
            trace.cache_result = "bypass"

    # ------------------------------------------------------------------ fleet mode

    async def _fleet_admit(self, trace: Trace, *, shared_cache: bool, hold_s: float | None = None) -> Completion | None:
        """Fleet mode's `_admit`: one round trip for the shared cache (when `shared_cache`), the fleet's limits and
        budgets and the coalescing lease; the shared answer when the store had one. `hold_s`: how long the budget
        reservation is held (an async job's: until its deadline; else the request's deadline)."""
        fleet, plan, request = self.fleet, trace.plan, trace.request
        assert fleet is not None and plan is not None
        user = pseudonym(request.user, self.user_salt) if request.user is not None else None
        cache_key = plan.cache_key if shared_cache and request.cache == "use" else None
        while True:
            result = await fleet.admit(
                request_id=trace.request_id, feature=trace.feature, route=plan.route_name, user_key=user,
                estimated_tokens=plan.estimated_tokens, estimated_usd=worst_cost_usd(plan, self.accounting.prices),
                deadline_s=hold_s if hold_s is not None else max(0.0, plan.deadline - self._clock()), cache_key=cache_key, lead=True,
                app=_app_of(trace), prepaid=trace.job.prepaid if trace.job is not None else None, prompt=plan.prompt,
                job=hold_s is not None, cached_as=request.feature, own=trace.internal,
            )
            if not isinstance(result, CacheHit):
                self._admitted(trace, result)
                return None
            answer = self._shared_answer(trace, result)
            if answer is not None:
                return answer
            cache_key = None  # unreadable: asked again without the shared cache

    def _shared_answer(self, trace: Trace, hit: CacheHit) -> Completion | None:
        """A shared cache entry answered, and kept in the local cache; None if it cannot be read."""
        plan = trace.plan
        assert plan is not None and plan.cache_key is not None and self.cache is not None
        try:
            answer = unpack(hit.payload)
        except msgspec.MsgspecError:
            self.metrics.cache_undecodable.inc()
            return None
        shift = self.fleet.wall() - self._clock()  # type: ignore[union-attr]
        expires_at = hit.expires_at - shift
        entry = Entry(hit.payload, hit.stored_at - shift, expires_at, expires_at + self.config.cache.stale_ttl_s,
                      (trace.request.feature, plan.prompt))
        self.cache.put(plan.cache_key, entry)
        trace.cache_result = "hit"
        return self.answers.cached(trace, answer, stale=False)

    async def _degraded(self, trace: Trace) -> Completion | None:
        """Every target failed: a stale answer from the local cache, else (fleet mode) from the shared one, else
        the static fallback."""
        fleet, plan = self.fleet, trace.plan
        if fleet is None or plan is None or plan.cache_key is None:
            return self.answers.degraded(trace)
        stale = self.answers.stale(trace)
        if stale is None:
            try:
                hit = await fleet.path.cache_get(plan.cache_key, fleet.wall(), allow_stale=True)
                stale = None if hit is None else self.answers.stale(trace, unpack(hit.payload))
            except (StoreError, msgspec.MsgspecError):
                stale = None
        return stale or self.answers.static_fallback(trace)

    async def _fleet_coalesced(self, trace: Trace) -> Completion:
        """A follower waits for another sidecar's leader; a leader answers (its lease released if it has no answer to share)."""
        fleet, ticket = self.fleet, trace.admission.fleet if trace.admission is not None else None
        key = trace.plan.cache_key  # type: ignore[union-attr]
        assert fleet is not None and key is not None
        if ticket is None or ticket.lease == "none":
            return await self._coalesced(trace)  # the store did not answer: coalesced on this sidecar only
        if ticket.lease == "follower":
            hit = await fleet.follow(key, ticket.lease_token)
            if hit is not None:
                answer = self._shared_answer(trace, hit)
                if answer is not None:
                    trace.cache_result = "coalesced"
                    return answer
        try:
            return await self._coalesced(trace)  # the gate renews the lease while this runs
        finally:
            fleet.lead_done(key)

    # ------------------------------------------------------------------ a whole answer

    async def _complete(self, trace: Trace) -> Completion:
        answer = self._prelude(trace)
        if answer is not None:
            return answer
        return await self._after_prelude(trace)

    async def _after_prelude(self, trace: Trace) -> Completion:
        """Admission, then the answer: shared, coalesced or fresh; degraded if the deadline passes first."""
        if self.fleet is not None:
            answer = await self._fleet_admit(trace, shared_cache=True)
            if answer is not None:
                return answer
        else:
            self._admit(trace)
        plan = trace.plan
        assert plan is not None
        trace.scope = scope = trio.CancelScope(deadline=plan.deadline)
        if trace.cancelled:
            scope.cancel()
        with scope:
            if plan.cache_key is not None and trace.request.cache == "use":
                if self.fleet is not None:
                    return await self._fleet_coalesced(trace)
                return await self._coalesced(trace)
            return await self._answer(trace)
        # Only reached when the deadline, or the client's `cancel`, stopped the walk.
        if trace.cancelled:
            raise CANCELLED_BY_CLIENT
        degraded = await self._degraded(trace)
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
                if has_container(flight.answer):  # the leader's conversation's own: this request asks for itself
                    return await self._answer(trace)
                trace.cache_result = "coalesced"
                return self.answers.shared(trace, flight.answer)

    async def _answer(self, trace: Trace) -> Completion:
        plan = trace.plan
        assert plan is not None
        completion = await self._walk(trace, plan.body)
        if plan.version is not None and not completion.degraded:
            completion = await self._checked_output(trace, completion)
        if not completion.degraded and trace.safety is not None:
            completion = await self._guarded(trace, completion)
        if plan.cache_key is not None and not completion.degraded and not completion.fallback:
            self.answers.store(trace, completion)
        return completion

    async def _checked_output(self, trace: Trace, completion: Completion) -> Completion:
        """An answer that breaks the prompt's declared format gets one corrective retry, then `bad_output`."""
        problem = self.answers.format_problem(trace, completion)
        if problem is None:
            return completion
        if trace.internal and trace.plan.version.name == JUDGE_PROMPT:  # type: ignore[union-attr]
            # The judge makes one attempt (docs/quality.md): a reply off its rubric's format is a judge error.
            raise SidecardError(Code.BAD_OUTPUT, f"the answer did not match the prompt's output format: {problem}")
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

    async def _guarded(self, trace: Trace, completion: Completion) -> Completion:
        """Placeholders restored, then the output guardrails: a block is `output_blocked` (or the static fallback),
        a redaction masks the answer, a retry asks once more with a corrective instruction."""
        gate, marks = self.gate, trace.safety
        assert gate is not None and isinstance(marks, Marks)
        guard = gate.guard(trace)
        restored = with_text(completion, marks.restored) if marks.restore else completion
        if guard is None:
            return restored
        with self._guard_span(trace):
            return await self._guard(trace, gate, guard, marks, completion, restored)

    async def _guard(self, trace: Trace, gate: Gate, guard: Guard, marks: Marks, completion: Completion,
                     restored: Completion) -> Completion:
        decision = await gate.decide(trace, guard, restored.text)
        if decision.outcome == "retry":
            body = trace.plan.body  # type: ignore[union-attr]
            corrected = {**body, "messages": [*body["messages"], Message("assistant", completion.text.strip() or "(empty answer)"),
                                              Message("user", decision.retry_instruction or "")]}
            second = await self._walk(trace, corrected)
            if second.degraded:
                return second
            restored = with_text(second, marks.restored) if marks.restore else second
            decision = await gate.decide(trace, guard, restored.text, retried=True)
        if decision.outcome == "block":
            fallback = self.answers.fallback_text(trace) if guard.on_block == "fallback" else None
            if fallback is None:
                raise gate.blocked(decision)
            return self.answers.static(trace, fallback)
        if decision.outcome == "redact":
            restored = with_text(restored, lambda text: guard.check(text).text)
        return msgspec.structs.replace(restored, guardrails=marks.guardrails) if marks.guardrails else restored

    @contextlib.contextmanager
    def _guard_span(self, trace: Trace) -> Iterator[None]:
        """Times the output guardrails for their span (tracing on)."""
        marks = trace.marks
        if marks is None:
            yield
            return
        marks.guarded, marks.guard_from = True, self._clock()
        try:
            yield
        finally:
            marks.guard_to = self._clock()

    async def _judge(self, request: Complete) -> Completion:
        """sidecard's own call to a judge (a policy guardrail's), apart from users' retries, hedges and breakers."""
        return await self.complete(request, internal=True)

    async def _walk(self, trace: Trace, body: dict[str, Any]) -> Completion:
        try:
            won = await self.walker.walk(trace, body, trace.plan.route.targets, self._create)  # type: ignore[union-attr]
        except Exhausted:
            degraded = await self._degraded(trace)
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
        if self.fleet is not None:
            await self._fleet_admit(trace, shared_cache=False)  # a stream is cached on this sidecar only
        else:
            self._admit(trace)
        checked = self.gate.stream_filter(trace, emit) if trace.safety is not None else None  # type: ignore[union-attr]
        if checked is None:
            return await self.streams.run(trace, emit, pings=pings)

        async def finish(completion: Completion) -> Completion:
            with self._guard_span(trace):
                return await checked.finish(completion)

        return await self.streams.run(trace, checked, pings=pings, finish=finish)

    # ------------------------------------------------------------------ token counting

    async def _count(self, trace: Trace) -> TokenCount:
        """The route's targets in order, one try each: counting is cheap, and a failure is not worth a retry."""
        self._prelude(trace, counting=True)
        if trace.safety is not None:  # the gate saw the request
            self.gate.pin(trace)  # type: ignore[union-attr]
        plan = trace.plan
        assert plan is not None
        body = {k: v for k, v in plan.body.items() if k not in _NOT_COUNTED}
        failures = trace.failures
        with trio.CancelScope(deadline=plan.deadline):
            for target in plan.route.targets:
                started = self._clock()
                try:
                    counted = await self.upstream.count_tokens(target, body, timeout_s=target.timeout_s, headers=plan.headers)
                except UpstreamError as err:
                    trace.failed(err)
                except Exception as exc:  # e.g. an SDK that cannot count for this provider: the next target may
                    trace.failed(self.walker.unusable(trace, target, exc))
                else:
                    trace.attempts.append(Attempt(target.provider, target.model, "ok", round((self._clock() - started) * 1000, 3)))
                    trace.upstream_request_id = counted.request_id
                    return TokenCount(trace.request.id, counted.input_tokens, target.model, request_id=trace.request_id,
                                      upstream_request_id=counted.request_id, extra=counted.extra or msgspec.UNSET)
                err = failures.last_error
                trace.attempts.append(Attempt(target.provider, target.model, err.outcome, round((self._clock() - started) * 1000, 3)))
                if classify(err.status, err.should_retry) is Disposition.FAIL:
                    raise upstream_errors.to_sidecard_error(err)
                failures.causes[(target.provider, target.model, target.base_url)] = upstream_errors.to_sidecard_error(
                    err, f"{target.provider}:{target.model}"
                )
        if failures.last_error is None or self._clock() >= plan.deadline:
            raise SidecardError(Code.DEADLINE_EXCEEDED, "the request's deadline passed before an answer")
        raise self.walker.failure(trace)  # the same decisive cause a complete's walk would give

    def _failure(self, trace: Trace, exc: Exception) -> SidecardError:
        """What a request that raised EXC ended with: its typed error (for a bug, a typed `internal`, and what
        happened in the log), naming the request and the provider's last answer, as its log line does."""
        if not isinstance(exc, SidecardError):
            self.log.internal_error("engine", exc, trace.request.id, request_id=trace.request_id)
            exc = SidecardError(Code.INTERNAL, f"internal error (request {trace.request_id}; the daemon's log has the details)")
        return exc.of_request(trace.request_id, trace.upstream_request_id)


def _app_of(trace: Trace) -> str | None:
    """The app identity's name, for its own rate limit and budget (None with access control off)."""
    marks = trace.safety
    return marks.identity.name if marks is not None and marks.identity.app is not None else None
