"""This sidecar's place in the fleet: the store connection and subscriber, their health as metrics and log lines,
the request path, the coalescing followers, heartbeats and the members' listing. The daemon builds one when the
config has a `[fleet]` section, and runs it in its services nursery (`run`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any, Final

import msgspec
import trio

from ..config import Config
from ..observe.log import JsonLog
from ..observe.metrics import Metrics
from . import scripts
from .coalesce import Landings, follow
from .connection import Connection
from .errors import StoreError
from .health import FleetHealth, Hooks
from .heartbeat import Heartbeat, beat, disagreements, instances
from .keys import Keys
from .pubsub import Subscriber
from .scripts import CacheHit, RequestPath
from .settings import FleetSettings, StoreAddress

_config_encoder: Final = msgspec.json.Encoder(order="deterministic")


def config_hash(config: Config) -> str:
    """A short hash of the config in force (the fleet's members should all run the same one); no secret is in it:
    the store's url is left out."""
    fields = msgspec.to_builtins(config)
    fields.pop("fleet", None)
    for section in ("server", "admin", "http", "metrics", "state", "spend", "sim", "log"):  # per host, not per fleet
        fields.pop(section, None)
    return hashlib.blake2b(_config_encoder.encode(_without_files(fields)), digest_size=6).hexdigest()


def _without_files(value: Any) -> Any:
    """VALUE without the settings that name a file on this host (`path`, `*_path`, `*_file`): hosts differ in them."""
    if isinstance(value, dict):
        return {k: _without_files(v) for k, v in value.items() if not (k == "path" or k.endswith(("_path", "_file")))}
    if isinstance(value, list):
        return [_without_files(v) for v in value]
    return value


class FleetNode:
    def __init__(
        self, settings: FleetSettings, *, metrics: Metrics, log: JsonLog, wall: Callable[[], float], address: StoreAddress | None = None,
    ) -> None:
        """`address`: the store's, password included, as `settings.address` read it at start."""
        self.settings = settings
        self.keys = Keys(settings.namespace)
        self.instance = settings.instance_name()
        self.metrics = metrics
        self.log = log
        self._wall = wall
        self.address = address or settings.address()  # str() never shows the password
        self.health = FleetHealth(Hooks(
            on_up=self._up, on_down=self._down,
            on_latency=lambda op, s: metrics.fleet_store_seconds(op).observe(s),
            on_error=lambda op, kind: metrics.fleet_store_errors(op, kind).inc(),
            on_fallback=lambda what: metrics.fleet_fallbacks(what).inc(),
        ))
        self.connection = Connection.from_settings(settings, address=self.address, health=self.health, scripts=scripts.ALL)
        self.subscriber = Subscriber.from_settings(settings, address=self.address, health=self.health)
        self.path = RequestPath(self.connection, self.keys, max_entry_bytes=settings.cache.max_entry_bytes)
        self.landings = Landings(self.keys.cache_channel)
        self.landings.attach(self.subscriber)
        self.on_up: list[Callable[[], object]] = []  # told when the store is back (after an outage, or at last)
        self.members: list[Heartbeat] = []
        self.disagreeing: dict[str, list[str]] = {}
        self.started_at = wall()
        self._beat_now = trio.Event()
        metrics.fleet_up.set(0)

    def _up(self) -> None:
        self.metrics.fleet_up.set(1)
        self.log.info("fleet_store_up", store=str(self.address), namespace=self.settings.namespace, instance=self.instance)
        for hook in self.on_up:
            hook()

    def _down(self, reason: str) -> None:
        self.metrics.fleet_up.set(0)
        self.log.warning("fleet_store_down", store=str(self.address), namespace=self.settings.namespace, reason=reason,
                         fallback="local limits, local cache, last-known operator state")

    async def connect(self, nursery: trio.Nursery) -> None:
        """Start the connection, and wait for it up to `connect_timeout_ms`: a store that is down never holds up
        the start for longer."""
        await nursery.start(self.connection.run)
        with trio.move_on_after(self.settings.connect_timeout_ms / 1000):
            await self.connection.wait_connected()

    async def follow(self, cache_key: str, lease_token: str) -> CacheHit | None:
        return await follow(self.path, self.landings, cache_key, lease_token=lease_token, lease_ms=self.settings.cache.lease_ms,
                            wall=self._wall)

    async def run_heartbeats(self, make: Callable[[float], Heartbeat], *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Beat, and read the members back (for the metrics and `sidecardctl fleet`), every heartbeat interval."""
        task_status.started()
        settings = self.settings
        while True:
            now = self._wall()
            try:
                await beat(self.connection, self.keys, make(now), ttl_s=settings.heartbeat_ttl_s, now=now)
                await self.list_members()
            except StoreError:
                pass  # counted by the connection's health; the next beat is on time
            with trio.move_on_after(settings.heartbeat_interval_s):
                await self._beat_now.wait()
            self._beat_now = trio.Event()

    def beat_soon(self) -> None:
        """Beat now rather than at the next interval (what this sidecar runs has changed)."""
        self._beat_now.set()

    async def list_members(self) -> list[Heartbeat]:
        members = self.members = await instances(self.connection, self.keys, now=self._wall())
        self.disagreeing = disagreements(members)
        self.metrics.fleet_members.set(len(members))
        self.metrics.fleet_disagreeing.set(len(self.disagreeing))
        return members

    def status(self) -> dict[str, Any]:
        return {
            "store": str(self.address),
            "namespace": self.settings.namespace,
            "instance": self.instance,
            "up": self.health.up,
            "down_reason": self.health.down_reason,
            "connects": self.connection.connects,
            "in_flight": self.connection.in_flight,
            "subscribed": self.subscriber.subscribed,
            "fallbacks": dict(self.health.fallbacks),
            "errors": {f"{op}:{kind}": n for (op, kind), n in self.health.errors.items()},
        }
