"""Unusual spend: a scope (a feature, a user, the whole daemon) spending far above its own normal pattern.

Meant to catch a runaway loop in one feature within minutes, long before a hard budget is reached, without
firing on the daily rhythm of ordinary traffic. Pure: the caller feeds spend with `now` (unix time) and gets
alert events back.

The model, per scope, on per-minute spend x (a minute with no spend counts as 0):

- `level`: an exponentially weighted mean of x, half-life `level_half_life_s` (1 h): what the scope spends lately;
- `daily[h]`: an exponentially weighted mean of x over the minutes of hour-of-day h (UTC), a day's hour weighing
  `daily_weight` (0.3: about three days of memory): what it spends at this time of day;
- `var`: the weighted mean of (x - level)^2: how noisy a minute's spend is;
- `kappa`: the weighted ratio of the sum of squared request costs to their sum (E[c^2] / E[c], learned
  unclipped), so that a window expecting spend E has at least the variance E * kappa of requests arriving at
  random (compound Poisson): a sparse scope, whose minutes say little about its noise, still gets its share.

Its normal rate now is e = max(level, daily[h]) (daily[h] once a whole day of that hour has been seen). Over
the last W = `window_s` minutes the scope spent s. It fires when

    s - c_max > factor * e * W + z * sd            far above normal, and beyond the scope's noise,
                                                   sd = sqrt(W * max(var, e * kappa)), c_max the window's
                                                   costliest request (a loop, not one long prompt),
    s / W >= min_usd_per_hour / 60                  worth an alert,
    requests in the window >= min_requests

and the scope has `warmup_s` of history. It resolves when s falls to half of factor * e * W.

Why this and not the alternatives. Normal variation is slow next to a runaway: a daily sine changes the rate by
at most a quarter of its mean per hour, which `level` follows with a small lag, while a loop is a step. The
`daily` term covers the rhythms that are not slow (business hours starting at 9): the taking of the maximum
means a rate has to be far above both what the scope did lately and what it normally does at this hour. A
day-of-week term would need weeks to learn (one observation per week per slot); weekends are lower, which only
makes the expectation generous (the safe side), and a Monday morning is covered by the hour-of-day profile
learned on the weekdays before. A robust z-score (median and MAD over a history window) would need that history
kept per scope and cannot be combined across instances; these averages are a few dozen floats per scope, and
linear: the state of a fleet is the sum of its instances' (`merge`).

A minute is learned at most z standard deviations above normal (a robust, Huber-like clipping), so the first
minutes of a runaway, before its window is full enough to fire, barely move the normal. While an alert fires,
the scope learns nothing (the runaway must not become the normal and resolve itself), for at most
`accept_after_s`: a rate that lasts that long is taken as the new normal.

What the defaults do (tests/policies/test_anomaly.py, seeded synthetic traffic): a tenfold jump fires 2 to 5
minutes after it starts for scopes with a few requests a minute or more; daily sines (+-80 %), business hours
with quiet weekends (once a day is learned) and a sparse user's long-tailed costs do not fire.

Memory: about 60 floats per scope, at most `max_scopes` scopes (the least recently active quiet one is forgotten
first); scopes quiet for `forget_after_s` are forgotten. `state()` is plain data (JSON-ready), `restore` takes
it back: the time a daemon was down is not taken for zero spend.
"""

from __future__ import annotations

import math
from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import Any, Final, Literal

FORMAT: Final = 1
_HOURS: Final = 24
_LOOP_LIMIT: Final = 180  # quiet minutes learned one by one; beyond, in closed form


@dataclass(frozen=True, slots=True)
class AnomalySettings:
    factor: float = 4.0  # the sensitivity: fire above this many times the normal rate
    z: float = 3.0  # ... and this many standard deviations of the scope's noise above it
    window_s: float = 300.0  # the rate is judged over this much recent time (a whole number of minutes)
    min_usd_per_hour: float = 1.0  # below this rate nothing fires
    min_requests: int = 10  # requests in the window before anything fires (a loop makes many)
    level_half_life_s: float = 3600.0
    daily_weight: float = 0.3
    warmup_s: float = 3600.0  # history a scope needs before it can fire
    accept_after_s: float = 6 * 3600.0
    forget_after_s: float = 8 * 86_400.0
    max_scopes: int = 10_000

    def __post_init__(self) -> None:
        if not self.factor > 1:
            raise ValueError("factor must be above 1")
        if self.window_s < 60 or self.window_s % 60:
            raise ValueError("window_s must be a whole number of minutes, at least one")
        if not 0 < self.daily_weight < 1:
            raise ValueError("daily_weight must be between 0 and 1")
        if self.z < 0 or self.min_usd_per_hour < 0 or self.min_requests < 0 or self.max_scopes < 1:
            raise ValueError("z, min_usd_per_hour and min_requests must not be negative; max_scopes at least 1")
        if self.level_half_life_s <= 0 or self.warmup_s < 0 or self.accept_after_s <= 0 or self.forget_after_s <= 0:
            raise ValueError("half-lives and durations must be positive")


@dataclass(frozen=True, slots=True)
class AnomalyEvent:
    state: Literal["firing", "resolved"]
    scope: str
    rate_usd_per_hour: float  # spend over the window, as an hourly rate
    expected_usd_per_hour: float  # the scope's normal rate now
    since: float  # when the alert started firing
    at: float

    @property
    def message(self) -> str:
        if self.state == "resolved":
            return f"{self.scope}: spend back to ${self.rate_usd_per_hour:,.2f}/h (normal ${self.expected_usd_per_hour:,.2f}/h)"
        return f"{self.scope} is spending ${self.rate_usd_per_hour:,.2f}/h, normally ${self.expected_usd_per_hour:,.2f}/h"


class _Scope:
    __slots__ = ("count", "daily_s", "daily_w", "first_minute", "firing_since", "largest", "level_s", "level_w", "minute",
                 "raw_s", "recent", "spent", "squares", "squares_s", "var_s")

    def __init__(self, minute: int, window: int) -> None:
        self.minute = minute  # the minute being counted (unix minutes)
        self.spent = 0.0  # in it
        self.count = 0  # requests in it
        self.squares = 0.0  # the sum of its requests' squared costs
        self.largest = 0.0  # its costliest request
        self.recent: deque[tuple[float, int, float]] = deque(maxlen=window - 1)  # the window's closed minutes, like those
        self.first_minute = minute
        self.level_s = self.level_w = self.var_s = 0.0  # weighted sums: mean = s / w (no start-up bias)
        self.raw_s = self.squares_s = 0.0  # spend and squared costs, unclipped: their ratio is kappa
        self.daily_s = [0.0] * _HOURS
        self.daily_w = [0.0] * _HOURS
        self.firing_since: float | None = None


def _hour_of_day(minute: int) -> int:
    return (minute // 60) % _HOURS


def _minutes_per_hour(start: int, count: int) -> list[int]:
    """How many of the minutes [start, start + count) fall in each hour of the day."""
    per = [count // 1440 * 60] * _HOURS
    minute, end = start + count // 1440 * 1440, start + count
    while minute < end:
        step = min(end, (minute // 60 + 1) * 60) - minute
        per[_hour_of_day(minute)] += step
        minute += step
    return per


class AnomalyDetector:
    def __init__(self, settings: AnomalySettings = AnomalySettings()) -> None:
        self.settings = settings
        self._window = int(settings.window_s // 60)
        self._alpha = 1 - 0.5 ** (60 / settings.level_half_life_s)  # per minute
        self._daily_alpha = 1 - (1 - settings.daily_weight) ** (1 / 60)  # per minute of that hour
        self._scopes: OrderedDict[str, _Scope] = OrderedDict()  # least recently active first

    # -- feeding

    def add(self, scope: str, usd: float, now: float) -> AnomalyEvent | None:
        """Count one request's cost for `scope`; returns the event if this makes its alert fire."""
        if not usd >= 0:
            raise ValueError("spend must be a non-negative number of dollars")
        minute = math.floor(now / 60)
        s = self._scopes.get(scope)
        if s is None:
            s = self._scopes[scope] = _Scope(minute, self._window)
            self._evict()
        else:
            self._scopes.move_to_end(scope)
            self._advance(s, minute)
        s.spent += usd
        s.count += 1
        s.squares += usd * usd
        s.largest = max(s.largest, usd)
        return self._check(scope, s, now)

    def tick(self, now: float) -> list[AnomalyEvent]:
        """Call every few seconds: resolves alerts of scopes that went quiet, forgets scopes long quiet."""
        minute = math.floor(now / 60)
        events = []
        forget_before = minute - self.settings.forget_after_s / 60
        for name, s in list(self._scopes.items()):
            if s.firing_since is not None:
                self._advance(s, minute)
                event = self._check(name, s, now)
                if event is not None:
                    events.append(event)
            elif s.minute < forget_before:
                del self._scopes[name]
        return events

    # -- reading

    def expected_per_minute(self, scope: str, now: float) -> float | None:
        s = self._scopes.get(scope)
        return None if s is None else self._expected(s, max(s.minute, math.floor(now / 60)))

    def firing(self) -> dict[str, float]:
        """Scope -> when its alert started, for the scopes firing now."""
        return {name: s.firing_since for name, s in self._scopes.items() if s.firing_since is not None}

    def __len__(self) -> int:
        return len(self._scopes)

    # -- the model

    def _advance(self, s: _Scope, minute: int) -> None:
        """Close the minutes before `minute` (a clock that stepped back keeps counting in the current one)."""
        if minute <= s.minute:
            return
        self._learn(s, s.minute, s.spent, s.squares)
        s.recent.append((s.spent, s.count, s.largest))
        quiet = minute - s.minute - 1
        for _ in range(min(quiet, self._window - 1)):
            s.recent.append((0.0, 0, 0.0))
        self._learn_quiet(s, s.minute + 1, quiet)
        s.minute, s.spent, s.count, s.squares, s.largest = minute, 0.0, 0, 0.0, 0.0

    def _learn(self, s: _Scope, minute: int, x: float, squares: float = 0.0) -> None:
        if s.firing_since is not None and minute * 60 - s.firing_since < self.settings.accept_after_s:
            return  # the runaway must not become the normal it is measured against
        a = self._alpha
        s.raw_s = (1 - a) * s.raw_s + a * x
        s.squares_s = (1 - a) * s.squares_s + a * squares
        if (minute - s.first_minute) * 60 >= self.settings.warmup_s:
            # A minute more than z standard deviations above normal is learned as if it were z above: the first
            # minutes of a runaway, before its window is full enough to fire, must not raise the normal it is
            # measured against (and one expensive minute must not teach the scope a wild variance).
            cap = self._expected(s, minute) + self.settings.z * math.sqrt(self._var(s, minute))
            x = min(x, cap)
        level = s.level_s / s.level_w if s.level_w else x
        s.var_s = (1 - a) * s.var_s + a * (x - level) ** 2
        s.level_s = (1 - a) * s.level_s + a * x
        s.level_w = (1 - a) * s.level_w + a
        h, d = _hour_of_day(minute), self._daily_alpha
        s.daily_s[h] = (1 - d) * s.daily_s[h] + d * x
        s.daily_w[h] = (1 - d) * s.daily_w[h] + d

    def _learn_quiet(self, s: _Scope, start: int, count: int) -> None:
        """Learn `count` minutes of no spend from minute `start` on."""
        looped = min(count, _LOOP_LIMIT)
        for minute in range(start, start + looped):
            self._learn(s, minute, 0.0)
        rest = count - looped
        if rest <= 0:
            return
        decay = (1 - self._alpha) ** rest  # after hours of quiet the level's part in the variance is negligible
        s.level_s *= decay
        s.var_s *= decay
        s.raw_s *= decay
        s.squares_s *= decay
        s.level_w = s.level_w * decay + 1 - decay
        for h, minutes in enumerate(_minutes_per_hour(start + looped, rest)):
            if minutes:
                daily_decay = (1 - self._daily_alpha) ** minutes
                s.daily_s[h] *= daily_decay
                s.daily_w[h] = s.daily_w[h] * daily_decay + 1 - daily_decay

    def _expected(self, s: _Scope, minute: int) -> float:
        level = s.level_s / s.level_w if s.level_w else 0.0
        h = _hour_of_day(minute)
        learned = s.daily_w[h] >= self.settings.daily_weight * 0.999  # a whole day of this hour seen
        return max(level, s.daily_s[h] / s.daily_w[h]) if learned else level

    def _var(self, s: _Scope, minute: int) -> float:
        """A minute's spend variance: as observed, and at least that of random arrivals (see the module doc)."""
        if not s.level_w:
            return 0.0
        kappa = s.squares_s / s.raw_s if s.raw_s else 0.0
        return max(s.var_s / s.level_w, self._expected(s, minute) * kappa)

    def _check(self, name: str, s: _Scope, now: float) -> AnomalyEvent | None:
        cfg, window = self.settings, self._window
        spent = s.spent + sum(minute[0] for minute in s.recent)
        expected = self._expected(s, s.minute)
        normal = cfg.factor * expected * window
        rate, expected_rate = spent * 60 / window, expected * 60
        if s.firing_since is not None:
            if spent > normal / 2:
                return None
            since, s.firing_since = s.firing_since, None
            return AnomalyEvent("resolved", name, rate, expected_rate, since, now)
        if (s.minute - s.first_minute) * 60 < cfg.warmup_s or rate < cfg.min_usd_per_hour:
            return None
        if s.count + sum(minute[1] for minute in s.recent) < cfg.min_requests:
            return None
        largest = max(s.largest, max((minute[2] for minute in s.recent), default=0.0))
        if spent - largest <= normal + cfg.z * math.sqrt(window * self._var(s, s.minute)):
            return None
        s.firing_since = now
        return AnomalyEvent("firing", name, rate, expected_rate, now, now)

    def _evict(self) -> None:
        for _ in range(len(self._scopes)):
            if len(self._scopes) <= self.settings.max_scopes:
                return
            name, s = self._scopes.popitem(last=False)
            if s.firing_since is not None:  # a firing scope is kept: it goes to the back
                self._scopes[name] = s

    # -- persistence and the fleet

    def state(self) -> dict[str, Any]:
        """Plain data (JSON-ready) to `restore` from."""
        return {"format": FORMAT, "window": self._window, "scopes": {
            name: {
                "minute": s.minute, "spent": s.spent, "count": s.count, "squares": s.squares, "largest": s.largest,
                "recent": [list(r) for r in s.recent], "first_minute": s.first_minute, "level_s": s.level_s,
                "level_w": s.level_w, "var_s": s.var_s, "raw_s": s.raw_s, "squares_s": s.squares_s,
                "daily_s": list(s.daily_s), "daily_w": list(s.daily_w), "firing_since": s.firing_since,
            }
            for name, s in self._scopes.items()
        }}

    @classmethod
    def restore(cls, settings: AnomalySettings, state: dict[str, Any], now: float) -> AnomalyDetector:
        """A detector with `state`, resumed at `now`: the minutes since the state was taken were not observed
        (the daemon was down), so they are neither learned as quiet nor counted. Raises ValueError for state it
        cannot use."""
        detector = cls(settings)
        if not isinstance(state, dict) or state.get("format") != FORMAT or not isinstance(state.get("scopes"), dict):
            raise ValueError("not an anomaly detector state")
        minute = math.floor(now / 60)
        try:
            for name, data in state["scopes"].items():
                s = _Scope(int(data["minute"]), detector._window)
                s.spent, s.count, s.squares = float(data["spent"]), int(data["count"]), float(data["squares"])
                s.largest = float(data["largest"])
                s.recent.extend((float(usd), int(n), float(top)) for usd, n, top in data["recent"])
                s.first_minute = int(data["first_minute"])
                s.level_s, s.level_w = float(data["level_s"]), float(data["level_w"])
                s.var_s, s.raw_s, s.squares_s = float(data["var_s"]), float(data["raw_s"]), float(data["squares_s"])
                s.daily_s = [float(v) for v in data["daily_s"]]
                s.daily_w = [float(v) for v in data["daily_w"]]
                s.firing_since = None if data["firing_since"] is None else float(data["firing_since"])
                if len(s.daily_s) != _HOURS or len(s.daily_w) != _HOURS:
                    raise ValueError("a daily profile has 24 hours")
                if not all(math.isfinite(v) and v >= 0 for v in (s.spent, s.squares, s.level_s, s.level_w, s.var_s, s.raw_s, s.squares_s, *s.daily_s, *s.daily_w)):
                    raise ValueError("negative or non-finite figures")
                if s.minute < minute:  # resume: what happened while down is unknown, not zero
                    gap = minute - s.minute
                    s.first_minute += gap
                    s.minute, s.spent, s.count, s.squares, s.largest = minute, 0.0, 0, 0.0, 0.0
                    s.recent.clear()
                detector._scopes[str(name)] = s
        except (KeyError, TypeError) as exc:
            raise ValueError(f"anomaly detector state: {exc!r}") from None
        detector._evict()
        return detector

    @staticmethod
    def merge(*states: dict[str, Any]) -> dict[str, Any]:
        """The state of a fleet from its instances' (each from `state()`): spend, levels, variances (the
        instances' noise is independent) and daily profiles add up; weights, history and alerts take the
        longest. Exact when the states were taken in the same minute."""
        scopes: dict[str, dict[str, Any]] = {}
        for state in states:
            for name, data in state["scopes"].items():
                into = scopes.get(name)
                if into is None:
                    scopes[name] = {**data, "recent": [list(r) for r in data["recent"]], "daily_s": list(data["daily_s"]),
                                    "daily_w": list(data["daily_w"])}
                    continue
                if data["minute"] == into["minute"]:
                    for key in ("spent", "count", "squares"):
                        into[key] += data[key]
                    into["largest"] = max(into["largest"], data["largest"])
                elif data["minute"] > into["minute"]:
                    for key in ("minute", "spent", "count", "squares", "largest"):
                        into[key] = data[key]
                ours, theirs = into["recent"], data["recent"]  # newest last: add them up from the newest back
                width = max(len(ours), len(theirs))
                padded = [[0.0, 0, 0.0]] * (width - len(ours)) + ours
                for i, (usd, n, top) in enumerate([[0.0, 0, 0.0]] * (width - len(theirs)) + [list(r) for r in theirs]):
                    padded[i] = [padded[i][0] + usd, padded[i][1] + n, max(padded[i][2], top)]
                into["recent"] = padded
                for key in ("level_s", "var_s", "raw_s", "squares_s"):
                    into[key] += data[key]
                into["level_w"] = max(into["level_w"], data["level_w"])
                into["daily_s"] = [a + b for a, b in zip(into["daily_s"], data["daily_s"])]
                into["daily_w"] = [max(a, b) for a, b in zip(into["daily_w"], data["daily_w"])]
                into["first_minute"] = min(into["first_minute"], data["first_minute"])
                firing = [t for t in (into["firing_since"], data["firing_since"]) if t is not None]
                into["firing_since"] = min(firing) if firing else None
        window = max((state.get("window", 1) for state in states), default=1)
        return {"format": FORMAT, "window": window, "scopes": scopes}
