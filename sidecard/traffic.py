"""Traffic control: who may send how much, and how much reaches each upstream target at once.

Composes the pure parts — token buckets (rate limits), the spend ledger (budgets), admission queues
(concurrency limit, priority queue, load shedding) — with what the providers say about their own limits
(`anthropic-ratelimit-*` headers, `retry-after`: a `ProviderWindow` per target, the gate of its queue). The
engine calls it at three points: `admit` before a request does anything (it reserves the request's worst
case against its budgets), `acquire` around each upstream attempt, `settle` once the request is over.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import trio

from .config import Config, RateLimit, Target
from .errors import Code, SidecardError
from .limits.queue import AdmissionQueue, Overloaded, Slot
from .limits.spend import Budget, Reservation, SpendLedger
from .observe.log import JsonLog
from .observe.metrics import Metrics
from .policies.bucket import BucketSet
from .policies.concurrency import AIMDLimit, ConcurrencyLimit, GradientLimit, StaticLimit
from .policies.throttle import ProviderWindow

PRIORITIES = {"interactive": 0, "batch": 1}
RESET_MARGIN_S = 1.0  # reset times come in whole seconds: wait out the rounding too, or the first call draws a 429
BUDGET_GAUGES_EVERY_S = 5.0
_RESET_TIMES_KEPT = 64
Keys = list[tuple[Budget, str]]


@dataclass(slots=True)
class Admission:
    """What `admit` decided for one request, handed back to `settle`."""

    budget_keys: Keys
    route: str | None  # a cheaper route while a soft budget limit is crossed
    token_keys: list[tuple[BucketSet, str]]
    estimated_tokens: float
    reservation: Reservation | None  # the request's worst case, held against its budgets until it settles
    fleet: Any = None  # fleet mode: what the store reserved (`fleet.gate.FleetTicket`), settled there


class TargetSlot:
    """An admission slot that also keeps, for an adaptive limit, the limit's gauge."""

    __slots__ = ("_gauge", "_queue", "_slot")

    def __init__(self, slot: Slot, queue: AdmissionQueue, gauge: Any) -> None:
        self._slot = slot
        self._queue = queue
        self._gauge = gauge

    def release(self, *, rtt_s: float | None, dropped: bool = False) -> None:
        self._slot.release(rtt_s=rtt_s, dropped=dropped)
        if self._gauge is not None:
            self._gauge.set(self._queue.limit)  # an adaptive limit moves on the sample a release feeds it


@dataclass(slots=True)
class _Limiter:
    limit: RateLimit
    requests: BucketSet | None
    tokens: BucketSet | None


@dataclass(frozen=True, slots=True)
class _QueueSettings:
    """What one target's queue was built with: a reload compares the fresh settings with these."""

    target_max: int | None  # the target's own max_concurrency
    adaptive: str
    max_concurrency: int
    max_queue: int
    codel_target_s: float
    codel_interval_s: float
    shed: bool

    @classmethod
    def of(cls, config: Config, target_max: int | None) -> _QueueSettings:
        q = config.queue
        return cls(target_max, q.adaptive, target_max or q.max_concurrency, q.max_queue, q.codel_target_ms / 1000,
                   q.codel_interval_ms / 1000, q.shed)

    def queue_kwargs(self) -> dict[str, Any]:
        return {"max_queue": self.max_queue, "codel_target_s": self.codel_target_s,
                "codel_interval_s": self.codel_interval_s, "shed": self.shed}


@dataclass(slots=True)
class _TargetTraffic:
    """One target's queue, provider window and settings, with its metric children bound once: an attempt looks
    its target up once."""

    queue: AdmissionQueue
    window: ProviderWindow
    settings: _QueueSettings
    labels: tuple[str, str]  # provider, model
    limit: Any  # the child of sidecard_concurrency_limit; the others are bound when first used (a series appears then)
    depth: Any = None
    wait: Any = None
    throttled: Any = None
    holds_counted: int = 0  # the window's holds sidecard_throttled_total has counted


def _iso_to_unix(value: str) -> float | None:
    if not value:
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


class Traffic:
    def __init__(
        self,
        config: Config,
        ledger: SpendLedger,
        *,
        metrics: Metrics,
        log: JsonLog,
        clock: Callable[[], float] = trio.current_time,
        wall: Callable[[], float] = time.time,
        on_alert: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        self.ledger = ledger
        self.metrics = metrics
        self.log = log
        self._clock = clock
        self._wall = wall
        self._on_alert = on_alert
        self._gauged_spend: dict[tuple[str, str], float] = {}  # per budget: the spend its gauges show
        self._targets: dict[tuple[str, str, str | None], _TargetTraffic] = {}
        self._limiters: list[_Limiter] = []
        # Reset times as the headers give them (RFC 3339, whole seconds): one value serves many answers in a row.
        self._reset_times: dict[str, float | None] = {}
        self.configure(config)

    def configure(self, config: Config) -> None:
        """(Re)build rate limiters and apply queue settings; spend, and the waiters of queues in use, are kept."""
        self.config = config
        self._reconfigure_queues(config)
        for state in self._targets.values():
            state.window.min_requests, state.window.min_tokens = config.throttle.min_requests_remaining, config.throttle.min_tokens_remaining
        previous = {id_of(l.limit): l for l in self._limiters}
        self._limiters = []
        for limit in config.rate_limits:
            kept = previous.get(id_of(limit))
            if kept is not None:
                self._limiters.append(kept)
                continue
            requests = tokens = None
            if limit.requests_per_minute:
                rate = limit.requests_per_minute / 60
                requests = BucketSet(rate, max(1.0, rate * limit.burst_s))
            if limit.tokens_per_minute:
                rate = limit.tokens_per_minute / 60
                tokens = BucketSet(rate, max(1.0, rate * limit.burst_s))
            self._limiters.append(_Limiter(limit, requests, tokens))
        self._soft_routes = {(b.scope, b.window): b.soft_route for b in config.budgets if b.soft_route}

    # ------------------------------------------------------------------ before the request

    def admit(
        self, *, feature: str, route: str, user_key: str | None, estimated_tokens: float, estimate_usd: Callable[[], float],
        app: str | None = None, prepaid: Admission | None = None, own: bool = False,
    ) -> Admission:
        """Rate limits, then budgets; raises `rate_limited` or `budget_exceeded` at once, never waits. `estimate_usd`:
        the request's worst-case cost, asked for only when a budget applies. `prepaid`: an async job's admission at
        submit, which took the job's rate limits: its run takes none, and settling corrects the submit's estimate.
        `own`: sidecard's own call (the judge, a shadow), held to budgets but not to the rate limits, which divide the
        apps' traffic: it must not take what the apps are allowed (its own settings bound it)."""
        now = self._clock()
        takes: list[tuple[BucketSet, str, float]] = []
        worst, worst_scope = 0.0, ""
        for limiter in self._limiters if prepaid is None and not own else ():
            key = _rate_key(limiter.limit.scope, feature, user_key, app)
            if key is None:
                continue
            for buckets, amount in ((limiter.requests, 1.0), (limiter.tokens, estimated_tokens)):
                if buckets is None:
                    continue
                wait = buckets.delay(key, now, amount)
                if wait > worst:
                    worst, worst_scope = wait, limiter.limit.scope
                takes.append((buckets, key, amount))
        if worst > 0:
            # Never "forever": a request larger than a whole bucket waits until it is full (see bucket.py).
            self.metrics.refusals("rate_limited").inc()
            raise SidecardError(
                Code.RATE_LIMITED, f"over the {worst_scope} rate limit", retryable=True, retry_after_ms=math.ceil(worst * 1000)
            )
        wall_now = self._wall()
        keys = self.ledger.keys_for(feature=feature, route=route, user=user_key, app=app)
        switched = reservation = None
        if keys:
            estimated_usd = estimate_usd()
            verdict = self.ledger.check(keys, estimated_usd, wall_now)
            if not verdict.allowed:
                self.metrics.refusals("budget_exceeded").inc()
                budget = verdict.refused
                assert budget is not None and budget.hard_usd is not None and verdict.reset_at is not None
                reset = datetime.fromtimestamp(verdict.reset_at).astimezone().isoformat(timespec="seconds")
                use = next(u for u in verdict.usage if u.key == verdict.refused_key and u.budget.window == budget.window)
                left = budget.hard_usd - use.spent_usd - use.reserved_usd
                # Nothing spent yet can still refuse: the request's worst case is held against the budget.
                why = "is spent" if left <= 0 else (
                    f"has ${left:.4g} left{f' (${use.reserved_usd:.4g} held by requests in flight)' if use.reserved_usd else ''}, "
                    f"less than this request's worst case (${estimated_usd:.4g})")
                raise SidecardError(
                    Code.BUDGET_EXCEEDED,
                    f"the {budget.window} budget of {verdict.refused_key} (${budget.hard_usd:g}) {why} until {reset}",
                    retryable=False,
                    retry_after_ms=max(0, math.ceil((verdict.reset_at - wall_now) * 1000)),
                )
            for budget, _ in verdict.soft_crossed:
                switched = switched or self._soft_routes.get((budget.scope, budget.window))
            reservation = self.ledger.reserve(keys, estimated_usd)
        # Taken only now: a request the budgets refuse uses none of its rate limits.
        for buckets, key, amount in takes:
            buckets.try_take(key, now, amount)
        if prepaid is not None:
            return Admission(keys, switched, prepaid.token_keys, prepaid.estimated_tokens, reservation)
        token_keys = [(b, k) for b, k, _ in takes if any(l.tokens is b for l in self._limiters)]
        return Admission(keys, switched, token_keys, estimated_tokens, reservation)

    # ------------------------------------------------------------------ around each attempt

    def queue(self, target: Target) -> AdmissionQueue:
        return self._target(target).queue

    def _target(self, target: Target) -> _TargetTraffic:
        key = (target.provider, target.model, target.base_url)
        state = self._targets.get(key)
        if state is None:
            settings = _QueueSettings.of(self.config, target.max_concurrency)
            throttle = self.config.throttle
            window = ProviderWindow(min_requests=throttle.min_requests_remaining, min_tokens=throttle.min_tokens_remaining)
            queue = AdmissionQueue(
                _limit(settings.adaptive, settings.max_concurrency), **settings.queue_kwargs(), clock=self._clock, gate=window
            )
            labels = (target.provider, target.model)
            state = self._targets[key] = _TargetTraffic(queue, window, settings, labels, self.metrics.concurrency_limit(*labels))
            state.limit.set(queue.limit)
        return state

    def forget(self, model: str) -> None:
        """Drop the queues and provider windows of every target of MODEL (a model no route has that no longer holds
        a slot); a call in flight releases its slot into the dropped queue."""
        for key in [key for key in self._targets if key[1] == model]:
            del self._targets[key]

    def _reconfigure_queues(self, config: Config) -> None:
        """Apply `[queue]` (and per-target `max_concurrency`) to the queues in use, keeping their waiters.

        An adaptive limit keeps what it learnt unless its kind or maximum changed."""
        own = {(t.provider, t.model, t.base_url): t.max_concurrency for r in config.routes.values() for t in r.targets}
        for key, state in self._targets.items():
            old = state.settings
            new = state.settings = _QueueSettings.of(config, own.get(key, old.target_max))
            if new == old:
                continue
            same_limit = (new.adaptive, new.max_concurrency) == (old.adaptive, old.max_concurrency)
            state.queue.reconfigure(limit=None if same_limit else _limit(new.adaptive, new.max_concurrency), **new.queue_kwargs())
            state.limit.set(state.queue.limit)

    async def acquire(self, target: Target, *, priority: str, deadline: float, max_hold_s: float = math.inf) -> TargetSlot:
        """A slot for one call to `target`: within its concurrency limit and the provider's rate limits, the latter
        waited out for at most `max_hold_s` (longer: `Overloaded`, reason `paused`)."""
        state = self._target(target)
        queue = state.queue
        started = self._clock()
        try:
            slot = await queue.acquire(priority=PRIORITIES[priority], deadline=deadline, max_hold_s=max_hold_s)
        except Overloaded as refused:
            self.metrics.refusals(refused.reason if refused.reason == "deadline_too_short" else f"overloaded:{refused.reason}").inc()
            if refused.reason == "shed":
                self.metrics.shed(priority).inc()
            raise
        finally:
            if state.depth is None:
                state.depth = self.metrics.queue_depth(*state.labels)
            state.depth.set(queue.queued)
            self._count_holds(state)
        if state.wait is None:
            state.wait = self.metrics.queue_wait(*state.labels)
        state.wait.observe(self._clock() - started)
        # A static limit's gauge is set when its queue is built or reconfigured; an adaptive one moves on releases.
        return TargetSlot(slot, queue, state.limit if state.settings.adaptive != "off" else None)

    def observe(self, target: Target, headers: dict[str, str] | None, *, retry_after_s: float | None, status: int | None) -> None:
        """Slow down before the provider says 429: what it says about its limits goes to the target's window."""
        if not self.config.throttle.enabled:
            return
        state = self._target(target)
        window = state.window
        now = self._clock()
        if status == 429:
            # Only the provider knows how long its window has left. Without retry-after, a guessed pause
            # would hold every request on the target; each caller's own jittered backoff spreads them instead.
            if retry_after_s is None:
                return
            window.retry_after(now, retry_after_s)
        else:
            headers = headers or {}
            window.answered(
                now,
                limit=_count(headers.get("anthropic-ratelimit-requests-limit")),
                remaining=_count(headers.get("anthropic-ratelimit-requests-remaining")),
                reset=self._reset(now, headers.get("anthropic-ratelimit-requests-reset")),
                tokens_remaining=_count(headers.get("anthropic-ratelimit-tokens-remaining")),
                tokens_reset=self._reset(now, headers.get("anthropic-ratelimit-tokens-reset")),
            )
        window.delay(now)  # a hold that begins now is counted now
        self._count_holds(state)
        state.queue.poke()

    def _count_holds(self, state: _TargetTraffic) -> None:
        """`sidecard_throttled_total` follows the holds the target's window has begun."""
        holds = state.window.holds
        if holds > state.holds_counted:
            if state.throttled is None:
                state.throttled = self.metrics.throttled(*state.labels)
            state.throttled.inc(holds - state.holds_counted)
            state.holds_counted = holds

    def _reset(self, now: float, value: str | None) -> float | None:
        """A reset header (wall-clock RFC 3339) on the daemon's clock; one already past means a window that is over."""
        if value is None:
            return None
        times = self._reset_times
        if value in times:
            reset_at = times[value]
        else:
            if len(times) >= _RESET_TIMES_KEPT:
                times.clear()
            reset_at = times[value] = _iso_to_unix(value)
        return None if reset_at is None else now + reset_at - self._wall() + RESET_MARGIN_S

    # ------------------------------------------------------------------ after the request

    def settle(self, admission: Admission, *, cost_usd: float, tokens_used: float) -> None:
        """Turn the request's reservation into its actual spend (none, if it failed unbilled); correct the
        token buckets from the estimate to the real count."""
        if admission.token_keys and tokens_used != admission.estimated_tokens:
            now = self._clock()
            for buckets, key in admission.token_keys:
                buckets.adjust(key, now, tokens_used - admission.estimated_tokens)
        if admission.reservation is None:
            return
        wall_now = self._wall()
        crossed = self.ledger.settle(admission.reservation, max(0.0, cost_usd), wall_now)
        if cost_usd <= 0:
            return
        for budget, key in crossed:
            self.soft_limit_crossed(budget, key, self.ledger.spent(budget, key, wall_now))
        # Only the keys this request spent on: a full refresh scans every user with spend this window.
        for budget, key in admission.budget_keys:
            self.gauge_spend(self.ledger.in_force(budget, key, wall_now), self.ledger.spent(budget, key, wall_now))

    def soft_limit_crossed(self, budget: Budget, key: str, spent: float, **more: Any) -> None:
        """A budget key's spend crossed its soft limit: the log line, the counter, the alert sinks."""
        event = {
            "alert": "budget_soft_limit",
            "scope": key,
            "window": budget.window,
            "spent_usd": round(spent, 6),
            "soft_usd": budget.soft_usd,
            "hard_usd": budget.hard_usd,
            "switched_to_route": self._soft_routes.get((budget.scope, budget.window)),
            **more,
        }
        self.log.warning("budget_soft_limit", **{k: v for k, v in event.items() if k != "alert"})
        self.metrics.budget_alerts(budget.scope, budget.window).inc()
        if self._on_alert is not None:
            self._on_alert(event)

    def gauge_spend(self, budget: Budget, spent: float) -> None:
        """The budget's gauges follow its most-spent key."""
        if spent >= self._gauged_spend.get((budget.scope, budget.window), 0.0):
            self._set_budget_gauges(budget, spent)

    def refresh_budget_gauges(self, wall_now: float | None = None) -> None:
        """Spend, remaining and ratio per configured budget, as `budget_status` sees them now."""
        wall_now = self._wall() if wall_now is None else wall_now
        self._gauged_spend.clear()
        for budget, _, spent in self.ledger.usage(wall_now):
            self._set_budget_gauges(budget, spent)

    def _set_budget_gauges(self, budget: Budget, spent: float) -> None:
        """The gauges follow each budget's most-spent key, as `budget_status` does."""
        m = self.metrics
        labels = (budget.scope, budget.window)
        self._gauged_spend[labels] = spent
        m.budget_spent(*labels).set(round(spent, 6))
        hard = budget.hard_usd
        if hard is None:  # raised to "no limit": a ratio or a remainder would mean nothing
            m.budget_ratio.remove(*labels)
            m.budget_remaining.remove(*labels)
            return
        m.budget_ratio(*labels).set(spent / hard if hard else 1.0)
        m.budget_remaining(*labels).set(round(max(0.0, hard - spent), 6))

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Keep the budget gauges current while nothing is spent: windows roll over on their own.

        A tick in the daemon's thread rather than a scrape-time collector: scrapes render in a worker thread,
        which must not read the ledger while requests change it."""
        task_status.started()
        while True:
            self.refresh_budget_gauges()
            await trio.sleep(BUDGET_GAUGES_EVERY_S)

    # ------------------------------------------------------------------ status

    def budget_status(self, wall_now: float | None = None) -> list[dict[str, Any]]:
        """Per configured budget: its most-spent key (for per-user and per-feature budgets) and its limits."""
        wall_now = self._wall() if wall_now is None else wall_now
        out = []
        for budget, key, spent in self.ledger.usage(wall_now):
            out.append({
                "budget": budget.scope, "window": budget.window, "key": key, "spent_usd": round(spent, 6),
                "reserved_usd": round(self.ledger.reserved(budget, key or budget.scope), 6),
                "soft_usd": budget.soft_usd, "hard_usd": budget.hard_usd,
                "remaining_usd": None if budget.hard_usd is None else round(max(0.0, budget.hard_usd - spent), 6),
                "resets_at": self.ledger.reset_at(budget, wall_now, key=key),
            })
        return out

    def limits_status(self) -> dict[str, Any]:
        now = self._clock()
        return {
            "rate_limits": [
                {"scope": l.limit.scope, "requests_per_minute": l.limit.requests_per_minute,
                 "tokens_per_minute": l.limit.tokens_per_minute,
                 "keys": len(l.requests or l.tokens or []),
                 "global_requests_available": None if l.requests is None or l.limit.scope != "global" else round(l.requests.peek("global", now), 3)}
                for l in self._limiters
            ],
            "targets": {f"{p}:{m}": state.queue.stats() for (p, m, _), state in self._targets.items()},
        }


def _count(value: str | None) -> int | None:
    return int(value) if value is not None and value.isdigit() else None


def id_of(limit: RateLimit) -> tuple[Any, ...]:
    return (limit.scope, limit.requests_per_minute, limit.tokens_per_minute, limit.burst_s)


def _rate_key(scope: str, feature: str, user_key: str | None, app: str | None = None) -> str | None:
    if app is not None and scope == f"app:{app}":
        return scope
    if scope == "global":
        return "global"
    if scope == "user":
        return None if user_key is None else f"user:{user_key}"
    if scope == "feature":
        return f"feature:{feature}"
    if scope == f"feature:{feature}":
        return scope
    return None


def _limit(adaptive: str, maximum: int) -> ConcurrencyLimit:
    if adaptive == "aimd":
        return AIMDLimit(max(1, maximum // 4), max_limit=maximum)
    if adaptive == "gradient":
        return GradientLimit(max(1, maximum // 4), max_limit=maximum)
    return StaticLimit(maximum)
