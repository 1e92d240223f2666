"""Operator state: what operators set at runtime and the daemon keeps across restarts.

Kill switches, route overrides (kept by the route table), prompt release overrides (kept by the prompt store),
experiments and rollouts (kept by the experiment book), and the salt of user pseudonyms. Built before the engine,
which reads it through narrow interfaces; restored from a `StateBackend` at start and saved through it on every
change, before the change is acknowledged.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, Literal

import trio

from ..errors import Code, SidecardError, StartupError
from ..killswitch import KillSwitch, KillSwitches
from ..limits.spend import SpendLedger
from ..observe.log import JsonLog
from ..observe.metrics import Metrics
from ..prompts.registry import Override, PromptStore
from ..routes import RouteTable, target_names
from ..loop.experiments import ExperimentBook
from .backend import (CorruptState, SaveFailed, State, StateBackend, StoredExperiment, StoredPrompt, kill_from_disk,
                      kill_to_disk)


class OperatorState:
    def __init__(
        self,
        backend: StateBackend,
        *,
        routes: RouteTable,
        prompts: PromptStore,
        metrics: Metrics,
        log: JsonLog,
        wall: Callable[[], float],
        clock: Callable[[], float] = trio.current_time,
        experiments: ExperimentBook | None = None,
        budgets: SpendLedger | None = None,
    ) -> None:
        """`budgets`: fleet mode's ledger, whose operators' raises are the fleet's operator state (alone, a sidecar
        keeps them in its spend file)."""
        self.backend = backend
        self.experiments = experiments
        self.budgets = budgets
        self.kills = KillSwitches()
        self.routes = routes
        self.prompts = prompts
        self.metrics = metrics
        self.log = log
        self._wall = wall
        self._clock = clock
        self.salt = b""  # set by `restore`: fixed on the first start, so pseudonyms (and per-user spend) carry over
        self.error: str | None = None  # what was wrong with the state kept, when it was set aside
        self._lock = trio.Lock()

    def _shift(self) -> float:
        """Wall clock minus the daemon's clock: converts the times kept."""
        return self._wall() - self._clock()

    # ------------------------------------------------------------------ start

    def restore(self, on_corrupt: Literal["refuse", "open"]) -> None:
        """Load what the backend keeps and put it in force; raises `StartupError` for unreadable state (unless
        `on_corrupt` is "open": then it is set aside and the daemon starts from its config alone)."""
        backend, location = self.backend, self.backend.location
        if leftovers := backend.tidy():
            self.log.info("state_temp_files_removed", path=location, removed=leftovers)
        try:
            saved = backend.load()
        except CorruptState as exc:
            if on_corrupt == "refuse":
                raise StartupError(
                    f"the state file {location} cannot be read ({exc.reason}); it may hold kill switches that must stay on: "
                    f'inspect it, then move it aside, or set [state] on_corrupt = "open", to start without it'
                ) from None
            moved_to = backend.move_aside(self._wall())
            self.error = f"{location}: {exc.reason} (moved to {moved_to or '(could not be moved)'})"
            self.metrics.state_discarded.set(1)
            self.log.error("state_corrupt", path=location, reason=exc.reason, moved_to=moved_to, on_corrupt="open")
            saved = State()  # from the config alone, with a new salt saved below
        if saved.salt:
            self.salt = bytes.fromhex(saved.salt)
        else:  # first start: fix the salt now
            self.salt = os.urandom(16)
            saved.salt = self.salt.hex()
            try:
                backend.write(saved)
            except SaveFailed as exc:
                self.log.error("state_save_failed", path=location, reason=exc.reason)
        self._put_in_force(saved)
        prompts = self.prompts
        if self.experiments is not None:  # this sidecar's own (fleet mode does not adopt another's)
            for stored in saved.experiments:
                self.experiments.add(stored.experiment, stored.tally)
            self.experiments.rollouts.update((rollout.subject, rollout) for rollout in saved.rollouts)
        kills = self.count_kills()
        if kills or self.routes.overrides or prompts.overrides:
            # A warning: what an operator (or a try-out) left in force, and how to undo each, before serving.
            self.log.warning(
                "state_restored",
                path=location,
                kills=[self.describe_kill(k) for k in kills],
                route_overrides={name: target_names(stack[-1]) for name, stack in sorted(self.routes.overrides.items())},
                prompt_overrides={name: effective.describe() for name in sorted(prompts.overrides)
                                  if (effective := prompts.effective_or_none(name)) is not None},
                undo="sidecardctl unkill SCOPE; sidecardctl route rollback ROUTE; sidecardctl prompt clear PROMPT",
            )
        self.count_prompt_errors()
        for problem in prompts.override_problems():
            self.log.error("prompt_override_missing", file=problem.path, reason=problem.reason)

    def _put_in_force(self, saved: State) -> None:
        """SAVED's kill switches, route overrides and prompt overrides replace those in force."""
        shift, now = self._shift(), self._clock()
        for switch in self.kills.active(now):
            self.kills.clear(switch.scope)
        for stored in saved.kills:
            switch = kill_from_disk(stored, shift)
            if not switch.expired(now):
                self.kills.set(switch)
        self.routes.overrides.clear()
        for name, stack in saved.routes.items():
            if self.routes.get(name) is not None:
                self.routes.overrides[name] = stack
        self.routes.rebase(self.routes.base)
        prompts = self.prompts
        prompts.overrides.clear()
        prompts.history.clear()
        for name, kept in saved.prompts.items():
            prompts.overrides[name] = Override(kept.stable, kept.canary, kept.canary_percent, kept.canary_cleared, kept.rolled_back)
            prompts.history[name] = list(kept.history)
        prompts.settle()  # the fleet's release may have moved off a version held here
        if self.budgets is not None:
            self.budgets.put_raises(saved.budget_raises)

    def adopt(self, document: State) -> None:
        """Another sidecar's operator state (fleet mode) put in force here; the pseudonym salt stays the one this
        sidecar started with (a change of salt at runtime would split every user's limits and spend)."""
        self._put_in_force(document)
        self.count_kills()
        self.count_prompt_errors()

    # ------------------------------------------------------------------ keeping

    def snapshot(self) -> State:
        shift, prompts, book = self._shift(), self.prompts, self.experiments
        return State(
            salt=self.salt.hex(),
            kills=[kill_to_disk(k, shift) for k in self.kills.active(self._clock())],
            routes={name: [list(ts) for ts in stack] for name, stack in self.routes.overrides.items()},
            prompts={
                name: StoredPrompt(
                    stable=o.stable, canary=o.canary, canary_percent=o.canary_percent, canary_cleared=o.canary_cleared,
                    rolled_back=o.rolled_back, history=list(prompts.history.get(name, [])),
                )
                for name, o in prompts.overrides.items()
            },
            experiments=[] if book is None else [StoredExperiment(experiment=e, tally=book.tallies[e.name])
                                                 for e in book.experiments.values()],
            rollouts=[] if book is None else list(book.rollouts.values()),
            budget_raises=[] if self.budgets is None else self.budgets.raises(),
        )

    async def save(self) -> None:
        """Keep operator state; raises `SidecardError` if the backend refuses (the change is then not acknowledged)."""
        snapshot = self.snapshot()
        async with self._lock:
            try:
                await self.backend.save(snapshot)
            except SaveFailed as exc:
                self.log.error("state_save_failed", path=self.backend.location, reason=exc.reason)
                raise SidecardError(Code.INTERNAL, f"applied, but could not be saved to {self.backend.location}: {exc.reason}") from None

    # ------------------------------------------------------------------ views

    def count_kills(self) -> list[KillSwitch]:
        """The kill switches in force (the gauge follows them)."""
        kills = self.kills.active(self._clock())
        self.metrics.kill_switches.set(len(kills))
        return kills

    def count_prompt_errors(self) -> None:
        """Files refused and overrides naming a missing version, after the overrides changed."""
        self.metrics.prompt_load_errors.set(len(self.prompts.errors()))

    def describe_kill(self, switch: KillSwitch | None) -> dict[str, Any] | None:
        if switch is None:
            return None
        return {
            "scope": switch.scope,
            "mode": switch.mode,
            "text": switch.text,
            "reason": switch.reason,
            "expires_in_s": None if switch.expires_at is None else round(switch.expires_at - self._clock(), 3),
        }
