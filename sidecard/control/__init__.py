"""The control layer: operators' ops on a running daemon, its reload, and its status view.

`Control` is built from the parts it acts on (engine, traffic, prompt store, cache, quality) and the operator
state (`state.py`), never from the daemon: the admin socket hands it typed ops (`ops.py`), and fleet mode will
hand it the same ops from a shared store. `execute` runs one op at a time, so the before and after views stay
consistent, and a change to operator state is kept by its backend before it is acknowledged. Each op answers
with the state before and after it (`Change`).
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

import msgspec
import trio

from ..cache import ResponseCache
from ..cache_store import SqliteStore
from ..config import Config, ConfigError, load, with_overrides, written_paths
from ..durable import require_written
from ..errors import Code, SidecardError, StartupError, describe_validation_error
from ..jobs.runner import JobRunner
from ..fleet.errors import StoreError
from ..fleet.flushes import flush_shared
from ..killswitch import KillSwitch, validate_scope
from ..loop.review import ReviewDesk
from ..loop.shadow import ShadowMirror
from ..observe.log import JsonLog
from ..observe.metrics import Metrics
from ..pricing import unpriced_models, unpriced_problem
from ..prompts.registry import PromptStore, Snapshot
from ..quality.pipeline import QualityPipeline
from ..routes import target_names
from ..traffic import Traffic
from ..safety import rules as safety_rules
from ..safety.access import AccessControl
from ..safety.settings import SafetySettings
from ..usage.anomalies import SpendWatch
from ..usage.store import UsageStore
from . import ops
from .experiments import ExperimentControl
from .backend import State
from .quality import QualityRemedies
from .state import OperatorState

if TYPE_CHECKING:
    from ..engine import Engine
    from ..engine.safety import Gate
    from ..fleet.node import FleetNode
    from .fleet import FleetSync

# Sections bound at start-up (sockets, pool, stores) keep their running values until a restart.
RESTART_SECTIONS: Final = (
    "server", "admin", "http", "upstream", "metrics", "cache", "state", "prompts", "log", "sim", "spend", "budgets", "quality",
    "feedback", "shadows", "review", "jobs", "fleet", "tracing", "usage", "anomaly",
)
SIDECAR_OWN_NOTE: Final = ("local: this sidecar only (in fleet mode an experiment splits and tallies its own sidecar's "
                            "traffic; start or stop it on each sidecar, or declare it in every config)")
STALE_RETRIES: Final = 5  # fleet mode: an op that loses the compare-and-set this often in a row is refused
# `sidecardctl usage` without --last: a day of hours, a week of days, a year of months.
USAGE_RANGE_S: Final = {"hour": 86_400.0, "day": 7 * 86_400.0, "month": 366 * 86_400.0}


@dataclass(frozen=True, slots=True)
class Change:
    """What an op answers: the state before and after it, and anything else it has to say."""

    before: Any = None
    after: Any = None
    result: Any = None


class Control:
    def __init__(
        self,
        config: Config,
        *,
        config_path: str | None,
        state: OperatorState,
        config_overrides: Mapping[str, Mapping[str, Any]] | None = None,
        remedies: QualityRemedies,
        engine: Engine,
        traffic: Traffic,
        cache: ResponseCache | None,
        cache_store: SqliteStore | None,
        quality: QualityPipeline | None,
        metrics: Metrics,
        log: JsonLog,
        wall: Callable[[], float],
        spend_error: str | None = None,
        process: Callable[[], dict[str, Any]] = dict,
        on_drain: Callable[[], None] = lambda: None,
        on_reload: Callable[[bool | None], None] = lambda outcome: None,
        clock: Callable[[], float] = trio.current_time,
        access: AccessControl | None = None,
        experiments: ExperimentControl | None = None,
        shadows: ShadowMirror | None = None,
        review: ReviewDesk | None = None,
        jobs: JobRunner | None = None,
        fleet: tuple[FleetNode, FleetSync] | None = None,
        usage: UsageStore | None = None,
        spend_watch: SpendWatch | None = None,
    ) -> None:
        """`process`: the daemon's own lines of the status view (version, sockets, connections); `on_drain`: begin a
        graceful drain; `on_reload`: told None as a reload starts, then whether it applied (systemd hears of both);
        `access`: the app identities the faces check (for the `apps` view)."""
        self.config = config
        self.access = access
        self.config_path = config_path
        self.config_overrides = config_overrides or {}
        self.state = state
        self.remedies = remedies
        self.engine = engine
        self.traffic = traffic
        self.prompts: PromptStore = state.prompts
        self.cache = cache
        self.cache_store = cache_store
        self.quality = quality
        self.metrics = metrics
        self.log = log
        self._wall = wall
        self.spend_error = spend_error
        self._process = process
        self._on_drain = on_drain
        self._on_reload = on_reload
        self._clock = clock
        self.fleet = fleet
        # In fleet mode an op and the adoption of the fleet's state never interleave.
        self._lock = fleet[1].lock if fleet is not None else trio.Lock()
        self.experiments = experiments
        self.shadows = shadows
        self.review = review
        self.jobs = jobs
        self.usage = usage
        self.spend_watch = spend_watch

    async def execute(self, op: ops.AdminOp | ops.QualityRollback) -> Change:
        """Run one op, alone; a change to operator state is kept before this returns (raises `SidecardError` if
        the backend refuses it: then it is not acknowledged)."""
        persisted = isinstance(op, ops.PERSISTED) or (self.fleet is not None and isinstance(op, ops.FLEET_PERSISTED))
        async with self._lock:
            for _ in range(STALE_RETRIES):
                before = self.state.snapshot() if persisted and self.fleet is not None else None
                change = _HANDLERS[type(op)](self, op)
                if inspect.isawaitable(change):
                    change = await change
                if not persisted:
                    return change
                if before is None:
                    await self.state.save()
                    return change
                if await self._kept_in_fleet(before, type(op).__struct_config__.tag):
                    # Fleet mode says where the change went: "fleet", or "local (why)".
                    kept = SIDECAR_OWN_NOTE if isinstance(op, ops.SIDECAR_OWN) else self.fleet[1].backend.kept
                    return dataclasses.replace(change, result={**(change.result or {}), "kept": kept})
            raise SidecardError(Code.OVERLOADED, "the fleet's operator state kept changing under this op: try again", retryable=True)

    async def _kept_in_fleet(self, before: State, op: str) -> bool:
        """Save a change in fleet mode (what OP changed since BEFORE is journaled if the store does not answer);
        False: another sidecar changed the fleet's state first, which is now in force here, for the op to run
        again on."""
        from .fleet import StaleState, change_between

        assert self.fleet is not None
        backend = self.fleet[1].backend
        backend.taking = change_between(before, self.state.snapshot(), op=op, taken_at=self._wall())
        try:
            await self.state.save()
        except StaleState:
            backend.taking = None
            await self.fleet[1].resync_locked()
            return False
        finally:
            backend.taking = None
        return True

    # ------------------------------------------------------------------ kill switches

    def kill(self, scope: str, *, mode: str, text: str | None, reason: str | None, expires_in_s: float | None) -> Change:
        if mode == "static" and not text:
            raise SidecardError(Code.BAD_REQUEST, "text: mode static needs the text to answer with")
        if expires_in_s is not None and expires_in_s <= 0:
            raise SidecardError(Code.BAD_REQUEST, "expires_in_s: must be positive")
        now = self._clock()
        switch = KillSwitch(
            scope=_scope(scope), mode=mode, text=text, reason=reason,  # type: ignore[arg-type]
            expires_at=None if expires_in_s is None else now + expires_in_s, set_at=now,
        )
        before = self.state.kills.set(switch)
        self.state.count_kills()
        return Change(self.state.describe_kill(before), self.state.describe_kill(switch))

    def unkill(self, scope: str) -> Change:
        before = self.state.kills.clear(_scope(scope))
        if before is None:
            raise SidecardError(Code.BAD_REQUEST, f"no kill switch on {scope}")
        self.state.count_kills()
        return Change(self.state.describe_kill(before), None)

    # ------------------------------------------------------------------ routes and prompts

    def route(self, op: ops.RouteSetPrimary | ops.RouteOverride | ops.RouteRollback) -> Change:
        routes = self.state.routes
        routes.require(op.route)  # (before its models: a route's typo is told as one)
        if not isinstance(op, ops.RouteRollback) and not op.force:
            self._priced([op.model] if isinstance(op, ops.RouteSetPrimary) else [t.model for t in op.targets])
        if isinstance(op, ops.RouteSetPrimary):
            before, after = routes.set_primary(op.route, op.model, op.provider)
        elif isinstance(op, ops.RouteOverride):
            before, after = routes.override(op.route, op.targets)
        else:
            before, after = routes.rollback(op.route)
        self.engine.walker.track(after)
        return Change(target_names(before), target_names(after))

    def _priced(self, models: list[str]) -> None:
        """Refuse a model the price table does not know: a typo would leave only the fallbacks working (or, in
        an experiment or a rollout, fail its share of users), and its calls would cost $0 against budgets."""
        prices = self.engine.accounting.prices
        for model in models:
            if not prices.knows(model):
                raise SidecardError(Code.BAD_REQUEST, f"{unpriced_problem(model)} and reload, or repeat with --force")

    def prompt(self, op: ops.PromptOp) -> Change:
        store, kept = self.prompts, None
        if isinstance(op, ops.PromptClear) and store.forget(op.prompt):
            self.state.count_prompt_errors()
            return Change(result={"note": f"prompt {op.prompt!r} is gone (no directory): its runtime override is dropped"})
        with store.change():  # a refused op leaves the overrides as they were
            if isinstance(op, ops.PromptUse):
                before, after = store.use(op.prompt, op.version)
            elif isinstance(op, ops.PromptRollback):
                before, after = store.rollback(op.prompt)
            elif isinstance(op, ops.PromptCanary):
                before, after = store.set_canary(op.prompt, op.version, op.percent)
            elif isinstance(op, ops.PromptPromote):
                before, after = store.promote(op.prompt)
            else:
                before, after = store.clear(op.prompt, force=op.force)
                rolled_back = store.overrides[op.prompt].rolled_back if op.prompt in store.overrides else None
                if rolled_back is not None:
                    kept = (f"canary v{rolled_back} stays stopped: the fleet's quality monitor rolled it back; to serve it "
                            f"anyway: sidecardctl prompt clear {op.prompt} --force (judged again on its answers from then on)")
            note = self.remedies.guard(op.prompt, before, after, force=op.force, clearing=isinstance(op, ops.PromptClear)) or kept
        self.state.count_prompt_errors()
        after = store.effective(op.prompt)
        return Change(before.describe(), after.describe(), None if note is None else {"note": note})

    def quality_rollback(self, op: ops.QualityRollback) -> Change:
        store = self.prompts
        before, after = store.stop_canary(op.prompt, rolled_back=op.version)
        return Change(before.describe(), after.describe())

    # ------------------------------------------------------------------ cache, budgets, limits, quality

    async def flush_cache(self, *, feature: str | None = None, prompt: str | None = None) -> Change:
        """This sidecar's cache; in fleet mode the shared one and every other sidecar's too (`fleet/flushes.py`),
        marked first, so that nothing refills this one from the shared cache in between."""
        result: dict[str, Any] = {}
        if self.fleet is not None:
            node = self.fleet[0]
            try:
                await flush_shared(node.connection, node.keys, feature=feature, prompt=prompt, now=self._wall())
            except StoreError as exc:
                result["fleet"] = (f"not flushed: the fleet store did not answer ({exc}); the shared cache and the other "
                                   "sidecars keep their answers: flush again once it is back")
            else:
                result["fleet"] = "flushed: the shared cache, and every sidecar's own as it hears of it"
        result["flushed"] = 0 if self.cache is None else len(self.cache.flush(feature=feature, prompt=prompt))
        return Change(result=result)

    async def budgets(self) -> Change:
        gate = self.engine.fleet
        if gate is None:
            return Change(result={"budgets": self.traffic.budget_status(), "spend_error": self.spend_error})
        try:  # the fleet's spend, which its budgets hold to (this sidecar's own ledger is not filled)
            return Change(result={"budgets": await gate.budget_status(), "spend_error": self.spend_error, "fleet": True})
        except StoreError as exc:
            raise SidecardError(Code.OVERLOADED, f"the fleet store did not answer ({exc}): the fleet's spend cannot be read "
                                "now (sidecard_budget_spent_usd has it as of this sidecar's last answer); try again",
                                retryable=True) from None

    def limits(self) -> Change:
        return Change(result=self.traffic.limits_status())

    async def change_budget(self, op: ops.BudgetRaise | ops.BudgetReset) -> Change:
        """On this sidecar's ledger; in fleet mode on the fleet's budgets: a raise is the fleet's operator state
        (`execute` keeps it, in the store if it answers), a reset zeroes the spend in the store (or is refused)."""
        ledger, wall_now, gate = self.traffic.ledger, self._wall(), self.engine.fleet
        try:
            before = _budget_view(ledger, op.scope, op.window, wall_now)
            if gate is not None and before is not None:
                try:
                    before = await gate.budget_view(op.scope, op.window, reset=isinstance(op, ops.BudgetReset))
                except StoreError as exc:
                    if isinstance(op, ops.BudgetReset):
                        raise SidecardError(Code.OVERLOADED, f"the fleet store did not answer ({exc}): the fleet's spend is "
                                            "not reset; try again", retryable=True) from None
            if isinstance(op, ops.BudgetRaise):
                if op.soft_usd is msgspec.UNSET and op.hard_usd is msgspec.UNSET:
                    raise ValueError("give the soft limit, the hard limit or both (null: no limit)")
                ledger.raise_limit(op.scope, op.window, soft_usd=op.soft_usd, hard_usd=op.hard_usd, wall_now=wall_now)
            else:
                ledger.reset(op.scope, op.window, wall_now)
        except ValueError as exc:
            raise SidecardError(Code.BAD_REQUEST, str(exc)) from None
        after = _budget_view(ledger, op.scope, op.window, wall_now)
        if gate is None:
            self.traffic.refresh_budget_gauges(wall_now)
            return Change(before, after)
        if isinstance(op, ops.BudgetReset):
            self.traffic.refresh_budget_gauges(wall_now)  # down to zero; the next answers' settles bring the fleet's
        if after is not None and before is not None and before["spent_usd"] is not None:  # the fleet's spend
            spent = 0.0 if isinstance(op, ops.BudgetReset) else before["spent_usd"]
            after = {**after, "spent_usd": spent, **({"reserved_usd": before["reserved_usd"]} if "reserved_usd" in before else {})}
        return Change(before, after, {"kept": "fleet"} if isinstance(op, ops.BudgetReset) else None)

    def quality_status(self) -> dict[str, Any] | None:
        if self.quality is None:
            return None
        status = self.quality.status()
        spent = status.pop("judge_spent_today_usd")
        remedies = self.remedies
        return {**status, "actions": list(remedies.actions), "switches": remedies.describe(), "judge_spent_today_usd": spent}

    def unswitch(self, prompt: str) -> Change:
        before = self.remedies.end(prompt)
        if before is None:
            raise SidecardError(Code.BAD_REQUEST, f"prompt {prompt!r} is not switched to a fallback route")
        return Change(before, None)

    # ------------------------------------------------------------------ experiments and rollouts

    def _trials(self) -> ExperimentControl:
        if self.experiments is None:
            raise SidecardError(Code.BAD_REQUEST, "experiments are not run by this daemon")
        return self.experiments

    def experiment(self, op: ops.ExperimentStart | ops.ExperimentStatus | ops.ExperimentStop | ops.ExperimentPromote) -> Change:
        trials = self._trials()
        if isinstance(op, ops.ExperimentStart):
            if not op.force:
                self._priced([arm.model for arm in op.experiment.arms if arm.model is not None])
            return Change(None, trials.start(op.experiment))
        if isinstance(op, ops.ExperimentStatus):
            return Change(result={"experiments": trials.status(op.name)})
        if isinstance(op, ops.ExperimentStop):
            return Change(*trials.stop(op.name))
        return Change(result=trials.promote(op.name, op.arm))

    def rollout(self, op: ops.PromptRollout | ops.RouteRollout | ops.RolloutStatus | ops.RolloutControl) -> Change:
        trials = self._trials()
        if isinstance(op, ops.PromptRollout):
            return Change(None, trials.rollout(op.prompt, op.version, op.steps))
        if isinstance(op, ops.RouteRollout):
            self.state.routes.require(op.route)  # (before its model: a route's typo is told as one)
            if not op.force:  # completing the rollout puts the model first, as `route set-primary` would
                self._priced([op.model])
            return Change(None, trials.route_rollout(op.route, op.model, op.steps))
        if isinstance(op, ops.RolloutStatus):
            return Change(result={"rollouts": trials.rollout_status(op.prompt)})
        return Change(*trials.rollout_control(op.prompt, op.action))

    async def review_op(self, op: ops.ReviewList | ops.ReviewShow | ops.ReviewLabel) -> Change:
        review = self.review
        if review is None:
            raise SidecardError(Code.BAD_REQUEST, "the review queue is off: set [review] enabled = true")
        if isinstance(op, ops.ReviewList):
            return Change(result=await review.page(op.state, op.prompt, op.after, op.limit))
        if isinstance(op, ops.ReviewShow):
            return Change(result=await review.show(op.item))
        before, after = await review.label(op.item, op.label, op.note)
        # What the audit line keeps of the item: never its question or answer (the note is in the op's args).
        return Change(*({k: item.get(k) for k in ("id", "request_id", "label", "score")} for item in (before, after)))

    async def run_experiments(self) -> None:
        """Evaluate experiments and move rollouts every `rollout.evaluate_every_s`, one op at a time with the
        operators' (a service of the daemon); what changed is kept before the next tick."""
        trials = self._trials()
        try:
            while True:
                await trio.sleep(trials.settings.evaluate_every_s)
                async with self._lock:
                    before = self.state.snapshot() if self.fleet is not None else None
                    if trials.evaluate():
                        await self._save_quietly(before)
        finally:  # the values tallied since the last save are kept at shutdown
            with trio.CancelScope(shield=True), trio.move_on_after(5):
                async with self._lock:
                    if trials.unsaved():
                        await self._save_quietly()

    async def _save_quietly(self, before: State | None = None) -> None:
        """BEFORE: the state before the rollouts moved (fleet mode), so what they changed is replayed after an outage."""
        try:
            if self.fleet is None:
                await self.state.save()
            else:  # (the fleet's state changed first: it is adopted, the tallies saved next time)
                await self._kept_in_fleet(before or self.state.snapshot(), "rollout")
        except SidecardError:
            pass  # logged by save; the next change tries again

    # ------------------------------------------------------------------ reload and drain

    async def reload(self) -> dict[str, Any]:
        """Re-read the config file and the prompts (SIGHUP, or the admin op). A bad config is refused."""
        self._on_reload(None)
        applied = False
        try:
            result = await self._reload()
            applied = True
            return result
        finally:
            self._on_reload(applied)

    async def _reload(self) -> dict[str, Any]:
        result: dict[str, Any] = {"config": None, "prompts": None}
        if self.config_path:
            try:
                fresh = with_overrides(load(self.config_path), self.config_overrides)  # flags still win
                fresh = safety_rules.with_app_limits(fresh, settings := safety_rules.check(fresh, self.config_path))
                self._check_written(fresh, settings)
            except (ConfigError, StartupError, msgspec.ValidationError) as exc:
                reason = describe_validation_error(exc) if isinstance(exc, msgspec.ValidationError) else str(exc)
                self.log.error("reload_refused", reason=reason)
                raise SidecardError(Code.BAD_REQUEST, f"config refused, the running one stays: {reason}") from None
            needs_restart = [
                section for section in RESTART_SECTIONS
                if msgspec.to_builtins(getattr(fresh, section)) != msgspec.to_builtins(getattr(self.config, section))
            ]
            kept = {section: getattr(self.config, section) for section in needs_restart}
            # The audit writer (its directory, files, queue) is started with the daemon: the running [safety.audit]
            # stays whole until a restart, as a section of RESTART_SECTIONS does.
            if msgspec.to_builtins(settings.audit) != msgspec.to_builtins(self._gate().rules.settings.audit):
                needs_restart.append("safety.audit")
                running = {"audit": self.config.safety["audit"]} if "audit" in self.config.safety else {}
                kept["safety"] = {**{key: value for key, value in fresh.safety.items() if key != "audit"}, **running}
            try:
                applied = msgspec.structs.replace(fresh, **kept)
            except ValueError as exc:  # e.g. a route removed that a kept section (budgets, quality) still names
                self.log.error("reload_refused", reason=str(exc), needs_restart=needs_restart)
                raise SidecardError(Code.BAD_REQUEST, f"config refused, the running one stays: {exc} (the running "
                                    f"{', '.join(needs_restart)} still apply until a restart)") from None
            await self.engine.upstream.prepare(applied.targets())  # a new Bedrock or Vertex target needs the SDK path
            dropped = self.state.routes.rebase(applied.routes)  # operator overrides stay on routes that remain
            self.traffic.configure(applied)
            self.engine.configure(applied)
            if self.experiments is not None:
                self.experiments.configure(applied)
            self.config = applied
            unpriced_warned(applied, self.log)
            result["config"] = {"applied": True, "needs_restart": needs_restart, "route_overrides_dropped": dropped}
        snapshot = await self.prompts.reload_async()
        prompts_loaded(self.prompts, snapshot, self.metrics, self.log)
        result["prompts"] = {"loaded": sorted(snapshot.prompts), "errors": len(snapshot.errors)}
        # Models named off the routes that the upstream never answered (refused or unreachable) give their slots back.
        result["named_models_released"] = len(self.engine.release_named_models())
        self.log.info("reloaded", **result)
        return result

    def _check_written(self, fresh: Config, settings: SafetySettings) -> None:
        """A reload that moves a file the daemon writes (most take effect at the next restart) is refused when the
        daemon could not write there: the restart would fail on it (`StartupError`), leaving the service down."""
        before = set(written_paths(self.config, self.config_path, audit_directory=self._gate().rules.settings.audit.written))
        require_written(written_paths(fresh, self.config_path, audit_directory=settings.audit.written), besides=before)

    def _gate(self) -> Gate:
        gate = self.engine.gate
        assert gate is not None  # (made by the engine's first configure)
        return gate

    def apps(self) -> dict[str, Any]:
        """The app identities, what each may use, and its requests so far by outcome (no token, no hash)."""
        access = self.access
        if access is None or not access.settings.enabled:
            return {"enabled": False, "apps": []}
        counts = self.engine.app_use.counts
        return {"enabled": True, "apps": [{**row, "requests": counts.get(str(row["app"]), {})} for row in access.describe()]}

    async def fleet_status(self) -> Change:
        """The live sidecars of the namespace (heartbeats), what each runs, who disagrees, and the store's health."""
        if self.fleet is None:
            return Change(result=None)
        node, sync = self.fleet
        result = {**node.status(), **_sync_view(sync, self._wall()), "members": None, "disagreeing": {}}
        try:
            members = await node.list_members()
        except StoreError as exc:
            result["members_error"] = str(exc)
            return Change(result=result)
        result["members"] = [msgspec.to_builtins(m) for m in members]
        result["disagreeing"] = node.disagreeing
        return Change(result=result)

    def drain(self) -> Change:
        self._on_drain()
        return Change(result={"in_flight": self.engine.in_flight})

    # ------------------------------------------------------------------ async jobs

    def _runner(self) -> JobRunner:
        if self.jobs is None:
            raise SidecardError(Code.BAD_REQUEST, "async jobs are not enabled on this daemon ([jobs] enabled)")
        return self.jobs

    async def jobs_status(self) -> Change:
        """Jobs by state, the oldest pending, batches in flight, at risk, the savings so far."""
        stats = await self._runner().stats()
        return Change(result={k: round(v, 6) if isinstance(v, float) else v for k, v in stats.items()})

    async def cancel_job(self, job_id: str) -> Change:
        return Change(result=await self._runner().cancel(job_id))

    async def cancel_batch(self, batch_id: str) -> Change:
        status = await self._runner().cancel_batch(batch_id)
        return Change(result={"batch": batch_id, "upstream": status.id, "processing_status": status.processing_status})

    # ------------------------------------------------------------------ status

    def status(self) -> dict[str, Any]:
        engine, prompts, state = self.engine, self.prompts, self.state
        routes = {}
        for name in state.routes.names():
            route = state.routes.get(name)
            assert route is not None
            targets = []
            for t in route.targets:
                breaker, wait = engine.walker.breaker(t)
                targets.append({"provider": t.provider, "model": t.model, "breaker": breaker.state.name.lower(), "retry_in_s": round(wait, 3)})
            routes[name] = {
                "targets": targets,
                "overridden": name in state.routes.overrides,
                "static_fallback": route.static_fallback is not None,
            }
        prompt_status = {}
        for name, prompt in sorted(prompts.snapshot.prompts.items()):
            entry: dict[str, Any] = {"versions": sorted(prompt.versions)}
            try:
                entry.update(prompts.effective(name).describe())
            except Exception:  # noqa: BLE001 (a prompt without a valid release is reported, not fatal)
                entry["error"] = "no valid release"
            prompt_status[name] = entry
        cache = self.cache
        quality = self.quality
        return {
            **self._process(),
            "routes": routes,
            "prompts": prompt_status,
            "prompt_errors": [{"file": e.path, "reason": e.reason} for e in prompts.errors()],
            "kills": [state.describe_kill(k) for k in state.kills.active(self._clock())],
            "cache": None
            if cache is None
            else {
                "entries": len(cache),
                "bytes": cache.bytes,
                "max_entries": cache.max_entries,
                "max_bytes": cache.max_bytes,
                "store": "sqlite" if self.cache_store is not None else "memory",  # memory if the file was unusable
            },
            "state_error": state.error,
            **({} if self.fleet is None else {"fleet": {**self.fleet[0].status(), **_sync_view(self.fleet[1], self._wall())}}),
            "quality": None if quality is None else {
                "firing": len(quality.monitor.firing()), "actions": list(self.remedies.actions)[:5],
                "switches": self.remedies.describe(),
            },
        }


    # ------------------------------------------------------------------ usage and unusual spend

    async def usage_report(self, op: ops.UsageReport) -> Change:
        store = self.usage
        if store is None:
            raise SidecardError(Code.BAD_REQUEST, "usage is not recorded: set [usage] enabled = true (docs/usage.md)")
        until = self._wall()
        since = until - (op.last_s or USAGE_RANGE_S[op.window])
        rows = await trio.to_thread.run_sync(store.report, op.by, op.window, since, until)
        return Change(result={"by": op.by, "window": op.window, "since": since, "until": until,
                              "rows": [dataclasses.asdict(row) for row in rows]})

    def anomalies(self) -> Change:
        watch = self.spend_watch
        if watch is None:
            raise SidecardError(Code.BAD_REQUEST, "unusual spend is not watched: set [anomaly] enabled = true (docs/usage.md)")
        return Change(result={"firing": watch.firing(), "scopes": len(watch.detector)})


def prompts_loaded(store: PromptStore, snapshot: Snapshot, metrics: Metrics, log: JsonLog, *, first: bool = False) -> None:
    """A (re)load of the prompt directory, counted and logged; `first`: the store has not installed it yet."""
    errors = snapshot.errors if first else store.errors()
    metrics.prompt_reloads("errors" if snapshot.errors else "ok").inc()
    metrics.prompt_load_errors.set(len(errors))
    log.event(
        "prompts_loaded",
        "warning" if errors else "info",
        prompts=sorted(snapshot.prompts),
        errors=[{"file": e.path, "reason": e.reason} for e in errors],
        **({"removed": list(snapshot.removed)} if snapshot.removed else {}),
    )


def unpriced_warned(config: Config, log: JsonLog) -> None:
    """An `unpriced_model` warning for each model CONFIG calls that the price table does not know (at start and at
    each reload; check-config prints the same): its calls count $0 against budgets until it is priced."""
    for each in unpriced_models(config):
        log.warning("unpriced_model", where=each.where, model=each.model, reason=unpriced_problem(each.model))


def prompts_settled(store: PromptStore, names: set[str], metrics: Metrics, log: JsonLog) -> None:
    """The release moved off a version held from memory: PROMPTS were read again (their refused edits went in)."""
    errors = store.errors()
    metrics.prompt_load_errors.set(len(errors))
    log.info("prompts_settled", prompts=sorted(names), errors=[{"file": e.path, "reason": e.reason} for e in errors])


# One handler per op; each returns a `Change` (or an awaitable of one).
_HANDLERS: Final[dict[type, Callable[[Control, Any], Any]]] = {
    ops.Status: lambda c, op: Change(result=c.status()),
    ops.Kill: lambda c, op: c.kill(op.scope, mode=op.mode, text=op.text, reason=op.reason, expires_in_s=op.expires_in_s),
    ops.Unkill: lambda c, op: c.unkill(op.scope),
    ops.RouteSetPrimary: Control.route,
    ops.RouteOverride: Control.route,
    ops.RouteRollback: Control.route,
    ops.PromptUse: Control.prompt,
    ops.PromptRollback: Control.prompt,
    ops.PromptCanary: Control.prompt,
    ops.PromptPromote: Control.prompt,
    ops.PromptClear: Control.prompt,
    ops.QualityRollback: Control.quality_rollback,
    ops.CacheFlush: lambda c, op: c.flush_cache(feature=op.feature, prompt=op.prompt),
    ops.BudgetStatus: lambda c, op: c.budgets(),
    ops.BudgetRaise: Control.change_budget,
    ops.BudgetReset: Control.change_budget,
    ops.LimitsStatus: lambda c, op: c.limits(),
    ops.QualityStatus: lambda c, op: Change(result=c.quality_status()),
    ops.QualityUnswitch: lambda c, op: c.unswitch(op.prompt),
    ops.ExperimentStart: Control.experiment,
    ops.ExperimentStatus: Control.experiment,
    ops.ExperimentStop: Control.experiment,
    ops.ExperimentPromote: Control.experiment,
    ops.PromptRollout: Control.rollout,
    ops.RouteRollout: Control.rollout,
    ops.RolloutStatus: Control.rollout,
    ops.RolloutControl: Control.rollout,
    ops.ShadowStatus: lambda c, op: Change(result={"shadows": c.shadows.status() if c.shadows is not None else []}),
    ops.ReviewList: Control.review_op,
    ops.ReviewShow: Control.review_op,
    ops.ReviewLabel: Control.review_op,
    ops.UsageReport: Control.usage_report,
    ops.Anomalies: lambda c, op: c.anomalies(),
    ops.Reload: lambda c, op: _reloaded(c),
    ops.Drain: lambda c, op: c.drain(),
    ops.AppsStatus: lambda c, op: Change(result=c.apps()),
    ops.JobsStatus: lambda c, op: c.jobs_status(),
    ops.JobCancel: lambda c, op: c.cancel_job(op.job),
    ops.BatchCancel: lambda c, op: c.cancel_batch(op.batch),
    ops.FleetStatus: lambda c, op: c.fleet_status(),
}


async def _reloaded(control: Control) -> Change:
    return Change(result=await control.reload())


def _sync_view(sync: FleetSync, wall_now: float) -> dict[str, Any]:
    backend = sync.backend
    return {
        "state_version": backend.version,
        "state_kept": backend.kept,
        "state_local_change_pending": backend.dirty,
        "state_local_ops_pending": len(backend.pending),
        "state_synced_s_ago": None if sync.last_sync is None else round(wall_now - sync.last_sync, 3),
    }


def _budget_view(ledger: Any, scope: str, window: str, wall_now: float) -> dict[str, Any] | None:
    view = ledger.describe(scope, window, wall_now)
    return None if view is None else {k: (round(v, 6) if isinstance(v, float) else v) for k, v in view.items()}


def _scope(scope: str) -> str:
    try:
        return validate_scope(scope)
    except ValueError as exc:
        raise SidecardError(Code.BAD_REQUEST, str(exc)) from None
