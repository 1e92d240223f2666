"""Spend budgets: what a scope may spend per hour, day or month, and the ledger of what it spent (pure; the file
that keeps it across restarts is `spend_store.py`).

A budget names a scope and a window. Scopes: "global"; "feature:NAME" or "route:NAME" for one feature or
route; "feature:*" or "route:*" for each feature or route separately (a feature with its own budget for the
same window is counted by that one instead); "user" for each user key separately. A request counts against
one scope key per budget that applies to it, e.g. ("user", "user:<pseudonym>").

Windows: "day" and "month" are calendar windows in UTC (a day is always 86,400 s of unix time); "hour" is
rolling, kept as 60 one-minute buckets, so spend leaves it a minute at a time. If the wall clock steps back,
spend keeps counting in the window it was recorded in until that window ends: the safe side.

An admitted request reserves its worst-case estimate until it ends (`reserve`), then settles to what it really
cost (`settle`; a request that failed before anything was billed settles at zero). A request is refused when
what was spent, plus what requests in flight reserved, plus its own worst case would exceed the hard limit: so
requests running at once cannot overshoot together, and spend passes the limit only by what a request cost
beyond its estimate. A soft limit is reached when what was spent reaches it (reservations do not count: they
are not spend yet); it only warns. Times are unix time (`wall_now`): calendar windows need wall time, and the
caller injects it. Reservations are not part of the snapshot: they end with the requests that hold them.

Memory: one small counter per scope key with spend in its current window; counters of ended windows are
dropped (at most once a minute, and in every snapshot).

An operator's `raise_limit` holds until the window it was made in resets (the rolling hour: for an hour), and
is kept in the snapshot with the spend, so a restart does not undo it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Final, Literal, Union

import msgspec

from ..config import BudgetConfig, check_budget_scope, check_spend_limits

Window = Literal["hour", "day", "month"]

FORMAT: Final = 1
DAY_S: Final = 86_400
PRUNE_EVERY_S: Final = 60.0
LAST_TIME: Final = 253_402_300_800  # 10000-01-01: a restored time beyond it is corruption


class Budget(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    scope: str
    window: Window
    soft_usd: Union[float, None] = None
    hard_usd: Union[float, None] = None

    def __post_init__(self) -> None:
        check_budget_scope(self.scope)
        check_spend_limits(self.soft_usd, self.hard_usd)

    @classmethod
    def of(cls, config: BudgetConfig) -> Budget:
        return cls(scope=config.scope, window=config.window, soft_usd=config.soft_usd, hard_usd=config.hard_usd)


@dataclass(frozen=True, slots=True)
class Usage:
    budget: Budget  # with the limits in force for this key (an operator may have changed them)
    key: str
    spent_usd: float
    reserved_usd: float = 0.0  # held by requests in flight


@dataclass(frozen=True, slots=True)
class Reservation:
    """A request's worst case, held against its budgets' keys from admission until it settles."""

    keys: tuple[tuple[Budget, str], ...]
    usd: float


@dataclass(frozen=True, slots=True)
class Verdict:
    refused: Budget | None  # the budget that refuses the request (the one that resets last, if several do)
    refused_key: str | None
    reset_at: float | None  # unix time from which the refusing budget would let this request through
    soft_crossed: list[tuple[Budget, str]]  # soft limits that spend has reached
    usage: list[Usage]

    @property
    def allowed(self) -> bool:
        return self.refused is None


class _Period:
    """Spend in one calendar window."""

    __slots__ = ("end", "start", "usd")

    def __init__(self, window: Window, start: float, usd: float = 0.0) -> None:
        self.start = start
        self.end = _period_end(window, start)
        self.usd = usd


def _period_start(window: Window, wall_now: float) -> float:
    if window == "day":
        return math.floor(wall_now / DAY_S) * float(DAY_S)
    moment = datetime.fromtimestamp(math.floor(wall_now), UTC)
    return datetime(moment.year, moment.month, 1, tzinfo=UTC).timestamp()


def _period_end(window: Window, start: float) -> float:
    if window == "day":
        return start + DAY_S
    moment = datetime.fromtimestamp(math.floor(start), UTC)
    year, month = (moment.year + 1, 1) if moment.month == 12 else (moment.year, moment.month + 1)
    return datetime(year, month, 1, tzinfo=UTC).timestamp()


def _minute(wall_now: float) -> int:
    return math.floor(wall_now / 60)


class _StoredSpend(msgspec.Struct, kw_only=True, omit_defaults=True):
    window: Window
    key: str
    start: float = 0.0  # calendar windows: the window's start, unix time
    usd: float = 0.0  # calendar windows
    minutes: dict[int, float] = {}  # the rolling hour: unix minute -> usd


class Raise(msgspec.Struct, kw_only=True, frozen=True):
    """An operator's limits for a budget (`scope` is the budget's) or one key it counts, until `until`."""

    window: Window
    scope: str
    soft_usd: Union[float, None] = None
    hard_usd: Union[float, None] = None
    until: float  # unix time: the end of the window the raise was made in


class _Snapshot(msgspec.Struct, kw_only=True):
    format: int = FORMAT
    spend: list[_StoredSpend] = []
    raises: list[Raise] = []  # absent from files written before raises were kept: defaulted


_encoder: Final = msgspec.json.Encoder()
_decoder: Final = msgspec.json.Decoder(_Snapshot)

Keys = Iterable[tuple[Budget, str]]


class SpendLedger:
    def __init__(self, budgets: list[Budget]) -> None:
        self._budgets: dict[tuple[str, Window], Budget] = {}
        for budget in budgets:
            if (budget.scope, budget.window) in self._budgets:
                raise ValueError(f"two budgets for {budget.scope} per {budget.window}")
            self._budgets[budget.scope, budget.window] = budget
        self._raises: dict[tuple[Window, str], Raise] = {}  # per budget scope or scope key
        self._periods: dict[tuple[Window, str], _Period] = {}
        self._minutes: dict[str, dict[int, float]] = {}  # rolling hour: key -> unix minute -> usd
        self._reserved: dict[tuple[Window, str], tuple[float, int]] = {}  # per key: usd held, by how many requests
        self.revision = 0  # counts changes to the spend, so a store writes only when there are some
        self._seen = -math.inf  # the latest wall time recorded: snapshots drop windows ended by then
        self._next_prune = -math.inf

    # -- which budgets a request counts against

    def keys_for(self, *, feature: str, route: str, user: str | None, app: str | None = None) -> list[tuple[Budget, str]]:
        keys = []
        for (scope, window), budget in self._budgets.items():
            if scope == "global":
                keys.append((budget, "global"))
            elif scope == "user":
                if user:
                    keys.append((budget, f"user:{user}"))
            elif scope.startswith("app:"):
                if app is not None and scope == f"app:{app}":
                    keys.append((budget, scope))
            else:
                kind, _, name = scope.partition(":")
                value = feature if kind == "feature" else route
                if value and (name == value or (name == "*" and (f"{kind}:{value}", window) not in self._budgets)):
                    keys.append((budget, f"{kind}:{value}"))
        return keys

    def owner(self, window: Window, key: str) -> Budget | None:
        """The budget that counts `key` in `window`, if any."""
        kind, _, name = key.partition(":")
        if key == "global" or (kind == "user" and name):
            return self._budgets.get((kind, window))
        if kind in ("feature", "route") and name and name != "*":
            return self._budgets.get((key, window)) or self._budgets.get((f"{kind}:*", window))
        if kind == "app" and name:
            return self._budgets.get((key, window))
        return None

    def in_force(self, budget: Budget, key: str, wall_now: float) -> Budget:
        """`budget` with the limits now in force for `key` (an operator's raise included)."""
        return self._effective(budget, key, wall_now)

    def _effective(self, budget: Budget, key: str, wall_now: float) -> Budget:
        """`budget` with the limits now in force for `key`: its own raise, else the budget's, else the config's."""
        current = self._budgets.get((budget.scope, budget.window), budget)
        for name in (key, budget.scope):
            raised = self._raises.get((budget.window, name))
            if raised is not None and wall_now < raised.until:
                return msgspec.structs.replace(current, soft_usd=raised.soft_usd, hard_usd=raised.hard_usd)
        return current

    # -- reading

    def spent(self, budget: Budget, key: str, wall_now: float) -> float:
        if budget.window == "hour":
            minutes = self._minutes.get(key)
            if not minutes:
                return 0.0
            first = _minute(wall_now) - 59
            return sum(usd for minute, usd in minutes.items() if minute >= first)
        period = self._periods.get((budget.window, key))
        return 0.0 if period is None or wall_now >= period.end else period.usd

    def reserved(self, budget: Budget, key: str) -> float:
        """What requests in flight hold against `key` in `budget`'s window."""
        return self._reserved.get((budget.window, key), (0.0, 0))[0]

    def check(self, keys: Keys, estimate_usd: float, wall_now: float) -> Verdict:
        """May a request that costs at most `estimate_usd` go ahead, beside the requests in flight?"""
        usage, soft_crossed = [], []
        refused: Budget | None = None
        refused_key: str | None = None
        reset_at: float | None = None
        for budget, key in keys:
            budget = self._effective(budget, key, wall_now)
            spent = self.spent(budget, key, wall_now)
            reserved = self.reserved(budget, key)
            usage.append(Usage(budget, key, spent, reserved))
            if budget.soft_usd is not None and spent >= budget.soft_usd:
                soft_crossed.append((budget, key))
            if budget.hard_usd is not None and spent + reserved + estimate_usd > budget.hard_usd:
                # Reservations settle into the current minute at the latest: count them as spent now.
                at = self.reset_at(budget, wall_now, key=key, estimate_usd=reserved + estimate_usd)
                if reset_at is None or at > reset_at:
                    refused, refused_key, reset_at = budget, key, at
        return Verdict(refused, refused_key, reset_at, soft_crossed, usage)

    def reset_at(self, budget: Budget, wall_now: float, *, key: str | None = None, estimate_usd: float = 0.0) -> float:
        """When the budget's spend next drops, as unix time.

        Calendar windows: the next window boundary (UTC). The rolling hour: given `key`, the first minute
        boundary after which spend plus `estimate_usd` fits under the hard limit again; without a key, or
        when the estimate alone is above the limit, when everything spent so far has left the window (at
        most an hour away).
        """
        if budget.window != "hour":
            return _period_end(budget.window, _period_start(budget.window, wall_now))
        empty_at = (_minute(wall_now) + 60) * 60.0
        if key is None:
            return empty_at
        hard = self._effective(budget, key, wall_now).hard_usd
        first = _minute(wall_now) - 59
        minutes = sorted((m, usd) for m, usd in self._minutes.get(key, {}).items() if m >= first)
        if hard is None or sum(usd for _, usd in minutes) + estimate_usd <= hard:
            return wall_now
        for i, (minute, _) in enumerate(minutes):
            if sum(usd for _, usd in minutes[i + 1 :]) + estimate_usd <= hard:
                return (minute + 60) * 60.0
        return empty_at

    # -- recording

    def reserve(self, keys: Keys, usd: float) -> Reservation:
        """Hold `usd` (a request's worst case) against `keys` until the request settles."""
        if not 0 <= usd < math.inf:
            raise ValueError("a reservation must be a finite, non-negative number of dollars")
        reservation = Reservation(tuple(keys), usd)
        for budget, key in reservation.keys:
            held, count = self._reserved.get((budget.window, key), (0.0, 0))
            self._reserved[budget.window, key] = (held + usd, count + 1)
        return reservation

    def settle(self, reservation: Reservation, usd: float, wall_now: float) -> list[tuple[Budget, str]]:
        """End a reservation with what the request really cost (0: nothing was billed); returns `add`'s crossings."""
        for budget, key in reservation.keys:
            held, count = self._reserved.pop((budget.window, key))
            if count > 1:  # the last one out drops the entry, and with it any rounding left in the sum
                self._reserved[budget.window, key] = (held - reservation.usd, count - 1)
        return self.add(reservation.keys, usd, wall_now) if usd > 0 else []

    def add(self, keys: Keys, usd: float, wall_now: float) -> list[tuple[Budget, str]]:
        """Record what a request cost; returns the (budget, key)s whose soft limit this spend just crossed.

        A crossing is reported once: spend only grows within a calendar window, and in the rolling hour it
        must fall back under the soft limit before it can cross again.
        """
        if not usd >= 0:
            raise ValueError("spend must be a non-negative number of dollars")
        crossed = []
        for budget, key in keys:
            budget = self._effective(budget, key, wall_now)
            before = self.spent(budget, key, wall_now)
            self._record(budget.window, key, usd, wall_now)
            if budget.soft_usd is not None and before < budget.soft_usd <= before + usd:
                crossed.append((budget, key))
        self.revision += 1
        self._seen = max(self._seen, wall_now)
        if wall_now >= self._next_prune:
            self._prune(wall_now)
            self._next_prune = wall_now + PRUNE_EVERY_S
        return crossed

    def _record(self, window: Window, key: str, usd: float, wall_now: float) -> None:
        if window == "hour":
            minutes = self._minutes.setdefault(key, {})
            minute = _minute(wall_now)
            if minute not in minutes:
                for old in [m for m in minutes if m < minute - 59]:
                    del minutes[old]
            minutes[minute] = minutes.get(minute, 0.0) + usd
            return
        period = self._periods.get((window, key))
        if period is None or wall_now >= period.end:
            period = self._periods[window, key] = _Period(window, _period_start(window, wall_now))
        period.usd += usd

    def _prune(self, wall_now: float) -> None:
        for counter in [c for c, period in self._periods.items() if wall_now >= period.end]:
            del self._periods[counter]
        first = _minute(wall_now) - 59
        for key in list(self._minutes):
            minutes = {m: usd for m, usd in self._minutes[key].items() if m >= first}
            if minutes:
                self._minutes[key] = minutes
            else:
                del self._minutes[key]
        for counter in [c for c, raised in self._raises.items() if wall_now >= raised.until]:
            del self._raises[counter]

    # -- the operator's controls

    def raise_limit(
        self, scope_key: str, window: Window, *, soft_usd: float | None | msgspec.UnsetType,
        hard_usd: float | None | msgspec.UnsetType, wall_now: float,
    ) -> Budget:
        """Change limits until the current window resets (None: no limit; `UNSET`: the one in force now stays);
        returns the budget now in force.

        A budget's own scope ("global", "user", "feature:*", "feature:search") changes that budget; a key
        counted by a per-key budget ("user:ab12", "feature:search" under "feature:*") gets limits of its own.
        Kept in the snapshot, so it survives a restart.
        """
        budget = self._budgets.get((scope_key, window)) or self.owner(window, scope_key)
        if budget is None:
            raise ValueError(f"no budget counts {scope_key} per {window}")
        now = self._effective(budget, scope_key, wall_now)
        soft_usd = now.soft_usd if soft_usd is msgspec.UNSET else soft_usd
        hard_usd = now.hard_usd if hard_usd is msgspec.UNSET else hard_usd
        check_spend_limits(soft_usd, hard_usd)
        until = wall_now + 3600.0 if window == "hour" else _period_end(window, _period_start(window, wall_now))
        self._raises[window, scope_key] = Raise(window=window, scope=scope_key, soft_usd=soft_usd, hard_usd=hard_usd, until=until)
        self.revision += 1
        return msgspec.structs.replace(budget, soft_usd=soft_usd, hard_usd=hard_usd)

    def raises(self) -> list[Raise]:
        """The operators' raises kept (fleet mode shares them as operator state)."""
        return sorted(self._raises.values(), key=lambda r: (r.window, r.scope))

    def put_raises(self, raises: Iterable[Raise]) -> None:
        """RAISES replace the ones kept (the fleet's, adopted); a raise no budget counts any more is dropped."""
        self._raises = {(r.window, r.scope): r for r in raises
                        if (r.scope, r.window) in self._budgets or self.owner(r.window, r.scope) is not None}
        self.revision += 1

    def reset(self, scope_key: str, window: Window, wall_now: float) -> float:
        """Zero one key's spend in its current window; returns what was zeroed."""
        owner = self.owner(window, scope_key)
        if owner is None:
            raise ValueError(f"no budget counts {scope_key} per {window}")
        zeroed = self.spent(owner, scope_key, wall_now)
        if window == "hour":
            self._minutes.pop(scope_key, None)
        else:
            self._periods.pop((window, scope_key), None)
        self.revision += 1
        return zeroed

    # -- for operators

    def usage(self, wall_now: float) -> list[tuple[Budget, str | None, float]]:
        """Per budget (with its limits in force): the most-spent key in its current window and that spend."""
        best: dict[tuple[str, Window], tuple[str, float]] = {}
        keys = [(window, key) for window, key in self._periods] + [("hour", key) for key in self._minutes]
        for window, key in keys:
            owner = self.owner(window, key)  # type: ignore[arg-type]
            if owner is None:
                continue
            spent = self.spent(owner, key, wall_now)
            slot = (owner.scope, owner.window)
            if spent > best.get(slot, ("", -1.0))[1]:
                best[slot] = (key, spent)
        out = []
        for slot, budget in self._budgets.items():
            key, spent = best.get(slot, (None, 0.0))
            out.append((self._effective(budget, key or budget.scope, wall_now), key, spent))
        return out

    def describe(self, scope_key: str, window: Window, wall_now: float) -> dict[str, object] | None:
        """One scope key's limits in force and spend, or a budget's own limits for a wildcard scope."""
        budget = self._budgets.get((scope_key, window))
        owner = self.owner(window, scope_key)
        if owner is None:
            if budget is None:
                return None
            budget = self._effective(budget, scope_key, wall_now)
            return {"scope": scope_key, "window": window, "spent_usd": None, "soft_usd": budget.soft_usd, "hard_usd": budget.hard_usd}
        effective = self._effective(owner, scope_key, wall_now)
        return {
            "scope": scope_key, "window": window, "spent_usd": self.spent(owner, scope_key, wall_now),
            "soft_usd": effective.soft_usd, "hard_usd": effective.hard_usd,
        }

    # -- persistence

    def snapshot(self) -> bytes:
        """The spend of current windows and the operator's raises in force, as JSON."""
        if self._seen > -math.inf:
            self._prune(self._seen)
        spend = [_StoredSpend(window=w, key=k, start=p.start, usd=p.usd) for (w, k), p in self._periods.items()]
        spend += [_StoredSpend(window="hour", key=k, minutes=dict(m)) for k, m in self._minutes.items()]
        return _encoder.encode(_Snapshot(spend=spend, raises=list(self._raises.values())))

    @classmethod
    def restore(cls, budgets: list[Budget], data: bytes) -> SpendLedger:
        """A ledger for `budgets` with the spend in `data`; spend no budget counts any more is dropped.

        Raises `msgspec.MsgspecError` or `ValueError` on data it cannot use. Times must be plausible: spend
        dated in the far future would never leave its window.
        """
        snapshot = _decoder.decode(data)
        if snapshot.format != FORMAT:
            raise ValueError(f"unknown format {snapshot.format}")
        ledger = cls(budgets)
        for stored in snapshot.spend:
            times = [m * 60 for m in stored.minutes] if stored.window == "hour" else [stored.start]
            if not all(0 <= t < LAST_TIME for t in times):
                raise ValueError(f"{stored.key} per {stored.window}: implausible time")
            if stored.usd < 0 or any(usd < 0 for usd in stored.minutes.values()):  # (would raise the budget it counts)
                raise ValueError(f"{stored.key} per {stored.window}: a negative amount")
            if stored.window != "hour" and _period_start(stored.window, stored.start) != stored.start:
                raise ValueError(f"{stored.key} per {stored.window}: {stored.start} is not the start of a window")
            if ledger.owner(stored.window, stored.key) is None:
                continue
            if stored.window == "hour":
                ledger._minutes[stored.key] = dict(stored.minutes)
            else:
                ledger._periods[stored.window, stored.key] = _Period(stored.window, stored.start, stored.usd)
        for raised in snapshot.raises:
            check_spend_limits(raised.soft_usd, raised.hard_usd)
            if not 0 <= raised.until < LAST_TIME:
                raise ValueError(f"a raise of {raised.scope} per {raised.window}: implausible time")
            if (raised.scope, raised.window) in ledger._budgets or ledger.owner(raised.window, raised.scope) is not None:
                ledger._raises[raised.window, raised.scope] = raised
        return ledger
