"""`sidecardctl usage` output: the table, JSON, CSV and the PNG, from a week of two features and three users."""

from __future__ import annotations

import csv
import io
import json
import random
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from sidecard.observe.redact import pseudonym
from sidecard.usage import UsageRecord, UsageStore
from sidecard.usage.report import plot_png, table, to_csv, to_json, totals
from sidecard.usage.store import roll_up

START = datetime(2026, 11, 30, tzinfo=UTC)  # a Monday
USERS = [pseudonym(name, b"salt") for name in ("ann", "bo", "cy")]


def week(rng: random.Random) -> list[UsageRecord]:
    records = []
    for hour in range(7 * 24):
        when = START + timedelta(hours=hour)
        for feature, per_hour, price in (("search", 6, 0.02), ("summarize", 2, 0.15)):
            for _ in range(rng.randrange(per_hour + 1)):
                records.append(UsageRecord(
                    at=(when + timedelta(minutes=rng.randrange(60))).timestamp(), feature=feature, user=rng.choice(USERS),
                    model="claude-sonnet-4-6", route="default", outcome="error" if rng.random() < 0.02 else "ok",
                    input_tokens=1000, output_tokens=200, cache_read_tokens=500, cost_usd=price, saved_usd=price / 10,
                ))
    return records


@pytest.fixture
def store(tmp_path: Path) -> UsageStore:
    store = UsageStore(tmp_path / "usage.sqlite3")
    store.write(roll_up(week(random.Random(7))))
    yield store
    store.close()


def this_week(store: UsageStore, by: str) -> list:
    return store.report(by, "day", START.timestamp(), (START + timedelta(days=7)).timestamp())


def test_the_table_answers_which_feature_spent_what_this_week(store: UsageStore) -> None:
    rows = this_week(store, "feature")
    text = table(rows, "feature", "day")
    lines = text.splitlines()
    assert lines[0].split() == ["day", "feature", "requests", "input", "output", "cache", "read", "cache", "write", "cost",
                                "cache", "saved", "errors"]
    assert lines[1].startswith("2026-11-30  summarize")  # each day's costliest feature first
    summed = totals(rows)
    assert [r.key for r in summed] == ["summarize", "search"]
    total_line = next(line for line in lines[lines.index("total by feature, 2026-11-30 to 2026-12-06") + 2:] if line.startswith("summarize"))
    assert f"${summed[0].cost_usd:,.4f}" in total_line and f"{summed[0].requests:,}" in total_line


def test_users_are_listed_by_pseudonym(store: UsageStore) -> None:
    text = table(this_week(store, "user"), "user", "day")
    assert all(user in text for user in USERS) and "ann" not in text


def test_json_and_csv_carry_the_same_rows(store: UsageStore) -> None:
    rows = this_week(store, "feature")
    data = json.loads(to_json(rows, "feature", "day"))
    assert data["by"] == "feature" and len(data["rows"]) == len(rows) == 14
    first = data["rows"][0]
    assert first["period"] == "2026-11-30" and first["period_start"] == int(START.timestamp())
    assert first["requests"] == rows[0].requests and first["error_rate"] == pytest.approx(rows[0].error_rate)
    parsed = list(csv.DictReader(io.StringIO(to_csv(rows, "day"))))
    assert [(r["period"], r["key"], int(r["requests"])) for r in parsed] == [(d["period"], d["key"], d["requests"]) for d in data["rows"]]


def test_empty_ranges_say_so(tmp_path: Path) -> None:
    assert table([], "feature", "day") == "no usage recorded in this range"
    plot_png([], str(tmp_path / "empty.png"), "feature", "day")
    assert (tmp_path / "empty.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_png_is_a_stacked_bar_per_period(store: UsageStore, tmp_path: Path) -> None:
    path = tmp_path / "usage.png"
    plot_png(store.report("user", "hour", START.timestamp(), (START + timedelta(days=2)).timestamp()), str(path), "user", "hour")
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


def test_the_time_axis_is_even_across_gaps_and_years() -> None:
    from sidecard.usage.report import _periods
    from sidecard.usage.store import UsageRow

    def row(when: datetime) -> UsageRow:
        return UsageRow(int(when.timestamp()), "k", 1, 0, 0, 0, 0, 1.0, 0.0, 0)

    hours = _periods([row(START), row(START + timedelta(hours=3))], "hour")
    assert [h - hours[0] for h in hours] == [0, 3600, 7200, 10800]
    months = _periods([row(datetime(2026, 11, 1, tzinfo=UTC)), row(datetime(2027, 2, 1, tzinfo=UTC))], "month")
    assert [datetime.fromtimestamp(m, UTC).strftime("%Y-%m") for m in months] == ["2026-11", "2026-12", "2027-01", "2027-02"]
