"""Quality remedies: what happens when a quality alert fires, and how it ends.

A firing alert on a prompt's canary rolls the canary back (`auto_rollback_canary`); otherwise a prompt with
`fallback_route_on_alert` is switched to that route (`quality/switch.py` keeps the switches) until its alerts
resolve, its hold runs out, or an operator ends it; then its alerts are re-measured on the original route. The
engine reads the switches through `route_for`. An operator's op must not quietly give traffic back to a version
whose alert fires (`guard`).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from ..config import QualityConfig
from ..errors import Code, SidecardError
from ..observe.log import JsonLog
from ..observe.metrics import Metrics
from ..prompts.registry import Effective, PromptStore
from ..quality.monitor import AlertEvent, QualityMonitor
from ..quality.switch import RouteSwitches, Switch
from ..routes import RouteTable

ACTIONS_KEPT = 50  # automatic mitigations, newest first, for status


class QualityRemedies:
    def __init__(
        self,
        config: QualityConfig,
        *,
        monitor: QualityMonitor | None,
        prompts: PromptStore,
        routes: RouteTable,
        save: Callable[[], Awaitable[None]],
        metrics: Metrics,
        log: JsonLog,
        wall: Callable[[], float],
        clock: Callable[[], float] = trio.current_time,
    ) -> None:
        self.config = config
        self.monitor = monitor  # None: quality monitoring is off, nothing fires
        self.prompts = prompts
        self.routes = routes
        self._save = save
        self.metrics = metrics
        self.log = log
        self._wall = wall
        self._clock = clock
        self.switches = RouteSwitches()
        self.actions: deque[dict[str, Any]] = deque(maxlen=ACTIONS_KEPT)
        self._switched = trio.Event()  # a switch began: its expiry is due

    def route_for(self, prompt: str) -> str | None:
        """The route PROMPT is switched to while its quality alert fires (what the engine asks)."""
        return self.switches.route(prompt)

    # ------------------------------------------------------------------ alerts

    async def act(self, event: AlertEvent) -> None:
        """Act on a quality alert: roll a failing canary back, else switch the prompt to its fallback route."""
        if await self._rollback_canary(event):
            return  # the rollback is the remedy: that version gets no more traffic
        name, version, model = event.key
        scope = self.config.prompts.get(name)
        route = scope.fallback_route_on_alert if scope is not None else None
        if scope is None or route is None:
            return
        if event.state == "firing" and not self._serves(name, version):
            return  # e.g. a canary rolled back a moment ago: switching the route cannot help
        if event.state == "resolved":
            ended = self.switches.resolve(name, (event.key, event.signal))
            if ended is not None:
                self._ended(ended, "resolved", event.reason)
            return
        fallback = self.routes.get(route)
        if fallback is not None and any(t.model == model for t in fallback.targets):
            return  # an alert about the fallback itself: switching to it again cannot help
        now = self._clock()
        switch = self.switches.fire(name, (event.key, event.signal), route, scope.fallback_hold_s, now)
        if switch is None:
            return  # already switched: the alert joins the switch's causes
        self.metrics.quality_route_switched(name).set(1)
        self._switched.set()
        self.actions.appendleft({
            "action": "route_switched", "prompt": name, "route": route, "version": version, "model": model,
            "signal": event.signal, "value": round(event.value, 4), "hold_s": scope.fallback_hold_s, "at": round(self._wall(), 3),
        })
        self.log.warning("admin", op="quality.route_switch", args={"prompt": name, "route": route}, peer="quality-monitor",
                         result="ok", before=None, after=switch.describe(now), reason=event.reason)

    def _serves(self, prompt: str, version: str) -> bool:
        """Whether PROMPT's VERSION ("-": any) still answers requests (as its stable or canary version)."""
        try:
            effective = self.prompts.effective(prompt)
        except SidecardError:
            return False
        return version == "-" or version in (str(effective.stable), str(effective.canary))

    async def _rollback_canary(self, event: AlertEvent) -> bool:
        """Roll the prompt's canary back if a firing alert is about it; True if it did."""
        name, version, model = event.key
        prompts = self.prompts
        if event.state != "firing" or not self.config.auto_rollback_canary or name not in prompts.snapshot.prompts:
            return False
        effective = prompts.effective(name)
        if effective.canary is None or str(effective.canary) != version:
            return False
        before, after = prompts.stop_canary(name)
        self.actions.appendleft({"action": "canary_rolled_back", "prompt": name, "version": effective.canary, "model": model,
                                 "signal": event.signal, "value": round(event.value, 4), "at": round(self._wall(), 3)})
        self.metrics.quality_rollbacks(name).inc()
        # The same audit line an operator's rollback writes, with the monitor as the actor.
        self.log.warning("admin", op="prompt.canary_rollback", args={"prompt": name}, peer="quality-monitor",
                         result="ok", before=before.describe(), after=after.describe(), reason=event.reason)
        try:
            await self._save()
        except SidecardError:
            pass  # logged by the save; the rollback itself is in force
        return True

    # ------------------------------------------------------------------ ending a switch

    def end(self, prompt: str) -> dict[str, Any] | None:
        """An operator ends PROMPT's fallback route switch (`sidecardctl quality unswitch`); None if there is none."""
        switch = self.switches.end(prompt)
        if switch is None:
            return None
        view = switch.describe(self._clock())
        self._ended(switch, "operator", "ended by an operator")
        return view

    def _ended(self, switch: Switch, why: str, reason: str) -> None:
        """Traffic back on the prompt's own route; unless its alerts resolved, they are re-measured there."""
        self.metrics.quality_route_switched(switch.prompt).set(0)
        if why != "resolved" and self.monitor is not None:
            for key, _signal in switch.causes:
                self.monitor.remeasure(key)
        self.actions.appendleft({"action": "route_switch_ended", "prompt": switch.prompt, "route": switch.route,
                                 "why": why, "at": round(self._wall(), 3)})
        if why != "operator":  # an operator's call has the admin socket's own audit line
            self.log.warning("admin", op="quality.route_switch_end", args={"prompt": switch.prompt, "route": switch.route},
                             peer="quality-monitor", result="ok", before=switch.describe(self._clock()), after=None,
                             why=why, reason=reason)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """End each fallback route switch when its hold is over (its original model gets no samples meanwhile)."""
        task_status.started()
        while True:
            deadline = self.switches.next_expiry()
            with trio.move_on_at(math.inf if deadline is None else deadline):
                await self._switched.wait()
            self._switched = trio.Event()
            for switch in self.switches.expired(self._clock()):
                hold = switch.expires_at - switch.since
                self._ended(switch, "expired", f"held for {hold:g}s without samples of the original model")

    def describe(self) -> list[dict[str, Any]]:
        """The switches in force, for status."""
        return self.switches.describe(self._clock())

    # ------------------------------------------------------------------ operators' prompt ops

    def firing_on(self, prompt: str, version: int) -> list[AlertEvent]:
        """Quality alerts firing now on PROMPT's VERSION (any model)."""
        if self.monitor is None:
            return []
        return [e for e in self.monitor.firing() if e.key[0] == prompt and e.key[1] == str(version)]

    def guard(self, name: str, before: Effective, after: Effective, *, force: bool, clearing: bool) -> str | None:
        """An admin op must not quietly give traffic back to a version whose quality alert fires (the monitor acts
        only when an alert first fires). `prompt clear` keeps such a canary stopped; any other op is refused
        without `force`. Forced, the version's alerts are re-measured: if it still fails they fire, and act, again.
        Returns a note for the operator, if any."""
        for version in _gaining(before, after):
            alerts = self.firing_on(name, version)
            if not alerts:
                continue
            what = "; ".join(f"{e.signal} = {e.value:.2f} on {e.key[2]}, floor {e.threshold:.2f}" for e in alerts)
            if force:
                assert self.monitor is not None
                for event in alerts:
                    self.monitor.remeasure(event.key)
                continue
            if clearing and version == after.canary:
                self.prompts.stop_canary(name)
                return (f"canary v{version} stays stopped: its quality alert is firing ({what}); to serve it anyway: "
                        f"sidecardctl prompt clear {name} --force")
            raise SidecardError(
                Code.BAD_REQUEST,
                f"{name} v{version} has a firing quality alert ({what}): this would give it traffic again. Fix it, or "
                f"repeat with --force to serve it anyway (its alert is re-measured and acts again if it still fails)",
            )
        return None


def _gaining(before: Effective, after: Effective) -> list[int]:
    """The versions AFTER gives a larger share of traffic than BEFORE did."""

    def share(e: Effective, version: int) -> float:
        return (100.0 - e.canary_percent if version == e.stable else 0.0) + (e.canary_percent if version == e.canary else 0.0)

    return [v for v in dict.fromkeys((after.stable, after.canary)) if v is not None and share(after, v) > share(before, v)]
