"""Quality monitoring in the background: every answer checked, a sample judged, alerts acted on.

The request path only calls `SampleQueue.submit()`, which never blocks and never fails: answers go through a
bounded channel (full: the sample is dropped and counted). The queue is made first, so the engine can be given it
before the pipeline, which judges through the engine, exists. A consumer runs the cheap checks on every answer and
picks a sample for the judge; judge workers (their own concurrency limit, queue and daily spend cap) ask
the judge model through the engine on the judge route, and feed the scores to the monitor. Alert events go
to the sinks and to `on_alert` (the control layer's remedies: a canary rolled back, a prompt switched to its
fallback route).
"""

from __future__ import annotations

import random
import time
from collections.abc import Awaitable, Callable
from typing import Any, Final

import msgspec
import trio

from ..config import QualityConfig
from ..errors import SidecardError
from ..observe.log import JsonLog
from ..observe.metrics import Metrics
from ..protocol import Complete, Completion
from ..tracing.traceparent import TraceParent
from .checks import Sample, run_checks
from .judge import JUDGE_PROMPT, Scores, judge_vars, judged, parse_scores
from .monitor import AlertEvent, Key, QualityMonitor, key_for, label
from .sinks import AlertSinks

# Traffic that is not an app's answer: never fed back into the windows it is measuring.
UNMONITORED: Final = frozenset({"quality-judge", "eval"})
CHECK_BATCH_S: Final = 0.01  # the check loop's pause between batches

_encoder: Final = msgspec.json.Encoder()


class SampleQueue:
    """The request path's way in: answers to check, in a bounded channel the pipeline reads."""

    def __init__(self, config: QualityConfig, metrics: Metrics) -> None:
        self._metrics = metrics
        self._send, self.receive = trio.open_memory_channel[Sample](config.check_queue)

    def submit(self, sample: Sample) -> None:
        """Hand over an answer; never blocks, never raises."""
        if sample.feature in UNMONITORED:
            return
        try:
            self._send.send_nowait(sample)
        except trio.WouldBlock:
            self._metrics.quality_dropped("checks").inc()


class QualityPipeline:
    def __init__(
        self,
        config: QualityConfig,
        samples: SampleQueue,
        monitor: QualityMonitor,
        *,
        complete: Callable[[Complete, dict[str, str | int]], Awaitable[Completion]],
        metrics: Metrics,
        log: JsonLog,
        sinks: AlertSinks | None = None,
        on_alert: Callable[[AlertEvent], Awaitable[None]] | None = None,
        clock: Callable[[], float] = trio.current_time,
        wall: Callable[[], float] | None = None,
        rng: random.Random | None = None,
        on_value: Callable[[Sample, str, float, list[str]], None] | None = None,
    ) -> None:
        """`on_value`: told each answer's `pass_rate` (1: every check passed; with the checks failed) and
        `judge_score` (the experiments, the review queue)."""
        self.config = config
        self._on_value = on_value
        self._complete = complete
        self.metrics = metrics
        self.log = log
        self.sinks = sinks
        self._on_alert = on_alert
        self._clock = clock
        self._wall = wall
        self._rng = rng or random.Random()
        self.monitor = monitor
        self._samples = samples.receive
        self._judge_send, self._judge_receive = trio.open_memory_channel[tuple[Key, Sample]](config.judge_queue)
        self._judge_spend: tuple[int, float] = (-1, 0.0)  # (UTC day, as days since the epoch; USD)
        self._ids = 0
        self._review = open(config.review_log, "a", encoding="utf-8") if config.review_log else None  # noqa: SIM115

    # ------------------------------------------------------------------ background

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._check_loop)
            for _ in range(self.config.judge_concurrency):
                nursery.start_soon(self._judge_loop)
            task_status.started()

    async def _check_loop(self) -> None:
        async for first in self._samples:
            # What came in meanwhile is checked in the same turn: a receive of its own yields to the scheduler.
            sample: Sample | None = first
            while sample is not None:
                await self._check(sample)
                try:
                    sample = self._samples.receive_nowait()
                except trio.WouldBlock:
                    sample = None
                except trio.EndOfChannel:
                    return
            # Then a pause, so that a busy daemon wakes this task once per batch rather than once per answer
            # (a wake-up costs about what the checks do); the queue holds what comes meanwhile.
            await trio.sleep(CHECK_BATCH_S)

    async def _check(self, sample: Sample) -> None:
        key = key_for(sample)
        failed = run_checks(sample)
        if self._on_value is not None:
            self._on_value(sample, "pass_rate", 0.0 if failed else 1.0, failed)
        labels = label_values(key)
        self.metrics.quality_answers(*labels).inc()
        for check in failed:
            self.metrics.quality_checks(*labels, check).inc()
        await self._handle(self.monitor.record_checks(key, failed, self._clock()))
        if self._rng.random() < self._sample_rate(sample):
            try:
                self._judge_send.send_nowait((key, sample))
            except trio.WouldBlock:
                self.metrics.quality_dropped("judge").inc()

    async def _judge_loop(self) -> None:
        async for key, sample in self._judge_receive:
            if not self._judge_affordable():
                self.metrics.quality_judged("skipped_budget").inc()
                continue
            scores = await self._judge(sample)
            now = self._clock()
            if scores is None:
                self.metrics.quality_judged("error").inc()
                self.monitor.record_judge_error(key, now)
                continue
            self.metrics.quality_judged("ok").inc()
            if self._on_value is not None:
                self._on_value(sample, "judge_score", scores.overall, [])
            labels = label_values(key)
            events = self.monitor.record_score(key, scores.overall, now)
            self.metrics.quality_score(*labels).set(self.monitor.mean(key) or 0.0)
            baseline = self.monitor.baseline(key)
            if baseline is not None:
                self.metrics.quality_baseline(*labels).set(baseline)
            self._write_review(sample, scores)
            await self._handle(events)

    async def score(self, sample: Sample) -> float | None:
        """The judge's overall score for an answer outside the sampled flow (shadow traffic's pairs), within the
        judge's daily budget; None when it cannot be had."""
        if not self._judge_affordable():
            self.metrics.quality_judged("skipped_budget").inc()
            return None
        scores = await self._judge(sample)
        self.metrics.quality_judged("ok" if scores is not None else "error").inc()
        return scores.overall if scores is not None else None

    async def record_feedback(self, key: Key, negative: bool) -> None:
        """A user's feedback on one of KEY's answers, as a signal beside the judge and the checks."""
        await self._handle(self.monitor.record_feedback(key, negative, self._clock()))

    async def _judge(self, sample: Sample) -> Scores | None:
        self._ids += 1
        request = Complete(
            id=f"judge-{self._ids}",
            prompt=JUDGE_PROMPT,
            vars=judge_vars(sample),
            feature="quality-judge",
            route=self.config.judge_route,
            cache="bypass",
            deadline_ms=60_000,
            priority="batch",
            traceparent=TraceParent(*sample.trace).header() if sample.trace is not None else None,
        )
        try:
            completion = await self._complete(request, judged(sample))
        except SidecardError as err:
            self.log.debug("judge_failed", code=err.code)
            return None
        self._spent(completion.cost_usd)
        return parse_scores(completion.text)

    def _judge_affordable(self) -> bool:
        day, spent = self._judge_spend
        return day != self._today() or spent < self.config.judge_daily_budget_usd

    def _spent(self, usd: float) -> None:
        day, spent = self._judge_spend
        today = self._today()
        self._judge_spend = (today, (spent if day == today else 0.0) + usd)

    def _today(self) -> int:
        now = self._wall() if self._wall is not None else time.time()
        return int(now // 86_400)  # (UTC days are 86,400 s long: POSIX time has no leap seconds)

    def _sample_rate(self, sample: Sample) -> float:
        scope = self.config.scope_for(sample.prompt, sample.feature)
        if scope is not None and scope.sample_rate is not None:
            return scope.sample_rate
        return self.config.canary_sample_rate if sample.canary else self.config.sample_rate

    async def _handle(self, events: list[AlertEvent]) -> None:
        for event in events:
            self.metrics.quality_alert_firing(*label_values(event.key)).set(1 if event.state == "firing" else 0)
            if self.sinks is not None:
                self.sinks.submit(event)
            else:
                log_alert(self.log, event)
            if self._on_alert is not None:
                await self._on_alert(event)

    def _write_review(self, sample: Sample, scores: Scores) -> None:
        if self._review is None:
            return
        redact = self.log.redactor.redact
        record = {
            "prompt": sample.prompt, "version": sample.version, "model": sample.model, "feature": sample.feature,
            "question": redact(sample.question)[:4000], "answer": redact(sample.answer)[:4000],
            "scores": msgspec.to_builtins(scores),
        }
        try:
            self._review.write(_encoder.encode(record).decode() + "\n")
            self._review.flush()
        except OSError:
            pass

    def status(self) -> dict[str, Any]:
        return {
            "monitored": self.monitor.summary(),
            "firing": [alert_view(e) for e in self.monitor.firing()],
            "recent": [alert_view(e) for e in self.monitor.recent(20)],
            "judge_spent_today_usd": round(self._judge_spend[1], 6) if self._judge_spend[0] == self._today() else 0.0,
        }


def label_values(key: Key) -> tuple[str, str, str]:
    return key


def alert_view(event: AlertEvent) -> dict[str, Any]:
    data: dict[str, Any] = msgspec.to_builtins(event)
    data["key"] = label(event.key)
    return data


def log_alert(log: JsonLog, event: AlertEvent | dict[str, Any]) -> None:
    if isinstance(event, dict):
        log.warning("alert", **event)
        return
    level = "warning" if event.state == "firing" else "info"
    log.event(
        "quality_alert", level, state=event.state, target=label(event.key), signal=event.signal,
        value=round(event.value, 4), baseline=None if event.baseline is None else round(event.baseline, 4),
        threshold=round(event.threshold, 4), reason=event.reason,
    )
