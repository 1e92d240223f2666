"""The background quality pipeline keeps up with the request path."""

from __future__ import annotations

import random

import trio
import trio.testing
from prometheus_client import CollectorRegistry

from sidecard.config import QualityConfig
from sidecard.observe.log import JsonLog
from sidecard.observe.metrics import Metrics
from sidecard.quality.checks import Sample
from sidecard.quality.monitor import QualityMonitor
from sidecard.quality.pipeline import CHECK_BATCH_S, QualityPipeline, SampleQueue


def sample(i: int) -> Sample:
    return Sample(feature="support", model="claude-sonnet-4-6", prompt=None, version=None, canary=False,
                  question=f"question {i}", system=None, answer=f"A full answer to question {i}.", stop_reason="end_turn",
                  output_problem=None)


async def never_judged(request, about):  # pragma: no cover - sample_rate 0
    raise AssertionError("no answer is judged at sample rate 0")


async def test_answers_that_arrive_together_are_checked_in_one_turn_and_none_is_dropped(autojump_clock):
    # Several requests ending in one scheduler turn submit several answers at once; the checks must take them all
    # in the consumer's next turn (one receive each, yielding every time, fell behind and dropped most at load).
    # The consumer then pauses (CHECK_BATCH_S): a queue holding what comes in one pause (its edges included: three
    # turns here) loses nothing.
    config = QualityConfig(enabled=True, sample_rate=0.0, check_queue=9)
    metrics = Metrics(CollectorRegistry())
    samples = SampleQueue(config, metrics)
    pipeline = QualityPipeline(config, samples, QualityMonitor(config.monitor), complete=never_judged, metrics=metrics,
                               log=JsonLog(lambda line: None), rng=random.Random(1))
    async with trio.open_nursery() as nursery:
        await nursery.start(pipeline.run)
        for turn in range(20):
            for i in range(3):
                samples.submit(sample(3 * turn + i))
            await trio.sleep(CHECK_BATCH_S / 2)
        await trio.testing.wait_all_tasks_blocked()
        nursery.cancel_scope.cancel()
    registry = metrics.registry
    assert registry.get_sample_value("sidecard_quality_dropped_total", {"queue": "checks"}) in (None, 0.0)
    assert registry.get_sample_value("sidecard_quality_answers_total",
                                     {"prompt": "feature:support", "version": "-", "model": "claude-sonnet-4-6"}) == 60
