"""The usage store: hourly rollups in SQLite, the writer off the request path, the queries behind the reports."""

from __future__ import annotations

import os
import sqlite3
import stat
from datetime import UTC, datetime
from pathlib import Path

import pytest
import trio

from sidecard.config import _default_prices
from sidecard.observe.redact import pseudonym
from sidecard.pricing import PriceTable
from sidecard.protocol import Usage
from sidecard.usage import UsageRecord, UsageRow, UsageStore, UsageWriter, cache_savings, open_store
from sidecard.usage.store import roll_up

ALICE = pseudonym("alice@example.com", b"salt")
BOB = pseudonym("bob", b"salt")


def at(text: str) -> float:
    return datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp()


def rec(when: str, **fields: object) -> UsageRecord:
    return UsageRecord(at=at(when), **fields)


@pytest.fixture
def store(tmp_path: Path) -> UsageStore:
    store = UsageStore(tmp_path / "usage.sqlite3")
    yield store
    store.close()


def test_rollups_answer_by_feature_per_day(store: UsageStore) -> None:
    store.write(roll_up([
        rec("2026-12-01T09:10", feature="search", model="m", input_tokens=100, output_tokens=10, cost_usd=0.5),
        rec("2026-12-01T09:50", feature="search", model="m", input_tokens=200, output_tokens=20, cost_usd=1.0),
        rec("2026-12-01T17:00", feature="search", model="m", outcome="error"),
        rec("2026-12-01T12:00", feature="chat", model="m", cache_read_tokens=500, cache_write_tokens=7, cost_usd=2.0, saved_usd=0.25),
        rec("2026-12-02T00:00", feature="search", model="m", outcome="cached", saved_usd=0.5),
        rec("2026-12-02T08:00", model="m", cost_usd=0.1),  # no feature
    ]))
    rows = store.report("feature", "day", at("2026-12-01T00:00"), at("2026-12-03T00:00"))
    assert rows == [
        UsageRow(int(at("2026-12-01T00:00")), "chat", 1, 0, 0, 500, 7, 2.0, 0.25, 0),
        UsageRow(int(at("2026-12-01T00:00")), "search", 3, 300, 30, 0, 0, 1.5, 0.0, 1),
        UsageRow(int(at("2026-12-02T00:00")), "", 1, 0, 0, 0, 0, 0.1, 0.0, 0),
        UsageRow(int(at("2026-12-02T00:00")), "search", 1, 0, 0, 0, 0, 0.0, 0.5, 0),
    ]
    assert rows[1].error_rate == pytest.approx(1 / 3)
    # Hours are the unit: a range covers the hours it overlaps.
    assert [r.requests for r in store.report("feature", "hour", at("2026-12-01T09:30"), at("2026-12-01T09:31"))] == [2]
    assert store.report("feature", "hour", at("2026-12-03T00:00"), at("2026-12-04T00:00")) == []


def test_months_are_calendar_months_in_utc(store: UsageStore) -> None:
    store.write(roll_up([rec("2027-01-31T23:30", model="m", cost_usd=1.0), rec("2027-02-01T00:30", model="m", cost_usd=2.0),
                         rec("2027-02-28T23:59", model="m", cost_usd=4.0)]))
    rows = store.report("model", "month", at("2027-01-01T00:00"), at("2027-03-01T00:00"))
    assert [(r.period, r.cost_usd) for r in rows] == [(int(at("2027-01-01T00:00")), 1.0), (int(at("2027-02-01T00:00")), 6.0)]


def test_by_user_prompt_and_route(store: UsageStore) -> None:
    store.write(roll_up([
        rec("2026-12-01T09:00", user=ALICE, prompt="summarize", version="v3", route="default", cost_usd=1.0),
        rec("2026-12-01T09:00", user=ALICE, prompt="summarize", version="v4", route="cheap", cost_usd=0.5),
        rec("2026-12-01T09:00", user=BOB, route="default", cost_usd=3.0),
    ]))
    day = (at("2026-12-01T00:00"), at("2026-12-02T00:00"))
    assert [(r.key, r.cost_usd) for r in store.report("user", "day", *day)] == [(BOB, 3.0), (ALICE, 1.5)]
    assert [(r.key, r.cost_usd) for r in store.report("prompt", "day", *day)] == [("", 3.0), ("summarize@v3", 1.0), ("summarize@v4", 0.5)]
    assert [(r.key, r.requests) for r in store.report("route", "day", *day)] == [("default", 2), ("cheap", 1)]
    with pytest.raises(ValueError):
        store.report("team", "day", *day)


def test_a_raw_user_id_is_refused() -> None:
    for raw in ("alice@example.com", "user-123", ALICE.upper()):
        with pytest.raises(ValueError, match="pseudonym"):
            UsageRecord(at=0.0, user=raw)
    assert UsageRecord(at=0.0, user=ALICE).user == ALICE


def test_cache_savings_are_what_the_caches_kept_off_the_bill() -> None:
    prices = PriceTable(_default_prices())  # claude-sonnet-4: $3 in, $15 out, cache reads $0.30 per million
    answer = Usage(input_tokens=1_000_000, output_tokens=100_000)
    assert cache_savings(prices, "claude-sonnet-4-6", answer, from_response_cache=True) == pytest.approx(3.0 + 1.5)
    read = Usage(input_tokens=10, output_tokens=10, cache_read_input_tokens=1_000_000)
    assert cache_savings(prices, "claude-sonnet-4-6", read, from_response_cache=False) == pytest.approx(3.0 - 0.3)
    assert cache_savings(prices, "claude-sonnet-4-6", answer, from_response_cache=False) == 0.0
    assert cache_savings(prices, "unpriced-model", answer, from_response_cache=True) == 0.0


def test_the_file_is_private_and_readable_while_written(store: UsageStore) -> None:
    assert stat.S_IMODE(os.stat(store.path).st_mode) == 0o600
    store.write(roll_up([rec("2026-12-01T09:00", feature="f", cost_usd=1.0)]))
    reader = UsageStore(store.path, read_only=True)
    store.write(roll_up([rec("2026-12-01T09:00", feature="f", cost_usd=1.0)]))
    assert reader.report("feature", "hour", 0, at("2027-01-01T00:00"))[0].cost_usd == 2.0
    reader.close()


@pytest.mark.parametrize("content", [b"this is not a database" * 100, None])
def test_an_unusable_file_is_moved_aside(tmp_path: Path, content: bytes | None) -> None:
    path = tmp_path / "usage.sqlite3"
    if content is None:  # written by a newer version
        db = sqlite3.connect(path)
        db.execute("PRAGMA user_version = 99")
        db.close()
    else:
        path.write_bytes(content)
    store, problem = open_store(path)
    assert problem is not None and "moved to" in problem
    assert [p.name for p in tmp_path.iterdir() if ".corrupt-" in p.name]
    store.write(roll_up([rec("2026-12-01T09:00", cost_usd=1.0)]))
    assert store.report("model", "hour", 0, at("2027-01-01T00:00"))[0].cost_usd == 1.0
    store.close()


async def test_the_writer_batches_and_flushes_on_cancel(store: UsageStore, autojump_clock: object) -> None:
    writer = UsageWriter(store, flush_interval_s=1.0)
    async with trio.open_nursery() as nursery:
        await nursery.start(writer.run)
        for _ in range(3):
            writer.submit(rec("2026-12-01T09:00", feature="f", cost_usd=0.5))
        await trio.sleep(1.5)  # (virtual time) one interval: one transaction
        while writer.writes == 0:  # the write runs in a thread, which virtual time does not wait for
            await trio.sleep(0.01)
        assert writer.writes == 1
        writer.submit(rec("2026-12-01T10:00", feature="f", cost_usd=0.25))
        nursery.cancel_scope.cancel()  # the last record is written by the shielded final flush
    rows = store.report("feature", "hour", 0, at("2027-01-01T00:00"))
    assert [(r.requests, r.cost_usd) for r in rows] == [(3, 1.5), (1, 0.25)]


async def test_a_full_channel_drops_and_counts(store: UsageStore) -> None:
    writer = UsageWriter(store, queue_size=2)
    for _ in range(5):
        writer.submit(rec("2026-12-01T09:00", cost_usd=1.0))
    assert writer.dropped == 3
    await writer.flush()
    assert store.report("model", "hour", 0, at("2027-01-01T00:00"))[0].requests == 2


class _FailingStore(UsageStore):
    failures = 0

    def write(self, rollup: object) -> None:
        if self.failures:
            self.failures -= 1
            raise sqlite3.OperationalError("disk I/O error")
        super().write(rollup)


async def test_a_failing_disk_keeps_the_rollups_for_the_next_write(tmp_path: Path) -> None:
    store = _FailingStore(tmp_path / "usage.sqlite3")
    store.failures = 2
    errors: list[str] = []
    writer = UsageWriter(store, on_error=errors.append, max_pending_keys=2)
    writer.submit(rec("2026-12-01T09:00", feature="a", cost_usd=1.0))
    await writer.flush()
    writer.submit(rec("2026-12-01T09:00", feature="a", cost_usd=1.0))
    writer.submit(rec("2026-12-01T09:00", feature="b", cost_usd=1.0))
    writer.submit(rec("2026-12-01T09:00", feature="c", cost_usd=1.0))  # a third key waits beyond the cap: dropped
    await writer.flush()
    assert errors == [f"could not write {store.path}: disk I/O error"]  # once, until a write succeeds
    assert writer.write_failures == 2 and writer.dropped == 1
    await writer.flush()
    assert writer.last_error is None
    rows = store.report("feature", "hour", 0, at("2027-01-01T00:00"))
    assert sorted((r.key, r.requests) for r in rows) == [("a", 2), ("b", 1)]
    store.close()


async def test_retention_prunes_old_hours(store: UsageStore) -> None:
    now = at("2026-12-10T12:00")
    writer = UsageWriter(store, retention_s=2 * 86_400, wall_clock=lambda: now)
    for when in ("2026-12-01T09:00", "2026-12-08T11:00", "2026-12-08T12:30", "2026-12-10T11:00"):
        writer.submit(rec(when, cost_usd=1.0))
    await writer.flush()
    rows = store.report("model", "day", 0, now)
    assert [(r.period, r.requests) for r in rows] == [(int(at("2026-12-08T00:00")), 1), (int(at("2026-12-10T00:00")), 1)]
