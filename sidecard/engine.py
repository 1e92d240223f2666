"""The engine: one request's way from a typed `Complete` to a `Completion` or a `SidecardError`.

It renders the prompt (if the request names one), consults the cache, and otherwise walks the route
under the request's deadline: each target in order, attempts under `min(per-attempt timeout, time left)`,
retries with backoff while the retry budget allows, a hedge to the next target when the current one is
slow, targets with an open breaker skipped at once. When every target has failed it serves a stale cached
answer, else the static fallback, else a typed error. Nothing here knows about sockets or frames.
"""

from __future__ import annotations

import itertools
import math
import os
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Final, TypeVar

import msgspec
import trio

from .cache import CachedAnswer, Entry, ResponseCache, SingleFlight, cache_key, pack
from .config import Config, Route, Target
from .errors import Code, SidecardError
from .killswitch import KillSwitch, KillSwitches
from .limits.queue import Overloaded
from .observe.log import JsonLog
from .observe.metrics import Metrics
from .observe.redact import pseudonym
from .policies.breaker import Breaker, BreakerSettings, State
from .policies.budget import RetryBudget
from .policies.retry import Backoff, Disposition, Retry, classify
from .pricing import PriceTable
from .prompts.files import PromptVersion
from .prompts.output import corrective_instruction, output_problem
from .prompts.registry import PromptStore
from .quality.checks import Sample
from .quality.judge import JUDGE_PROMPT
from .protocol import Attempt, Complete, Completion, CountTokens, Message, ServedBy, Usage
from .routes import RouteTable
from .traffic import Admission, Traffic

from .upstream import errors as upstream_errors
from .streaming import Continuation, MalformedEvent, StreamError, StreamState, error_status
from .upstream.client import ApiMessage, Upstream, UpstreamReply, UpstreamStream
from .upstream.errors import UpstreamError

_encoder: Final = msgspec.json.Encoder()
_CANCELLED: Final = SidecardError("cancelled", "the request was cancelled")
_R = TypeVar("_R")
_Upstream = Callable[["_Call", Target, dict[str, Any], float], Awaitable[_R]]


_decoder: Final = msgspec.json.Decoder()
# Fields of a messages request that the count-tokens endpoint does not take.
_NOT_COUNTED: Final = frozenset({"max_tokens", "temperature", "stop_sequences", "metadata", "top_p", "top_k", "stream", "service_tier"})
Emit = Callable[[dict[str, Any]], Awaitable[None]]


class _Exhausted(Exception):
    """Every target of the route failed (or was skipped by its breaker)."""


class PartialAnswer(SidecardError):
    """A stream failed after its first token: `text` is what the client already has."""

    def __init__(self, code: str, message: str, text: str) -> None:
        super().__init__(code, message)
        self.text = text


class _StreamBroke(Exception):
    def __init__(self, reason: str, code: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.code = code
        self.message = message


@dataclass(slots=True)
class _Opened:
    """A stream that has delivered its first token, with the frames produced so far."""

    stream: UpstreamStream
    state: StreamState
    frames: list[dict[str, Any]]
    slot: Any = None  # the target's admission slot, released when the stream ends


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


@dataclass(slots=True)
class _Call:
    """One request on its way: what it asks, where it goes, and what happened, for the reply and the log."""

    request: Complete
    request_id: str
    started: float
    deadline: float = 0.0
    route_name: str = ""
    route: Route | None = None
    body: dict[str, Any] = field(default_factory=dict)
    headers: dict[str, str] = field(default_factory=dict)  # the request's own anthropic-* headers, sent upstream
    version: PromptVersion | None = None
    canary: bool = False
    cache_key: str | None = None
    cache_ttl_s: float = 0.0
    cache_result: str | None = None  # hit, miss, coalesced, stale, bypass
    killed_by: str | None = None
    ttft_ms: float | None = None  # streams: time to the first token
    resumed: bool = False  # streams: continued on another target after a failure
    stream: StreamState | None = None  # streams: the answer as relayed so far
    estimated_tokens: float = 0.0  # input (estimated) plus max_tokens: the most this request can use
    output_problem: str | None = None  # the first answer broke the prompt's output format
    rejected: Completion | None = None  # the answer that ended in `bad_output`, for the quality signal
    internal: bool = False  # sidecard's own call (the judge): no retries, hedges, retry budget or shared breakers
    pings: bool = False  # streams: relay the API's `ping` events
    admission: Admission | None = None
    refused: Overloaded | None = None  # the last target that turned the attempt away locally (queue, shedding)
    first_text: str = ""
    attempts: list[Attempt] = field(default_factory=list)
    last_error: UpstreamError | None = None
    # Per target, its last failure as the client would be told it: the walk's final error is chosen from these.
    causes: dict[tuple[str, str, str | None], SidecardError] = field(default_factory=dict)
    breaker_wait_s: float | None = None
    # Every upstream answer is paid for, a bad output that was retried included.
    usage: Usage = field(default_factory=Usage)
    cost_usd: float = 0.0
    spent_on: str | None = None

    @property
    def upstream_attempts(self) -> int:
        return sum(1 for a in self.attempts if a.outcome != "breaker_open")


class Engine:
    def __init__(
        self,
        config: Config,
        upstream: Upstream,
        *,
        metrics: Metrics,
        log: JsonLog,
        prompts: PromptStore | None = None,
        cache: ResponseCache | None = None,
        traffic: Traffic | None = None,
        kills: KillSwitches | None = None,
        routes: RouteTable | None = None,
        route_for_prompt: Callable[[str], str | None] | None = None,
        on_cache_store: Callable[[str, Entry], None] | None = None,
        quality_sink: Callable[[Sample], None] | None = None,
        rng: random.Random | None = None,
        user_salt: bytes | None = None,
        clock: Callable[[], float] = trio.current_time,
    ) -> None:
        self.upstream = upstream
        self.metrics = metrics
        self.log = log
        self.prompts = prompts or PromptStore(None)
        self.cache = cache
        self.traffic = traffic
        self.quality_sink = quality_sink
        self.route_for_prompt = route_for_prompt
        self.on_cache_store = on_cache_store
        self.flights = SingleFlight()
        self._rng = rng or random.Random()
        self._clock = clock
        self.user_salt = user_salt or os.urandom(16)
        self._ids = itertools.count(1)
        self._id_prefix = os.urandom(3).hex()
        self.in_flight = 0
        self._health: dict[tuple[str, str, str | None], TargetHealth] = {}
        self._internal_health: dict[tuple[str, str, str | None], TargetHealth] = {}
        self.kills = kills or KillSwitches()
        self.routes = routes or RouteTable(config.routes)
        self.configure(config)

    def now(self) -> float:
        return self._clock()

    def configure(self, config: Config) -> None:
        """Apply a (re)loaded config; breaker state of targets that remain is kept."""
        self.config = config
        self.prices = PriceTable(config.prices)
        r = config.retry
        self.backoff = Backoff(r.base_delay_ms / 1000, r.max_delay_ms / 1000)
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
        for name in self.routes.names():
            self.track(self.routes.get(name).targets)  # type: ignore[union-attr]

    def track(self, targets: list[Target]) -> None:
        """Give TARGETS breakers (and their gauges) before any request reaches them."""
        for target in targets:
            self.health(target)

    def breaker(self, target: Target) -> tuple[Breaker, float]:
        """TARGET's breaker, and seconds until an open one lets a probe through."""
        breaker = self.health(target).breaker
        return breaker, breaker.retry_after(self._clock())

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

    def breakers(self) -> list[tuple[TargetHealth, float]]:
        """Every known target with its breaker, and seconds until an open one lets a probe through."""
        now = self._clock()
        return [(h, h.breaker.retry_after(now)) for h in self._health.values()]

    # ------------------------------------------------------------------ one request

    async def complete(self, request: Complete, *, internal: bool = False) -> Completion:
        """Answer one request. `internal` marks sidecard's own calls (the quality judge): they make one attempt
        per target, never hedge, never draw on the users' retry budget, and have breakers of their own, so a
        failing judge cannot open the breaker that users' fallbacks rely on."""
        return await self._guarded(self._call(request, internal=internal), self._run)

    def _call(self, request: Complete, *, internal: bool = False) -> _Call:
        return _Call(request, f"{self._id_prefix}-{next(self._ids):x}", self._clock(), internal=internal)

    async def _guarded(self, call: _Call, run: Callable[[_Call], Awaitable[_R]]) -> _R:
        """One request from start to end: counted in flight, a bug turned into a typed `internal` error, and
        accounted for (log line, metrics, spend) however it ends."""
        result: _R | None = None
        error: SidecardError | None = None
        self.in_flight += 1
        self.metrics.in_flight.inc()
        try:
            result = await run(call)
            return result
        except SidecardError as exc:
            error = exc
            raise
        except Exception as exc:
            error = self._internal(call, exc)
            raise error from exc
        except trio.Cancelled:
            error = _CANCELLED  # the client went away, or the daemon stopped waiting at shutdown
            raise
        finally:
            self.in_flight -= 1
            self.metrics.in_flight.dec()
            if isinstance(call.request, CountTokens):
                self._account_count(call, result, error)
            else:
                self._account(call, result if isinstance(result, Completion) else None, error)

    def _set_deadline(self, call: _Call) -> None:
        cfg = self.config.requests
        call.deadline = call.started + min(call.request.deadline_ms or cfg.default_deadline_ms, cfg.max_deadline_ms) / 1000

    async def _run(self, call: _Call) -> Completion:
        request = call.request
        self._set_deadline(call)
        self._plan(call)
        switch = self.kills.match(request.feature, call.version.name if call.version else None, call.started)
        if switch is not None:
            return self._killed(call, switch)
        if call.cache_key is not None and request.cache in ("use", "only"):
            assert self.cache is not None
            hit = self.cache.get(call.cache_key, call.started)
            if hit is not None:
                call.cache_result = "hit"
                return self._from_cache(call, hit.answer, stale=False)
            call.cache_result = "miss"
        elif call.cache_key is not None:
            call.cache_result = "refresh"
        if request.cache == "only":
            raise SidecardError(Code.CACHE_MISS, "no cached answer for this request (cache policy `only`)")
        self._admit_traffic(call)
        if not call.internal:
            self.budget.deposit(call.started)
        with trio.CancelScope(deadline=call.deadline):
            if call.cache_key is not None and request.cache == "use":
                return await self._coalesced(call)
            return await self._answer(call)
        # Only reached when the deadline cancelled the walk.
        degraded = self._degraded(call)
        if degraded is None:
            raise SidecardError(Code.DEADLINE_EXCEEDED, "the request's deadline passed before an answer")
        return degraded

    # ------------------------------------------------------------------ streams

    async def complete_stream(self, request: Complete, emit: Emit, *, pings: bool = False) -> Completion:
        """Answer a streaming request: frames go out through `emit`; the assembled answer is returned.

        Failures before the first token are retried and failed over like any request; after it, a failure
        raises `PartialAnswer` (or, with `resume`, continues on the next target). `pings`: relay the API's `ping`
        events as `{"event": "ping"}` frames.
        """
        call = self._call(request)
        call.pings = pings
        return await self._guarded(call, lambda call: self._run_stream(call, emit))

    async def _run_stream(self, call: _Call, emit: Emit) -> Completion:
        request = call.request
        self._set_deadline(call)
        # A stream's deadline is for its first token; the whole stream is bounded by stream_max_duration_s.
        call.deadline = min(call.deadline, self._stream_end(call))
        self._plan(call)
        switch = self.kills.match(request.feature, call.version.name if call.version else None, call.started)
        if switch is not None:
            return await self._replay(call, self._killed(call, switch), emit)
        if call.cache_key is not None and request.cache in ("use", "only"):
            assert self.cache is not None
            hit = self.cache.get(call.cache_key, call.started)
            if hit is not None:
                call.cache_result = "hit"
                return await self._replay(call, self._from_cache(call, hit.answer, stale=False), emit)
            call.cache_result = "miss"
        elif call.cache_key is not None:
            call.cache_result = "refresh"
        if request.cache == "only":
            raise SidecardError(Code.CACHE_MISS, "no cached answer for this request (cache policy `only`)")
        self._admit_traffic(call)
        self.budget.deposit(call.started)
        with trio.CancelScope(deadline=call.deadline) as scope:
            completion = await self._stream(call, emit, scope)
            if call.version is not None and not completion.degraded and self._format_problem(call, completion):
                # The text is already with the client: no corrective retry is possible, and never cache it.
                raise PartialAnswer(
                    Code.BAD_OUTPUT,
                    f"the streamed answer did not match the prompt's output format: {call.output_problem}",
                    completion.text,
                )
            if call.cache_key is not None and not completion.degraded and not completion.fallback and not call.resumed:
                self._store(call, completion)
            return completion
        if call.stream is not None:
            self.metrics.stream_failures("deadline").inc()
            limit = self.config.requests.stream_max_duration_s
            raise PartialAnswer(
                Code.DEADLINE_EXCEEDED, f"the stream ran longer than requests.stream_max_duration_s ({limit:g} s)", call.stream.text()
            )
        degraded = self._degraded(call)
        if degraded is None:
            raise SidecardError(Code.DEADLINE_EXCEEDED, "the request's deadline passed before an answer")
        return await self._replay(call, degraded, emit)

    def _stream_end(self, call: _Call) -> float:
        return call.started + self.config.requests.stream_max_duration_s

    async def _stream(self, call: _Call, emit: Emit, scope: trio.CancelScope) -> Completion:
        assert call.route is not None
        targets = call.route.targets
        try:
            opened, served = await self._route_walk(call, call.body, targets, self._call_stream)
        except _Exhausted:
            degraded = self._degraded(call)
            if degraded is None:
                raise _exhausted(call, self._clock()) from None
            return await self._replay(call, degraded, emit)
        # The first token is in: the stream now lives while events keep coming (stream_idle_timeout_s apart), up to
        # its total bound; a resumed attempt runs under that bound too.
        call.deadline = scope.deadline = self._stream_end(call)
        state = call.stream = opened.state
        call.ttft_ms = round((self._clock() - call.started) * 1000, 3)
        self.metrics.ttft(*served.labels).observe(call.ttft_ms / 1000)
        model = _stream_model(state, served)
        opened.frames.insert(0, {"event": "start", "request_id": call.request_id, "model": served.target.model,
                                 "served_by": {"provider": served.target.provider, "model": served.target.model},
                                 "usage": state.usage_struct(), "upstream_request_id": opened.stream.request_id})
        try:
            await self._pump(call, opened, emit, model)
        except _StreamBroke as broke:
            remaining = targets[targets.index(served.target) + 1 :]
            resume = call.request.resume if call.request.resume is not None else call.route.resume
            if not (resume and remaining and state.text_only() and state.text()):
                raise PartialAnswer(broke.code, broke.message, state.text()) from None
            served, model = await self._resume(call, state, remaining, emit, broke)
        # Usage was charged attempt by attempt as each stream ended (see `_pump`).
        message = ApiMessage(
            id=str(state.message.get("id", "")),
            model=model,
            content=msgspec.Raw(_encoder.encode(state.content())),
            stop_reason=state.stop_reason,
            stop_sequence=state.stop_sequence,
        )
        reply = UpstreamReply(message, state.text(), opened.stream.request_id)
        return self._completion(call, reply, model, served, self._is_fallback(call, served))

    async def _call_stream(self, call: _Call, target: Target, body: dict[str, Any], timeout: float) -> _Opened:
        """Open a stream and read it up to its first token, so a slow start can still fail over."""
        stream = await self.upstream.open_stream(target, body, call.headers)
        state = StreamState(pings=call.pings)
        frames: list[dict[str, Any]] = []
        try:
            while not state.first_token:
                event = await stream.next_event()
                if event is None:
                    # Ended cleanly without a message_start: not a stream at all (a JSON answer, an empty body).
                    kind = upstream_errors.CONNECT if state.message else upstream_errors.MALFORMED
                    raise UpstreamError(kind, request_id=stream.request_id)
                frames += state.feed(*event)
        except MalformedEvent:
            await stream.aclose()
            raise UpstreamError(upstream_errors.MALFORMED, request_id=stream.request_id) from None
        except StreamError as err:
            await stream.aclose()
            raise UpstreamError(upstream_errors.STATUS, status=error_status(err.error_type), error_type=err.error_type,
                                message=err.message, request_id=stream.request_id) from None
        except BaseException:
            await stream.aclose()
            raise
        return _Opened(stream, state, frames)

    async def _pump(self, call: _Call, opened: _Opened, emit: Emit, model: str, splice: Continuation | None = None) -> None:
        """Relay an opened stream to the client until `message_stop`; raises `_StreamBroke` if it fails.

        However it ends, what the provider billed for it so far is charged at its own model's price."""
        idle = self.config.requests.stream_idle_timeout_s
        state = opened.state
        try:
            frames = opened.frames
            while True:
                for frame in splice.frames(frames) if splice is not None else frames:
                    await emit(frame)
                if state.finished:
                    break
                with trio.move_on_after(idle) as waited:
                    event = await opened.stream.next_event()
                if waited.cancelled_caught:
                    raise _StreamBroke("idle_timeout", Code.UPSTREAM_TIMEOUT, f"the stream stalled for {idle:g} s")
                if event is None:
                    raise _StreamBroke("incomplete", Code.UPSTREAM_ERROR, "the stream ended before the answer was complete")
                try:
                    frames = state.feed(*event)
                except MalformedEvent:
                    raise _StreamBroke("malformed", Code.UPSTREAM_ERROR, "the upstream sent an event that does not parse") from None
                except StreamError as err:
                    # The upstream's own error type decides the code: an overload mid-stream is `overloaded`.
                    failed = UpstreamError(upstream_errors.STATUS, status=error_status(err.error_type), error_type=err.error_type)
                    code = upstream_errors.to_sidecard_error(failed).code
                    raise _StreamBroke("error_event", code, f"the upstream failed mid-stream ({err.error_type})") from None
        except UpstreamError as err:
            self.metrics.stream_failures("reset").inc()
            reason = "connection lost" if err.kind == upstream_errors.CONNECT else err.outcome
            raise _StreamBroke("reset", Code.UPSTREAM_ERROR, f"the stream broke ({reason})") from None
        except _StreamBroke as broke:
            self.metrics.stream_failures(broke.reason).inc()
            raise
        finally:
            self._charge(call, state.billed_usage(), model)
            with trio.CancelScope(shield=True):
                await opened.stream.aclose()
            if opened.slot is not None:
                opened.slot.release(rtt_s=None)
        if splice is not None:
            splice.finish(state)

    async def _resume(
        self, call: _Call, state: StreamState, remaining: list[Target], emit: Emit, broke: _StreamBroke
    ) -> tuple[TargetHealth, str]:
        """Continue a broken text answer on the next targets, with what was said so far as a prefill."""
        splice = Continuation(state)
        body = {**call.body, "messages": [*call.body["messages"], Message("assistant", splice.prefill())]}
        try:
            opened, served = await self._route_walk(call, body, remaining, self._call_stream)
        except _Exhausted:
            raise PartialAnswer(broke.code, broke.message, state.text()) from None
        self.metrics.stream_resumes(*served.labels).inc()
        call.resumed = True
        model = _stream_model(opened.state, served)
        try:
            await self._pump(call, opened, emit, model, splice)
        except _StreamBroke as again:
            raise PartialAnswer(again.code, again.message, state.text()) from None
        return served, model

    async def _replay(self, call: _Call, completion: Completion, emit: Emit) -> Completion:
        """An answer that needed no upstream stream (cache, kill switch, static fallback), sent as a stream."""
        await emit({"event": "start", "request_id": call.request_id, "model": completion.model,
                    "served_by": msgspec.structs.asdict(completion.served_by), "usage": completion.usage,
                    "upstream_request_id": completion.upstream_request_id})
        for index, block in enumerate(_decoder.decode(completion.content)):
            if block.get("type") == "text":
                await emit({"event": "block", "index": index, "block": {"type": "text", "text": ""}})
                await emit({"event": "delta", "index": index, "type": "text", "text": block.get("text", "")})
            else:
                await emit({"event": "block", "index": index, "block": block})
        return completion

    # ------------------------------------------------------------------ token counting

    async def count_tokens(self, request: Complete) -> tuple[int, str]:
        """Input tokens of a request, from the API's count-tokens endpoint on the route's targets in order."""
        return await self._guarded(self._call(request), self._count)

    async def _count(self, call: _Call) -> tuple[int, str]:
        request = call.request
        self._set_deadline(call)
        self._plan(call)
        switch = self.kills.match(request.feature, call.version.name if call.version else None, call.started)
        if switch is not None:
            raise _disabled(switch)  # counting is still an upstream call: a kill switch stops it too
        body = {k: v for k, v in call.body.items() if k not in _NOT_COUNTED}
        assert call.route is not None
        with trio.CancelScope(deadline=call.deadline):
            for target in call.route.targets:
                started = self._clock()
                try:
                    tokens = await self.upstream.count_tokens(target, body, timeout_s=target.timeout_s, headers=call.headers)
                except UpstreamError as err:
                    call.last_error = err
                except Exception as exc:  # e.g. an SDK that cannot count for this provider: the next target may
                    call.last_error = self._unusable(call, target, exc)
                else:
                    call.attempts.append(Attempt(target.provider, target.model, "ok", round((self._clock() - started) * 1000, 3)))
                    return tokens, target.model
                err = call.last_error
                call.attempts.append(Attempt(target.provider, target.model, err.outcome, round((self._clock() - started) * 1000, 3)))
                if classify(err.status, err.should_retry) is Disposition.FAIL:
                    raise upstream_errors.to_sidecard_error(err)
        if call.last_error is None or self._clock() >= call.deadline:
            raise SidecardError(Code.DEADLINE_EXCEEDED, "the request's deadline passed before an answer")
        raise upstream_errors.to_sidecard_error(call.last_error)

    def _admit_traffic(self, call: _Call) -> None:
        """Rate limits and budgets, before anything reaches the upstream; a soft budget may switch the route."""
        if self.traffic is None:
            return
        estimated_usd = self._worst_cost_usd(call)
        user = pseudonym(call.request.user, self.user_salt) if call.request.user is not None else None
        call.admission = self.traffic.admit(
            feature=call.request.feature, route=call.route_name, user_key=user,
            estimated_tokens=call.estimated_tokens, estimated_usd=estimated_usd,
        )
        if call.admission.route is not None and call.admission.route != call.route_name:
            cheaper = self.routes.get(call.admission.route)
            if cheaper is not None:
                # The soft route replaces the whole route, a pinned model included (traffic.md says why).
                call.route_name, call.route = call.admission.route, cheaper
                if call.cache_key is not None:  # the answer comes from another model: store it under that one's key
                    call.cache_key = None
                    self._plan_cache(call, call.body.get("temperature"))

    def _worst_cost_usd(self, call: _Call) -> float:
        """The most this request can cost: its route's dearest target, or a target and its hedge at once."""
        assert call.route is not None
        max_tokens = call.body["max_tokens"]
        input_tokens = call.estimated_tokens - max_tokens
        costs = []
        for target in call.route.targets:
            price = self.prices.price(target.model)
            costs.append(0.0 if price is None else (input_tokens * price.input + max_tokens * price.output) / 1e6)
        worst = max(costs)
        for index, target in enumerate(call.route.targets[:-1]):
            if target.hedge_after_ms:
                worst = max(worst, costs[index] + costs[index + 1])
        return worst

    # ------------------------------------------------------------------ planning

    def _plan(self, call: _Call) -> None:
        """Render the prompt (if any), build the API body, pick the route, and decide cacheability."""
        request = call.request
        system = request.system
        messages: list[Message] = request.messages
        max_tokens, temperature, stop_sequences = request.max_tokens, request.temperature, request.stop_sequences
        if request.prompt is not None:
            if request.messages:
                raise SidecardError(Code.BAD_REQUEST, "messages: send either messages or a prompt, not both")
            if request.system is not None:
                raise SidecardError(Code.BAD_REQUEST, "system: a prompt brings its own system text")
            version, call.canary = self.prompts.resolve(request.prompt, version=request.version, sticky_key=request.user)
            call.version = version
            system, messages = version.render({k: _var_text(v) for k, v in request.vars.items()})
            max_tokens = max_tokens or version.max_tokens
            temperature = temperature if temperature is not None else version.temperature
            stop_sequences = stop_sequences if stop_sequences is not None else version.stop_sequences
        elif not request.messages:
            raise SidecardError(Code.BAD_REQUEST, "messages: at least one message is required")
        body: dict[str, Any] = {
            "max_tokens": max_tokens or self.config.requests.default_max_tokens,
            "messages": messages,
        }
        if system is not None:
            body["system"] = system
        if temperature is not None:
            body["temperature"] = temperature
        if stop_sequences is not None:
            body["stop_sequences"] = stop_sequences
        if request.metadata is not None:
            body["metadata"] = request.metadata
        if request.passthrough:
            body.update(request.passthrough)
        call.body = body
        if request.betas:
            call.headers["anthropic-beta"] = ",".join(request.betas)
        call.first_text = _first_text(messages)
        call.estimated_tokens = _estimate_input_tokens(system, messages, request.passthrough) + body["max_tokens"]
        call.route_name, call.route = self._route(request, call.version)
        self._plan_cache(call, temperature)

    def _route(self, request: Complete, version: PromptVersion | None) -> tuple[str, Route]:
        name = (
            request.route
            or (self.route_for_prompt(version.name) if version is not None and self.route_for_prompt is not None else None)
            or (version.route if version is not None else None)
            or self.config.requests.default_route
        )
        route = self.routes.get(name)
        if route is None:
            raise SidecardError(Code.BAD_REQUEST, f"route: no route named {name!r}")
        if request.model:
            # A named model leads. The route's other targets stay behind it as fallbacks, unless the request or the
            # route wants that model alone (its other providers' targets for the same model id still count).
            fallback = request.model_fallback if request.model_fallback is not None else route.model_fallback
            lead = msgspec.structs.replace(route.targets[0], model=request.model)
            rest = [
                t for t in route.targets
                if (t.provider, t.model) != (lead.provider, lead.model) and (fallback or t.model == request.model)
            ]
            if [lead, *rest] != route.targets:
                route = msgspec.structs.replace(route, targets=[lead, *rest])
        return name, route

    def _plan_cache(self, call: _Call, temperature: float | None) -> None:
        request, route = call.request, call.route
        assert route is not None
        if self.cache is None or request.cache == "bypass":
            call.cache_result = "bypass"
            return
        feature = self.config.features.get(request.feature)
        any_temperature = route.cache_any_temperature or (feature is not None and feature.cache_any_temperature)
        # No temperature means the API's default of 1.0: a fresh sample each time, so not an answer to keep.
        deterministic = temperature == 0.0
        if not deterministic and not any_temperature:
            call.cache_result = "bypass"
            return
        ttls = (
            call.version.cache_ttl_s if call.version is not None else None,
            feature.cache_ttl_s if feature is not None else None,
            route.cache_ttl_s,
        )
        call.cache_ttl_s = next((t for t in ttls if t is not None), self.config.cache.ttl_s)
        if call.cache_ttl_s <= 0:
            call.cache_result = "bypass"
            return
        parts = {k: v for k, v in call.body.items() if k != "metadata"}
        parts["model"] = route.targets[0].model
        if call.headers:
            parts["headers"] = call.headers  # a beta feature changes the answer
        if call.version is not None:
            parts["prompt"] = [call.version.name, call.version.version, call.version.digest]
        call.cache_key = cache_key(parts)

    # ------------------------------------------------------------------ answering

    async def _coalesced(self, call: _Call) -> Completion:
        """Identical cacheable requests in flight share the leader's upstream call."""
        assert call.cache_key is not None
        while True:
            leader, flight = self.flights.lead_or_follow(call.cache_key)
            if leader:
                try:
                    completion = await self._answer(call)
                except SidecardError as err:
                    self.flights.land(call.cache_key, flight, error=err)
                    raise
                except BaseException:
                    self.flights.land(call.cache_key, flight)  # cancelled: a follower takes over
                    raise
                self.flights.land(call.cache_key, flight, answer=completion)
                return completion
            await flight.done.wait()
            if flight.error is not None:
                raise flight.error
            if flight.answer is not None:
                call.cache_result = "coalesced"
                return self._shared(call, flight.answer)

    async def _answer(self, call: _Call) -> Completion:
        completion = await self._walk(call, call.body)
        if call.version is not None and not completion.degraded:
            completion = await self._checked_output(call, completion)
        if call.cache_key is not None and not completion.degraded and not completion.fallback:
            self._store(call, completion)
        return completion

    async def _checked_output(self, call: _Call, completion: Completion) -> Completion:
        """An answer that breaks the prompt's declared format gets one corrective retry, then `bad_output`."""
        problem = self._format_problem(call, completion)
        if problem is None:
            return completion
        corrected = {
            **call.body,
            "messages": [
                *call.body["messages"],
                Message("assistant", completion.text.strip() or "(empty answer)"),
                Message("user", corrective_instruction(problem)),
            ],
        }
        second = await self._walk(call, corrected)
        if second.degraded:
            return second
        problem = self._format_problem(call, second)
        if problem is not None:
            raise SidecardError(Code.BAD_OUTPUT, f"the answer did not match the prompt's output format twice: {problem}")
        return second

    def _format_problem(self, call: _Call, completion: Completion) -> str | None:
        """Why the answer breaks the prompt's declared output format (counted, and kept for the quality signal)."""
        version = call.version
        assert version is not None
        problem = output_problem(completion.text, version.output)
        if problem is not None:
            call.output_problem, call.rejected = problem, completion
            self.metrics.prompt_bad_outputs(version.name, str(version.version)).inc()
        return problem

    # ------------------------------------------------------------------ the route walk

    async def _walk(self, call: _Call, body: dict[str, Any]) -> Completion:
        assert call.route is not None
        try:
            reply, served = await self._route_walk(call, body, call.route.targets, self._call_create)
        except _Exhausted:
            degraded = self._degraded(call)
            if degraded is None:
                raise _exhausted(call, self._clock()) from None
            return degraded
        model = reply.message.model or served.target.model
        self._charge(call, reply.message.usage, model)
        return self._completion(call, reply, model, served, self._is_fallback(call, served))

    def _is_fallback(self, call: _Call, served: TargetHealth) -> bool:
        assert call.route is not None
        lead = call.route.targets[0]
        fallback = (served.target.provider, served.target.model) != (lead.provider, lead.model)
        if fallback:
            self.metrics.fallbacks(call.route_name, *served.labels).inc()
        return fallback

    async def _call_create(self, call: _Call, target: Target, body: dict[str, Any], timeout: float) -> UpstreamReply:
        return await self.upstream.create(target, body, timeout_s=timeout, headers=call.headers)

    async def _route_walk(
        self, call: _Call, body: dict[str, Any], targets: list[Target], call_upstream: _Upstream[_R]
    ) -> tuple[_R, TargetHealth]:
        """Targets in order, each with retries under the budget and deadline; raises `_Exhausted`."""
        for index, target in enumerate(targets):
            health = self.health(target, internal=call.internal)
            retry = Retry(max_attempts=1 if call.internal else target.max_attempts, backoff=self.backoff)
            while True:
                if not self._admit(health, call):
                    break
                if retry.attempts:
                    self.metrics.retries(*health.labels).inc()
                retry = retry.started()
                hedges = target.hedge_after_ms and index + 1 < len(targets) and not call.internal
                partner = self.health(targets[index + 1]) if hedges else None
                try:
                    if partner is None:
                        return await self._attempt(health, body, call, call_upstream), health
                    return await self._hedged(health, partner, body, call, call_upstream)
                except Overloaded as refused:
                    call.refused = refused  # this target is full: the next one may have room
                    break
                except UpstreamError as err:
                    disposition = classify(err.status, err.should_retry)
                    if disposition is Disposition.FAIL:
                        raise upstream_errors.to_sidecard_error(err) from None
                    if disposition is Disposition.FAILOVER:
                        break
                    if err.kind == upstream_errors.TIMEOUT and call.request.stream and not target.ttft_retry:
                        break  # slow to its first token: another try would be as slow, the next target may not
                    now = self._clock()
                    delay = retry.delay_before_retry(
                        retry_after_s=err.retry_after_s, remaining_s=call.deadline - now, rng=self._rng
                    )
                    if delay is None:
                        break
                    if not self.budget.try_withdraw(now):
                        self.metrics.budget_refusals(*health.labels).inc()
                        break
                    await trio.sleep(delay)
        raise _Exhausted

    def _admit(self, health: TargetHealth, call: _Call) -> bool:
        now = self._clock()
        allowed, transition = health.breaker.allow(now)
        if transition is not None:
            self._breaker_moved(health, transition)
        if not allowed:
            wait = health.breaker.retry_after(now)
            call.breaker_wait_s = wait if call.breaker_wait_s is None else min(call.breaker_wait_s, wait)
            call.causes[_key(health.target)] = health.refusal or SidecardError(
                Code.UPSTREAM_UNAVAILABLE, f"{health.name}: circuit breaker open", retry_after_ms=max(1, math.ceil(wait * 1000))
            )
            call.attempts.append(Attempt(health.target.provider, health.target.model, "breaker_open", 0.0))
            self.metrics.attempts(*health.labels, "breaker_open").inc()
        return allowed

    async def _attempt(
        self, health: TargetHealth, body: dict[str, Any], call: _Call, call_upstream: _Upstream[_R]
    ) -> _R:
        """One call to one target, whose breaker has already admitted it.

        A streamed attempt is limited by the target's time-to-first-token timeout instead of its total one:
        it succeeds once the first token arrives, and what follows is the stream's own business.
        """
        target = health.target
        if self._clock() >= call.deadline:
            # The deadline passed before this attempt could start (a pipelined request with a tiny deadline): no
            # call and no verdict. The request's deadline scope ends it here; were it not ours to see, fail over.
            health.breaker.release()
            await trio.lowlevel.checkpoint()
            raise UpstreamError(upstream_errors.DEADLINE, should_retry=False)
        slot = None
        if self.traffic is not None:
            try:
                slot = await self.traffic.acquire(target, priority=call.request.priority, deadline=call.deadline)
            except Overloaded as refused:
                health.breaker.release()
                call.causes[_key(target)] = _refusal_cause(health, refused)
                call.attempts.append(Attempt(target.provider, target.model, f"overloaded:{refused.reason}", 0.0))
                self.metrics.attempts(*health.labels, "overloaded").inc()
                raise
            except BaseException:  # cancelled in the queue: a half-open breaker's probe must not stay out forever
                health.breaker.release()
                raise
        started = self._clock()
        limit = (target.ttft_timeout_s or target.timeout_s) if call.request.stream else target.timeout_s
        timeout = max(0.0, min(limit, call.deadline - started))
        # An attempt cut short by the request's deadline says nothing about the target: no breaker verdict.
        timeout_kind = upstream_errors.DEADLINE if timeout < limit else upstream_errors.TIMEOUT
        outcome = "cancelled"
        verdict: bool | None = None  # for the breaker: True success, False failure, None no verdict
        result = None
        try:
            with trio.move_on_after(timeout):
                try:
                    result = await call_upstream(call, target, body, timeout)
                except UpstreamError:
                    raise
                except Exception as exc:  # the target could not be built or called: its failure, not the request's
                    raise self._unusable(call, target, exc) from None
                outcome, verdict = "ok", True
                health.refusal = None
                if self.traffic is not None:
                    headers = result.stream.rate_limits if isinstance(result, _Opened) else getattr(result, "rate_limits", None)
                    self.traffic.observe(target, headers, retry_after_s=None, status=200)
                return result
            raise UpstreamError(timeout_kind, should_retry=False if timeout_kind == upstream_errors.DEADLINE else None)
        except UpstreamError as err:
            outcome = err.outcome
            call.last_error = err
            cause = upstream_errors.to_sidecard_error(err, health.name)
            call.causes[_key(target)] = cause
            health.refusal = cause if cause.code in _TARGET_REFUSALS else None
            # A 429 says the account is over its rate, not that the target is unwell: throttling waits it out
            # (below), and counting it would open the breaker exactly when the provider asks for patience.
            caller_error = classify(err.status, err.should_retry) is Disposition.FAIL
            no_verdict = caller_error or err.status == 429 or err.kind == upstream_errors.DEADLINE
            verdict = None if no_verdict else False
            if err.status in (401, 403):
                self._breaker_moved(health, health.breaker.force_open(self._clock()))
            if self.traffic is not None and err.status == 429:
                self.traffic.observe(target, None, retry_after_s=err.retry_after_s, status=429)
            raise
        finally:
            now = self._clock()
            if slot is not None:
                dropped = outcome in ("429", "529", "timeout")
                if isinstance(result, _Opened) and outcome == "ok":
                    result.slot = slot  # a stream holds its slot until it ends
                else:
                    slot.release(rtt_s=None if outcome == "cancelled" else now - started, dropped=dropped)
            if verdict is None:
                health.breaker.release()
            else:
                self._breaker_moved(health, health.breaker.record(now, success=verdict))
            latency = now - started
            call.attempts.append(Attempt(target.provider, target.model, outcome, round(latency * 1000, 3)))
            self.metrics.attempts(*health.labels, outcome).inc()
            if outcome != "cancelled":
                self.metrics.upstream_seconds(*health.labels).observe(latency)

    async def _hedged(
        self,
        primary: TargetHealth,
        partner: TargetHealth,
        body: dict[str, Any],
        call: _Call,
        call_upstream: _Upstream[_R],
    ) -> tuple[_R, TargetHealth]:
        """Race the primary against the next target, started if the primary is slower than its hedge delay.

        The first success wins and the other attempt is cancelled (its connection is closed, not reused).
        If no attempt succeeds, the primary's failure is raised for the walk to handle.
        """
        winner: list[tuple[_R, TargetHealth]] = []
        primary_error: list[UpstreamError | Overloaded] = []
        primary_done = trio.Event()
        hedge_started = False

        async with trio.open_nursery() as race:

            async def run(health: TargetHealth, is_hedge: bool) -> None:
                try:
                    reply = await self._attempt(health, body, call, call_upstream)
                except (UpstreamError, Overloaded) as err:
                    if not is_hedge:
                        primary_error.append(err)
                    return
                finally:
                    if not is_hedge:
                        primary_done.set()
                winner.append((reply, health))
                race.cancel_scope.cancel()

            race.start_soon(run, primary, False)
            with trio.move_on_after(primary.target.hedge_after_ms / 1000):  # type: ignore[operator]
                await primary_done.wait()
            if not primary_done.is_set() and self._admit(partner, call):
                if self.budget.try_withdraw(self._clock()):
                    hedge_started = True
                    race.start_soon(run, partner, True)
                else:
                    partner.breaker.release()
                    self.metrics.budget_refusals(*partner.labels).inc()
        for loser, health in winner[1:]:  # both finished in the same instant: an open stream must not leak
            if isinstance(loser, _Opened):
                self._charge(call, loser.state.billed_usage(), _stream_model(loser.state, health))
                with trio.CancelScope(shield=True):
                    await loser.stream.aclose()
                if loser.slot is not None:
                    loser.slot.release(rtt_s=None)
        if winner:
            reply, served = winner[0]
            if hedge_started:
                self.metrics.hedges(*partner.labels, "won" if served is partner else "lost").inc()
            return reply, served
        raise primary_error[0]

    def _unusable(self, call: _Call, target: Target, exc: Exception) -> UpstreamError:
        """A target sidecard could not build or call (an SDK that refuses its settings, a missing credential):
        logged with what went wrong, and failed over like any failed target."""
        self.log.error(
            "target_unusable", request_id=call.request_id, target=f"{target.provider}:{target.model}",
            exception=type(exc).__name__, message=self.log.redactor.redact(str(exc))[:300],
        )
        return UpstreamError(upstream_errors.UNUSABLE, should_retry=False)

    def _internal(self, call: _Call, exc: Exception) -> SidecardError:
        """A bug: the client gets a typed error naming the request, the log gets what happened."""
        self.log.internal_error("engine", exc, call.request.id, request_id=call.request_id)
        return SidecardError(Code.INTERNAL, f"internal error (request {call.request_id}; the daemon's log has the details)")

    def _breaker_moved(self, health: TargetHealth, state: State | None) -> None:
        if state is None:
            return
        if not health.shared:  # the judge's own breaker: not the one the metrics (and operators) watch
            self.log.info("breaker", target=health.name, state=state.name.lower(), internal=True)
            return
        self.metrics.breaker_state(*health.labels).set(state.value)
        self.metrics.breaker_transitions(*health.labels, state.name.lower()).inc()
        self.log.warning("breaker", target=health.name, state=state.name.lower())

    # ------------------------------------------------------------------ answers

    def _charge(self, call: _Call, usage: Usage, model: str) -> None:
        """Every upstream answer is paid for at its own model's price: retried, resumed and broken ones too."""
        cost = self.prices.cost(model, usage)
        call.usage.add(usage)
        call.cost_usd += cost
        call.spent_on = model
        feature, metrics = call.request.feature, self.metrics
        metrics.tokens(feature, model, "input").inc(usage.input_tokens)
        metrics.tokens(feature, model, "output").inc(usage.output_tokens)
        if usage.cache_read_input_tokens:
            metrics.tokens(feature, model, "cache_read").inc(usage.cache_read_input_tokens)
        if usage.cache_creation_input_tokens:
            metrics.tokens(feature, model, "cache_write").inc(usage.cache_creation_input_tokens)
        if cost:
            metrics.cost(feature, model).inc(cost)

    def _completion(self, call: _Call, reply: UpstreamReply, model: str, served: TargetHealth, fallback: bool) -> Completion:
        message = reply.message
        return Completion(
            id=call.request.id,
            text=reply.text,
            content=message.content,
            model=model,
            usage=msgspec.structs.replace(call.usage),
            stop_reason=message.stop_reason,
            stop_sequence=message.stop_sequence,
            latency_ms=0.0,  # set in _account, once the request is over
            cost_usd=call.cost_usd,
            upstream_request_id=reply.request_id,
            request_id=call.request_id,
            served_by=ServedBy(served.target.provider, served.target.model),
            attempts=call.upstream_attempts,
            fallback=fallback,
            **self._prompt_fields(call),
        )

    def _from_cache(self, call: _Call, answer: CachedAnswer, *, stale: bool) -> Completion:
        return Completion(
            id=call.request.id,
            text=answer.text,
            content=msgspec.Raw(answer.content),
            model=answer.model,
            usage=answer.usage,
            stop_reason=answer.stop_reason,
            stop_sequence=answer.stop_sequence,
            latency_ms=0.0,
            cost_usd=0.0,
            upstream_request_id=answer.upstream_request_id,
            request_id=call.request_id,
            served_by=answer.served_by,
            attempts=call.upstream_attempts,
            degraded=stale,
            cached=True,
            stale=stale,
            **self._prompt_fields(call),
        )

    def _shared(self, call: _Call, leader: Completion) -> Completion:
        """A follower's copy of its leader's answer: nothing was spent on its behalf."""
        return msgspec.structs.replace(
            leader, id=call.request.id, request_id=call.request_id, cost_usd=0.0, attempts=0, cached=not leader.degraded
        )

    def _store(self, call: _Call, completion: Completion) -> None:
        assert self.cache is not None and call.cache_key is not None
        answer = CachedAnswer(
            completion.text,
            bytes(completion.content),
            completion.model,
            completion.usage,
            completion.stop_reason,
            completion.stop_sequence,
            completion.served_by,
            completion.upstream_request_id,
        )
        now = self._clock()
        entry = Entry(
            pack(answer),
            now,
            now + call.cache_ttl_s,
            now + call.cache_ttl_s + self.config.cache.stale_ttl_s,
            (call.request.feature, call.version.name if call.version else None),
        )
        evictions = self.cache.evictions
        if self.cache.put(call.cache_key, entry):
            if self.on_cache_store is not None:
                self.on_cache_store(call.cache_key, entry)
        self.metrics.cache_evictions.inc(self.cache.evictions - evictions)
        self.metrics.cache_entries.set(len(self.cache))
        self.metrics.cache_bytes.set(self.cache.bytes)

    def _degraded(self, call: _Call) -> Completion | None:
        """When every target failed: a stale cached answer, else the static fallback, else None."""
        if call.cache_key is not None and self.cache is not None:
            hit = self.cache.get(call.cache_key, self._clock(), allow_stale=True)
            if hit is not None:
                call.cache_result = "stale"
                self.metrics.degraded(call.route_name, "stale").inc()
                return self._from_cache(call, hit.answer, stale=True)
        feature = self.config.features.get(call.request.feature)
        text = feature.static_fallback if feature and feature.static_fallback is not None else None
        if text is None and call.route is not None:
            text = call.route.static_fallback
        if text is None:
            return None
        self.metrics.degraded(call.route_name, "static").inc()
        return self._static(call, text)

    def _killed(self, call: _Call, switch: KillSwitch) -> Completion:
        """No upstream call for a request in a killed scope: the switch's error, static text or cached answer."""
        self.metrics.killed(switch.scope, switch.mode).inc()
        call.killed_by = switch.scope
        if switch.mode == "cached" and call.cache_key is not None and self.cache is not None:
            hit = self.cache.get(call.cache_key, call.started, allow_stale=True)
            if hit is not None:
                call.cache_result = "stale" if hit.stale else "hit"
                completion = self._from_cache(call, hit.answer, stale=hit.stale)
                completion.degraded = True
                return completion
        if switch.mode != "error" and switch.text is not None:
            return self._static(call, switch.text)
        raise _disabled(switch)

    def _static(self, call: _Call, text: str) -> Completion:
        request = call.request
        return Completion(
            id=request.id,
            text=text,
            content=msgspec.Raw(_encoder.encode([{"type": "text", "text": text}])),
            model="static_fallback",
            usage=Usage(),
            stop_reason="end_turn",
            latency_ms=0.0,
            cost_usd=call.cost_usd,
            upstream_request_id=None,
            request_id=call.request_id,
            served_by=ServedBy("sidecard", "static_fallback"),
            attempts=call.upstream_attempts,
            fallback=True,
            degraded=True,
            **self._prompt_fields(call),
        )

    def _sample(self, call: _Call, completion: Completion) -> Sample:
        """What the quality pipeline needs of a fresh answer (in the background, never on this path)."""
        request, version = call.request, call.version
        system = call.body.get("system")
        if isinstance(system, list):
            system = "\n".join(b.get("text", "") for b in system if isinstance(b, dict))
        prompt = version.name if version is not None else None
        scope = self.config.quality.scope_for(prompt, request.feature)
        return Sample(
            feature=request.feature, model=completion.model, prompt=prompt,
            version=version.version if version is not None else None, canary=call.canary,
            question=_last_user_text(call.body["messages"]), system=system, answer=completion.text,
            stop_reason=completion.stop_reason, output_problem=call.output_problem,
            language=scope.language if scope is not None else None,
        )

    @staticmethod
    def _prompt_fields(call: _Call) -> dict[str, Any]:
        if call.version is None:
            return {}
        return {"prompt": call.version.name, "prompt_version": call.version.version}

    # ------------------------------------------------------------------ accounting

    def _account(self, call: _Call, completion: Completion | None, error: SidecardError | None) -> None:
        request = call.request
        if call.admission is not None and self.traffic is not None:
            used = call.usage.input_tokens + call.usage.output_tokens + call.usage.cache_creation_input_tokens
            self.traffic.settle(call.admission, cost_usd=call.cost_usd, tokens_used=used)
        elapsed = self._clock() - call.started
        latency_ms = round(elapsed * 1000, 3)
        feature = request.feature
        metrics = self.metrics
        if call.cache_result is not None:
            metrics.cache_requests(call.cache_result).inc()
        # A fresh answer is checked in the background; so is one that ended in `bad_output` (a bad_format signal).
        answer = completion if completion is not None else call.rejected
        if self.quality_sink is not None and call.spent_on is not None and answer is not None and not answer.degraded:
            self.quality_sink(self._sample(call, answer))
        fields: dict[str, Any] = {"request_id": call.request_id, "feature": feature}
        if completion is not None:
            completion.latency_ms = latency_ms
            completion.ttft_ms = call.ttft_ms
            completion.resumed = call.resumed
            model = completion.model
            outcome = "degraded" if completion.degraded else "ok"
            fields.update(
                upstream_request_id=completion.upstream_request_id,
                model=model,
                served_by=f"{completion.served_by.provider}:{completion.served_by.model}",
                fallback=completion.fallback,
                stop_reason=completion.stop_reason,
            )
        else:
            model = call.attempts[-1].model if call.attempts else (request.model or "none")
            outcome = error.code if error is not None else Code.INTERNAL
            fields["model"] = model
            if call.last_error is not None and call.last_error.request_id:
                fields["upstream_request_id"] = call.last_error.request_id
        metrics.requests(outcome, model, feature).inc()
        metrics.request_seconds(feature).observe(elapsed)
        version = call.version
        if version is not None:
            labels = (version.name, str(version.version))
            metrics.prompt_requests(*labels, outcome).inc()
            metrics.prompt_seconds(*labels).observe(elapsed)
        if not self.log.enabled("info"):
            return
        fields.update(
            outcome=outcome,
            latency_ms=latency_ms,
            input_tokens=call.usage.input_tokens,
            output_tokens=call.usage.output_tokens,
            cost_usd=round(call.cost_usd, 8),
            route=call.route_name or None,
            cache=call.cache_result,
            attempts=[msgspec.structs.asdict(a) for a in call.attempts],
        )
        if call.internal:
            fields["internal"] = True  # sidecard's own call: feature, prompt and version say which
        if not call.internal and (version is None or version.name != JUDGE_PROMPT):
            # A judge's prompt quotes the answer under review, and answers are never logged.
            fields["prompt_prefix"] = self.log.redactor.prefix(call.first_text, self.config.log.prompt_prefix_chars)
        if version is not None:
            fields.update(prompt=version.name, prompt_version=version.version, canary=call.canary)
        if call.killed_by is not None:
            fields["killed_by"] = call.killed_by
        if request.stream:
            fields.update(stream=True, ttft_ms=call.ttft_ms, resumed=call.resumed)
        if request.user is not None:
            fields["user"] = pseudonym(request.user, self.user_salt)
        self.log.info("request", **fields)

    def _account_count(self, call: _Call, result: tuple[int, str] | None, error: SidecardError | None) -> None:
        """The log line of a count_tokens request: no answer, no spend, no request metrics."""
        if not self.log.enabled("info"):
            return
        outcome = "ok" if result is not None else error.code if error is not None else Code.INTERNAL
        model = result[1] if result is not None else call.attempts[-1].model if call.attempts else call.request.model
        self.log.info(
            "request", request_id=call.request_id, op="count_tokens", feature=call.request.feature, model=model,
            outcome=outcome, latency_ms=round((self._clock() - call.started) * 1000, 3), route=call.route_name or None,
            input_tokens=result[0] if result is not None else None, attempts=[msgspec.structs.asdict(a) for a in call.attempts],
        )


def _disabled(switch: KillSwitch) -> SidecardError:
    reason = f": {switch.reason}" if switch.reason else ""
    return SidecardError(Code.AI_DISABLED, f"AI is switched off for {switch.scope}{reason}", retryable=False)


def _stream_model(state: StreamState, served: TargetHealth) -> str:
    return str(state.message.get("model") or served.target.model)


def _key(target: Target) -> tuple[str, str, str | None]:
    return (target.provider, target.model, target.base_url)


# Refusals about the target itself: every request through it gets the same answer until an operator acts.
_TARGET_REFUSALS: Final = frozenset({Code.UPSTREAM_AUTH, Code.UPSTREAM_FORBIDDEN, Code.MODEL_NOT_FOUND})


def _refusal_cause(health: TargetHealth, refused: Overloaded) -> SidecardError:
    """A target turned away locally: paused by the provider's rate limit, or sidecard's own queue full."""
    retry_after_ms = max(1, math.ceil(refused.retry_after_s * 1000)) if math.isfinite(refused.retry_after_s) else 1000
    if refused.reason == "paused":
        return SidecardError(Code.RATE_LIMITED, f"{health.name}: held by the provider's rate limit", retry_after_ms=retry_after_ms)
    return SidecardError(Code.OVERLOADED, f"sidecard is at capacity for this route ({refused.reason})", retry_after_ms=retry_after_ms)


def _exhausted(call: _Call, now: float) -> SidecardError:
    """The error for a walk in which every target failed: the most decisive cause, not always an outage.

    When every target refused the request itself (credentials, permissions, model id), that refusal, which no
    retry can cure; when every target is rate-limited, `rate_limited`; when only sidecard's own queues turned it
    away, `overloaded`; else `upstream_unavailable`. The retryable ones carry the shortest wait a target asked for.
    """
    causes = list(call.causes.values())
    if causes and not any(cause.retryable for cause in causes):
        return causes[-1]
    if now >= call.deadline:
        return SidecardError(Code.DEADLINE_EXCEEDED, "the request's deadline passed before an answer")
    waits = [cause.retry_after_ms for cause in causes if cause.retry_after_ms]
    retry_after_ms = min(waits) if waits else 1000
    if causes and all(cause.code == Code.RATE_LIMITED for cause in causes):
        return SidecardError(Code.RATE_LIMITED, f"every target is rate-limited (last: {causes[-1].message})", retry_after_ms=retry_after_ms)
    if call.refused is not None and call.last_error is None:
        return SidecardError(Code.OVERLOADED, f"sidecard is at capacity for this route ({call.refused.reason})", retry_after_ms=retry_after_ms)
    last = call.attempts[-1] if call.last_error is not None else None
    cause = f"last: {last.provider}:{last.model} {last.outcome}" if last else "every target's circuit breaker is open"
    return SidecardError(Code.UPSTREAM_UNAVAILABLE, f"every target failed ({cause})", retry_after_ms=retry_after_ms)


_IMAGE_TOKENS: Final = 1600  # what the API charges for a typical image; a binary document is counted the same


def _estimate_input_tokens(system: Any, messages: list[Message], passthrough: dict[str, msgspec.Raw]) -> float:
    """About four characters a token: good enough to bound a request before the API counts it.

    Tool definitions and the other passed-through fields count at their JSON size."""
    chars, blocks = _content_size(system)
    for message in messages:
        more_chars, more_blocks = _content_size(message.content)
        chars += more_chars
        blocks += more_blocks
    chars += sum(len(raw) for raw in passthrough.values())
    return chars / 4 + blocks * _IMAGE_TOKENS


def _content_size(content: Any) -> tuple[int, int]:
    """(characters, images and binary documents) of a string or a list of content blocks."""
    if isinstance(content, str):
        return len(content), 0
    if not isinstance(content, list):  # malformed: the API's 400 says so, not an internal error here
        return 0, 0
    chars = blocks = 0
    for block in content:
        if not isinstance(block, dict):
            continue
        text = block.get("text")
        kind = block.get("type")
        if isinstance(text, str):
            chars += len(text)
            continue
        if kind == "image":
            blocks += 1
            continue
        if kind == "document":
            source = block.get("source")
            source = source if isinstance(source, dict) else {}
            if source.get("type") == "text":
                chars += len(str(source.get("data", "")))
            elif source.get("type") == "content":
                more_chars, more_blocks = _content_size(source.get("content"))
                chars += more_chars
                blocks += more_blocks
            else:
                blocks += 1  # a PDF, inline or by URL
            continue
        if kind == "tool_result":
            more_chars, more_blocks = _content_size(block.get("content"))
            chars += more_chars + len(str(block.get("tool_use_id", "")))
            blocks += more_blocks
            continue
        chars += len(_encoder.encode(block))  # tool calls, server tool results, future blocks: their JSON
    return chars, blocks


def _var_text(value: str | int | float | bool) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return value if isinstance(value, str) else str(value)


def _last_user_text(messages: list[Message]) -> str:
    for message in reversed(messages):
        if message.role != "user":
            continue
        if isinstance(message.content, str):
            return message.content
        return "\n".join(b["text"] for b in message.content if b.get("type") == "text" and isinstance(b.get("text"), str))
    return ""


def _first_text(messages: list[Message]) -> str:
    for message in messages:
        if isinstance(message.content, str):
            return message.content
        for block in message.content:
            if block.get("type") == "text" and isinstance(block.get("text"), str):
                return block["text"]
    return ""
