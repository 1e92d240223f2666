"""Rolling quality windows per (prompt, version, model), baselines, and alerts with hysteresis (pure; `now` injected).

Two kinds of signal per key:

- `score`: the mean of the last `window` judge scores. It fires when the mean falls below the floor: the
  absolute `threshold`, or `baseline - max_drop` when a baseline is known, whichever is higher. It resolves
  only when the mean is back at or above the floor plus `hysteresis`, so a mean wobbling around the floor does
  not flap.
- `check:<name>`: the share of the last `window` answers that failed a heuristic check. It fires above
  `check_rate_threshold` and resolves at or below `check_rate_threshold - hysteresis`.
- `feedback`: the share of the last `window` feedback items (from users, `op: feedback`) that were negative. It
  fires above `feedback_negative_threshold` and resolves at or below it minus `hysteresis`.

Nothing fires before the window holds `min_samples` values. The baseline is the configured one, else the
learned one: the mean of a key's first `baseline_samples` scores, then frozen, so it is the quality at deploy
time (a slow decline after that is still measured against it). Until it is learned only the threshold applies.

Firing and resolving are separate events. `remeasure(key)` starts a key's windows afresh (its baseline and firing
alerts kept): once they hold `min_samples` again, each firing alert resolves or fires again ("still firing"),
so an alert whose traffic was moved away gets a verdict when the traffic returns. Memory is bounded: per key by `window` (and the trend's buckets),
and at most `max_keys` keys, the least recently updated forgotten first (their alerts with them, silently).
"""

from __future__ import annotations

from collections import Counter, OrderedDict, deque
from collections.abc import Callable
from itertools import islice
from typing import Any, Final, Literal

import msgspec

from ..config import MonitorSettings
from .checks import CHECKS, Sample
from .trend import Trend, sparkline

Key = tuple[str, str, str]  # (prompt or "feature:<name>", version or "-", model)
RECENT_EVENTS: Final = 200


def key_for(sample: Sample) -> Key:
    return key_of(sample.prompt, sample.version, sample.feature, sample.model)


def key_of(prompt: str | None, version: int | None, feature: str, model: str) -> Key:
    return (prompt if prompt is not None else f"feature:{feature}", str(version) if version is not None else "-", model)


def label(key: Key) -> str:
    """`support-reply v2 claude-sonnet-4-6`, or `feature:chat claude-haiku-4-5` without a prompt version."""
    prompt, version, model = key
    return f"{prompt} {model}" if version == "-" else f"{prompt} v{version} {model}"


class AlertEvent(msgspec.Struct, frozen=True):
    state: Literal["firing", "resolved"]
    key: Key
    signal: str  # "score" or "check:<name>"
    value: float  # the window's mean score, or the check's failure rate
    baseline: float | None
    threshold: float  # the floor the value is compared with (for a score: max(threshold, baseline - max_drop))
    at: float
    reason: str


class _KeyState:
    __slots__ = (
        "answers",
        "baseline_n",
        "baseline_sum",
        "checks",
        "failures",
        "feedback",
        "firing",
        "judge_errors",
        "remeasure",
        "scored",
        "scores",
        "settings",
    )

    def __init__(self, settings: MonitorSettings) -> None:
        self.settings = settings
        self.scores: deque[float] = deque(maxlen=settings.window)
        self.scored = 0  # scores ever recorded
        self.baseline_sum = 0.0
        self.baseline_n = 0
        self.checks: deque[tuple[str, ...]] = deque(maxlen=settings.window)  # failed checks per answer
        self.failures: Counter[str] = Counter()  # failures per check within `checks`
        self.feedback: deque[bool] = deque(maxlen=settings.window)  # negative or not, per feedback item
        self.answers = 0
        self.judge_errors = 0
        self.firing: dict[str, AlertEvent] = {}
        self.remeasure: set[str] = set()  # firing signals whose window was started afresh

    def mean(self) -> float | None:
        return sum(self.scores) / len(self.scores) if self.scores else None

    def baseline(self) -> float | None:
        if self.settings.baseline is not None:
            return self.settings.baseline
        if self.baseline_n >= self.settings.baseline_samples:
            return self.baseline_sum / self.baseline_n
        return None

    def floor(self) -> float:
        """The mean score below which the score alert fires."""
        baseline, settings = self.baseline(), self.settings
        return settings.threshold if baseline is None else max(settings.threshold, baseline - settings.max_drop)

    def baseline_source(self) -> str:
        if self.settings.baseline is not None:
            return "configured"
        return "learned" if self.baseline_n >= self.settings.baseline_samples else "learning"


class QualityMonitor:
    def __init__(
        self,
        settings: MonitorSettings,
        *,
        settings_for: Callable[[Key], MonitorSettings] | None = None,
        max_keys: int = 1000,
        trend: Trend | None = None,
    ) -> None:
        """`settings_for` gives a key its own settings (per-prompt overrides); it is asked once, when the key
        is first seen."""
        self.settings = settings
        self._settings_for = settings_for
        self._max_keys = max_keys
        self.trend = trend or Trend()
        self._keys: OrderedDict[Key, _KeyState] = OrderedDict()
        self._recent: deque[AlertEvent] = deque(maxlen=RECENT_EVENTS)

    # -- recording

    def record_score(self, key: Key, overall: float, now: float) -> list[AlertEvent]:
        """A judge's overall score (0-1) for an answer; returns the alerts that fired or resolved."""
        state = self._state(key)
        state.scores.append(overall)
        state.scored += 1
        if state.baseline_n < state.settings.baseline_samples:
            state.baseline_sum += overall
            state.baseline_n += 1
        self.trend.add(key, overall, now)
        return self._check_score(key, state, now)

    def record_checks(self, key: Key, failed: list[str], now: float) -> list[AlertEvent]:
        """The checks an answer failed (every answer, usually none); returns the alerts that fired or resolved."""
        state = self._state(key)
        state.answers += 1
        checks, failures = state.checks, state.failures
        full = len(checks) == checks.maxlen
        evicted = checks[0] if full else ()
        if evicted:
            failures.subtract(evicted)
        names = tuple(dict.fromkeys(failed)) if failed else ()
        checks.append(names)
        if names:
            failures.update(names)
        elif full and not evicted and not state.remeasure:
            return []  # the window's rates are what they were at the last answer, which said what they crossed
        return self._check_rates(key, state, now)

    def record_feedback(self, key: Key, negative: bool, now: float) -> list[AlertEvent]:
        """A user's feedback on one of KEY's answers; returns the alerts that fired or resolved."""
        state = self._state(key)
        state.feedback.append(negative)
        count = len(state.feedback)
        settings = state.settings
        if count < settings.min_samples:
            return []
        rate, limit = sum(state.feedback) / count, settings.feedback_negative_threshold
        back = max(0.0, limit - settings.hysteresis)
        if "feedback" not in state.firing and rate > limit:
            reason = f"{rate:.0%} of the last {count} feedback items were negative (more than {limit:.0%})"
            return [self._emit(state, AlertEvent("firing", key, "feedback", rate, None, limit, now, reason))]
        if "feedback" in state.firing and rate <= back:
            reason = f"{rate:.0%} of the last {count} feedback items were negative (back at or below {back:.0%})"
            return [self._emit(state, AlertEvent("resolved", key, "feedback", rate, None, limit, now, reason))]
        return []

    def remeasure(self, key: Key) -> None:
        """Start KEY's windows afresh, keeping its baseline and its firing alerts, each of which resolves or fires
        again once the window holds `min_samples` (the key's traffic was elsewhere: its old window is stale)."""
        state = self._keys.get(key)
        if state is None:
            return
        state.scores.clear()
        state.checks.clear()
        state.failures.clear()
        state.remeasure.update(state.firing)

    def record_judge_error(self, key: Key, now: float) -> None:
        """The judge failed or its verdict could not be read: counted, never scored."""
        self._state(key).judge_errors += 1

    # -- reading

    def firing(self) -> list[AlertEvent]:
        """The alerts firing now, oldest first."""
        return sorted((e for s in self._keys.values() for e in s.firing.values()), key=lambda e: e.at)

    def recent(self, limit: int = 50) -> list[AlertEvent]:
        """Recent firing and resolved events, newest first."""
        return list(islice(self._recent, limit))

    def mean(self, key: Key) -> float | None:
        state = self._keys.get(key)
        return state.mean() if state is not None else None

    def baseline(self, key: Key) -> float | None:
        """The configured or learned baseline (e.g. a stable version's, to configure its canary against)."""
        state = self._keys.get(key)
        return state.baseline() if state is not None else None

    def summary(self) -> list[dict[str, Any]]:
        """Per key, sorted: its window, baseline, check failure rates, judge errors, firing signals and trend."""
        rows = []
        for key in sorted(self._keys):
            state = self._keys[key]
            checked = len(state.checks)
            series = self.trend.series(key)
            rows.append(
                {
                    "key": label(key),
                    "prompt": key[0],
                    "version": key[1],
                    "model": key[2],
                    "scores": state.scored,
                    "window": len(state.scores),
                    "mean": state.mean(),
                    "baseline": state.baseline(),
                    "baseline_source": state.baseline_source(),
                    "threshold": state.settings.threshold,
                    "floor": state.floor(),
                    "answers": state.answers,
                    "check_rates": {name: state.failures[name] / checked if checked else 0.0 for name in CHECKS},
                    "judge_errors": state.judge_errors,
                    "firing": sorted(state.firing),
                    "trend": [list(point) for point in series],
                    "sparkline": sparkline([mean for _, mean in series]),
                }
            )
        return rows

    # -- internals

    def _state(self, key: Key) -> _KeyState:
        state = self._keys.get(key)
        if state is not None:
            self._keys.move_to_end(key)
            return state
        settings = self._settings_for(key) if self._settings_for is not None else self.settings
        state = self._keys[key] = _KeyState(settings)
        if len(self._keys) > self._max_keys:
            forgotten, _ = self._keys.popitem(last=False)
            self.trend.forget(forgotten)
        return state

    def _emit(self, state: _KeyState, event: AlertEvent) -> AlertEvent:
        if event.state == "firing":
            state.firing[event.signal] = event
        else:
            del state.firing[event.signal]
        state.remeasure.discard(event.signal)
        self._recent.appendleft(event)
        return event

    def _check_score(self, key: Key, state: _KeyState, now: float) -> list[AlertEvent]:
        settings = state.settings
        count = len(state.scores)
        if count < settings.min_samples:
            return []
        mean = sum(state.scores) / count
        baseline = state.baseline()
        floor = state.floor()
        firing = "score" in state.firing
        if not firing and mean < floor:
            if baseline is not None and floor > settings.threshold:
                why = f"more than {settings.max_drop:.2f} below the baseline {baseline:.2f}"
            else:
                why = f"below the threshold {settings.threshold:.2f}"
            reason = f"mean score {mean:.2f} over the last {count} is {why}"
            return [self._emit(state, AlertEvent("firing", key, "score", mean, baseline, floor, now, reason))]
        if firing and mean >= floor + settings.hysteresis:
            back = floor + settings.hysteresis
            reason = f"mean score {mean:.3f} over the last {count} is back at or above {back:.3f}"
            return [self._emit(state, AlertEvent("resolved", key, "score", mean, baseline, floor, now, reason))]
        if firing and "score" in state.remeasure:
            reason = f"mean score {mean:.2f} over the last {count} re-measured is still below {floor + settings.hysteresis:.2f}"
            return [self._emit(state, AlertEvent("firing", key, "score", mean, baseline, floor, now, reason))]
        return []

    def _check_rates(self, key: Key, state: _KeyState, now: float) -> list[AlertEvent]:
        settings = state.settings
        count = len(state.checks)
        if count < settings.min_samples:
            return []
        limit = settings.check_rate_threshold
        events = []
        watched = {name for name, n in state.failures.items() if n > 0}
        watched.update(signal.removeprefix("check:") for signal in state.firing if signal != "score")
        for name in sorted(watched):
            signal = f"check:{name}"
            rate = state.failures[name] / count
            if signal not in state.firing and rate > limit:
                reason = f"check {name} failed on {rate:.0%} of the last {count} answers (more than {limit:.0%})"
                events.append(self._emit(state, AlertEvent("firing", key, signal, rate, None, limit, now, reason)))
            elif signal in state.firing and rate <= max(0.0, limit - settings.hysteresis):
                back = max(0.0, limit - settings.hysteresis)
                reason = f"check {name} failed on {rate:.0%} of the last {count} answers (back at or below {back:.0%})"
                events.append(self._emit(state, AlertEvent("resolved", key, signal, rate, None, limit, now, reason)))
            elif signal in state.remeasure:
                back = max(0.0, limit - settings.hysteresis)
                reason = f"check {name} still fails on {rate:.0%} of the last {count} answers re-measured (more than {back:.0%})"
                events.append(self._emit(state, AlertEvent("firing", key, signal, rate, None, limit, now, reason)))
        return events
