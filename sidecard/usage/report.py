"""Usage rows rendered for `sidecardctl usage`: a table (per period, then totals per key), JSON, CSV, a PNG.

Periods are shown in UTC: hours as `2026-12-03 14:00`, days as `2026-12-03`, months as `2026-12`.
"""

from __future__ import annotations

import csv
import io
import math
import time
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Final

import msgspec

from .store import By, UsageRow, Window

_PERIOD_FORMAT: Final = {"hour": "%Y-%m-%d %H:00", "day": "%Y-%m-%d", "month": "%Y-%m"}
_NONE: Final = "(none)"
FIELDS: Final = (
    "period", "key", "requests", "input_tokens", "output_tokens", "cache_read_tokens", "cache_write_tokens",
    "cost_usd", "saved_usd", "errors", "error_rate",
)
MAX_STACKS: Final = 8  # keys drawn separately in the PNG; the rest are "other"


def period_label(period: int, window: Window) -> str:
    return time.strftime(_PERIOD_FORMAT[window], time.gmtime(period))


def totals(rows: Iterable[UsageRow]) -> list[UsageRow]:
    """One row per key over all periods (period 0), the costliest first."""
    sums: dict[str, list[float]] = {}
    for row in rows:
        values = (row.requests, row.input_tokens, row.output_tokens, row.cache_read_tokens, row.cache_write_tokens,
                  row.cost_usd, row.saved_usd, row.errors)
        current = sums.get(row.key)
        sums[row.key] = list(values) if current is None else [a + b for a, b in zip(current, values)]
    out = [
        UsageRow(0, key, int(v[0]), int(v[1]), int(v[2]), int(v[3]), int(v[4]), v[5], v[6], int(v[7]))
        for key, v in sums.items()
    ]
    return sorted(out, key=lambda row: (-row.cost_usd, row.key))


def _cells(row: UsageRow) -> list[str]:
    return [
        row.key or _NONE, f"{row.requests:,}", f"{row.input_tokens:,}", f"{row.output_tokens:,}",
        f"{row.cache_read_tokens:,}", f"{row.cache_write_tokens:,}", f"${row.cost_usd:,.4f}", f"${row.saved_usd:,.4f}",
        f"{row.error_rate:.1%}",
    ]


_FIGURES: Final = ["requests", "input", "output", "cache read", "cache write", "cost", "cache saved", "errors"]


def _grid(labels: list[str], lines: list[list[str]]) -> str:
    """Text columns (`labels`) left-aligned, then the figures right-aligned."""
    header = [*labels, *_FIGURES]
    widths = [max(len(cells[i]) for cells in [header, *lines]) for i in range(len(header))]
    return "\n".join(
        "  ".join(c.ljust(w) if i < len(labels) else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))).rstrip()
        for cells in [header, *lines]
    )


def table(rows: list[UsageRow], by: By, window: Window) -> str:
    """Each period's rows, then the totals per key: "which feature spent what" at a glance."""
    if not rows:
        return "no usage recorded in this range"
    per_period = _grid([window, by], [[period_label(row.period, window), *_cells(row)] for row in rows])
    first, last = period_label(rows[0].period, window), period_label(rows[-1].period, window)
    total = _grid([by], [_cells(row) for row in totals(rows)])
    return f"{per_period}\n\ntotal by {by}, {first} to {last}\n{total}"


def _record(row: UsageRow, window: Window) -> dict[str, object]:
    return {
        "period": period_label(row.period, window), "period_start": row.period, "key": row.key,
        "requests": row.requests, "input_tokens": row.input_tokens, "output_tokens": row.output_tokens,
        "cache_read_tokens": row.cache_read_tokens, "cache_write_tokens": row.cache_write_tokens,
        "cost_usd": row.cost_usd, "saved_usd": row.saved_usd, "errors": row.errors, "error_rate": row.error_rate,
    }


def to_json(rows: list[UsageRow], by: By, window: Window) -> bytes:
    return msgspec.json.encode({"by": by, "window": window, "rows": [_record(row, window) for row in rows]})


def to_csv(rows: list[UsageRow], window: Window) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, ["period", "period_start", *FIELDS[1:]], lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow(_record(row, window))
    return out.getvalue()


def _periods(rows: list[UsageRow], window: Window) -> list[int]:
    """Every period from the first row's to the last row's, those without usage included (as gaps)."""
    if not rows:
        return []
    first, last = min(row.period for row in rows), max(row.period for row in rows)
    if window != "month":
        step = 3600 if window == "hour" else 86_400
        return list(range(first, last + 1, step))
    periods, moment = [], datetime.fromtimestamp(first, UTC)
    while (start := int(moment.timestamp())) <= last:
        periods.append(start)
        moment = moment.replace(year=moment.year + moment.month // 12, month=moment.month % 12 + 1)
    return periods


def plot_png(rows: list[UsageRow], path: str, by: By, window: Window) -> None:
    """Cost per period as stacked bars, one colour per key (the costliest `MAX_STACKS`, the rest as "other");
    periods without usage stay as gaps, so the time axis is even.

    Needs matplotlib, drawn off-screen (Agg) without pyplot's global state, like `sidecardctl quality --png`.
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise RuntimeError("plotting needs matplotlib: install matplotlib (pip install matplotlib)") from None
    periods = _periods(rows, window)
    ranked = [row.key for row in totals(rows)]
    shown = ranked[:MAX_STACKS] if len(ranked) <= MAX_STACKS else ranked[: MAX_STACKS - 1]
    stacks = [*shown, "other"] if len(ranked) > len(shown) else shown
    cost = {(key, period): 0.0 for key in stacks for period in periods}
    for row in rows:
        key = row.key if row.key in shown else "other"
        cost[key, row.period] += row.cost_usd
    figure = Figure(figsize=(min(16.0, max(8.0, 1.0 + 0.3 * len(periods))), 5.0), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots()
    xs = range(len(periods))
    bottom = [0.0] * len(periods)
    for i, key in enumerate(stacks):
        heights = [cost[key, p] for p in periods]
        axes.bar(xs, heights, bottom=bottom, label=key or _NONE, color="lightgrey" if key == "other" else f"C{i % 10}",
                 edgecolor="white", linewidth=0.5)
        bottom = [b + h for b, h in zip(bottom, heights)]
    if not periods:
        axes.text(0.5, 0.5, "no usage recorded in this range", ha="center", va="center", transform=axes.transAxes)
    step = max(1, math.ceil(len(periods) / 24))  # at most 24 labels
    axes.set_xticks(list(xs)[::step], [period_label(p, window) for p in periods][::step], rotation=45, ha="right")
    axes.set_ylabel("cost (USD)")
    axes.set_title(f"sidecard spend by {by} per {window}", loc="left", fontweight="bold")
    axes.grid(True, axis="y", alpha=0.3)
    if stacks:
        axes.legend(title=by, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small", frameon=False)
    figure.savefig(path, format="png")
