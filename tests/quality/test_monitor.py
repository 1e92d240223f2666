"""The quality monitor: windows, baselines, alerts with hysteresis, check rates, per-prompt settings (pure)."""

import msgspec
import pytest

from sidecard.quality.checks import Sample
from sidecard.config import MonitorSettings
from sidecard.quality.monitor import AlertEvent, QualityMonitor, key_for, label

K = ("support-reply", "2", "claude-sonnet-4-6")
S = MonitorSettings(window=20, min_samples=5, baseline_samples=20, threshold=0.6, max_drop=0.05, hysteresis=0.02)


def feed(monitor, values, key=K, start=0.0):
    """Record scores at t = start, start+1, ...; returns every event."""
    events = []
    for i, value in enumerate(values):
        events += monitor.record_score(key, value, start + i)
    return events


def test_keys_and_labels():
    sample = Sample(feature="chat", model="m", prompt=None, version=None, canary=False, question="q", system=None,
                    answer="a", stop_reason=None, output_problem=None)  # fmt: skip
    assert key_for(sample) == ("feature:chat", "-", "m") and label(key_for(sample)) == "feature:chat m"
    assert key_for(msgspec.structs.replace(sample, prompt="p", version=3)) == ("p", "3", "m")
    assert label(K) == "support-reply v2 claude-sonnet-4-6"


def test_nothing_fires_before_min_samples():
    monitor = QualityMonitor(S)
    assert feed(monitor, [0.1] * 4) == []  # far below the threshold, but only 4 scores
    [event] = monitor.record_score(K, 0.1, 4.0)
    assert event == AlertEvent("firing", K, "score", pytest.approx(0.1), None, 0.6, 4.0,
                               "mean score 0.10 over the last 5 is below the threshold 0.60")  # fmt: skip
    assert monitor.firing() == [event] and monitor.recent() == [event]


def test_a_drop_from_the_learned_baseline_fires_within_a_bounded_number_of_samples():
    monitor = QualityMonitor(S)
    assert feed(monitor, [0.9] * 20) == []  # the baseline is learned: 0.9
    assert monitor.baseline(K) == pytest.approx(0.9)
    # Each 0.7 replaces a 0.9 in the window: the mean falls 0.01 a score, below 0.85 after the 6th.
    events = feed(monitor, [0.7] * 10, start=20)
    [event] = events
    assert event.state == "firing" and event.at == 25.0  # the 6th low score
    assert event.value == pytest.approx(0.84) and event.baseline == pytest.approx(0.9)
    assert event.threshold == pytest.approx(0.85)
    assert "more than 0.05 below the baseline 0.90" in event.reason
    assert monitor.mean(K) == pytest.approx(0.8)


def test_the_learned_baseline_freezes_and_a_slow_decline_still_fires():
    monitor = QualityMonitor(S)
    feed(monitor, [0.9] * 20)
    feed(monitor, [0.88] * 20, start=20)  # within 0.05 of the baseline: quiet
    assert monitor.firing() == [] and monitor.baseline(K) == pytest.approx(0.9)  # still the first 20
    [event] = feed(monitor, [0.80] * 20, start=40)
    assert event.state == "firing"


def test_hysteresis_prevents_flapping_and_resolves_once():
    monitor = QualityMonitor(MonitorSettings(window=10, min_samples=10, baseline=0.9, max_drop=0.1, hysteresis=0.04))
    # floor = 0.8; resolve at >= 0.84
    [fired] = feed(monitor, [0.79] * 10)
    assert fired.state == "firing" and fired.threshold == pytest.approx(0.8)
    assert feed(monitor, [0.81, 0.79] * 10 + [0.83] * 10, start=10) == []  # wobbling around the floor: quiet
    [resolved] = feed(monitor, [0.9] * 3, start=40)  # from 0.83, the mean reaches 0.837, then 0.844
    assert resolved.state == "resolved" and resolved.at == 41.0 and resolved.value == pytest.approx(0.844)
    assert resolved.reason == "mean score 0.844 over the last 10 is back at or above 0.840"
    assert monitor.firing() == [] and monitor.recent() == [resolved, fired]
    assert monitor.recent(limit=1) == [resolved]


def test_the_absolute_threshold_applies_without_a_baseline():
    monitor = QualityMonitor(S)
    [event] = feed(monitor, [0.55] * 5)
    assert event.baseline is None and event.threshold == 0.6 and "threshold 0.60" in event.reason
    assert feed(monitor, [0.7] * 4, start=5) == []  # the mean climbs to 0.617: above 0.6, below 0.62
    [resolved] = feed(monitor, [0.7] * 20, start=9)
    assert resolved.state == "resolved" and resolved.at == 9.0 and resolved.value == pytest.approx(0.625)


def test_a_configured_baseline_wins_over_the_learned_one():
    monitor = QualityMonitor(msgspec.structs.replace(S, baseline=0.95))
    [event] = feed(monitor, [0.85] * 5)  # learned would be 0.85 (no drop); configured: 0.85 < 0.90
    assert event.baseline == 0.95 and event.threshold == pytest.approx(0.9)
    assert monitor.summary()[0]["baseline_source"] == "configured"


def test_check_rate_alerts():
    monitor = QualityMonitor(MonitorSettings(window=10, min_samples=5, check_rate_threshold=0.2, hysteresis=0.1))
    events = []
    for i, failed in enumerate([["refusal"], [], ["refusal", "refusal"], [], []]):
        events += monitor.record_checks(K, failed, float(i))
    [event] = events  # 2 of 5 = 40% > 20%, as soon as 5 answers are in
    assert (event.state, event.signal, event.value, event.threshold) == ("firing", "check:refusal", 0.4, 0.2)
    assert event.reason == "check refusal failed on 40% of the last 5 answers (more than 20%)"
    for i in range(5, 10):
        assert monitor.record_checks(K, [], float(i)) == []  # 2 of 10 = 20%: not yet at or below 10%
    [resolved] = monitor.record_checks(K, [], 10.0)  # the first refusal left the window: 1 of 10
    assert resolved.state == "resolved" and resolved.value == 0.1
    assert resolved.reason == "check refusal failed on 10% of the last 10 answers (back at or below 10%)"
    row = monitor.summary()[0]
    assert row["answers"] == 11 and row["check_rates"]["refusal"] == 0.1 and row["check_rates"]["empty"] == 0.0


def test_several_checks_fire_independently():
    monitor = QualityMonitor(MonitorSettings(window=5, min_samples=5))
    events = []
    for i in range(5):
        events += monitor.record_checks(K, ["truncated", "bad_format"] if i < 2 else [], float(i))
    assert [(e.signal, e.state) for e in events] == [("check:bad_format", "firing"), ("check:truncated", "firing")]
    assert sorted(e.signal for e in monitor.firing()) == ["check:bad_format", "check:truncated"]


def test_per_prompt_settings_and_separate_keys():
    canary = ("support-reply", "3", "claude-sonnet-4-6")
    strict = msgspec.structs.replace(S, threshold=0.9)
    asked = []

    def settings_for(key):
        asked.append(key)
        return strict if key == canary else S

    monitor = QualityMonitor(S, settings_for=settings_for)
    assert feed(monitor, [0.85] * 5) == []
    [event] = feed(monitor, [0.85] * 5, key=canary)
    assert event.key == canary and event.threshold == 0.9
    feed(monitor, [0.85] * 5, key=canary, start=5)
    assert asked == [K, canary]  # asked once per key


def test_judge_errors_summary_and_trend():
    monitor = QualityMonitor(S)
    monitor.record_judge_error(K, 0.0)
    monitor.record_judge_error(K, 1.0)
    feed(monitor, [1.0] * 3, start=0)
    feed(monitor, [0.5] * 3, start=60)
    monitor.record_checks(K, ["empty"], 61.0)
    [row] = monitor.summary()
    assert row["prompt"] == "support-reply" and row["version"] == "2" and row["model"] == "claude-sonnet-4-6"
    assert (row["scores"], row["window"], row["mean"], row["baseline"]) == (6, 6, 0.75, None)
    assert row["baseline_source"] == "learning" and row["judge_errors"] == 2 and row["firing"] == []
    assert row["trend"] == [[0.0, 1.0], [60.0, 0.5]] and row["sparkline"] == "█▅"
    assert row["check_rates"]["empty"] == 1.0
    msgspec.json.encode(row)  # ready for the admin socket


def test_memory_is_bounded():
    monitor = QualityMonitor(MonitorSettings(window=5, min_samples=1), max_keys=3)
    for i in range(10):
        key = (f"p{i}", "1", "m")
        monitor.record_score(key, 0.1, float(i))  # fires for each
        for _ in range(50):
            monitor.record_checks(key, ["empty"], float(i))
    rows = monitor.summary()
    assert [row["prompt"] for row in rows] == ["p7", "p8", "p9"] and all(row["window"] == 1 for row in rows)
    assert len(monitor.firing()) == 6  # the score and check:empty of each key kept
    assert monitor.mean(("p0", "1", "m")) is None and monitor.trend.series(("p0", "1", "m")) == []


def test_settings_validation():
    with pytest.raises(ValueError, match="min_samples"):
        MonitorSettings(window=5, min_samples=6)
    with pytest.raises(msgspec.ValidationError):
        msgspec.convert({"threshold": 1.5}, MonitorSettings)
