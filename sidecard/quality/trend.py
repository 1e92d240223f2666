"""Score trends for `sidecardctl quality`: per-key means in time buckets, as a sparkline or a PNG chart."""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Any, Final

BARS: Final = "▁▂▃▄▅▆▇█"


class Trend:
    """The mean of the values added per key in each `bucket_s` bucket, for the last `buckets` buckets.

    Memory per key is bounded by `buckets`; times are whatever clock `now` comes from (bucket starts are
    multiples of `bucket_s` on it).
    """

    def __init__(self, *, bucket_s: float = 60.0, buckets: int = 120) -> None:
        if bucket_s <= 0 or buckets < 1:
            raise ValueError("bucket_s must be positive and buckets at least 1")
        self.bucket_s = float(bucket_s)
        self.buckets = buckets
        self._series: dict[Hashable, deque[list[float]]] = {}  # [bucket index, sum, count], oldest first

    def add(self, key: Hashable, value: float, now: float) -> None:
        index = math.floor(now / self.bucket_s)
        series = self._series.get(key)
        if series is None:
            series = self._series[key] = deque(maxlen=self.buckets)
        if series and series[-1][0] >= index:  # the current bucket (or a clock that stepped back: the latest)
            series[-1][1] += value
            series[-1][2] += 1
            return
        series.append([index, value, 1])
        while series[0][0] <= index - self.buckets:
            series.popleft()

    def series(self, key: Hashable, now: float | None = None) -> list[tuple[float, float]]:
        """(bucket start, mean) for the buckets with values, oldest first; with `now`, only the last `buckets`
        buckets up to `now` (else up to the key's latest value)."""
        series = self._series.get(key)
        if not series:
            return []
        oldest = (math.floor(now / self.bucket_s) if now is not None else series[-1][0]) - self.buckets
        return [(index * self.bucket_s, total / count) for index, total, count in series if index > oldest]

    def forget(self, key: Hashable) -> None:
        self._series.pop(key, None)


def sparkline(values: list[float], *, lo: float = 0.0, hi: float = 1.0) -> str:
    """One bar per value, ▁ at `lo` (or below) to █ at `hi` (or above)."""
    if hi <= lo:
        raise ValueError("hi must be above lo")
    top = len(BARS) - 1
    return "".join(BARS[round((min(hi, max(lo, v)) - lo) / (hi - lo) * top)] for v in values)


@dataclass(frozen=True, slots=True)
class Line:
    """One monitored key in the chart: its score trend, its alert floor, and the spans its alerts fired."""

    label: str  # within its panel, e.g. "v2 · claude-sonnet-4-6"
    points: list[tuple[float, float]]  # (bucket start, mean score)
    floor: float | None = None  # the score an alert fires below
    alerts: tuple[tuple[float, float | None, str], ...] = ()  # (fired at, resolved at or None: firing now, signal)


MAX_PANELS: Final = 12
_STYLES: Final = ("-", "--", ":", "-.")


def plot_png(panels: dict[str, list[Line]], path: str, *, title: str) -> None:
    """One panel per prompt (its versions and models as lines), into a PNG: each line's alert floor dashed in
    its colour, alert spans shaded, the legend beside the panel. Times are minutes before the latest one.

    Needs matplotlib, drawn off-screen (Agg) without pyplot's global state, so it is safe in any process.
    """
    trend_figure(panels, title=title).savefig(path, format="png")


def trend_figure(panels: dict[str, list[Line]], *, title: str) -> Any:
    """The matplotlib `Figure` that `plot_png` saves."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.lines import Line2D
        from matplotlib.patches import Patch
    except ImportError:
        raise RuntimeError("plotting needs matplotlib: install matplotlib (pip install matplotlib)") from None
    shown = dict(sorted(panels.items())[:MAX_PANELS])
    times = [t for lines in shown.values() for line in lines for t in _times(line)]
    latest, earliest = max(times, default=0.0), min(times, default=0.0)
    span = max((latest - earliest) / 60, 1.0)
    figure = Figure(figsize=(11, 1.2 + 2.6 * max(1, len(shown))), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    figure.suptitle(title)
    axes_list = figure.subplots(max(1, len(shown)), 1, sharex=True, squeeze=False)[:, 0]
    if not shown:
        axes_list[0].text(0.5, 0.5, "no judged answers yet", ha="center", va="center", transform=axes_list[0].transAxes)
    colours = [f"C{i}" for i in range(10)]
    for axes, (panel, lines) in zip(axes_list, shown.items()):
        handles = []
        labels = 0  # alert labels in this panel so far: each gets a row of its own
        for i, line in enumerate(sorted(lines, key=lambda l: l.label)):
            colour, style = colours[i % 10], _STYLES[i // 10 % len(_STYLES)]
            xs = [(t - latest) / 60 for t, _ in line.points]
            (drawn,) = axes.plot(xs, [v for _, v in line.points], color=colour, linestyle=style, marker=".", label=line.label)
            handles.append(drawn)
            if line.floor is not None:
                axes.axhline(line.floor, color=colour, linestyle=(0, (4, 3)), linewidth=1, alpha=0.8)
            for since, until, signals in _merged(line.alerts, latest):
                start, end = (since - latest) / 60, (until - latest) / 60
                axes.axvspan(start, max(end, start + span / 200), color="red", alpha=0.12, linewidth=0)
                # Inside the axes: from the span's start rightwards in the left half, else ending at its end.
                left = start < -span / 2
                axes.text(start if left else end, 0.04 + 0.1 * (labels % 8), f" {line.label}: {', '.join(signals)} ",
                          color="darkred", fontsize="small", va="bottom", ha="left" if left else "right",
                          transform=axes.get_xaxis_transform())
                labels += 1
        handles += [Line2D([], [], color="grey", linestyle=(0, (4, 3)), linewidth=1, label="alert floor"),
                    Patch(color="red", alpha=0.12, label="alert firing")]
        axes.set_title(panel, loc="left", fontsize="medium", fontweight="bold")
        axes.set_ylabel("mean judge score")
        axes.set_ylim(0.0, 1.05)
        axes.grid(True, alpha=0.3)
        axes.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small", frameon=False)
    axes_list[-1].set_xlabel("minutes (0 = latest)")
    axes_list[-1].set_xlim(-span * 1.02, span * 0.02)
    return figure


def _merged(alerts: tuple[tuple[float, float | None, str], ...], latest: float) -> list[tuple[float, float, list[str]]]:
    """A line's alert spans, overlapping ones as one (signals firing together shade once, labelled once)."""
    merged: list[tuple[float, float, list[str]]] = []
    for since, until, signal in sorted(alerts, key=lambda a: a[0]):
        end = latest if until is None else until
        if merged and since <= merged[-1][1]:
            start, previous_end, signals = merged[-1]
            merged[-1] = (start, max(previous_end, end), signals if signal in signals else [*signals, signal])
        else:
            merged.append((since, end, [signal]))
    return merged


def _times(line: Line) -> list[float]:
    return [t for t, _ in line.points] + [t for since, until, _ in line.alerts for t in (since, until) if t is not None]
