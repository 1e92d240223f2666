"""The feedback desk: every answer sidecard gave can take feedback, from either face, for `retention_s`.

As an accounting sink it records each answer (fresh, cached, streamed, a kill switch's or a stale one; never
sidecard's own calls, never a token count) under its `request_id` with what served it: prompt, version, model,
route, feature and experiment arm, never its text (`experiments.feedback.FeedbackLedger`, bounded).

`accept` validates one feedback item against that record: a typed error for an id never issued here
(`unknown_request`), one forgotten (`expired_request`), a second score or signal (`duplicate_feedback`), and a
`bad_request` for a score out of range, a bad label or too long a comment. Accepted feedback is counted in
metrics and handed to each listener (the experiments' tally, synchronously), and to the quality monitor through
a bounded channel (`run` drains it; a full channel drops and counts, never blocks the caller).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Final

import trio

from ..config import FeedbackConfig
from ..engine.types import Finished
from ..errors import Code, SidecardError
from ..experiments.feedback import Feedback, FeedbackItem, FeedbackLedger, FeedbackSettings, Issued, Reason, Refused
from ..observe.metrics import Metrics
from ..protocol import Feedback as FeedbackRequest
from ..protocol import FeedbackReply
from ..quality.monitor import key_of

QUEUE: Final = 1000  # feedback waiting for the quality monitor
_CODES: Final = {
    Reason.UNKNOWN_REQUEST: Code.UNKNOWN_REQUEST,
    Reason.EXPIRED_REQUEST: Code.EXPIRED_REQUEST,
    Reason.DUPLICATE: Code.DUPLICATE_FEEDBACK,
}
Listener = Callable[[Feedback], None]
Monitor = Callable[[tuple[str, str, str], bool], Awaitable[None]]  # (quality key, negative)


def settings_of(config: FeedbackConfig) -> FeedbackSettings:
    return FeedbackSettings(retention_s=config.retention_s, max_entries=config.max_entries, score_min=config.score_min,
                            score_max=config.score_max, labels=tuple(config.labels),
                            max_comment_chars=config.max_comment_chars)


class FeedbackDesk:
    def __init__(self, config: FeedbackConfig, *, metrics: Metrics, listeners: Sequence[Listener] = (),
                 monitor: Monitor | None = None, clock: Callable[[], float] = trio.current_time) -> None:
        """`monitor`: the quality pipeline's feedback signal (None without quality monitoring)."""
        self.ledger = FeedbackLedger(settings_of(config))
        self.metrics = metrics
        self.listeners = list(listeners)
        self.monitor = monitor
        self._clock = clock
        self._send, self._receive = trio.open_memory_channel[Feedback](QUEUE)

    def configure(self, config: FeedbackConfig) -> None:
        self.ledger.settings = settings_of(config)

    def __call__(self, finished: Finished) -> None:
        """The accounting sink: remember an answer that can take feedback."""
        trace, answer = finished.trace, finished.completion
        if answer is None or trace.internal or finished.counting:
            return
        plan, now = trace.plan, self._clock()
        if plan is None:
            issued = Issued(feature=trace.feature, model=answer.model, issued_at=now)
        else:
            issued = Issued(feature=trace.feature, model=answer.model, route=plan.route_name, prompt=plan.prompt,
                            version=plan.version.version if plan.version is not None else None,
                            experiment=plan.experiment, arm=plan.arm, canary=plan.canary, issued_at=now)
        self.ledger.issue(trace.request_id, issued, now)
        self.metrics.feedback_tracked.set(len(self.ledger))

    def accept(self, request: FeedbackRequest) -> FeedbackReply:
        """Take one feedback item, or raise the typed error saying why not."""
        item = FeedbackItem(request_id=request.request_id, score=request.score, thumbs=request.thumbs,
                            signal=request.signal, label=request.label, comment=request.comment)
        result = self.ledger.accept(item, self._clock())
        if isinstance(result, Refused):
            self.metrics.feedback_refused(result.reason.value).inc()
            raise SidecardError(_CODES.get(result.reason, Code.BAD_REQUEST), result.message)
        served, metrics = result.request, self.metrics
        scope = (served.feature, served.prompt or "", str(served.version) if served.version is not None else "")
        metrics.feedback(*scope, result.kind).inc()
        metrics.feedback_value(*scope).inc(result.value)
        if result.negative:
            metrics.feedback_negative(*scope).inc()
        for listener in self.listeners:
            listener(result)
        if self.monitor is not None:
            try:
                self._send.send_nowait(result)
            except trio.WouldBlock:
                metrics.feedback_dropped.inc()
        return FeedbackReply(request.id, request.request_id, result.kind, result.value)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Pass accepted feedback on to the quality monitor (a service of the daemon)."""
        task_status.started()
        if self.monitor is None:
            return
        async for feedback in self._receive:
            served = feedback.request
            await self.monitor(key_of(served.prompt, served.version, served.feature, served.model), feedback.negative)
