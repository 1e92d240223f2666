import json
import os
import stat
import time
from datetime import UTC, datetime
from pathlib import Path

import msgspec
import pytest
import trio
from trio.testing import wait_all_tasks_blocked

from sidecard.limits.spend import Budget, SpendLedger
from sidecard.limits.spend_store import SpendStore


def at(*args) -> float:
    """Unix time of a UTC date and time."""
    return datetime(*args, tzinfo=UTC).timestamp()


def ledger_with(*budgets: Budget) -> SpendLedger:
    return SpendLedger(list(budgets))


def test_keys_a_request_counts_against():
    g = Budget(scope="global", window="day", hard_usd=100)
    per_feature = Budget(scope="feature:*", window="day", hard_usd=10)
    search = Budget(scope="feature:search", window="day", hard_usd=50)
    fast = Budget(scope="route:fast", window="month", soft_usd=5)
    user = Budget(scope="user", window="hour", hard_usd=1)
    ledger = ledger_with(g, per_feature, search, fast, user)
    assert ledger.keys_for(feature="chat", route="fast", user="ab12") == [
        (g, "global"), (per_feature, "feature:chat"), (fast, "route:fast"), (user, "user:ab12"),
    ]
    # a feature with its own budget is counted by that one, not by the per-feature one
    assert ledger.keys_for(feature="search", route="slow", user=None) == [(g, "global"), (search, "feature:search")]
    assert ledger.keys_for(feature="", route="", user="") == [(g, "global")]


def test_budgets_are_validated():
    for bad in ({"scope": "users", "window": "day"}, {"scope": "feature:", "window": "day"},
                {"scope": "global", "window": "week"}, {"scope": "global", "window": "day", "hard_usd": -1},
                {"scope": "global", "window": "day", "soft_usd": float("inf")}):
        with pytest.raises(msgspec.ValidationError):
            msgspec.convert(bad, Budget)
    with pytest.raises(ValueError):
        ledger_with(Budget(scope="user", window="day"), Budget(scope="user", window="day", hard_usd=1))


def test_day_window_ends_at_utc_midnight():
    day = Budget(scope="global", window="day", hard_usd=10)
    ledger = ledger_with(day)
    keys = ledger.keys_for(feature="f", route="r", user=None)
    ledger.add(keys, 4.0, at(2024, 3, 10, 0, 0, 0))
    ledger.add(keys, 5.0, at(2024, 3, 10, 23, 59, 59))
    assert ledger.spent(day, "global", at(2024, 3, 10, 23, 59, 59)) == 9.0
    assert ledger.reset_at(day, at(2024, 3, 10, 12)) == at(2024, 3, 11)
    assert ledger.spent(day, "global", at(2024, 3, 11)) == 0.0
    ledger.add(keys, 1.0, at(2024, 3, 11, 0, 0, 1))
    assert ledger.spent(day, "global", at(2024, 3, 11, 1)) == 1.0


@pytest.mark.parametrize("moment, start, end", [
    ((2024, 2, 29, 23, 59, 59), (2024, 2, 1), (2024, 3, 1)),  # a leap year's February
    ((2023, 2, 28, 12), (2023, 2, 1), (2023, 3, 1)),
    ((2023, 12, 31, 23, 59, 59), (2023, 12, 1), (2024, 1, 1)),
    ((2024, 4, 30, 23, 59, 59), (2024, 4, 1), (2024, 5, 1)),
    ((2024, 1, 1), (2024, 1, 1), (2024, 2, 1)),
])
def test_month_window_is_the_calendar_month_in_utc(moment, start, end):
    month = Budget(scope="user", window="month", hard_usd=10)
    ledger = ledger_with(month)
    keys = ledger.keys_for(feature="f", route="r", user="u")
    ledger.add(keys, 3.0, at(*start))
    ledger.add(keys, 2.0, at(*moment))
    assert ledger.spent(month, "user:u", at(*moment)) == 5.0
    assert ledger.reset_at(month, at(*moment)) == at(*end)
    assert ledger.spent(month, "user:u", at(*end) - 0.001) == 5.0
    assert ledger.spent(month, "user:u", at(*end)) == 0.0


def test_rolling_hour_forgets_a_minute_at_a_time():
    hour = Budget(scope="user", window="hour", hard_usd=10)
    ledger = ledger_with(hour)
    keys = ledger.keys_for(feature="f", route="r", user="u")
    t0 = at(2024, 3, 10, 12, 0, 0)
    ledger.add(keys, 4.0, t0 + 30)  # minute 12:00
    ledger.add(keys, 3.0, t0 + 600)  # minute 12:10
    ledger.add(keys, 2.0, t0 + 1800)  # minute 12:30
    assert ledger.spent(hour, "user:u", t0 + 3599) == 9.0
    assert ledger.spent(hour, "user:u", t0 + 3600) == 5.0  # 12:00's bucket left at 13:00
    assert ledger.spent(hour, "user:u", t0 + 4200) == 2.0
    assert ledger.spent(hour, "user:u", t0 + 5400) == 0.0
    # 6 more fit under 10 once 12:00 and 12:10 have both left the window (2 + 6), not after 12:00 alone (5 + 6)
    assert ledger.reset_at(hour, t0 + 1800, key="user:u", estimate_usd=6) == t0 + 600 + 3600
    assert ledger.reset_at(hour, t0 + 1800, key="user:u", estimate_usd=1) == t0 + 1800  # fits now
    assert ledger.reset_at(hour, t0 + 1800, key="user:u", estimate_usd=11) == t0 + 1800 + 3600  # never: when empty
    assert ledger.reset_at(hour, t0 + 1830) == t0 + 1800 + 3600  # no key: the upper bound


def test_hard_limit_refuses_with_the_reset_time():
    day = Budget(scope="user", window="day", soft_usd=5, hard_usd=10)
    ledger = ledger_with(day)
    keys = ledger.keys_for(feature="f", route="r", user="u")
    now = at(2024, 3, 10, 15)
    ledger.add(keys, 8.0, now)
    verdict = ledger.check(keys, 2.0, now)  # 8 + 2 = 10: exactly at the limit is allowed
    assert verdict.allowed and verdict.soft_crossed == [(day, "user:u")]
    assert [(u.key, u.spent_usd, u.budget.hard_usd) for u in verdict.usage] == [("user:u", 8.0, 10)]
    verdict = ledger.check(keys, 2.5, now)
    assert not verdict.allowed
    assert (verdict.refused, verdict.refused_key, verdict.reset_at) == (day, "user:u", at(2024, 3, 11))
    ledger.add(keys, 2.5, now)  # a request let through earlier overshoots by at most its own estimate
    assert not ledger.check(keys, 0.0, now).allowed  # over the limit: even a free request waits
    assert ledger.check(keys, 2.5, at(2024, 3, 11)).allowed


def test_the_refusal_that_lasts_longest_is_reported():
    day = Budget(scope="global", window="day", hard_usd=1)
    month = Budget(scope="feature:*", window="month", hard_usd=1)
    hour = Budget(scope="user", window="hour", hard_usd=1)
    ledger = ledger_with(hour, day, month)
    keys = ledger.keys_for(feature="f", route="r", user="u")
    now = at(2024, 3, 10, 15)
    ledger.add(keys, 2.0, now)
    verdict = ledger.check(keys, 0.5, now)
    assert (verdict.refused, verdict.refused_key, verdict.reset_at) == (month, "feature:f", at(2024, 4, 1))


def test_soft_crossing_is_reported_once_per_window():
    day = Budget(scope="global", window="day", soft_usd=5)
    ledger = ledger_with(day)
    keys = ledger.keys_for(feature="f", route="r", user=None)
    now = at(2024, 3, 10, 15)
    assert ledger.add(keys, 4.0, now) == []
    assert ledger.add(keys, 1.0, now) == [(day, "global")]  # reaching it counts
    assert ledger.add(keys, 3.0, now) == []
    assert ledger.add(keys, 6.0, at(2024, 3, 11)) == [(day, "global")]  # a new day


def test_soft_crossing_in_the_rolling_hour_rearms_when_spend_falls_back():
    hour = Budget(scope="global", window="hour", soft_usd=5)
    ledger = ledger_with(hour)
    keys = ledger.keys_for(feature="f", route="r", user=None)
    t0 = at(2024, 3, 10, 12)
    assert ledger.add(keys, 6.0, t0) == [(hour, "global")]
    assert ledger.add(keys, 1.0, t0 + 1200) == []
    assert ledger.add(keys, 1.0, t0 + 3600) == []  # 6 left the window: 2, under the soft limit again
    assert ledger.add(keys, 3.0, t0 + 3660) == [(hour, "global")]


def test_requests_in_flight_reserve_their_worst_case_until_they_settle():
    day = Budget(scope="global", window="day", soft_usd=1, hard_usd=10)
    ledger = ledger_with(day)
    keys = ledger.keys_for(feature="f", route="r", user=None)
    now = at(2024, 3, 10, 15)
    first, second = ledger.reserve(keys, 4.0), ledger.reserve(keys, 4.0)
    assert ledger.reserved(day, "global") == 8.0 and ledger.spent(day, "global", now) == 0
    verdict = ledger.check(keys, 2.5, now)  # 0 spent + 8 reserved + 2.5 > 10
    assert not verdict.allowed and verdict.usage[0].reserved_usd == 8.0 and verdict.reset_at == at(2024, 3, 11)
    assert verdict.soft_crossed == []  # a reservation is not spend: the soft limit waits for the real cost
    assert ledger.settle(first, 1.5, now) == [(day, "global")]  # settled to what it cost: this spend reaches soft
    assert (ledger.reserved(day, "global"), ledger.spent(day, "global", now)) == (4.0, 1.5)
    assert ledger.check(keys, 2.5, now).allowed and ledger.check(keys, 2.5, now).soft_crossed == [(day, "global")]
    assert ledger.settle(second, 0.0, now) == []  # failed unbilled: the reservation is simply released
    assert ledger.reserved(day, "global") == 0 and ledger.spent(day, "global", now) == 1.5
    assert b"reserved" not in ledger.snapshot()  # held by requests in flight, never written
    with pytest.raises(ValueError):
        ledger.reserve(keys, float("nan"))


def test_a_refusal_in_the_rolling_hour_counts_reservations_as_spent_now():
    hour = Budget(scope="user", window="hour", hard_usd=10)
    ledger = ledger_with(hour)
    keys = ledger.keys_for(feature="f", route="r", user="u")
    t0 = at(2024, 3, 10, 12)
    ledger.add(keys, 5.0, t0)
    ledger.reserve(keys, 4.0)
    verdict = ledger.check(keys, 2.0, t0 + 600)  # 5 + 4 + 2 > 10: it fits once the 5 has left the hour
    assert not verdict.allowed and verdict.reset_at == t0 + 3600


def test_operator_raises_limits_for_a_budget_or_one_key():
    user = Budget(scope="user", window="day", soft_usd=1, hard_usd=2)
    ledger = ledger_with(user)
    now = at(2024, 3, 10, 15)
    alice = ledger.keys_for(feature="f", route="r", user="alice")
    bob = ledger.keys_for(feature="f", route="r", user="bob")
    ledger.add(alice, 2.0, now)
    ledger.add(bob, 2.0, now)
    assert ledger.raise_limit("user:alice", "day", soft_usd=None, hard_usd=5, wall_now=now) == Budget(scope="user", window="day", hard_usd=5)
    assert ledger.check(alice, 1.0, now).allowed
    assert not ledger.check(bob, 1.0, now).allowed
    raised = ledger.raise_limit("user", "day", soft_usd=3, hard_usd=3, wall_now=now)  # every user without limits of their own
    assert raised == Budget(scope="user", window="day", soft_usd=3, hard_usd=3)
    assert ledger.describe("user", "day", now)["hard_usd"] == 3
    verdict = ledger.check(bob, 1.0, now)
    assert verdict.allowed and verdict.usage[0].budget == raised
    assert not ledger.check(alice, 3.5, now).allowed  # alice keeps her own 5
    for scope_key, window in (("user:alice", "hour"), ("feature:f", "day"), ("user", "month"), ("user:", "day")):
        with pytest.raises(ValueError):
            ledger.raise_limit(scope_key, window, soft_usd=None, hard_usd=1, wall_now=now)
    with pytest.raises(ValueError):
        ledger.raise_limit("user", "day", soft_usd=-1, hard_usd=1, wall_now=now)


def test_a_raise_holds_until_its_window_resets():
    day = Budget(scope="global", window="day", hard_usd=1)
    hour = Budget(scope="user", window="hour", hard_usd=1)
    ledger = ledger_with(day, hour)
    now = at(2024, 3, 10, 15)
    keys = ledger.keys_for(feature="f", route="r", user="u")
    ledger.raise_limit("global", "day", soft_usd=None, hard_usd=10, wall_now=now)
    ledger.raise_limit("user:u", "hour", soft_usd=None, hard_usd=10, wall_now=now)
    assert ledger.check(keys, 5, now).allowed
    assert ledger.describe("global", "day", at(2024, 3, 10, 23, 59))["hard_usd"] == 10
    assert ledger.describe("global", "day", at(2024, 3, 11))["hard_usd"] == 1  # the next UTC day: the config's
    assert ledger.describe("user:u", "hour", now + 3599)["hard_usd"] == 10
    assert ledger.describe("user:u", "hour", now + 3600)["hard_usd"] == 1
    ledger.add(keys, 0.1, at(2024, 3, 11, 1))  # prunes what has ended
    assert json.loads(ledger.snapshot())["raises"] == []


def test_raises_are_kept_in_the_snapshot():
    budgets = [Budget(scope="global", window="day", hard_usd=1), Budget(scope="user", window="month", hard_usd=1)]
    ledger = ledger_with(*budgets)
    now = at(2024, 3, 10, 15)
    revision = ledger.revision
    ledger.raise_limit("global", "day", soft_usd=4, hard_usd=5, wall_now=now)
    ledger.raise_limit("user:u", "month", soft_usd=None, hard_usd=None, wall_now=now)
    assert ledger.revision > revision  # so the store writes it
    restored = SpendLedger.restore(budgets, ledger.snapshot())
    assert restored.describe("global", "day", now) == {"scope": "global", "window": "day", "spent_usd": 0.0, "soft_usd": 4, "hard_usd": 5}
    assert restored.describe("user:u", "month", now)["hard_usd"] is None
    assert restored.describe("user:v", "month", now)["hard_usd"] == 1
    assert restored.describe("global", "day", at(2024, 3, 11))["hard_usd"] == 1
    # a file written before raises were stored still loads; a raise no budget owns any more is dropped
    assert SpendLedger.restore(budgets, b'{"format": 1, "spend": []}').describe("global", "day", now)["hard_usd"] == 1
    assert json.loads(SpendLedger.restore(budgets[1:], ledger.snapshot()).snapshot())["raises"] == [
        {"window": "month", "scope": "user:u", "soft_usd": None, "hard_usd": None, "until": at(2024, 4, 1)}
    ]


def test_operator_resets_a_key():
    hour = Budget(scope="feature:*", window="hour", hard_usd=1)
    day = Budget(scope="feature:search", window="day", hard_usd=1)
    ledger = ledger_with(hour, day)
    now = at(2024, 3, 10, 15)
    ledger.add(ledger.keys_for(feature="search", route="r", user=None), 1.5, now)
    assert ledger.reset("feature:search", "hour", now) == 1.5
    assert ledger.reset("feature:search", "hour", now) == 0.0
    assert ledger.spent(day, "feature:search", now) == 1.5
    assert ledger.reset("feature:search", "day", now) == 1.5
    assert ledger.check(ledger.keys_for(feature="search", route="r", user=None), 1.0, now).allowed
    with pytest.raises(ValueError):
        ledger.reset("global", "day", now)


def test_snapshot_and_restore_keep_the_current_windows():
    hour = Budget(scope="user", window="hour", hard_usd=10)
    day = Budget(scope="feature:*", window="day", hard_usd=10)
    month = Budget(scope="global", window="month", hard_usd=100)
    ledger = ledger_with(hour, day, month)
    t0 = at(2024, 3, 31, 23, 30)
    ledger.add(ledger.keys_for(feature="a", route="r", user="u1"), 1.0, t0)
    ledger.add(ledger.keys_for(feature="b", route="r", user="u2"), 2.0, at(2024, 4, 1, 0, 10))
    data = ledger.snapshot()
    assert ("day", "feature:a") not in [(s["window"], s["key"]) for s in json.loads(data)["spend"]]  # March 31 ended
    restored = SpendLedger.restore([hour, day, month], data)
    for budget, key, now, spent in [
        (hour, "user:u1", t0 + 60, 1.0), (hour, "user:u2", t0 + 2400, 2.0),
        (day, "feature:b", at(2024, 4, 1, 1), 2.0), (month, "global", at(2024, 4, 1, 1), 2.0),
    ]:
        assert restored.spent(budget, key, now) == spent == ledger.spent(budget, key, now)
    # once time has moved on, what ended is dropped from the next snapshot
    ledger.add(ledger.keys_for(feature="b", route="r", user="u2"), 1.0, at(2024, 4, 1, 1))
    stored = json.loads(ledger.snapshot())["spend"]
    assert sorted((s["window"], s["key"]) for s in stored) == [
        ("day", "feature:b"), ("hour", "user:u2"), ("month", "global"),
    ]
    # spend no budget counts any more is left behind
    restored = SpendLedger.restore([month], ledger.snapshot())
    assert json.loads(restored.snapshot())["spend"] == [{"window": "month", "key": "global", "start": at(2024, 4, 1), "usd": 3.0}]


def test_restore_refuses_what_it_cannot_read():
    for data in (b"", b"{", b'{"format": 99, "spend": []}', b'{"format": 1, "spend": [{"window": "week", "key": "global"}]}',
                 b'{"format": 1, "spend": [{"window": "day", "key": "global", "start": 1e300}]}',
                 b'{"format": 1, "spend": [{"window": "month", "key": "global", "start": 1e300}]}',
                 b'{"format": 1, "spend": [{"window": "month", "key": "global", "start": 86400}]}',
                 b'{"format": 1, "spend": [{"window": "hour", "key": "global", "minutes": {"99999999999": 1}}]}',
                 b'{"format": 1, "spend": [{"window": "day", "key": "global", "start": 86400, "usd": -5}]}',  # (spend
                 b'{"format": 1, "spend": [{"window": "hour", "key": "global", "minutes": {"60": -5}}]}',  # no spend made)
                 b'{"format": 1, "raises": [{"window": "day", "scope": "global", "hard_usd": -1, "until": 0}]}',
                 b'{"format": 1, "raises": [{"window": "day", "scope": "global", "until": 1e300}]}'):
        with pytest.raises((msgspec.MsgspecError, ValueError)):
            SpendLedger.restore([], data)


def test_ended_windows_are_dropped_from_memory():
    day = Budget(scope="user", window="day", hard_usd=1)
    hour = Budget(scope="user", window="hour", hard_usd=1)
    ledger = ledger_with(day, hour)
    t0 = at(2024, 3, 10, 12)
    for i in range(100):
        ledger.add(ledger.keys_for(feature="f", route="r", user=f"u{i}"), 0.1, t0)
    ledger.add(ledger.keys_for(feature="f", route="r", user="late"), 0.1, at(2024, 3, 11, 0, 30))
    assert len(json.loads(ledger.snapshot())["spend"]) == 2


def test_negative_spend_is_refused():
    ledger = ledger_with(Budget(scope="global", window="day"))
    with pytest.raises(ValueError):
        ledger.add(ledger.keys_for(feature="f", route="r", user=None), -1.0, 0)


# -- the store

BUDGETS = [Budget(scope="global", window="day", hard_usd=10)]
NOW = at(2024, 3, 10, 12)


def spend(ledger: SpendLedger, usd: float) -> None:
    ledger.add(ledger.keys_for(feature="f", route="r", user=None), usd, NOW)


def on_disk(path: Path) -> float:
    return SpendLedger.restore(BUDGETS, path.read_bytes()).spent(BUDGETS[0], "global", NOW)


async def until(condition) -> None:
    """Wait for the store's worker thread, in real time (the mock clock does not move while it writes)."""
    give_up = time.monotonic() + 5
    while not condition():
        assert time.monotonic() < give_up
        await trio.lowlevel.checkpoint()


async def written(store: SpendStore, count: int) -> None:
    await until(lambda: store.writes >= count)


def test_load_without_a_file_starts_from_zero(tmp_path):
    ledger, problem = SpendStore(str(tmp_path / "spend.json")).load(BUDGETS)
    assert problem is None and ledger.spent(BUDGETS[0], "global", NOW) == 0


@pytest.mark.parametrize("make_bad", [
    lambda path: path.write_bytes(b'{"format": 1, "spend": [{"window": '),
    lambda path: path.write_bytes(b"\x00\xff garbage"),
    lambda path: path.write_bytes(b'{"format": 1, "spend": [{"window": "day", "key": "global", "start": 1e300}]}'),
])
def test_a_bad_file_is_moved_aside_and_reported(tmp_path, make_bad):
    path = tmp_path / "spend.json"
    make_bad(path)
    ledger, problem = SpendStore(str(path)).load(BUDGETS)
    assert ledger.spent(BUDGETS[0], "global", NOW) == 0
    (moved,) = tmp_path.glob("spend.json.corrupt-*")
    assert not path.exists()
    assert problem.startswith(f"spend file {path} is ") and str(moved) in problem


def test_a_directory_at_the_path_is_reported_and_never_moved(tmp_path):
    """(The daemon refuses to start on it first: issue 15.)"""
    path = tmp_path / "spend.json"
    path.mkdir()
    ledger, problem = SpendStore(str(path)).load(BUDGETS)
    assert ledger.spent(BUDGETS[0], "global", NOW) == 0 and "could not be moved" in problem
    assert path.is_dir() and not list(tmp_path.glob("spend.json.corrupt-*"))


async def test_store_flushes_at_most_every_interval_and_only_changes(tmp_path, nursery, mock_clock):
    path = tmp_path / "spend.json"
    store = SpendStore(str(path), flush_interval_s=1.0)
    ledger, _ = store.load(BUDGETS)
    await nursery.start(store.run, ledger)
    spend(ledger, 1.0)
    mock_clock.jump(0.5)
    await wait_all_tasks_blocked()
    assert not path.exists()
    mock_clock.jump(0.5)
    await written(store, 1)
    assert on_disk(path) == 1.0
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    mock_clock.jump(5)  # nothing changed: nothing written
    await wait_all_tasks_blocked()
    assert store.writes == 1
    spend(ledger, 2.0)
    spend(ledger, 0.5)
    mock_clock.jump(1)
    await written(store, 2)
    assert on_disk(path) == 3.5
    assert [p.name for p in tmp_path.iterdir()] == ["spend.json"]  # no temp file left behind
    reloaded, problem = SpendStore(str(path)).load(BUDGETS)
    assert problem is None and reloaded.spent(BUDGETS[0], "global", NOW) == 3.5


async def test_store_flushes_once_more_when_cancelled(tmp_path, mock_clock):
    path = tmp_path / "spend.json"
    store = SpendStore(str(path), flush_interval_s=60)
    ledger, _ = store.load(BUDGETS)
    async with trio.open_nursery() as nursery:
        await nursery.start(store.run, ledger)
        spend(ledger, 4.0)
        nursery.cancel_scope.cancel()
    assert store.writes == 1 and on_disk(path) == 4.0


async def test_a_failing_write_is_reported_once_and_retried(tmp_path, nursery, mock_clock):
    blocker = tmp_path / "not-a-directory"
    blocker.write_bytes(b"")
    errors = []
    store = SpendStore(str(blocker / "spend.json"), flush_interval_s=1.0, on_error=errors.append)
    ledger, _ = store.load(BUDGETS)
    await nursery.start(store.run, ledger)
    spend(ledger, 1.0)
    for failures in (1, 2):
        mock_clock.jump(1)
        await until(lambda failures=failures: store.write_failures >= failures)
    assert len(errors) == 1 and errors[0].startswith(f"could not write {blocker / 'spend.json'}")
    assert store.last_error == errors[0]
    blocker.unlink()
    blocker.mkdir()
    mock_clock.jump(1)
    await written(store, 1)
    assert store.last_error is None and on_disk(blocker / "spend.json") == 1.0
