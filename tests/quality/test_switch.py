"""Fallback route switches (pure), and the monitor's re-measuring that follows one."""

from sidecard.config import MonitorSettings
from sidecard.quality.monitor import QualityMonitor
from sidecard.quality.switch import RouteSwitches

K = ("support-reply", "2", "claude-sonnet-4-6")
OTHER = ("support-reply", "2", "claude-haiku-4-5")
S = MonitorSettings(window=10, min_samples=5, baseline=0.9, threshold=0.6, max_drop=0.1, hysteresis=0.05, check_rate_threshold=0.2)


def test_a_switch_holds_while_any_alert_that_caused_it_fires():
    switches = RouteSwitches()
    started = switches.fire("support-reply", (K, "score"), "safe", 60.0, now=0.0)
    assert started is not None and started.expires_at == 60.0
    assert switches.fire("support-reply", (K, "check:refusal"), "safe", 60.0, now=1.0) is None  # joins it
    assert switches.resolve("support-reply", (OTHER, "score")) is None  # not a cause: nothing changes
    assert switches.resolve("support-reply", (K, "score")) is None  # another cause still fires
    assert [s.prompt for s in switches.active()] == ["support-reply"]
    ended = switches.resolve("support-reply", (K, "check:refusal"))
    assert ended is started and not switches.active()


def test_a_switch_expires_after_its_hold_and_an_operator_can_end_one():
    switches = RouteSwitches()
    switches.fire("a", (K, "score"), "safe", 60.0, now=0.0)
    switches.fire("b", (K, "score"), "safe", 30.0, now=10.0)
    assert switches.next_expiry() == 40.0
    assert switches.expired(39.9) == []
    assert [s.prompt for s in switches.expired(40.0)] == ["b"]
    [view] = switches.describe(45.0)
    assert view == {"prompt": "a", "route": "safe", "for_s": 45.0, "expires_in_s": 15.0,
                    "causes": ["support-reply v2 claude-sonnet-4-6 score"]}  # fmt: skip
    assert switches.end("a") is not None and switches.end("a") is None and switches.next_expiry() is None


def test_a_re_measured_alert_fires_again_when_still_bad():
    monitor = QualityMonitor(S)
    events = [e for t in range(5) for e in monitor.record_score(K, 0.2, t)]
    assert [e.state for e in events] == ["firing"]
    monitor.remeasure(K)  # the switch ended: traffic is back on this key
    assert [e.signal for e in monitor.firing()] == ["score"]  # still firing meanwhile
    assert [e for t in range(4) for e in monitor.record_score(K, 0.2, 10 + t)] == []  # not min_samples yet
    [again] = monitor.record_score(K, 0.2, 14)
    assert again.state == "firing" and "re-measured" in again.reason and monitor.firing() == [again]
    assert monitor.record_score(K, 0.2, 15) == []  # fired again once, not on every score


def test_a_re_measured_alert_resolves_when_recovered_and_the_baseline_is_kept():
    monitor = QualityMonitor(S)
    for t in range(5):
        monitor.record_score(K, 0.2, t)
    monitor.remeasure(K)
    events = [e for t in range(5) for e in monitor.record_score(K, 0.95, 10 + t)]
    assert [e.state for e in events] == ["resolved"] and monitor.baseline(K) == 0.9


def test_re_measured_check_alerts_fire_again_or_resolve():
    monitor = QualityMonitor(S)
    for t in range(5):
        monitor.record_checks(K, ["refusal"], t)
    monitor.remeasure(K)
    events = [e for t in range(5) for e in monitor.record_checks(K, ["refusal"], 10 + t)]
    assert [(e.state, e.signal) for e in events] == [("firing", "check:refusal")] and "still fails" in events[0].reason
    monitor.remeasure(K)
    events = [e for t in range(5) for e in monitor.record_checks(K, [], 20 + t)]
    assert [(e.state, e.signal) for e in events] == [("resolved", "check:refusal")]
    monitor.remeasure(("never", "-", "seen"))  # an unknown key: nothing to do
