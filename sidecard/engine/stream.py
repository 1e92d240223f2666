"""Streamed answers: the walk up to a first token, the relay after it, and resuming a broken stream elsewhere.

Failures before the first token are retried and failed over like any request (`StreamLeg` reads a stream up to
its first token inside the attempt, so a slow start can still fail over). After it, the stream lives while events
keep coming (`stream_idle_timeout_s` apart), up to `stream_max_duration_s`; a failure then raises `PartialAnswer`,
or, with `resume`, continues the text on the route's next targets with what was said as a prefill, for the
`max_tokens` the answer has left. An answer that needed no upstream stream (cache, kill switch, static fallback) is
replayed as one.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, Final

import msgspec
import trio

from ..config import Config, Target
from ..errors import Code, SidecardError
from ..observe.metrics import Metrics
from ..protocol import Completion, Message, ServedBy
from ..streaming import (
    BlockStart,
    Continuation,
    Delta,
    MalformedEvent,
    StreamError,
    StreamEvent,
    StreamPing,
    StreamStart,
    StreamState,
    error_status,
    replayed,
)
from ..upstream import errors as upstream_errors
from ..upstream.client import ApiMessage, Upstream, UpstreamReply, UpstreamStream
from ..upstream.errors import UpstreamError
from .account import Accounting
from .answers import Answers
from .types import Emit, Exhausted, PartialAnswer, Plan, Trace
from .walk import RouteWalker, TargetHealth, Won

_encoder: Final = msgspec.json.Encoder()
MIN_STREAM_IDLE_S: Final = 1.0  # the shortest stall limit a client's `stream_idle_ms` sets
_decoder: Final = msgspec.json.Decoder()
Finish = Callable[[Completion], Awaitable[Completion]]


class Opened(msgspec.Struct):
    """A stream that has delivered its first token, with the events produced so far."""

    stream: UpstreamStream
    state: StreamState
    events: list[StreamEvent]


class StreamLeg:
    """An attempt that opens a stream and reads it up to its first token."""

    def __init__(self, upstream: Upstream, accounting: Accounting, trace: Trace, *, pings: bool) -> None:
        self.upstream = upstream
        self.accounting = accounting
        self.trace = trace
        self.pings = pings  # relay the API's `ping` events

    async def call(self, plan: Plan, target: Target, body: dict[str, Any], timeout: float) -> Opened:
        stream = await self.upstream.open_stream(target, body, timeout_s=timeout, headers=plan.headers)
        state = StreamState(pings=self.pings)
        events: list[StreamEvent] = []
        try:
            while not state.first_token:
                event = await stream.next_event()
                if event is None:
                    # Ended cleanly without a message_start: not a stream at all (a JSON answer, an empty body).
                    kind = upstream_errors.CONNECT if state.message else upstream_errors.MALFORMED
                    raise UpstreamError(kind, request_id=stream.request_id)
                events += state.feed(*event)
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
        return Opened(stream, state, events)

    def rate_limits(self, result: Opened) -> dict[str, str] | None:
        return result.stream.rate_limits

    async def discard(self, won: Won[Opened]) -> None:
        await self.close(won)

    async def close(self, won: Won[Opened]) -> None:
        """However a stream ends: what the provider billed so far is paid, the stream closed, its slot given back."""
        opened = won.value
        self.accounting.charge(self.trace, opened.state.billed_usage(), _model(opened.state, won.served))
        with trio.CancelScope(shield=True):
            await opened.stream.aclose()
        won.release(measured=False)


class _Broke(Exception):
    """The relayed stream failed: `reason` labels the metric, `code` and `message` go to the client."""

    def __init__(self, reason: str, code: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.code = code
        self.message = message


class Streams:
    def __init__(
        self, config: Config, *, upstream: Upstream, walker: RouteWalker, answers: Answers, accounting: Accounting,
        metrics: Metrics, clock: Callable[[], float],
    ) -> None:
        self.config = config
        self.upstream = upstream
        self.walker = walker
        self.answers = answers
        self.accounting = accounting
        self.metrics = metrics
        self.clock = clock

    async def run(self, trace: Trace, emit: Emit, *, pings: bool, finish: Finish | None = None) -> Completion:
        """Relay a planned, admitted request's stream through `emit`; returns the assembled answer. `finish`: run on
        the answer once the stream has ended, before it is checked or cached (the safety filter's last word)."""
        return await _Relay(self, trace, emit, pings, finish).run()

    async def replay(self, trace: Trace, completion: Completion, emit: Emit) -> Completion:
        """An answer that needed no upstream stream (cache, kill switch, static fallback), sent as a stream."""
        start, ending = replayed(completion.extra or None)
        await emit(StreamStart(trace.request_id, completion.model, completion.served_by, completion.usage,
                               completion.upstream_request_id, start))
        for index, block in enumerate(_decoder.decode(completion.content)):
            if block.get("type") == "text":
                await emit(BlockStart(index, {"type": "text", "text": ""}))
                await emit(Delta(index, "text", "text", block.get("text", "")))
            else:
                await emit(BlockStart(index, block))
        if ending is not None:
            await emit(ending)
        return completion


class _Relay:
    """One streamed request, from its walk to its last frame."""

    def __init__(self, streams: Streams, trace: Trace, emit: Emit, pings: bool, finish: Finish | None) -> None:
        self.streams = streams
        self.finish = finish
        self.trace = trace
        self.emit = emit
        self.leg = StreamLeg(streams.upstream, streams.accounting, trace, pings=pings)
        self.state: StreamState | None = None  # the answer as relayed so far, once its first token came
        self.cut_at_limit = False  # a broken stream ended at max_tokens by sidecard, not by the model

    async def run(self) -> Completion:
        trace, streams = self.trace, self.streams
        plan = trace.plan
        assert plan is not None
        with trio.CancelScope(deadline=plan.deadline) as scope:
            completion = await self._relay(scope)
            if self.finish is not None:
                completion = await self.finish(completion)
            if plan.version is not None and not completion.degraded and streams.answers.format_problem(trace, completion):
                # The text is already with the client: no corrective retry is possible, and never cache it.
                raise PartialAnswer(
                    Code.BAD_OUTPUT,
                    f"the streamed answer did not match the prompt's output format: {trace.output_problem}",
                    completion.text,
                )
            ended_here = trace.resumed or self.cut_at_limit  # an ending no single upstream answer gave
            if plan.cache_key is not None and not completion.degraded and not completion.fallback and not ended_here:
                streams.answers.store(trace, completion)
            return completion
        if self.state is not None:
            streams.metrics.stream_failures("deadline").inc()
            limit = streams.config.requests.stream_max_duration_s
            raise PartialAnswer(
                Code.DEADLINE_EXCEEDED, f"the stream ran longer than requests.stream_max_duration_s ({limit:g} s)", self.state.text()
            )
        degraded = streams.answers.degraded(trace)
        if degraded is None:
            raise SidecardError(Code.DEADLINE_EXCEEDED, "the request's deadline passed before an answer")
        degraded = await streams.replay(trace, degraded, self.emit)
        return await self.finish(degraded) if self.finish is not None else degraded

    async def _relay(self, scope: trio.CancelScope) -> Completion:
        trace, streams = self.trace, self.streams
        plan = trace.plan
        assert plan is not None
        targets = plan.route.targets
        try:
            won = await streams.walker.walk(trace, plan.body, targets, self.leg)
        except Exhausted:
            degraded = streams.answers.degraded(trace)
            if degraded is None:
                raise streams.walker.failure(trace) from None
            return await streams.replay(trace, degraded, self.emit)
        # The first token is in: the stream now lives while events keep coming, up to its total bound; a resumed
        # attempt runs under that bound too.
        end = trace.started + streams.config.requests.stream_max_duration_s
        scope.deadline = end
        trace.plan = plan = msgspec.structs.replace(plan, deadline=end)
        opened, served = won.value, won.served
        state = self.state = opened.state
        trace.upstream_request_id = opened.stream.request_id
        trace.ttft_ms = round((streams.clock() - trace.started) * 1000, 3)
        streams.metrics.ttft(*served.labels).observe(trace.ttft_ms / 1000)
        model = _model(state, served)
        target = served.target
        opened.events.insert(0, StreamStart(trace.request_id, target.model, ServedBy(target.provider, target.model),
                                            state.usage_struct(), opened.stream.request_id, state.start_extra or None))
        try:
            await self._pump(won)
        except _Broke as broke:
            remaining = targets[targets.index(served.target) + 1 :]
            resume = trace.request.resume if trace.request.resume is not None else plan.route.resume
            if not (resume and remaining and state.text_only() and state.text()):
                raise PartialAnswer(broke.code, broke.message, state.text()) from None
            # What the client has counts against its max_tokens: the broken attempt's output as it was billed (the
            # count the upstream reported, at least the streamed text at about 4 characters a token), so the answer's
            # usage, both calls together, stays within the limit it asked for.
            left = plan.body["max_tokens"] - state.billed_usage().output_tokens
            if left >= 1:
                served, model = await self._resume(state, remaining, broke, left)
            else:  # nothing left to ask for: the answer ends as the API ends one at the limit
                state.stop_reason, state.stop_sequence = "max_tokens", None
                self.cut_at_limit = True
        # Usage was paid for attempt by attempt as each stream ended (see `StreamLeg.close`).
        message = ApiMessage(
            id=str(state.message.get("id", "")),
            model=model,
            content=msgspec.Raw(_encoder.encode(state.content())),
            stop_reason=state.stop_reason,
            stop_sequence=state.stop_sequence,
        )
        reply = UpstreamReply(message, state.text(), opened.stream.request_id, extra=state.extra())
        return streams.answers.fresh(trace, reply, model, served)

    async def _pump(self, won: Won[Opened], splice: Continuation | None = None) -> None:
        """Relay an opened stream to the client until `message_stop`; raises `_Broke` if it fails."""
        idle = self.streams.config.requests.stream_idle_timeout_s
        if (stated_ms := self.trace.request.stream_idle_ms) is not None:
            # The client's own read timeout would fire first (at least a second: not a stall, else).
            idle = min(idle, max(MIN_STREAM_IDLE_S, stated_ms / 1000))
        opened = won.value
        state = opened.state
        try:
            events = opened.events
            while True:
                for event in splice.events(events) if splice is not None else events:
                    await self.emit(event)
                if state.finished:
                    break
                with trio.move_on_after(idle) as waited:
                    upstream_event = await opened.stream.next_event()
                if waited.cancelled_caught:
                    raise _Broke("idle_timeout", Code.UPSTREAM_TIMEOUT, f"the stream stalled for {idle:g} s")
                if upstream_event is None:
                    raise _Broke("incomplete", Code.UPSTREAM_ERROR, "the stream ended before the answer was complete")
                try:
                    events = state.feed(*upstream_event)
                except MalformedEvent:
                    raise _Broke("malformed", Code.UPSTREAM_ERROR, "the upstream sent an event that does not parse") from None
                except StreamError as err:
                    # The upstream's own error type decides the code: an overload mid-stream is `overloaded`.
                    failed = UpstreamError(upstream_errors.STATUS, status=error_status(err.error_type), error_type=err.error_type)
                    code = upstream_errors.to_sidecard_error(failed).code
                    raise _Broke("error_event", code, f"the upstream failed mid-stream ({err.error_type})") from None
        except UpstreamError as err:
            reason = "connection lost" if err.kind == upstream_errors.CONNECT else err.outcome
            broke = _Broke("reset", Code.UPSTREAM_ERROR, f"the stream broke ({reason})")
            self._broke(won, broke)
            raise broke from None
        except _Broke as broke:
            self._broke(won, broke)
            raise
        finally:
            await self.leg.close(won)
        if splice is not None:
            splice.finish(state)

    def _broke(self, won: Won[Opened], broke: _Broke) -> None:
        """Counted by its reason; its attempt, logged `ok` when its first token came, now says how it ended."""
        self.streams.metrics.stream_failures(broke.reason).inc()
        if won.attempt is not None:
            won.attempt.outcome = f"stream_broken:{broke.reason}"

    async def _resume(
        self, state: StreamState, remaining: list[Target], broke: _Broke, max_tokens: int
    ) -> tuple[TargetHealth, str]:
        """Continue a broken text answer on the next targets, with what was said so far as a prefill, for at most
        the `max_tokens` the client has left."""
        trace, streams = self.trace, self.streams
        plan = trace.plan
        assert plan is not None
        splice = Continuation(state)
        messages = [*plan.body["messages"], Message("assistant", splice.prefill())]
        body = {**plan.body, "max_tokens": max_tokens, "messages": messages}
        if self.leg.pings:  # the client's read timeout starts again: the next target has all of it to answer
            await self.emit(StreamPing())
        try:
            won = await streams.walker.walk(trace, body, remaining, self.leg)
        except Exhausted:
            raise PartialAnswer(broke.code, broke.message, state.text()) from None
        streams.metrics.stream_resumes(*won.served.labels).inc()
        trace.resumed = True
        trace.upstream_request_id = won.value.stream.request_id
        model = _model(won.value.state, won.served)
        try:
            await self._pump(won, splice)
        except _Broke as again:
            raise PartialAnswer(again.code, again.message, state.text()) from None
        return won.served, model


def _model(state: StreamState, served: TargetHealth) -> str:
    return str(state.message.get("model") or served.target.model)
