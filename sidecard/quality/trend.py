"""Score trends for `sidecardctl quality`: per-key means in time buckets, as a sparkline or a PNG chart."""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Hashable
from typing import Final

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


def plot_png(series: dict[str, list[tuple[float, float]]], path: str, *, title: str) -> None:
    """Draw each labelled series (bucket start, mean) against minutes before the latest point, into a PNG.

    Needs matplotlib, drawn off-screen (Agg) without pyplot's global state, so it is safe in any process.
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise RuntimeError("plotting needs matplotlib: install matplotlib (pip install matplotlib)") from None
    latest = max((t for points in series.values() for t, _ in points), default=0.0)
    figure = Figure(figsize=(9, 4.5), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    for label, points in sorted(series.items()):
        if points:
            axes.plot([(t - latest) / 60 for t, _ in points], [v for _, v in points], marker=".", label=label)
    axes.set_title(title)
    axes.set_xlabel("minutes (0 = latest)")
    axes.set_ylabel("mean score")
    axes.set_ylim(0.0, 1.05)
    axes.grid(True, alpha=0.3)
    if any(series.values()):
        axes.legend(loc="lower left", fontsize="small")
    figure.savefig(path, format="png")
