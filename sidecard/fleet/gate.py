"""The request path in fleet mode: one round trip to the store for the shared cache, the fleet's rate limits and
budgets, and the coalescing lease; local traffic control when the store does not answer in time.

The engine asks `admit` where it would ask `Traffic.admit`. The store's answer is one of: a shared cached answer
(nothing taken), a refusal (the same typed errors as local limits give), or an admission that reserved the
request's worst case on every budget key of the fleet. A store error (down, slow past `op_timeout_ms`, garbage
under the namespace) is never the request's failure: the request is admitted by the local `Traffic` built
with this sidecar's share of each limit (`local_share`), or refused for scopes configured `closed`.

What comes after the request never waits on the store: settles, shared cache writes and released leases go out
with the next store operation (or on their own a moment later), and the connection's reader handles their
replies; past `QUEUE` unanswered ones a write is dropped and counted (a reservation never settled lapses in the
store after its deadline plus `reservation_margin_s`).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any, Final, Literal

import msgspec
import trio

from ..cache import Entry
from ..config import Config, RateLimit
from ..errors import Code, SidecardError
from ..limits.spend import LAST_TIME, Budget, SpendLedger, Window
from ..observe.log import JsonLog
from ..observe.metrics import Metrics
from ..traffic import Admission, Traffic, _rate_key
from .errors import StoreDataError, StoreError, StoreUnavailable
from .connection import ADMIN_TIMEOUT_S, ScriptCall
from .flushes import applying
from .scripts import (
    Admit, Admitted, BudgetCheck, BudgetRefused, CacheHit, CacheMiss, RateCheck, RateRefused, Settle, Settled, Usage, settle_result,
    window_bounds,
)
from .settings import FleetSettings

if TYPE_CHECKING:
    from .node import FleetNode

QUEUE: Final = 1024  # background store writes unanswered; more are dropped (and counted)
SHUTDOWN_FLUSH_S: Final = 1.0  # the most a drain waits for the writes still unanswered
OWED_MAX: Final = 10_000  # budget keys and windows whose uncounted spend waits for the store; more are dropped (counted)


class OutageRecord(msgspec.Struct, kw_only=True):
    """What this sidecar spent while the store did not count it, kept across a restart (`[spend] fleet_outage_path`):
    its local share's spend, which bounds it while the store stays down, and the spend still to carry in."""

    local_spend: msgspec.Raw = msgspec.Raw(b"null")  # the local share's ledger snapshot
    owed: list[Settle] = []
    carrying: list[Settle] = []  # each with its carry id: one counted before the restart still counts once


_record_decoder: Final = msgspec.json.Decoder(OutageRecord)


@dataclass(slots=True)
class FleetTicket:
    """What the store reserved for one request, handed back at settle (`Admission.fleet`)."""

    reservation_id: str
    budgets: list[BudgetCheck]
    token_rates: list[RateCheck]
    estimated_tokens: float
    lease: Literal["leader", "follower", "none"] = "none"
    lease_token: str = ""
    local: bool = False  # admitted on this sidecar's share while the store did not answer


def local_share(config: Config, settings: FleetSettings) -> Config:
    """The config this sidecar limits itself by while it cannot see the fleet: each rate limit and budget divided
    by `expected_instances`."""
    n = settings.expected_instances

    def share(value: float | None) -> float | None:
        return None if value is None else value / n

    rates = [msgspec.structs.replace(r, requests_per_minute=share(r.requests_per_minute), tokens_per_minute=share(r.tokens_per_minute))
             for r in config.rate_limits]
    budgets = [msgspec.structs.replace(b, soft_usd=share(b.soft_usd), hard_usd=share(b.hard_usd)) for b in config.budgets]
    return msgspec.structs.replace(config, rate_limits=rates, budgets=budgets)


class FleetGate:
    def __init__(self, node: FleetNode, traffic: Traffic, *, metrics: Metrics, log: JsonLog, wall: Callable[[], float]) -> None:
        self.node = node
        self.settings = settings = node.settings
        self.path = node.path
        self.traffic = traffic  # the configured limits (reloads included); its queues serve every request
        self._shared_from = traffic.config
        shared = local_share(traffic.config, settings)
        self.fallback = Traffic(shared, SpendLedger([Budget.of(b) for b in shared.budgets]), metrics=metrics, log=log, wall=wall)
        self.metrics = metrics
        self.log = log
        self.health = node.health
        self._wall = wall
        self.instance = node.instance
        self.run_token = secrets.token_hex(4)  # names this run's reservations (`_release_previous`)
        self._store_up = trio.Event()
        node.on_up.append(self._back)
        # Spend the store has not counted (settled on a local share, or its settle could not be sent), by budget
        # keys and window, then carried in when it answers (`_carry`) under an id each, so that a carry sent
        # again (its reply lost) counts once; a carry failed is sent again as it was: the same id, the same amount.
        self._owed: dict[tuple[tuple[str, str, float], ...], Settle] = {}
        self._carrying: dict[str, Settle] = {}
        self._carrying_sent: set[str] = set()  # (the ids whose reply is awaited)
        self._carries = itertools.count(1)
        self._carried = (0, 0.0)  # carries landed and their usd, since the last `fleet_outage_spend_settled`
        self._changes = 0  # of what is owed and carried (`revision`)
        self._leases: dict[str, str] = {}  # cache key -> our lease token, until its answer is stored or given up
        # Per budget (scope, window): its most-spent key among those this sidecar's settles saw, with the fleet's
        # spend then and when (for `sidecardctl budget`: per-user spend is in the store only).
        self._most_spent: dict[tuple[str, str], tuple[str, float, float]] = {}
        self.unanswered = 0  # background writes sent (or about to be) whose replies have not come
        self._all_answered = trio.lowlevel.ParkingLot()
        self.dropped = 0

    def wall(self) -> float:
        return self._wall()

    # ------------------------------------------------------------------ before the request

    async def admit(
        self, *, request_id: str, feature: str, route: str, user_key: str | None, estimated_tokens: float,
        estimated_usd: float, deadline_s: float, cache_key: str | None, lead: bool, app: str | None = None,
        prepaid: Admission | None = None, prompt: str | None = None, job: bool = False, cached_as: str | None = None,
        own: bool = False,
    ) -> Admission | CacheHit:
        """A shared cached answer, or the request's admission (fleet-wide, else local); raises the refusals. `app`:
        the caller's app identity, whose own rate limit and budget (`app:NAME`) are the fleet's too. `prepaid`: an
        async job's admission at submit, which took its rate limits (see `Traffic.admit`). `feature`: the one the
        request is accounted under; `cached_as`: its own, which cache flushes name (None: the same). `own`: sidecard's
        own call, held to budgets but not to rate limits (see `Traffic.admit`)."""
        wall_now = self._wall()
        rates = self._rates(feature, user_key, estimated_tokens, app) if prepaid is None and not own else []
        budgets = self._budgets(feature, route, user_key, wall_now, app)
        token_rates, tokens = [r for r in rates if r.kind == "tokens"], estimated_tokens
        paid = prepaid.fleet if prepaid is not None else None
        if isinstance(paid, FleetTicket) and not paid.local:  # settling corrects the submit's estimate
            token_rates, tokens = paid.token_rates, paid.estimated_tokens
        if not rates and not budgets and not (cache_key and self.settings.cache.l2):
            return Admission([], None, [], tokens, None, FleetTicket("", [], token_rates, tokens))  # nothing to ask
        op = Admit(
            wall_now, rates=rates, budgets=budgets, estimate_usd=estimated_usd,
            # A request's reservation names this run, so the next run gives it back at once (`_release_previous`);
            # an async job's outlives a restart.
            reservation_id=f"{self.instance}/{'job' if job else self.run_token}/{request_id}" if budgets else "",
            reservation_ttl_s=deadline_s + self.settings.reservation_margin_s,
            cache_key=cache_key if self.settings.cache.l2 else None,
            cache_mode=("lead" if lead else "lookup") if cache_key and self.settings.cache.l2 else "none",
            lease_token=request_id, lease_ms=self.settings.cache.lease_ms,
            flush_marks=applying(cached_as or feature, prompt) if cache_key and self.settings.cache.l2 else (),
        )
        try:
            result = await self.path.admit(op)
        except StoreError as exc:
            self._fell_back("limits", exc)
            return self._local(feature=feature, route=route, user_key=user_key, estimated_tokens=estimated_tokens,
                               estimated_usd=estimated_usd, rates=rates, budgets=budgets, app=app, prepaid=prepaid, own=own)
        if isinstance(result, CacheHit):
            return result
        if isinstance(result, CacheMiss):  # "lookup" answers only that: the limits still have to be asked
            return await self.admit(request_id=request_id, feature=feature, route=route, user_key=user_key,
                                    estimated_tokens=estimated_tokens, estimated_usd=estimated_usd, deadline_s=deadline_s,
                                    cache_key=None, lead=False, app=app, prepaid=prepaid, job=job, own=own)
        if isinstance(result, RateRefused):
            self.metrics.refusals("rate_limited").inc()
            raise SidecardError(Code.RATE_LIMITED, f"over the fleet's {rates[result.index].scope_key} rate limit",
                                retryable=True, retry_after_ms=math.ceil(result.wait_s * 1000))
        if isinstance(result, BudgetRefused):
            self.metrics.refusals("budget_exceeded").inc()
            check, use = budgets[result.index], result.usage[result.index]
            reset = datetime.fromtimestamp(result.reset_at).astimezone().isoformat(timespec="seconds")
            # What holds the budget: the spend, and the worst cases of the requests in flight (given back as they end).
            held = f"${use.spent_usd:.4g} spent, ${use.reserved_usd:.4g} reserved by requests in flight on the fleet"
            left = (check.hard_usd or 0.0) - use.spent_usd - use.reserved_usd
            why = f"is used ({held})" if left <= 0 else (
                f"has ${left:.4g} left ({held}), less than this request's worst case (${estimated_usd:.4g})")
            raise SidecardError(
                Code.BUDGET_EXCEEDED, f"the fleet's {check.window} budget of {check.scope_key} (${check.hard_usd:g}) {why} until {reset}",
                retryable=False, retry_after_ms=max(0, math.ceil((result.reset_at - wall_now) * 1000)),
            )
        assert isinstance(result, Admitted)
        switched = None
        soft_routes = self.traffic._soft_routes
        for i in result.soft_crossed:
            switched = switched or soft_routes.get((_budget_scope(budgets[i].scope_key, self.traffic), budgets[i].window))
        ticket = FleetTicket(op.reservation_id, budgets, token_rates, tokens, result.lease,
                             request_id if result.lease != "none" else "")
        if result.lease == "leader" and cache_key is not None:
            self._leases[cache_key] = request_id
        admission = Admission([], switched, [], tokens, None)
        admission.fleet = ticket
        return admission

    def _rates(self, feature: str, user_key: str | None, estimated_tokens: float, app: str | None = None) -> list[RateCheck]:
        checks = []
        for limiter in self.traffic._limiters:
            limit: RateLimit = limiter.limit
            key = _rate_key(limit.scope, feature, user_key, app)
            if key is None:
                continue
            for kind, per_minute, amount in (("requests", limit.requests_per_minute, 1.0), ("tokens", limit.tokens_per_minute, estimated_tokens)):
                if per_minute:
                    rate = per_minute / 60
                    checks.append(RateCheck(key, kind, rate, max(1.0, rate * limit.burst_s), amount))  # type: ignore[arg-type]
        return checks

    def _budgets(self, feature: str, route: str, user_key: str | None, wall_now: float, app: str | None = None) -> list[BudgetCheck]:
        ledger = self.traffic.ledger
        checks = []
        for budget, key in ledger.keys_for(feature=feature, route=route, user=user_key, app=app):
            in_force = ledger.in_force(budget, key, wall_now)  # an operator's raise, on this sidecar
            checks.append(BudgetCheck(key, budget.window, in_force.hard_usd, in_force.soft_usd))
        return checks

    def _local(self, *, feature: str, route: str, user_key: str | None, estimated_tokens: float, estimated_usd: float,
               rates: list[RateCheck], budgets: list[BudgetCheck], app: str | None = None,
               prepaid: Admission | None = None, own: bool = False) -> Admission:
        for check in rates:
            if self.settings.fail_mode("rate_limit", _scope_of(check.scope_key)) == "closed":
                self.metrics.refusals("rate_limited").inc()
                raise SidecardError(Code.RATE_LIMITED, f"the fleet store is unreachable and the {check.scope_key} rate limit "
                                    "is set to refuse meanwhile (fleet on_failure = closed)", retryable=True, retry_after_ms=1000)
        for check in budgets:
            if self.settings.fail_mode("budget", _scope_of(check.scope_key)) == "closed":
                self.metrics.refusals("budget_exceeded").inc()
                raise SidecardError(Code.BUDGET_EXCEEDED, f"the fleet store is unreachable and the {check.scope_key} budget "
                                    "is set to refuse meanwhile (fleet on_failure = closed)", retryable=True, retry_after_ms=1000)
        if self._shared_from is not self.traffic.config:  # a reload: the limits of the new config, shared
            self._shared_from = self.traffic.config
            self.fallback.configure(local_share(self.traffic.config, self.settings))
        admission = self.fallback.admit(feature=feature, route=route, user_key=user_key, estimated_tokens=estimated_tokens,
                                        estimate_usd=lambda: estimated_usd, app=app, prepaid=prepaid, own=own)
        admission.fleet = FleetTicket("", budgets, [], admission.estimated_tokens, local=True)
        return admission

    def _fell_back(self, what: str, exc: StoreError) -> None:
        self.health.fallback(what)
        if isinstance(exc, StoreDataError):
            self.log.error("fleet_store_data_error", reason=str(exc), fallback=what)

    # ------------------------------------------------------------------ coalescing and the shared cache

    async def follow(self, cache_key: str, lease_token: str) -> CacheHit | None:
        """Wait for another sidecar's leader (`coalesce.follow`); None: lead (also when the store fails)."""
        try:
            hit = await self.node.follow(cache_key, lease_token)
        except StoreError as exc:
            self._fell_back("coalescing", exc)
            return None
        if hit is None:
            self._leases[cache_key] = lease_token
        return hit

    def stored(self, cache_key: str, entry: Entry) -> None:
        """An answer the local cache kept: into the shared cache too (our lease, if we lead, released)."""
        token = self._leases.pop(cache_key, "")
        self._queue("cache_put", (cache_key, entry, token))

    def lead_done(self, cache_key: str) -> None:
        """The leader's call ended without an answer to share: give the lease up, so a follower leads at once."""
        token = self._leases.pop(cache_key, None)
        if token is not None:
            self._queue("release", (cache_key, token))

    # ------------------------------------------------------------------ after the request

    def settle(self, admission: Admission, *, cost_usd: float, tokens_used: float) -> None:
        ticket: FleetTicket = admission.fleet
        if ticket.local:
            self.fallback.settle(admission, cost_usd=cost_usd, tokens_used=tokens_used)
            if cost_usd > 0 and ticket.budgets:  # the fleet's counters learn of it when the store answers
                self._owe(Settle(self._wall(), "", cost_usd, ticket.budgets))
                if self.path.connection.connected:
                    self._carry()
            return
        if not ticket.reservation_id and not (cost_usd > 0 and ticket.budgets) and (not ticket.token_rates or tokens_used == ticket.estimated_tokens):
            return  # nothing reserved, nothing to correct (nor spent on budgets: an async job's after a restart)
        adjust = [(r, tokens_used - ticket.estimated_tokens) for r in ticket.token_rates] if tokens_used != ticket.estimated_tokens else []
        self._queue("settle", Settle(self._wall(), ticket.reservation_id, max(0.0, cost_usd), ticket.budgets, adjust))

    def _queue(self, kind: str, job: Any) -> bool:
        """A background write: it goes with the next store operation (`Connection.run_script_later`), and its
        reply is handled by the connection's reader; no task of its own, no wake-up of its own. False: not sent."""
        if self.unanswered >= QUEUE:
            self.dropped += 1
            self.metrics.fleet_dropped_writes.inc()
            return False

        def answered(reply: Any) -> None:
            self.unanswered -= 1
            if not self.unanswered:
                self._all_answered.unpark_all()
            try:
                if isinstance(reply, StoreError):
                    raise reply
                if kind in ("settle", "carry"):
                    self._settled(job, settle_result(job, reply))
                if kind == "carry":
                    self._landed(job)
            except StoreError as exc:
                self._fell_back(kind, exc)
                if kind == "carry":
                    self._carrying_sent.discard(job.once)  # (sent again, as it is, with the next carry)

        if self.path.connection.run_script_later(*self._script(kind, job), answered):
            self.unanswered += 1
            return True
        self._fell_back(kind, StoreUnavailable("the store is not connected"))
        if kind == "settle" and job.cost_usd > 0 and job.budgets:
            self._owe(Settle(job.now, "", job.cost_usd, job.budgets))  # (its reservation lapses on its own)
        return False

    # ------------------------------------------------------------------ spend the store has not counted

    def _back(self) -> None:
        """The store answers again (or at last)."""
        self._store_up.set()
        self._carry()

    @property
    def revision(self) -> int:
        """Counts the changes of what `snapshot` holds, so its store writes only when there are some."""
        return self._changes + self.fallback.ledger.revision

    def snapshot(self) -> bytes:
        record = OutageRecord(local_spend=msgspec.Raw(self.fallback.ledger.snapshot()), owed=list(self._owed.values()),
                              carrying=list(self._carrying.values()))
        return msgspec.json.encode(record)

    def restore(self, data: bytes | None) -> FleetGate:
        """Take back what a previous run saved (`snapshot`), at start; None: nothing was. Raises on data it cannot use,
        leaving the gate as it was."""
        if data is None:
            return self
        record = _record_decoder.decode(data)
        # A time no window holds (a bit flipped, an edit) would fail where the spend is keyed by its window, as a
        # crash at start: the file is refused here instead, as `SpendLedger.restore` refuses one.
        kept = (*record.owed, *record.carrying)
        if not all(0 <= settle.now < LAST_TIME and settle.cost_usd >= 0 for settle in kept):
            raise ValueError("spend owed at an implausible time, or a negative amount")
        for settle in kept:  # each window found before anything changes (the calendar's own limits raise here)
            for check in settle.budgets:
                window_bounds(check.window, settle.now)
        ledger = self.fallback.ledger
        spent = bytes(record.local_spend)
        if spent != b"null":
            budgets = [Budget.of(b) for b in local_share(self.traffic.config, self.settings).budgets]
            ledger = SpendLedger.restore(budgets, spent)
        self.fallback.ledger = ledger
        for settle in record.owed:
            self._owe(settle)
        self._carrying.update((settle.once, settle) for settle in record.carrying)
        if kept:
            self.log.info("fleet_outage_spend_kept", usd=round(sum(settle.cost_usd for settle in kept), 6),
                          reason="spent before a restart while the store did not count it: carried in when it answers")
            if self.path.connection.connected:  # (up before this gate was: no `_back` is coming)
                self._carry()
        return self

    def _owe(self, settle: Settle) -> None:
        self._changes += 1
        key = tuple((b.window, b.scope_key, window_bounds(b.window, settle.now)[0]) for b in settle.budgets)
        if (owed := self._owed.get(key)) is not None:
            self._owed[key] = dataclasses.replace(owed, cost_usd=owed.cost_usd + settle.cost_usd)
        elif len(self._owed) + len(self._carrying) < OWED_MAX:
            self._owed[key] = settle
        else:
            self.dropped += 1
            self.metrics.fleet_dropped_writes.inc()

    def _carry(self) -> None:
        """Send the spend owed to the store, each carry once at a time."""
        if self._owed:
            self._changes += 1
        for settle in self._owed.values():
            once = f"{self.instance}/{self.run_token}/{next(self._carries)}"
            self._carrying[once] = dataclasses.replace(settle, once=once)
        self._owed.clear()
        for once, settle in self._carrying.items():
            if once not in self._carrying_sent:
                self._carrying_sent.add(once)
                if not self._queue("carry", dataclasses.replace(settle, sent_at=self._wall())):
                    self._carrying_sent.discard(once)

    def _landed(self, carry: Settle) -> None:
        self._changes += 1
        self._carrying.pop(carry.once, None)
        self._carrying_sent.discard(carry.once)
        count, usd = self._carried
        self._carried = count + 1, usd + carry.cost_usd
        if not self._carrying and not self._owed:
            self.log.info("fleet_outage_spend_settled", carries=count + 1, usd=round(usd + carry.cost_usd, 6),
                          reason="spent while the store did not count it, now added to the fleet's budgets")
            self._carried = (0, 0.0)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Renew the leases held, until cancelled; give back what this instance's previous run had reserved."""
        task_status.started()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._release_previous)
            await self._renew_leases()

    async def _release_previous(self) -> None:
        """The reservations this instance's previous run made for requests in flight are given back when the store
        first answers: those requests ended with that run (else they would hold the fleet's budgets until their
        deadline plus `reservation_margin_s`). Only a previous run of the same `instance` name is known."""
        while True:
            try:
                released = await self.path.release_previous_runs(self.instance, self.run_token)
            except StoreError:
                await self._store_up.wait()
                self._store_up = trio.Event()
                continue
            if released:
                self.log.info("fleet_reservations_released", instance=self.instance, released=released,
                              reason="reserved by a previous run of this instance for requests that ended with it")
            return

    async def flush(self) -> None:
        """At the end of a drain, while the store connection still runs: the writes not yet answered go out
        (settles free the reservations the fleet counts), and their replies are waited for, within
        `SHUTDOWN_FLUSH_S`."""
        self.path.connection.send_deferred()
        with trio.move_on_after(SHUTDOWN_FLUSH_S):
            while self.unanswered:
                await self._all_answered.park()

    async def _renew_leases(self) -> None:
        """Every third of a lease, renew the leases our leaders hold (so followers wait for a slow leader, and
        take over only from a dead one). One task for all of them, not one per request."""
        lease_ms = self.settings.cache.lease_ms
        while True:
            await trio.sleep(lease_ms / 3000)
            for key, token in list(self._leases.items()):
                try:
                    await self.path.renew_lease(key, token, lease_ms=lease_ms, now=self._wall())
                except StoreError:
                    pass  # the next round tries again; a lease that ran out is taken over by a follower

    def _script(self, kind: str, job: Any) -> ScriptCall:
        path = self.path
        if kind in ("settle", "carry"):
            return path.settle_script(job)
        if kind == "cache_put":
            key, entry, token = job
            now = self._wall()
            shift = now - trio.current_time()  # the cache's times are the daemon's clock; the store's are wall time
            return path.cache_put_script(key, entry.payload, now=now, stored_at=entry.stored_at + shift,
                                         expires_at=entry.expires_at + shift, stale_until=entry.stale_until + shift, lease_token=token)
        return path.release_script(*job)

    def _settled(self, job: Settle, settled: Settled) -> None:
        for i, check in enumerate(job.budgets):
            budget = Budget(scope=_budget_scope(check.scope_key, self.traffic), window=check.window, soft_usd=check.soft_usd,
                            hard_usd=check.hard_usd)
            self.traffic.gauge_spend(budget, settled.spent_usd[i])  # the fleet's spend
            seen = self._most_spent.get((budget.scope, check.window))
            if (seen is None or seen[0] == check.scope_key or not _same_window(check.window, seen[2], job.now)
                    or seen[1] <= settled.spent_usd[i]):
                self._most_spent[budget.scope, check.window] = (check.scope_key, settled.spent_usd[i], job.now)
            if i in settled.soft_crossed:  # exactly one settle in the fleet crosses it
                self.traffic.soft_limit_crossed(budget, check.scope_key, settled.spent_usd[i], fleet=True)

    def status(self) -> dict[str, Any]:
        return {"leases_held": len(self._leases), "writes_waiting": self.unanswered, "writes_dropped": self.dropped}

    # ------------------------------------------------------------------ the operators' budget commands

    async def budget_status(self) -> list[dict[str, Any]]:
        """`Traffic.budget_status` for the fleet: per configured budget, the store's spend and reservations of its
        key (a per-key budget's: the most-spent key among those this sidecar's answers counted); raises
        `StoreError`."""
        ledger, wall_now, out = self.traffic.ledger, self._wall(), []
        for budget, _, _ in ledger.usage(wall_now):
            key = budget.scope if _one_key(budget.scope) else self._seen_key(budget.scope, budget.window, wall_now)
            usage = Usage(0.0, 0.0) if key is None else await self.path.budget(budget.window, key, now=wall_now, timeout_s=ADMIN_TIMEOUT_S)
            in_force = ledger.in_force(budget, key or budget.scope, wall_now)
            out.append({
                "budget": budget.scope, "window": budget.window, "key": None if key == budget.scope else key,
                "spent_usd": round(usage.spent_usd, 6), "reserved_usd": round(usage.reserved_usd, 6),
                "soft_usd": in_force.soft_usd, "hard_usd": in_force.hard_usd,
                "remaining_usd": None if in_force.hard_usd is None else round(max(0.0, in_force.hard_usd - usage.spent_usd), 6),
                "resets_at": ledger.reset_at(budget, wall_now),  # (the rolling hour: when all of it has left, at most)
            })
        return out

    def _seen_key(self, scope: str, window: Window, wall_now: float) -> str | None:
        seen = self._most_spent.get((scope, window))
        return seen[0] if seen is not None and _same_window(window, seen[2], wall_now) else None

    async def budget_view(self, scope_key: str, window: Window, *, reset: bool = False) -> dict[str, Any] | None:
        """One key's limits in force and the fleet's spend (`reset`: zeroed after it is read); raises `StoreError`."""
        ledger, wall_now = self.traffic.ledger, self._wall()
        view = ledger.describe(scope_key, window, wall_now)
        if view is None or view["spent_usd"] is None:  # no budget, or a wildcard's own limits: nothing in the store
            return view
        usage = await self.path.budget(window, scope_key, now=wall_now, reset=reset, timeout_s=ADMIN_TIMEOUT_S)
        if reset:
            for slot, seen in list(self._most_spent.items()):
                if seen[0] == scope_key and slot[1] == window:
                    del self._most_spent[slot]
        return {**view, "spent_usd": round(usage.spent_usd, 6), "reserved_usd": round(usage.reserved_usd, 6)}


def _same_window(window: Window, then: float, now: float) -> bool:
    """Whether spend recorded at THEN still counts in NOW's window."""
    return then > now - 3600 if window == "hour" else window_bounds(window, then)[0] == window_bounds(window, now)[0]


def _one_key(scope: str) -> bool:
    """A budget that counts one key, its scope ("global", "feature:search"), not one per user, feature or route."""
    return scope != "user" and not scope.endswith(":*")


def _scope_of(scope_key: str) -> str:
    """"user:<pseudonym>" -> "user"; "feature:search" and "global" stay as they are."""
    return "user" if scope_key.startswith("user:") else scope_key


def _budget_scope(scope_key: str, traffic: Traffic) -> str:
    """The configured budget scope a key counts against ("user:<p>" -> "user", "feature:x" -> itself or "feature:*")."""
    if scope_key.startswith("user:"):
        return "user"
    if any(b.scope == scope_key for b in traffic.config.budgets):
        return scope_key
    return f"{scope_key.partition(':')[0]}:*"

