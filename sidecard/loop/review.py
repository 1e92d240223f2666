"""The human review queue in the daemon: which answers go to it, the store's I/O off the event loop, labels back.

What is queued (`experiments.review`'s sampling, `[review]` rates and weights): each answer the quality checks
see is offered once when checked (its failed checks raise its chance) and once more when the judge scores it
below `low_score`; negative feedback offers the answer it is about again, with that weight, while the answer is
among the `recent` ones kept in memory. Question and answer are redacted through the log's redaction layer
before they are kept anywhere. The SQLite store (0600, on this host only) is written by one worker from a
bounded channel (a full channel drops and counts) and read by the admin ops, one call at a time, in a thread.

An answer an output guardrail flagged (a check with `action = "flag"`, docs/safety.md) is always queued, with
the reason `guardrail_flag` (`flagged`, an accounting sink).

A reviewer's label with a score (`good` 1, `bad` 0 by default) is fed back as a `review_score` value to the
experiment arm and the rollout that served the answer.
"""

from __future__ import annotations

import random
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, Final, Literal

import msgspec
import trio

from ..config import QualityConfig, ReviewConfig
from ..engine.account import answer_sample
from ..engine.types import Finished
from ..errors import Code, SidecardError
from ..experiments.feedback import Feedback, Issued
from ..experiments.review import LabelRefused, NewItem, ReviewItem, ReviewSettings, ReviewStore, Signals, sample
from ..observe.metrics import Metrics
from ..observe.redact import Redactor
from ..quality.checks import Sample
from .experiments import ExperimentBook

QUEUE: Final = 200  # items waiting to be written


def settings_of(config: ReviewConfig) -> ReviewSettings:
    fields = msgspec.structs.asdict(config)
    for own in ("enabled", "path", "recent"):
        del fields[own]
    return msgspec.convert(fields, ReviewSettings)


class ReviewDesk:
    def __init__(self, config: ReviewConfig, path: str, *, book: ExperimentBook, served: Callable[[str], Issued | None],
                 redactor: Redactor, metrics: Metrics, wall: Callable[[], float], rng: random.Random | None = None,
                 quality: QualityConfig | None = None) -> None:
        """`served`: what served a request id (the feedback desk's record), for the item's prompt, version, model
        and experiment arm; `quality`: how answers are sampled for checks (a flagged answer's language)."""
        self.settings = settings_of(config)
        self.store = ReviewStore(path, self.settings)
        self.config = config
        self.book = book
        self._served = served
        self._redact = redactor.redact
        self.metrics = metrics
        self._wall = wall
        self._rng = rng or random.Random()
        self.quality = quality or QualityConfig()
        self._recent: OrderedDict[str, Sample] = OrderedDict()
        # Negative feedback on answers not checked yet (the checks run in batches): offered once they are.
        self._early: OrderedDict[str, None] = OrderedDict()
        self._send, self._receive = trio.open_memory_channel[NewItem](QUEUE)
        self._lock = trio.Lock()

    # ------------------------------------------------------------------ offers (never block)

    def on_value(self, answer: Sample, metric: str, value: float, failed: list[str]) -> None:
        """The quality pipeline's hook: an answer checked (`pass_rate`) or judged (`judge_score`)."""
        if answer.request_id is None:
            return
        if metric == "pass_rate":
            self._remember(answer)
            self._offer(answer, Signals(failed_checks=tuple(failed)))
            if answer.request_id in self._early:
                del self._early[answer.request_id]
                self._offer(answer, Signals(negative_feedback=True))
        elif metric == "judge_score" and value < self.settings.low_score:
            self._offer(answer, Signals(judge_score=value))

    def on_feedback(self, feedback: Feedback) -> None:
        """A feedback listener: negative feedback offers its answer again, if it is still remembered."""
        if not feedback.negative:
            return
        answer = self._recent.get(feedback.request_id)
        if answer is not None:
            self._offer(answer, Signals(negative_feedback=True))
            return
        if not self.quality.enabled:
            return  # no check will ever bring its answer
        self._early[feedback.request_id] = None
        while len(self._early) > self.config.recent:
            self._early.popitem(last=False)

    def flagged(self, finished: Finished) -> None:
        """The accounting sink: an answer an output guardrail flagged goes to review (a check's `flag` action)."""
        trace, answer, marks = finished.trace, finished.completion, finished.trace.safety
        if answer is None or marks is None or not marks.guardrails or trace.internal or trace.plan is None:
            return
        checks = tuple(rule.removesuffix(":flag") for rule in marks.guardrails if rule.endswith(":flag"))
        if checks:
            self._offer(answer_sample(trace, answer, self.quality), Signals(flagged=checks))

    def _remember(self, answer: Sample) -> None:
        assert answer.request_id is not None
        self._recent[answer.request_id] = answer
        while len(self._recent) > self.config.recent:
            self._recent.popitem(last=False)

    def _offer(self, answer: Sample, signals: Signals) -> None:
        if not sample(self.settings, answer.prompt, answer.feature, signals, self._rng):
            return
        request_id = answer.request_id
        assert request_id is not None
        served = self._served(request_id) or Issued(feature=answer.feature, model=answer.model, prompt=answer.prompt,
                                                     version=answer.version)
        item = NewItem(request_id=request_id, served=served, question=self._redact(answer.question),
                       answer=self._redact(answer.answer), signals=signals)
        try:
            self._send.send_nowait(item)
        except trio.WouldBlock:
            self.metrics.review_items("dropped").inc()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Write offered items to the store (a service of the daemon); the store closes with it."""
        task_status.started()
        try:
            async for item in self._receive:
                now = self._wall()  # (read here: the clock is the event loop's)
                added = await self._call(lambda item=item, now=now: self.store.add(item, now))  # type: ignore[misc]
                self.metrics.review_items("queued" if added is not None else "duplicate").inc()
                await self._count()
        finally:
            with trio.CancelScope(shield=True):
                async with self._lock:
                    self.store.close()

    # ------------------------------------------------------------------ the admin ops

    async def page(self, state: Literal["pending", "labelled", "all"], prompt: str | None, after: int, limit: int) -> dict[str, Any]:
        items = await self._call(lambda: self.store.page(state=state, prompt=prompt, after=after, limit=limit))
        counts = await self._call(self.store.counts)
        return {"items": [_summary(item) for item in items], "counts": counts,
                "next_after": items[-1].id if items else None}

    async def show(self, item_id: int) -> dict[str, Any]:
        item = await self._call(lambda: self.store.get(item_id))
        if item is None:
            raise SidecardError(Code.BAD_REQUEST, f"no review item {item_id}")
        return msgspec.to_builtins(item)  # type: ignore[no-any-return]

    async def label(self, item_id: int, label: str, note: str | None) -> tuple[dict[str, Any], dict[str, Any]]:
        before = await self.show(item_id)
        now = self._wall()
        labelled = await self._call(lambda: self.store.label(item_id, label, note, now))
        if isinstance(labelled, LabelRefused):
            raise SidecardError(Code.BAD_REQUEST, labelled.message)
        self.metrics.review_labels(label).inc()
        await self._count()
        if labelled.score is not None:
            self._score(labelled)
        return before, msgspec.to_builtins(labelled)

    def _score(self, item: ReviewItem) -> None:
        served, score = item.served, item.score
        assert score is not None
        if served.experiment is not None and served.arm is not None:
            self.book.record(served.experiment, served.arm, "review_score", score)
        if served.prompt is not None and served.version is not None:
            self.book.observe(served.prompt, served.version, "review_score", score)

    async def _count(self) -> None:
        counts = await self._call(self.store.counts)
        self.metrics.review_pending.set(counts["pending"])

    async def _call(self, work: Callable[[], Any]) -> Any:
        async with self._lock:  # the store takes one call at a time
            return await trio.to_thread.run_sync(work)


def _summary(item: ReviewItem) -> dict[str, Any]:
    served = item.served
    return {"id": item.id, "request_id": item.request_id, "created_at": item.created_at, "prompt": served.prompt,
            "version": served.version, "model": served.model, "feature": served.feature, "arm": served.arm,
            "reasons": item.reasons, "judge_score": item.judge_score, "label": item.label,
            "question": item.question[:80]}
