"""Operator state in fleet mode: kept in the shared store, applied on every sidecar of the namespace.

`FleetBackend` is a `StateBackend`: a change is written to the store by compare-and-set (announced to every
sidecar), then to the local state file, which stays the last-known fleet state (what a sidecar starting while
the store is down honours). A compare-and-set that loses (another sidecar wrote first) is `StaleState`: the
control layer puts the store's state in force and runs the op again on it. A store that cannot be reached keeps
the change local (`kept` says so, and `sidecardctl` prints it) and journals what it changed (`PendingChange`, in
the local state file, so a restart keeps it); when the store is back, the journal is replayed onto the fleet's
state as it is then (`replayed`) and the result written by compare-and-set: another sidecar's change made meanwhile
stays, and this one's is not lost.

Experiments and rollouts, with the values they have tallied, stay out of the fleet's document: each sidecar keeps
its own in its local state file (`fleet_part`, `keeping_own`), so a sidecar's tally save never overwrites
another's, and a save that changes nothing shared makes no store write (no version, no message, no conflict).

`FleetMonitor` and `FleetQuality` judge canaries on the whole fleet's sample and roll each release back once.

`FleetSync` keeps this sidecar current: a change message, a resubscription, the store coming back and a periodic
full read each lead to a read of the store's state; a newer version is put in force (`OperatorState.adopt`) and
written to the local file.
"""

from __future__ import annotations

import random
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Final

import msgspec
import trio

from ..config import MonitorSettings, QualityConfig
from ..fleet.errors import StateConflict, StoreDataError, StoreError
from ..fleet.quality import Counts, Decision, QualityBatch, canary_verdict, decide, flush, merged, read_decisions, read_window
from ..fleet.state import FleetStateStore, StateWatcher
from ..observe.log import JsonLog
from ..observe.metrics import Metrics
from ..prompts.registry import PromptStore
from ..quality.monitor import AlertEvent, Key, QualityMonitor
from . import ops
from .backend import LocalFileBackend, PendingChange, SaveFailed, State, StoredKill
from .quality import QualityRemedies
from .state import OperatorState

if TYPE_CHECKING:
    from ..fleet.node import FleetNode

WRITE_RETRIES: Final = 5  # replays onto a fleet's state that keeps changing under them, before the next resync
# Two stored times of one kill switch differ by float noise (each save converts the daemon's clock to unix time).
SAME_KILL_S: Final = 0.001


def fleet_part(state: State) -> State:
    """What of STATE the fleet shares: all but this sidecar's experiments, rollouts and pending changes (docs/fleet.md)."""
    if not state.experiments and not state.rollouts and not state.pending:
        return state
    return msgspec.structs.replace(state, experiments=[], rollouts=[], pending=[])


def _same_kill(a: StoredKill, b: StoredKill) -> bool:
    return a.scope == b.scope and abs(a.set_at - b.set_at) <= SAME_KILL_S


def change_between(before: State, after: State, *, op: str, taken_at: float) -> PendingChange | None:
    """What a command changed of the fleet's part of the state (None: nothing), as values to set again."""
    was, now = {k.scope: k for k in before.kills}, {k.scope: k for k in after.kills}
    change = PendingChange(
        op=op, taken_at=taken_at,
        kills_set=[k for scope, k in now.items() if scope not in was or not _same_kill(was[scope], k)],
        kills_lifted=[k for scope, k in was.items() if scope not in now],
        routes={name: after.routes.get(name, []) for name in before.routes.keys() | after.routes.keys()
                if before.routes.get(name) != after.routes.get(name)},
        prompts={name: after.prompts.get(name) for name in before.prompts.keys() | after.prompts.keys()
                 if before.prompts.get(name) != after.prompts.get(name)},
        budget_raises=[r for r in after.budget_raises if r not in before.budget_raises],
    )
    if not (change.kills_set or change.kills_lifted or change.routes or change.prompts or change.budget_raises):
        return None
    return change


def replayed(document: State, changes: list[PendingChange], *, wall_now: float) -> tuple[State, list[str]]:
    """The fleet's DOCUMENT with CHANGES applied in the order taken; and what of them the fleet's state kept out.

    A kill switch wins over what it meets: a kill replaces one set earlier on its scope (the later-taken kill
    stays), and an unkill lifts only the switch its operator saw: one set elsewhere meanwhile is not lifted (that
    operator never saw it, and a kill is the safety action: lifting it takes another look). Routes, prompts and
    budget raises are set to what the command left in force on this sidecar."""
    kills = {k.scope: k for k in document.kills}
    routes, prompts = dict(document.routes), dict(document.prompts)
    raises = {(r.window, r.scope): r for r in document.budget_raises}
    kept_out: list[str] = []
    for change in changes:
        for kill in change.kills_set:
            current = kills.get(kill.scope)
            if kill.expires_at is not None and kill.expires_at <= wall_now:
                continue  # it lapsed meanwhile
            if current is not None and current.set_at > kill.set_at + SAME_KILL_S:
                kept_out.append(f"{change.op} {kill.scope}: a kill switch set later elsewhere stays")
                continue
            kills[kill.scope] = kill
        for kill in change.kills_lifted:
            current = kills.get(kill.scope)
            if current is not None and not _same_kill(current, kill):
                kept_out.append(f"{change.op} {kill.scope}: another sidecar set a kill switch on it meanwhile; it stays "
                                f"(sidecardctl unkill {kill.scope} again to lift it)")
            elif current is not None:
                del kills[kill.scope]
        for name, stack in change.routes.items():
            if stack:
                routes[name] = stack
            else:
                routes.pop(name, None)
        for name, release in change.prompts.items():
            if release is None:
                prompts.pop(name, None)
            else:
                prompts[name] = release
        raises.update(((r.window, r.scope), r) for r in change.budget_raises)
    document = msgspec.structs.replace(
        document, kills=sorted(kills.values(), key=lambda k: k.scope), routes=routes, prompts=prompts,
        budget_raises=sorted(raises.values(), key=lambda r: (r.window, r.scope)),
    )
    return document, kept_out


def describe_pending(changes: list[PendingChange]) -> list[dict[str, Any]]:
    """The journal as a log line shows it: each command, when, and what it set."""
    return [{"op": c.op, "taken_at": c.taken_at, "kills_set": [k.scope for k in c.kills_set],
             "kills_lifted": [k.scope for k in c.kills_lifted], "routes": sorted(c.routes), "prompts": sorted(c.prompts),
             "budget_raises": [f"{r.scope}/{r.window}" for r in c.budget_raises]} for c in changes]


def keeping_own(document: State, own: State | None) -> State:
    """The fleet's DOCUMENT as this sidecar's local state: with its OWN experiments, rollouts and pending changes
    (none if None)."""
    if own is None:
        return fleet_part(document)
    return msgspec.structs.replace(document, experiments=own.experiments, rollouts=own.rollouts, pending=own.pending)


class StaleState(Exception):
    """The store's state changed since this sidecar's copy: adopt it, then apply the op again."""


class FleetBackend:
    def __init__(
        self, local: LocalFileBackend, store: FleetStateStore, *, log: JsonLog, on_version: Callable[[], object] = lambda: None,
    ) -> None:
        """`on_version`: told when this sidecar applies another version (its heartbeat says so at once)."""
        self.local = local
        self._on_version = on_version
        self.store = store
        self.log = log
        self.location = local.location
        self.version = 0  # the store's version this sidecar's state is based on
        self.kept = "local"  # where the last change went: "fleet", or "local (why)"
        self.dirty = False  # a change kept only locally, to write to the store when it is back
        # The changes kept only locally (`dirty`), to replay onto the fleet's state; in force here meanwhile.
        self.pending: list[PendingChange] = []
        self.taking: PendingChange | None = None  # what the change being saved is (the control layer's)
        self.kept_out: list[str] = []  # what of `pending` the fleet's state kept out, at their last replay
        self.watcher: StateWatcher | None = None

    def tidy(self) -> list[str]:
        return self.local.tidy()

    def load(self) -> State:
        state = self.local.load()
        self.pending = list(state.pending)
        self.dirty = bool(self.pending)  # taken before a restart, while the store was unreachable
        if self.pending:
            self.log.warning("fleet_state_local_ops_pending", ops=describe_pending(self.pending), path=self.location,
                             note="in force here; replayed onto the fleet's state when the store answers")
        return state

    def move_aside(self, wall_now: float) -> str | None:
        return self.local.move_aside(wall_now)

    def write(self, state: State) -> None:
        self.local.write(self._with_pending(state))

    def _with_pending(self, state: State) -> State:
        return msgspec.structs.replace(state, pending=list(self.pending))

    async def save(self, state: State) -> None:
        """The shared part to the store when it changed (by compare-and-set), the whole state to the local file."""
        shared = fleet_part(state)
        if self.watcher is not None and not self.dirty and shared == self.watcher.document:
            await self.local.save(self._with_pending(state))  # (only this sidecar's experiments changed)
            return
        try:
            version = await self.store.save(shared, self.version)
        except StateConflict as exc:
            raise StaleState(str(exc)) from None
        except StoreError as exc:
            self.kept, self.dirty = (f"local (the fleet store did not answer: {exc}; kept on this sidecar, and replayed onto "
                                     "the fleet's state when the store is back)"), True
            if self.taking is not None:
                self.pending.append(self.taking)
            if self.watcher is not None:
                self.watcher.document = shared  # what to give back to a store that returns empty
            self.log.warning("fleet_state_kept_locally", reason=str(exc), path=self.location, pending=len(self.pending))
        else:
            # The state written holds every pending change: they are in force here until the fleet's is adopted,
            # and replayed onto it when it is.
            self.kept, self.dirty, self.pending = "fleet", False, []
            self.seen(version, shared)
        await self.local.save(self._with_pending(state))

    def seen(self, version: int, state: State) -> None:
        self.version = version
        if self.watcher is not None:  # our own change message is not news
            self.watcher.version, self.watcher.document = version, state
        self._on_version()


class FleetSync:
    def __init__(
        self, state: OperatorState, backend: FleetBackend, *, resync_interval_s: float, metrics: Metrics, log: JsonLog,
        wall: Callable[[], float], rng: random.Random | None = None,
    ) -> None:
        self.state = state
        self.backend = backend
        self.metrics = metrics
        self.log = log
        self._wall = wall
        self.lock = trio.Lock()  # shared with the control layer: an op and an adoption never interleave
        self.watcher = backend.watcher = StateWatcher(
            backend.store, self._changed, resync_interval_s=resync_interval_s, document=fleet_part(state.snapshot()),
            on_error=self._failed, rng=rng,
        )
        self.last_sync: float | None = None
        self._failing = False

    def _failed(self, reason: str) -> None:
        self._failing = True
        self.log.warning("fleet_state_resync_failed", reason=reason)

    def _changed(self, version: int, document: State) -> None:
        backend = self.backend
        backend.seen(version, document)
        if backend.pending:
            # This sidecar's commands taken while the store was unreachable stay in force, on the fleet's state.
            document, backend.kept_out = replayed(document, backend.pending, wall_now=self._wall())
        elif backend.dirty:
            self.log.warning("fleet_state_local_change_dropped", version=version, written_by=backend.store.written_by,
                             reason="the fleet's operator state changed while this sidecar could not reach the store")
            backend.dirty = False
        self.state.adopt(document)
        self.metrics.fleet_state_version.set(version)
        self.log.info("fleet_state_applied", version=version, written_by=backend.store.written_by,
                      kills=[k.scope for k in document.kills], route_overrides=sorted(document.routes),
                      prompt_overrides=sorted(document.prompts))
        try:
            # The last-known fleet state, for a start while the store is down, with this sidecar's own experiments.
            backend.write(keeping_own(document, self.state.snapshot()))
        except SaveFailed as exc:
            self.log.error("state_save_failed", path=backend.location, reason=exc.reason)

    async def resync(self) -> None:
        """One full read (and, after an outage, this sidecar's local changes written, replayed onto it)."""
        async with self.lock:
            await self.resync_locked()

    async def resync_locked(self) -> None:
        """`resync`, by a holder of `lock` (the control layer, whose op lost a compare-and-set)."""
        self._failing = False
        await self.watcher.resync()
        if self.backend.dirty and not self._failing:
            await self._write_local_change()
        if not self._failing:
            self.last_sync = self._wall()
            self.metrics.fleet_state_synced.set(self.last_sync)

    async def _write_local_change(self) -> None:
        """Changes kept only locally during an outage go to the store by compare-and-set, replayed onto the fleet's
        state (the read before this one adopted it, with them) and again onto each newer one that beats them."""
        backend = self.backend
        for _ in range(WRITE_RETRIES):
            pending = list(backend.pending)
            try:
                await backend.save(self.state.snapshot())
            except StaleState:
                await self.watcher.resync()
                if self._failing:
                    return
                continue
            if backend.dirty:
                return  # the store went away again: kept for the next time
            if pending:
                self.log.info("fleet_state_local_ops_replayed", version=backend.version, ops=describe_pending(pending),
                              kept_out=backend.kept_out)
            else:
                self.log.info("fleet_state_local_change_written", version=backend.version)
            backend.kept_out = []
            return

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            await self.resync()
            # (what was kept during an outage and is still unwritten counts as a failed read: it is retried soon too)
            await self.watcher.wait(failed=self._failing or self.backend.dirty)


class FleetMonitor(QualityMonitor):
    """This sidecar's quality monitor, whose observations are also counted into the fleet's windows."""

    def __init__(self, settings: MonitorSettings, *, batch: QualityBatch, wall: Callable[[], float], **kwargs: Any) -> None:
        super().__init__(settings, **kwargs)
        self.batch = batch
        self._wall = wall

    def record_score(self, key: Key, overall: float, now: float) -> list[AlertEvent]:
        self.batch.add_score(key, overall, self._wall())
        return super().record_score(key, overall, now)

    def record_checks(self, key: Key, failed: list[str], now: float) -> list[AlertEvent]:
        self.batch.add_checks(key, failed, self._wall())
        return super().record_checks(key, failed, now)


class FleetQuality:
    """Canaries judged on the whole fleet's sample, and rolled back once per release for the fleet.

    Every `flush_interval_s` each sidecar adds its counts to the store and reads the fleet's windows (the last
    `WINDOW_BUCKETS` buckets); a canary whose fleet-wide sample fails (`canary_verdict`) is rolled back by the one
    sidecar that takes the decision (`decide`, by compare-and-set on the version's last rollback record), as
    an operator's `prompt canary NAME 0` would: through the fleet's operator state, so every sidecar stops it,
    and marked as the fleet's rollback there (`prompt clear` keeps it stopped). A canary re-released after a
    rollback is judged on the answers after it: the record lasts as long as the window that judged it. In fleet
    mode the local monitor no longer rolls canaries back on its own sample (it still alerts, and switches routes)."""

    WINDOW_BUCKETS: Final = 10

    def __init__(
        self, node: FleetNode, batch: QualityBatch, *, execute: Callable[[ops.AdminOp | ops.QualityRollback], Awaitable[Any]],
        remedies: QualityRemedies, prompts: PromptStore, config: QualityConfig, metrics: Metrics, log: JsonLog,
        wall: Callable[[], float],
    ) -> None:
        self.node = node
        self.batch = batch
        self._execute = execute
        self.remedies = remedies
        self.prompts = prompts
        self.config = config
        self.metrics = metrics
        self.log = log
        self._wall = wall
        self.decisions = 0

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        settings = self.node.settings.quality
        while True:
            await trio.sleep(settings.flush_interval_s)
            try:
                await flush(self.node.connection, self.node.keys, self.batch, retention_s=settings.retention_s)
                await self.judge()
            except StoreError as exc:
                self.node.health.fallback("quality")
                if isinstance(exc, StoreDataError):
                    self.log.error("fleet_store_data_error", reason=str(exc), fallback="quality")

    async def judge(self) -> None:
        prompts, node = self.prompts, self.node
        canaries = {name: e for name in prompts.snapshot.prompts if (e := prompts.effective_or_none(name)) and e.canary is not None}
        if not canaries:
            return
        names = [_decision_name(name, e.canary) for name, e in canaries.items()]  # type: ignore[arg-type]
        records = dict(zip(canaries, await read_decisions(node.connection, node.keys, names)))
        bucket_s = node.settings.quality.bucket_s
        after = {(name, str(e.canary)): r.at for name, e in canaries.items() if (r := records[name]) is not None}
        window = await read_window(node.connection, node.keys, now=self._wall(), span_s=bucket_s * self.WINDOW_BUCKETS,
                                   bucket_s=bucket_s, after=after)
        for name, effective in canaries.items():
            version = str(effective.canary)
            canary = merged(window, name, version)
            reason = canary_verdict(canary, merged(window, name, str(effective.stable)), self.config.monitor_for((name, version, "*")))
            if reason is not None:
                await self._roll_back(name, effective.canary, reason, canary, records[name])  # type: ignore[arg-type]

    async def _roll_back(self, name: str, version: int, reason: str, counts: Counts, seen: Decision | None) -> None:
        node, bucket_s = self.node, self.node.settings.quality.bucket_s
        # The record outlives the window that judged this release: until then a new release is judged after it.
        taken, _ = await decide(node.connection, node.keys, _decision_name(name, version), seen=seen, instance=node.instance,
                                now=self._wall(), ttl_s=bucket_s * (self.WINDOW_BUCKETS + 1))
        if not taken:
            return  # another sidecar took it: its change of the fleet's state reaches this one
        change = await self._execute(ops.QualityRollback(id="quality-monitor", prompt=name, version=version))
        self.decisions += 1
        self.metrics.quality_rollbacks(name).inc()
        self.remedies.actions.appendleft({"action": "canary_rolled_back", "prompt": name, "version": version, "model": "*",
                                          "signal": "fleet", "value": counts.mean, "at": round(self._wall(), 3)})
        self.log.warning("admin", op="prompt.canary_rollback", args={"prompt": name}, peer="quality-monitor", instance=node.instance,
                         result="ok", before=change.before, after=change.after, reason=reason, fleet=True,
                         judged=counts.scores, checked=counts.checked)


def _decision_name(prompt: str, version: int) -> str:
    return f"canary-rollback:{prompt}:v{version}"
