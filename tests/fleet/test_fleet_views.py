"""Heartbeats and the listing of live instances, fleet-wide quality windows, and decisions taken once."""

from __future__ import annotations

import pytest
import trio

from sidecard.fleet import heartbeat, quality
from sidecard.fleet.devserver import LocalStore
from sidecard.fleet.errors import StoreDataError, StoreUnavailable
from sidecard.fleet.heartbeat import Heartbeat, Release
from sidecard.fleet.quality import QualityBatch
from sidecard.fleet.settings import BreakerSettings

T0 = 1_773_480_000.0
KEY = ("support-reply", "4", "claude-sonnet-4-6")


def beat_of(name: str, **changes) -> Heartbeat:
    fields = dict(instance=name, version="0.1.0", config_hash="c0ffee", state_version=7,
                  prompts={"support-reply": Release(stable=3, canary=4, canary_percent=10.0)})
    return Heartbeat(**{**fields, **changes})


async def test_the_listing_shows_live_instances_and_flags_the_odd_ones(connect, keys):
    connection = await connect()
    for name in ("a", "b", "c"):
        await heartbeat.beat(connection, keys, beat_of(name), ttl_s=15, now=T0)
    await heartbeat.beat(connection, keys, beat_of("d", config_hash="deadbeef", prompts={}), ttl_s=15, now=T0 + 5)
    await heartbeat.beat(connection, keys, beat_of("gone"), ttl_s=15, now=T0 - 20)  # lapsed at T0 - 5
    live = await heartbeat.instances(connection, keys, now=T0 + 6)
    assert [b.instance for b in live] == ["a", "b", "c", "d"]
    assert heartbeat.disagreements(live) == {"d": ["config_hash", "prompts"]}
    assert heartbeat.disagreements(live[:3]) == {}
    # One each: no majority to call the other odd (the tie used to flag whichever came second by name).
    assert heartbeat.disagreements([live[0], live[3]]) == {"a": ["config_hash", "prompts"], "d": ["config_hash", "prompts"]}


async def test_an_unreadable_heartbeat_is_a_data_error(connect, keys, store_server):
    connection = await connect()
    await heartbeat.beat(connection, keys, beat_of("a"), ttl_s=15, now=T0)
    store_server.command("SET", keys.heartbeat("a"), "{garbage")
    with pytest.raises(StoreDataError, match="heartbeat of 'a'"):
        await heartbeat.instances(connection, keys, now=T0)


async def test_heartbeats_go_on_through_a_store_that_fails(connect, keys, mock_clock):
    connection = await connect(breaker=BreakerSettings(cooldown_s=3600))
    errors = []
    beats = []

    def make(now):
        beats.append(now)
        return beat_of("a", sent_at=now)

    connection.breaker.force_open(trio.current_time())  # the store is failing: each beat is refused at once
    async with trio.open_nursery() as nursery:
        await nursery.start(lambda task_status: heartbeat.run_heartbeats(
            connection, keys, make, interval_s=5, ttl_s=15, wall=lambda: T0 + trio.current_time(), on_error=errors.append,
            task_status=task_status))
        await trio.testing.wait_all_tasks_blocked()
        mock_clock.jump(5)
        await trio.testing.wait_all_tasks_blocked()
        mock_clock.jump(5)
        await trio.testing.wait_all_tasks_blocked()
        nursery.cancel_scope.cancel()
    assert beats == [T0, T0 + 5, T0 + 10] and len(errors) == 3 and "breaker" in errors[0]


async def test_the_fleets_quality_window_sums_every_sidecars_counts(connect, keys):
    connection = await connect()
    sidecars = [QualityBatch(60), QualityBatch(60)]
    for i in range(30):
        batch = sidecars[i % 2]
        batch.add_score(KEY, 0.5 if i % 3 else 0.8, T0 + i * 10)
        batch.add_checks(KEY, ["json_valid"] if i % 5 == 0 else [], T0 + i * 10)
    for batch in sidecars:
        await quality.flush(connection, keys, batch, retention_s=3600)
    window = await quality.read_window(connection, keys, now=T0 + 299, span_s=300, bucket_s=60)
    counts = window[KEY]
    assert (counts.scores, counts.checked, counts.failures) == (30, 30, {"json_valid": 6})
    assert counts.mean == pytest.approx((20 * 0.5 + 10 * 0.8) / 30)
    assert counts.failure_rate("json_valid") == pytest.approx(0.2)
    recent = await quality.read_window(connection, keys, now=T0 + 299, span_s=60, bucket_s=60)
    assert recent[KEY].scores == 12  # the buckets that overlap the last minute: T0 + 180 .. T0 + 299


async def test_counts_a_flush_could_not_deliver_wait_for_the_next(connect, keys, short_tmp):
    down = await connect(LocalStore(short_tmp))  # a store that is not there
    batch = QualityBatch(60)
    batch.add_score(KEY, 0.9, T0)
    with pytest.raises(StoreUnavailable):
        await quality.flush(down, keys, batch, retention_s=3600)
    assert batch
    connection = await connect()
    await quality.flush(connection, keys, batch, retention_s=3600)
    assert (await quality.read_window(connection, keys, now=T0, span_s=60, bucket_s=60))[KEY].scores == 1


def test_a_batch_is_bounded():
    batch = QualityBatch(60, max_fields=4)
    for i in range(10):
        batch.add_score((f"p{i}", "1", "m"), 1.0, T0)
    assert batch.dropped == 16 and sum(len(f) for f in batch.drain().values()) == 4


async def test_garbage_in_a_quality_bucket_is_a_data_error(connect, keys, store_server):
    store_server.command("HSET", keys.quality(int(T0 // 60 * 60)), "no tabs here", "1")
    with pytest.raises(StoreDataError, match="not a quality count"):
        await quality.read_window(await connect(), keys, now=T0, span_s=60, bucket_s=60)


async def test_a_decision_is_taken_once_per_record_in_the_fleet(connect, keys):
    a, b = await connect(), await connect()
    results = []

    async def decide(connection, name, seen):
        results.append(await quality.decide(connection, keys, "rollback:support-reply:4", seen=seen, instance=name, now=T0, ttl_s=600))

    async with trio.open_nursery() as nursery:
        for i in range(10):
            nursery.start_soon(decide, a if i % 2 else b, f"sidecar-{i}", None)
    winners = [holder for taken, holder in results if taken]
    assert len(winners) == 1 and all(holder == winners[0] for _, holder in results)
    (record,) = await quality.read_decisions(a, keys, ["rollback:support-reply:4"])
    assert record == winners[0] and record.at == T0
    # The next release's decision is taken on that record, once again; a sidecar that read an older one loses.
    results.clear()
    async with trio.open_nursery() as nursery:
        for i in range(10):
            nursery.start_soon(decide, a if i % 2 else b, f"later-{i}", record if i % 3 else None)
    winners = [holder for taken, holder in results if taken]
    assert len(winners) == 1 and winners[0].by.startswith("later-")
