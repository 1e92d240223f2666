"""The unusual-spend watch: usage records fed to the anomaly detector (`policies.anomaly`) off the request path.

Each record's cost counts towards its feature (`feature:search`) and its user (`user:<pseudonym>`), as
`[anomaly] scopes` says. An alert that fires is a `spend_anomaly` log line (warning), the gauge
`sidecard_spend_anomaly_firing{kind, scope}` (and the scope's rate beside it), a count in
`sidecard_spend_anomalies_total{kind}`, and an event for the alert sinks (the webhook and command of
`[quality]`, as budget alerts are); `spend_anomaly_resolved` when it ends. Records wait on a bounded channel
(a full one drops and counts); the watch wakes every `TICK_S` to resolve the alerts of scopes that went quiet.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Final

import trio

from ..config import AnomalyConfig
from ..observe.log import JsonLog
from ..observe.metrics import Metrics
from ..policies.anomaly import AnomalyDetector, AnomalyEvent, AnomalySettings
from .store import RecordInbox, UsageRecord

TICK_S: Final = 15.0


def detector_settings(config: AnomalyConfig) -> AnomalySettings:
    return AnomalySettings(
        factor=config.factor, z=config.z, window_s=float(config.window_s), min_usd_per_hour=config.min_usd_per_hour,
        min_requests=config.min_requests, warmup_s=config.warmup_s, accept_after_s=config.accept_after_s,
        max_scopes=config.max_scopes,
    )


class SpendWatch(RecordInbox):
    def __init__(
        self, config: AnomalyConfig, *, metrics: Metrics, log: JsonLog, wall: Callable[[], float],
        on_alert: Callable[[dict[str, Any]], None] | None = None, queue_size: int = 50_000,
    ) -> None:
        super().__init__(queue_size)
        self.detector = AnomalyDetector(detector_settings(config))
        self.scopes = tuple(config.scopes)
        self.metrics = metrics
        self.log = log
        self._wall = wall
        self._on_alert = on_alert
        self.rates: dict[str, AnomalyEvent] = {}  # firing scope -> the event that fired it

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            with trio.move_on_after(TICK_S):
                async for record in self._receive:
                    self.feed(record)
            for event in self.detector.tick(self._wall()):
                self._tell(event)

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
