"""The request path's store operations: what each script is sent and what its reply means (pure), and the
calls that send them on a `Connection`.

One round trip per request (`admit`): the shared cache lookup, the fleet-wide rate limits, the budget
reservation and the coalescing lease, atomically, in one Lua script. One more after the answer (`settle`):
the reservation becomes the real cost and the token buckets are corrected. The leader of a coalesced request
also stores the answer (`cache_put`) and renews or gives up its lease (`renew_lease`, `release_lease`).

The semantics are the local ones (`policies/bucket.py`'s GCRA, `limits/spend.py`'s windows), with one thing
only a fleet needs: an admitted request reserves its worst-case cost in the store until it settles, so
requests admitted at once on different sidecars cannot together pass a hard limit.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib.resources import files
from typing import Any, Literal

from ..limits.spend import Window, _minute, _period_end, _period_start  # the ledger's own window arithmetic
from .connection import Connection, Script, ScriptCall
from .errors import StoreDataError, StoreUnavailable
from .keys import SCHEMA, Keys

CacheMode = Literal["none", "lookup", "lead"]
_MODES = {"none": 0, "lookup": 1, "lead": 2}


def _load(name: str) -> Script:
    lua = files(__package__) / "lua"
    return Script(name, (lua / "prelude.lua").read_bytes() + (lua / f"{name}.lua").read_bytes())


REQUEST = _load("request")
SETTLE = _load("settle")
CACHE_PUT = _load("cache_put")
LEASE = _load("lease")
STATE = _load("state")
DECIDE = _load("decide")
BUDGET = _load("budget")
RELEASE = _load("release")
ALL = (REQUEST, SETTLE, CACHE_PUT, LEASE, STATE, DECIDE, BUDGET, RELEASE)


# ---------------------------------------------------------------------------------------------- what is asked


@dataclass(frozen=True, slots=True)
class RateCheck:
    """One GCRA bucket: `rate_per_s` sustained, `burst` at once; this request takes `amount`."""

    scope_key: str  # "global", "user:<pseudonym>", "feature:search"
    kind: Literal["requests", "tokens"]
    rate_per_s: float
    burst: float
    amount: float = 1.0


@dataclass(frozen=True, slots=True)
class BudgetCheck:
    """One budget key in one window, with the limits in force for it (an operator's raise included)."""

    scope_key: str
    window: Window
    hard_usd: float | None
    soft_usd: float | None = None


@dataclass(frozen=True, slots=True)
class Admit:
    now: float  # unix time, the caller's wall clock (all sidecars share it; the server's is never used)
    rates: Sequence[RateCheck] = ()
    budgets: Sequence[BudgetCheck] = ()
    estimate_usd: float = 0.0  # the request's worst case, reserved until it settles
    reservation_id: str = ""  # unique in the namespace; "" reserves nothing
    reservation_ttl_s: float = 0.0  # the request's deadline plus a margin: then a reservation never settled lapses
    cache_key: str | None = None
    cache_mode: CacheMode = "none"  # "lookup": a hit or a miss, nothing else; "lead": on a miss, limits, then a lease
    lease_token: str = ""
    lease_ms: int = 3000
    flush_marks: Sequence[str] = ()  # the cache flushes that cover this answer (`flushes.applying`)


@dataclass(frozen=True, slots=True)
class Settle:
    now: float
    reservation_id: str
    cost_usd: float
    budgets: Sequence[BudgetCheck] = ()
    token_adjustments: Sequence[tuple[RateCheck, float]] = ()  # (bucket, tokens to add: real - estimate)
    once: str = ""  # spend carried in after an outage: counted once under this id, however often it is sent
    sent_at: float = 0.0  # (with `once`) unix time: the id is remembered two days from then


# ---------------------------------------------------------------------------------------------- what comes back


@dataclass(frozen=True, slots=True)
class Usage:
    spent_usd: float
    reserved_usd: float  # in flight on the whole fleet, this request's own reservation not included


@dataclass(frozen=True, slots=True)
class CacheHit:
    payload: bytes
    stored_at: float
    expires_at: float


@dataclass(frozen=True, slots=True)
class CacheMiss:
    pass


@dataclass(frozen=True, slots=True)
class RateRefused:
    wait_s: float
    index: int  # into `Admit.rates`: the bucket with the longest wait (the first of equals)


@dataclass(frozen=True, slots=True)
class BudgetRefused:
    index: int  # into `Admit.budgets`: the refusal that lets the request through last
    reset_at: float  # unix time
    usage: list[Usage]


@dataclass(frozen=True, slots=True)
class Admitted:
    lease: Literal["leader", "follower", "none"]
    lease_ttl_ms: int
    usage: list[Usage]
    soft_crossed: list[int] = field(default_factory=list)  # indexes into `Admit.budgets`


AdmitResult = CacheHit | CacheMiss | RateRefused | BudgetRefused | Admitted


@dataclass(frozen=True, slots=True)
class Settled:
    spent_usd: list[float]  # per budget key, after this cost
    soft_crossed: list[int]  # budget keys whose soft limit this cost crossed: exactly one settle in the fleet sees it


# ---------------------------------------------------------------------------------------------- encoding


def window_bounds(window: Window, now: float) -> tuple[float, float]:
    """(start, end) as the scripts take them: the current unix minute for the rolling hour, else the
    calendar window's start and end."""
    if window == "hour":
        return float(_minute(now)), 0.0
    start = _period_start(window, now)
    return start, _period_end(window, start)


def _limit(value: float | None) -> float:
    return -1.0 if value is None else value


def _kind(window: Window) -> str:
    return "hour" if window == "hour" else "calendar"


def admit_call(keys: Keys, op: Admit) -> tuple[list[str], list[Any]]:
    cache_key = op.cache_key or ""
    if op.cache_mode != "none" and not cache_key:
        raise ValueError("a cache mode needs a cache key")
    key_list = [keys.schema, keys.reservations, keys.reservation_specs, keys.cache(cache_key), keys.lease(cache_key)]
    key_list += [keys.rate(r.kind, r.scope_key) for r in op.rates]
    key_list += [keys.budget(b.window, b.scope_key) for b in op.budgets]
    key_list.append(keys.cache_flushes)
    args: list[Any] = [
        SCHEMA, op.now, _MODES[op.cache_mode], op.lease_token, op.lease_ms, len(op.rates), len(op.budgets),
        op.estimate_usd, op.reservation_id, op.now + op.reservation_ttl_s,
    ]
    for r in op.rates:
        args += (r.rate_per_s, r.burst, r.amount)
    for b in op.budgets:
        start, end = window_bounds(b.window, op.now)
        args += (_kind(b.window), _limit(b.hard_usd), start, end)
    args += (len(op.flush_marks), *op.flush_marks)
    return key_list, args


def settle_call(keys: Keys, op: Settle) -> tuple[list[str], list[Any]]:
    key_list = [keys.schema, keys.reservations, keys.reservation_specs]
    key_list += [keys.budget(b.window, b.scope_key) for b in op.budgets]
    key_list += [keys.rate(r.kind, r.scope_key) for r, _ in op.token_adjustments]
    args: list[Any] = [SCHEMA, op.now, op.reservation_id, op.cost_usd, len(op.budgets), len(op.token_adjustments)]
    for b in op.budgets:
        start, end = window_bounds(b.window, op.now)
        args += (_kind(b.window), start, end, _limit(b.soft_usd))
    for r, tokens in op.token_adjustments:
        args += (r.rate_per_s, tokens)
    if op.once:
        key_list.append(keys.carried)
        args += (op.once, op.sent_at)
    return key_list, args


# ---------------------------------------------------------------------------------------------- decoding


def _float(value: Any) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise StoreDataError(f"the store answered {value!r:.40} where a number belongs") from None
    if not math.isfinite(number):
        raise StoreDataError(f"the store answered {number} where a finite number belongs")
    return number


def _usage(values: list[Any], count: int) -> list[Usage]:
    if len(values) != 2 * count:
        raise StoreDataError(f"the request script reported {len(values) // 2} budgets, not {count}")
    return [Usage(_float(values[2 * i]), _float(values[2 * i + 1])) for i in range(count)]


def admit_result(op: Admit, reply: Any) -> AdmitResult:
    """The script's reply as a result; anything else is `StoreDataError`."""
    if not isinstance(reply, list) or not reply:
        raise StoreDataError(f"the request script answered {type(reply).__name__}, not a list")
    try:
        tag, rest = reply[0], reply[1:]
        if tag == b"hit" and len(rest) == 3 and isinstance(rest[0], bytes):
            return CacheHit(rest[0], _float(rest[1]), _float(rest[2]))
        if tag == b"miss" and not rest:
            return CacheMiss()
        if tag == b"rate" and len(rest) == 2 and 1 <= rest[1] <= len(op.rates):
            return RateRefused(_float(rest[0]), rest[1] - 1)
        if tag == b"budget" and len(rest) >= 2 and 1 <= rest[0] <= len(op.budgets):
            return BudgetRefused(rest[0] - 1, _float(rest[1]), _usage(rest[2:], len(op.budgets)))
        if tag == b"ok" and len(rest) >= 2 and rest[0] in (b"leader", b"follower", b"none"):
            usage = _usage(rest[2:], len(op.budgets))
            crossed = [
                i for i, (b, u) in enumerate(zip(op.budgets, usage))
                if b.soft_usd is not None and u.spent_usd + u.reserved_usd + op.estimate_usd >= b.soft_usd
            ]
            return Admitted(rest[0].decode(), int(rest[1]), usage, crossed)
    except TypeError:
        pass
    raise StoreDataError(f"the request script answered something this sidecard cannot read: {reply!r:.80}")


def settle_result(op: Settle, reply: Any) -> Settled:
    n = len(op.budgets)
    if not isinstance(reply, list) or len(reply) < n or not all(isinstance(i, int) and 1 <= i <= n for i in reply[n:]):
        raise StoreDataError(f"the settle script answered something this sidecard cannot read: {reply!r:.80}")
    return Settled([_float(v) for v in reply[:n]], [i - 1 for i in reply[n:]])


def undo_call(keys: Keys, op: Admit) -> tuple[list[str], list[Any]]:
    """What gives back an admission nobody used (its reply came after the caller gave up on it): the
    reservation released, the buckets' takes returned."""
    return settle_call(keys, Settle(op.now, op.reservation_id, 0.0, op.budgets, [(r, -r.amount) for r in op.rates]))


# ---------------------------------------------------------------------------------------------- calls


class RequestPath:
    """The request path's operations on one connection and namespace."""

    def __init__(self, connection: Connection, keys: Keys, *, max_entry_bytes: int = 256 << 10) -> None:
        self.connection = connection
        self.keys = keys
        self.max_entry_bytes = max_entry_bytes

    async def admit(self, op: Admit) -> AdmitResult:
        """One round trip within the connection's deadline; `StoreError` means: decide locally."""
        key_list, args = admit_call(self.keys, op)
        reply = await self.connection.run_script(REQUEST, key_list, args, on_late=self._undo_late(op))
        return admit_result(op, reply)

    def _undo_late(self, op: Admit) -> Callable[[list[Any] | StoreUnavailable], None]:
        def undo(replies: list[Any] | StoreUnavailable) -> None:
            if isinstance(replies, StoreUnavailable):
                return  # the connection is gone: the reservation lapses on its own
            reply = replies[0]
            if not (isinstance(reply, list) and reply and reply[0] == b"ok"):
                return  # refused, or a hit: nothing was taken
            self.connection.send_and_forget(SETTLE, *undo_call(self.keys, op))
            if reply[1] == b"leader":
                self.connection.send_and_forget(*self.release_script(op.cache_key or "", op.lease_token))

        return undo

    async def settle(self, op: Settle, *, timeout_s: float | None = None) -> Settled:
        return settle_result(op, await self.connection.run_script(*self.settle_script(op), timeout_s=timeout_s))

    def settle_script(self, op: Settle) -> ScriptCall:
        return (SETTLE, *settle_call(self.keys, op))

    async def cache_put(
        self, cache_key: str, payload: bytes, *, now: float, stored_at: float, expires_at: float, stale_until: float,
        lease_token: str = "", timeout_s: float | None = None,
    ) -> bool:
        """Store an answer (and release the lease, telling the followers); False if it is too large to share."""
        call = self.cache_put_script(cache_key, payload, now=now, stored_at=stored_at, expires_at=expires_at,
                                     stale_until=stale_until, lease_token=lease_token)
        return await self.connection.run_script(*call, timeout_s=timeout_s) == 1

    def cache_put_script(
        self, cache_key: str, payload: bytes, *, now: float, stored_at: float, expires_at: float, stale_until: float,
        lease_token: str = "",
    ) -> ScriptCall:
        ttl_ms = max(1, math.ceil((stale_until - now) * 1000))
        if len(payload) > self.max_entry_bytes:
            payload = b""  # not sent: only the lease is released
            stored_limit = -1
        else:
            stored_limit = self.max_entry_bytes
        return (
            CACHE_PUT, [self.keys.schema, self.keys.cache(cache_key), self.keys.lease(cache_key)],
            [SCHEMA, payload, stored_at, expires_at, stale_until, ttl_ms, stored_limit, lease_token,
             self.keys.cache_channel, cache_key],
        )

    async def cache_get(self, cache_key: str, now: float, *, allow_stale: bool = False) -> CacheHit | None:
        """A shared answer (for stale-if-error: `allow_stale`), outside the request script."""
        reply = await self.connection.call("HMGET", self.keys.cache(cache_key), "p", "s", "e", "x", op="cache_get")
        if not isinstance(reply, list) or len(reply) != 4:
            raise StoreDataError("HMGET answered something else than four fields")
        payload, stored_at, expires_at, stale_until = reply
        if payload is None:
            return None
        hit = CacheHit(payload, _float(stored_at), _float(expires_at))
        if now >= _float(stale_until) or (now >= hit.expires_at and not allow_stale):
            return None
        return hit

    async def budget(self, window: Window, scope_key: str, *, now: float, reset: bool = False, timeout_s: float | None = None) -> Usage:
        """One budget key's spend in its window and what is reserved on it, fleet-wide; `reset`: then zero the
        spend (the reservations stay)."""
        start, end = window_bounds(window, now)
        reply = await self.connection.run_script(
            BUDGET, [self.keys.schema, self.keys.budget(window, scope_key)],
            [SCHEMA, "reset" if reset else "read", _kind(window), start, end], timeout_s=timeout_s,
        )
        if not (isinstance(reply, list) and len(reply) == 2):
            raise StoreDataError(f"the budget script answered something this sidecard cannot read: {reply!r:.80}")
        return Usage(_float(reply[0]), _float(reply[1]))

    async def release_previous_runs(self, instance: str, run: str) -> int:
        """Give back the reservations INSTANCE's previous runs made for requests (not for async jobs); how many."""
        reply = await self.connection.run_script(
            RELEASE, [self.keys.schema, self.keys.reservations, self.keys.reservation_specs], [SCHEMA, instance, run],
        )
        if not isinstance(reply, int):
            raise StoreDataError(f"the release script answered something this sidecard cannot read: {reply!r:.80}")
        return reply

    def _lease_args(self, action: str, cache_key: str, token: str, lease_ms: int, now: float) -> tuple[list[Any], list[Any]]:
        return ([self.keys.schema, self.keys.lease(cache_key)],
                [SCHEMA, action, token, lease_ms, self.keys.cache_channel, cache_key, now])

    async def renew_lease(self, cache_key: str, token: str, *, lease_ms: int, now: float) -> bool:
        """Hold the lease `lease_ms` more; False: it ran out (a follower may be leading by now)."""
        return await self.connection.run_script(LEASE, *self._lease_args("renew", cache_key, token, lease_ms, now)) == 1

    async def release_lease(self, cache_key: str, token: str) -> bool:
        """Give up the lease without an answer: the followers are told, and one of them leads."""
        return await self.connection.run_script(*self.release_script(cache_key, token)) == 1

    def release_script(self, cache_key: str, token: str) -> ScriptCall:
        return (LEASE, *self._lease_args("release", cache_key, token, 0, 0.0))
