"""Trends: per-key bucket means, sparklines, the PNG chart."""

import pytest

from sidecard.ctl import quality_panels
from sidecard.quality.trend import Line, Trend, plot_png, sparkline


def test_bucket_means_and_the_window():
    trend = Trend(bucket_s=60, buckets=3)
    trend.add("a", 1.0, 0.0)
    trend.add("a", 0.5, 59.9)
    trend.add("a", 0.2, 120.0)  # the bucket at 60 stays empty
    trend.add("b", 0.7, 30.0)
    assert trend.series("a") == [(0.0, 0.75), (120.0, 0.2)]
    assert trend.series("b") == [(0.0, 0.7)] and trend.series("none") == []
    trend.add("a", 0.4, 180.0)  # buckets 1..3 are the last three: bucket 0 drops out
    assert trend.series("a") == [(120.0, 0.2), (180.0, 0.4)]
    assert trend.series("a", now=359.0) == [(180.0, 0.4)]  # as of now: buckets 3..5
    assert trend.series("a", now=400.0) == []
    trend.add("a", 1.0, 170.0)  # a clock that stepped back counts in the latest bucket
    assert trend.series("a")[-1] == (180.0, 0.7)
    trend.forget("a")
    assert trend.series("a") == []


def test_memory_is_bounded_by_buckets():
    trend = Trend(bucket_s=1, buckets=120)
    for t in range(10_000):
        trend.add("k", 0.5, float(t))
    assert len(trend.series("k")) == 120 and trend.series("k")[0][0] == 9880.0
    with pytest.raises(ValueError):
        Trend(bucket_s=0)


def test_sparkline():
    assert sparkline([]) == ""
    assert sparkline([0.0, 0.15, 0.3, 0.45, 0.55, 0.7, 0.85, 1.0]) == "▁▂▃▄▅▆▇█"
    assert sparkline([-1.0, 2.0]) == "▁█"  # clamped
    assert sparkline([5.0, 7.5, 10.0], lo=5, hi=10) == "▁▅█"
    with pytest.raises(ValueError):
        sparkline([0.5], lo=1, hi=1)


def test_plot_png(tmp_path):
    pytest.importorskip("matplotlib")
    path = tmp_path / "trend.png"
    panels = {
        "support-reply": [Line("v1 · m", [(0.0, 0.9), (60.0, 0.85), (120.0, 0.6)], 0.8, ((90.0, None, "score"),)),
                          Line("v2 · m", [(60.0, 0.8)], 0.75)],
        # more lines than the 10-colour cycle: the 11th gets another line style, not a repeated look
        "feature:chat": [Line(f"model-{i}", [(0.0, 0.5 + i / 40)], None, ((0.0, 60.0, "check:empty"),)) for i in range(11)],
        "empty": [],
    }
    plot_png(panels, str(path), title="quality")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 1000
    plot_png({}, str(tmp_path / "none.png"), title="quality")  # nothing judged yet: still a picture


def test_quality_panels_group_by_prompt_and_pair_alert_events():
    def event(state, key, at, signal="score"):
        return {"state": state, "key": key, "signal": signal, "at": at}

    key = "support-reply v2 claude-sonnet-4-6"
    result = {
        "monitored": [
            {"key": key, "prompt": "support-reply", "version": "2", "model": "claude-sonnet-4-6", "floor": 0.8,
             "trend": [[0.0, 0.9], [60.0, 0.5]]},
            {"key": "feature:chat claude-haiku-4-5", "prompt": "feature:chat", "version": "-", "model": "claude-haiku-4-5",
             "floor": 0.6, "trend": []},
        ],
        # newest first, as status gives them; the re-measured "firing" again continues the first span
        "recent": [event("firing", key, 300.0), event("resolved", key, 200.0), event("firing", key, 150.0),
                   event("firing", key, 100.0), event("firing", key, 120.0, "check:refusal")],
        "firing": [event("firing", key, 300.0), event("firing", key, 120.0, "check:refusal")],
    }
    panels = quality_panels(result)
    assert sorted(panels) == ["feature:chat", "support-reply"]
    (line,) = panels["support-reply"]
    assert line.label == "v2 · claude-sonnet-4-6" and line.floor == 0.8 and line.points == [(0.0, 0.9), (60.0, 0.5)]
    assert sorted(line.alerts, key=lambda a: a[0]) == [(100.0, 200.0, "score"), (120.0, None, "check:refusal"), (300.0, None, "score")]
    assert panels["feature:chat"][0].label == "claude-haiku-4-5" and panels["feature:chat"][0].alerts == ()


def test_plot_png_without_matplotlib(tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes the import fail
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    monkeypatch.setitem(sys.modules, "matplotlib.backends.backend_agg", None)
    with pytest.raises(RuntimeError, match="install matplotlib"):
        plot_png({}, str(tmp_path / "x.png"), title="t")


def test_alert_labels_stay_inside_their_panel_and_apart():
    """Two lines' alerts firing now, at the right edge: their labels were drawn on top of each other, outside."""
    pytest.importorskip("matplotlib")
    from sidecard.quality.trend import trend_figure

    panels = {"support-reply": [
        Line("v1 · claude-sonnet-4-6", [(0.0, 0.9), (600.0, 0.5)], 0.8, ((590.0, None, "score"),)),
        Line("v2 · claude-sonnet-4-6", [(0.0, 0.9), (600.0, 0.4)], 0.8, ((595.0, None, "check:empty"),)),
        Line("v3 · claude-haiku-4-5", [(0.0, 0.9), (600.0, 0.9)], 0.8, ((10.0, 60.0, "score"),)),
    ]}
    figure = trend_figure(panels, title="quality")
    renderer = figure.canvas.get_renderer()
    figure.draw(renderer)
    (axes,) = figure.axes
    box = axes.get_window_extent(renderer)
    labels = [t.get_window_extent(renderer) for t in axes.texts]
    assert len(labels) == 3
    for label in labels:
        assert box.x0 <= label.x0 and label.x1 <= box.x1 and box.y0 <= label.y0 and label.y1 <= box.y1
    for i, a in enumerate(labels):
        assert not any(a.overlaps(b) for b in labels[i + 1:])
