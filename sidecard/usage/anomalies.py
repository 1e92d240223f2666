"""The unusual-spend watch: usage records fed to the anomaly detector (`policies.anomaly`) off the request path.

Each record's cost counts towards its feature (`feature:search`) and its user (`user:<pseudonym>`), as
`[anomaly] scopes` says. An alert that fires is a `spend_anomaly` log line (warning), the gauge
`sidecard_spend_anomaly_firing{kind, scope}` (and the scope's rate beside it), a count in
`sidecard_spend_anomalies_total{kind}`, and an event for the alert sinks (the webhook and command of
`[quality]`, as budget alerts are); `spend_anomaly_resolved` when it ends. Records wait on a bounded channel
(a full one drops and counts); the watch wakes every `TICK_S` to resolve the alerts of scopes that went quiet.

The baselines are kept in `[anomaly] path` (every `SAVE_EVERY_S` and at shutdown, atomically) and taken back at
start: a restart keeps what each scope normally spends, and the time the daemon was down counts as unknown, not
as zero spend. An alert firing when the daemon stopped starts over: it fires again if the spend still is unusual.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, Final

import msgspec
import trio

from ..config import AnomalyConfig
from ..durable import replace_file, set_aside
from ..observe.log import JsonLog
from ..observe.metrics import Metrics
from ..policies.anomaly import AnomalyDetector, AnomalyEvent, AnomalySettings
from .store import RecordInbox, UsageRecord

TICK_S: Final = 15.0
SAVE_EVERY_S: Final = 60.0
FINAL_SAVE_S: Final = 5.0


def detector_settings(config: AnomalyConfig) -> AnomalySettings:
    return AnomalySettings(
        factor=config.factor, z=config.z, window_s=float(config.window_s), min_usd_per_hour=config.min_usd_per_hour,
        min_requests=config.min_requests, warmup_s=config.warmup_s, accept_after_s=config.accept_after_s,
        max_scopes=config.max_scopes,
    )


class SpendWatch(RecordInbox):
    def __init__(
        self, config: AnomalyConfig, *, metrics: Metrics, log: JsonLog, wall: Callable[[], float],
        on_alert: Callable[[dict[str, Any]], None] | None = None, queue_size: int = 50_000, path: Path | None = None,
    ) -> None:
        """`path`: where the baselines are kept (None: in memory only)."""
        super().__init__(queue_size)
        self.settings = detector_settings(config)
        self.detector = AnomalyDetector(self.settings)
        self.path = path
        self.scopes = tuple(config.scopes)
        self.metrics = metrics
        self.log = log
        self._wall = wall
        self._on_alert = on_alert
        self.rates: dict[str, AnomalyEvent] = {}  # firing scope -> the event that fired it

    def restore(self, now: float) -> None:
        """Take the kept baselines back at `now` (unix time; blocking: call it in a thread, before `run`). A file
        that cannot be used is set aside and logged; the watch starts from nothing."""
        if self.path is None or not self.path.exists():
            return
        try:
            state = msgspec.json.decode(self.path.read_bytes())
            for scope in state["scopes"].values():
                scope["firing_since"] = None  # (see the module docstring)
            self.detector = AnomalyDetector.restore(self.settings, state, now)
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:  # msgspec.DecodeError is a ValueError
            moved = set_aside(self.path, now)
            self.log.warning("anomaly_state_unusable", path=str(self.path), reason=f"{type(exc).__name__}: {exc}"[:300],
                             moved_to=moved)
            return
        self.log.info("anomaly_state_restored", path=str(self.path), scopes=len(self.detector))

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        next_save = trio.current_time() + SAVE_EVERY_S
        try:
            while True:
                with trio.move_on_after(TICK_S):
                    async for record in self._receive:
                        self.feed(record)
                for event in self.detector.tick(self._wall()):
                    self._tell(event)
                if trio.current_time() >= next_save:
                    next_save = trio.current_time() + SAVE_EVERY_S
                    await self.save()
        finally:
            with trio.move_on_after(FINAL_SAVE_S, shield=True):
                await self.save()

    async def save(self) -> None:
        """Keep the baselines (atomically, in a thread); a failure is logged and the next save tries again."""
        if self.path is None:
            return
        data = msgspec.json.encode(self.detector.state())
        try:
            await trio.to_thread.run_sync(replace_file, self.path, data, abandon_on_cancel=True)
        except OSError as exc:
            self.log.error("anomaly_state_write_failed", path=str(self.path), reason=str(exc)[:300])

    def feed(self, record: UsageRecord) -> None:
        for kind in self.scopes:
            key = getattr(record, kind)
            if key:
                event = self.detector.add(f"{kind}:{key}", record.cost_usd, record.at)
                if event is not None:
                    self._tell(event)

    def firing(self) -> list[dict[str, Any]]:
        """The alerts firing now, for `sidecardctl anomalies`: the costliest rate first."""
        return sorted((_fields(event) for event in self.rates.values()), key=lambda e: -e["rate_usd_per_hour"])

    def _tell(self, event: AnomalyEvent) -> None:
        kind, _, scope = event.scope.partition(":")
        fields = _fields(event)
        if event.state == "firing":
            self.rates[event.scope] = event
            self.metrics.spend_anomaly_firing(kind, scope).set(1)
            self.metrics.spend_anomaly_rate(kind, scope).set(event.rate_usd_per_hour)
            self.metrics.spend_anomalies(kind).inc()
            self.log.warning("spend_anomaly", **fields, message=event.message)
        else:
            self.rates.pop(event.scope, None)
            self.metrics.spend_anomaly_firing.remove(kind, scope)
            self.metrics.spend_anomaly_rate.remove(kind, scope)
            self.log.info("spend_anomaly_resolved", **fields, message=event.message)
        if self._on_alert is not None:
            self._on_alert({"alert": "spend_anomaly" if event.state == "firing" else "spend_anomaly_resolved", **fields})


def _fields(event: AnomalyEvent) -> dict[str, Any]:
    kind, _, scope = event.scope.partition(":")
    return {
        "kind": kind, "scope": scope, "rate_usd_per_hour": round(event.rate_usd_per_hour, 4),
        "expected_usd_per_hour": round(event.expected_usd_per_hour, 4), "since": event.since,
    }
