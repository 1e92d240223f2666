"""Shadow traffic: a share of live answers asked again of a candidate model or version, off the request path.

As an accounting sink the mirror sees each fresh answer (never a cached, degraded or internal one) of a shadowed
prompt or feature; `experiments.shadow.ShadowBudget` picks `share` of them while the window's budget (the real
answer's cost is the estimate) and `max_in_flight` allow. A picked request is copied (the candidate's model or
version, no user, feature `shadow`, cache bypassed) onto a bounded channel; a full channel drops it and counts.
Workers (`run`, `max_in_flight` per shadow) ask it through the engine as sidecard's own call (`internal`: no
retries, hedges or shared breakers, no user's limits or feedback), under its own deadline, and record the pair
(latency, cost, error rate: shadow against real) for the paired sequential test; with quality monitoring on,
the judge scores both answers (within its daily budget) for a `judge_score` pair. The user's answer was sent
before any of this: a shadow never changes, slows or fails it.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Final

import msgspec
import trio

from ..config import QualityConfig, ShadowConfig
from ..engine.account import answer_sample
from ..engine.types import Finished, Trace
from ..errors import SidecardError
from ..experiments.shadow import ShadowBudget, ShadowComparison, ShadowSettings, Ticket
from ..observe.metrics import Metrics
from ..protocol import Complete, Completion
from ..quality.checks import Sample

QUEUE: Final = 100  # copies waiting per shadow
METRICS: Final = ("judge_score", "latency", "cost", "error_rate")
Judge = Callable[[Sample], Awaitable["float | None"]]


class _Job(msgspec.Struct, frozen=True):
    request: Complete
    ticket: Ticket
    real_latency_s: float
    real_cost_usd: float
    real: Sample | None  # the real answer, for the judge (None: no judge)


class Shadow:
    """One configured shadow: its budget, its queue and its comparison so far."""

    def __init__(self, config: ShadowConfig) -> None:
        self.config = config
        self.budget = ShadowBudget(ShadowSettings(share=config.share, budget_usd=config.budget_usd,
                                                  window_s=config.window_s, max_in_flight=config.max_in_flight))
        self.comparison = ShadowComparison()
        self.send, self.receive = trio.open_memory_channel[_Job](QUEUE)

    def takes(self, prompt: str | None, feature: str) -> bool:
        config = self.config
        return prompt == config.prompt if config.prompt is not None else feature == config.feature


class ShadowMirror:
    def __init__(self, configs: Sequence[ShadowConfig], *, complete: Callable[[Complete], Awaitable[Completion]],
                 metrics: Metrics, quality: QualityConfig, judge: Judge | None = None, rng: random.Random | None = None,
                 clock: Callable[[], float] = trio.current_time) -> None:
        """`complete`: the engine's, as sidecard's own call; `judge`: the quality pipeline's score of an answer."""
        self.quality = quality
        self._judge = judge
        self.shadows = {config.name: Shadow(config) for config in configs}
        self._complete = complete
        self.metrics = metrics
        self._rng = rng or random.Random()
        self._clock = clock
        self._ids = itertools.count(1)

    def __call__(self, finished: Finished) -> None:
        """The accounting sink: maybe mirror this answer."""
        trace, answer = finished.trace, finished.completion
        if not self.shadows or answer is None or answer.cached or answer.degraded or trace.internal or finished.counting:
            return
        plan = trace.plan
        prompt = plan.prompt if plan is not None else None
        for shadow in self.shadows.values():
            if shadow.takes(prompt, trace.request.feature):
                self._offer(shadow, trace, answer, finished.latency_s)

    def _offer(self, shadow: Shadow, trace: Trace, answer: Completion, latency_s: float) -> None:
        request = trace.request
        skipped = shadow.budget.skipped_budget
        ticket = shadow.budget.decide(self._clock(), self._rng, answer.cost_usd)
        name = shadow.config.name
        if ticket is None:
            if shadow.budget.skipped_budget > skipped:
                self.metrics.shadow_requests(name, "skipped_budget").inc()
            return
        config = shadow.config
        copy = msgspec.structs.replace(
            request, id=f"shadow-{next(self._ids)}", user=None, feature="shadow", cache="bypass", stream=False,
            deadline_ms=config.deadline_ms, **({"model": config.model, "model_fallback": False} if config.model else {"version": config.version}),
        )
        try:
            real = answer_sample(trace, answer, self.quality) if self._judge is not None else None
            shadow.send.send_nowait(_Job(copy, ticket, latency_s, answer.cost_usd, real))
        except trio.WouldBlock:
            shadow.budget.settle(ticket, 0.0, self._clock())
            self.metrics.shadow_requests(name, "dropped").inc()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The shadows' workers (a service of the daemon)."""
        async with trio.open_nursery() as nursery:
            for shadow in self.shadows.values():
                for _ in range(shadow.config.max_in_flight):
                    nursery.start_soon(self._work, shadow)
            task_status.started()

    async def _work(self, shadow: Shadow) -> None:
        name = shadow.config.name
        async for job in shadow.receive:
            started = self._clock()
            try:
                answer = await self._complete(job.request)
            except SidecardError:
                answer = None
            failed = answer is None or answer.degraded
            cost = answer.cost_usd if answer is not None else 0.0
            shadow.budget.settle(job.ticket, cost, self._clock())
            self.metrics.shadow_requests(name, "failed" if failed else "answered").inc()
            self.metrics.shadow_cost(name).inc(cost)
            comparison = shadow.comparison.record("error_rate", 0.0, 1.0 if failed else 0.0)
            if not failed:
                comparison = comparison.record("latency", job.real_latency_s, self._clock() - started)
                comparison = comparison.record("cost", job.real_cost_usd, cost)
            shadow.comparison = comparison
            if answer is not None and not failed and job.real is not None:
                await self._judge_pair(shadow, job.real, answer)

    async def _judge_pair(self, shadow: Shadow, real: Sample, answer: Completion) -> None:
        assert self._judge is not None
        candidate = msgspec.structs.replace(real, model=answer.model, answer=answer.text, stop_reason=answer.stop_reason,
                                            version=shadow.config.version or real.version, request_id=None)
        real_score = await self._judge(real)
        shadow_score = await self._judge(candidate) if real_score is not None else None
        if real_score is not None and shadow_score is not None:
            shadow.comparison = shadow.comparison.record("judge_score", real_score, shadow_score)

    def status(self) -> list[dict[str, Any]]:
        """Each shadow: its budget, and per metric both sides' means and the paired verdict (shadow - real)."""
        now, views = self._clock(), []
        for name, shadow in sorted(self.shadows.items()):
            tally, metrics = shadow.comparison.tally, {}
            for metric in METRICS:
                verdict = shadow.comparison.verdict(metric)
                metrics[metric] = {"pairs": tally.get("difference", metric).n, "real": tally.get("real", metric).mean,
                                   "shadow": tally.get("shadow", metric).mean, "decision": verdict.decision.value,
                                   "effect": verdict.effect, "ci_low": verdict.ci_low, "ci_high": verdict.ci_high,
                                   "p_value": verdict.p_value}
            config = shadow.config
            views.append({"name": name, "of": config.prompt or f"feature:{config.feature}",
                          "candidate": config.model or f"v{config.version}", "share": config.share,
                          "budget": {k: round(v, 6) if isinstance(v, float) else v for k, v in shadow.budget.status(now).items()},
                          "metrics": metrics})
        return views
