"""Assembles the daemon from its parts and runs it: start-up, serving, reload, graceful drain.

Ownership: `Daemon.run` owns two nurseries. `services` holds what lives as long as the daemon (metrics
endpoint, simulated upstream, prompt watcher, cache writer, admin socket, accept loop); `handlers` holds
client connections and so every request in flight. Shutdown stops accepting, lets `handlers` finish within
the grace period, then cancels it.

Under systemd (see systemd.py) the daemon reports READY=1 once it serves, STATUS= lines, WATCHDOG=1 pings
from inside the Trio loop, RELOADING=1 around a reload and STOPPING=1 when the drain starts; sockets passed
by socket activation are served instead of bound. Without systemd none of this does anything.
"""

from __future__ import annotations

import importlib.util
import math
import os
import random
import resource
import socket
import sqlite3
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec
import trio
from prometheus_client import CollectorRegistry

from . import __version__, state
from .admin import AdminServer, target_names
from .cache import ResponseCache
from .cache_store import SqliteStore
from .config import Config, ConfigError, Target, load, parse_address
from .engine import Engine
from .httpface import HttpFace
from .httpserver import serve_http
from .errors import Code, SidecardError, first_leaf
from .killswitch import KillSwitch
from .limits.spend import Budget, SpendLedger, SpendStore
from .metrics_endpoint import serve_metrics
from .observe.log import JsonLog, open_destination, route_library_logging
from .observe.metrics import Metrics
from .observe.redact import Redactor
from .policies.buffers import BufferBudget
from .process import FdReserve, ReservedListener, return_memory_eagerly
from .prompts.registry import Effective, Override, PromptStore, Snapshot
from .prompts.watcher import watch_directory
from .quality.judge import BUILTIN_RUBRIC, JUDGE_PROMPT
from .quality.monitor import AlertEvent
from .quality.pipeline import QualityPipeline, log_alert
from .quality.switch import Switch
from .quality.sinks import AlertSinks
from .server import AppServer
from .traffic import Traffic
from .systemd import UNNAMED, Notifier
from .unixsock import BoundSocket, SocketInUse, adopt_unix, bind_unix
from .upstream.client import Upstream
from .upstream.pool import ConnectionPool

if TYPE_CHECKING:
    from .sim import Simulator

SIM_API_KEY = "sim-key-not-a-secret"
CREDENTIAL_NAME = "anthropic_api_key"  # systemd LoadCredential= name


class StartupError(Exception):
    """The daemon cannot start; the message says why in one line."""


def resolve_api_key(config: Config) -> str | None:
    """`upstream.api_key_file`, then systemd's `$CREDENTIALS_DIRECTORY`, then `$ANTHROPIC_API_KEY`."""
    candidates = []
    if config.upstream.api_key_file:
        candidates.append(Path(config.upstream.api_key_file))
    if creds := os.environ.get("CREDENTIALS_DIRECTORY"):
        if (Path(creds) / CREDENTIAL_NAME).exists():
            candidates.append(Path(creds) / CREDENTIAL_NAME)
    for path in candidates:
        try:
            key = path.read_text().strip()
        except OSError as exc:
            raise StartupError(f"cannot read the API key file {path}: {exc.strerror}") from None
        if not key:
            raise StartupError(f"the API key file {path} is empty")
        return key
    return os.environ.get("ANTHROPIC_API_KEY") or None


def raise_fd_limit() -> int:
    """The soft open-file limit raised to the hard one; returns it (`RLIM_INFINITY` counts as very large)."""
    # Every request in flight holds a client socket and an upstream socket; 1024 is far too few.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard if hard != resource.RLIM_INFINITY else 1 << 30


class Daemon:
    def __init__(
        self,
        config: Config,
        *,
        config_path: str | None = None,
        simulate: bool = False,
        simulator: Simulator | None = None,
        log_write: Callable[[bytes], object] | None = None,
        registry: CollectorRegistry | None = None,
        rng: random.Random | None = None,
        api_key: str | None = None,
        admin_peer_check: Any = None,
        wall_clock: Callable[[], float] = time.time,
        notifier: Notifier | None = None,
        listen_sockets: Mapping[str, list[socket.socket]] | None = None,
    ) -> None:
        self.config = config
        self.config_path = config_path
        self.simulate = simulate or simulator is not None
        self.simulator = simulator
        self.metrics = Metrics(registry)
        self._log_write = log_write
        self._rng = rng
        self._api_key = api_key
        self._admin_peer_check = admin_peer_check
        self._wall = wall_clock
        self._shutdown = trio.Event()
        self.started_at = 0.0
        self.nofile = 0  # the open-file limit, once raised at start
        self.ready = False  # serving: a failure from now on is not a start-up failure
        self.sim_url: str | None = None
        self.metrics_address: tuple[str, int] | None = None
        self.engine: Engine | None = None
        self.server: AppServer | None = None
        self.http: HttpFace | None = None
        self.http_address: tuple[str, int] | None = None
        self.prompts: PromptStore | None = None
        self.cache: ResponseCache | None = None
        self.cache_store: SqliteStore | None = None
        self.state_file: state.StateFile | None = None
        self.state_error: str | None = None
        self.spend_error: str | None = None
        self.traffic: Traffic | None = None
        self.alert_sinks: AlertSinks | None = None
        self.quality: QualityPipeline | None = None
        self._switches_changed = trio.Event()  # a fallback route switch began: its expiry is due
        self._state_lock = trio.Lock()
        # systemd: the notify socket (a no-op without one), and sockets passed by socket activation.
        self.notifier = notifier if notifier is not None else Notifier.from_environment()
        self._listen_sockets = dict(listen_sockets or {})
        self._listening: dict[str, str] = {}  # "app"/"admin" -> the path actually served
        self.activated: list[str] = []  # which of them systemd passed

    STATUS_INTERVAL_S = 10.0  # how often STATUS= goes to systemd

    @property
    def socket_path(self) -> str:
        return self._listening.get("app", self.config.server.socket)

    @property
    def admin_socket_path(self) -> str:
        return self._listening.get("admin", self.config.admin.socket)

    def shutdown(self) -> None:
        """Begin a graceful drain (what SIGTERM does)."""
        self._shutdown.set()

    # ------------------------------------------------------------------ running

    async def run(self, *, task_status: trio.TaskStatus[Daemon] = trio.TASK_STATUS_IGNORED) -> None:
        config = self.config
        self.started_at = trio.current_time()
        api_key = self._api_key or (SIM_API_KEY if self.simulate else resolve_api_key(config))
        try:
            write = self._log_write or open_destination(config.log.destination)
        except OSError as exc:
            raise StartupError(f"cannot open the log file {config.log.destination}: {_reason(exc)} "
                               '(set log.destination to a writable file, or "stderr")') from None
        log = self.log = JsonLog(
            write,
            level=config.log.level,
            redactor=Redactor([api_key] if api_key else []),
        )
        route_library_logging(log)
        self.notifier.on_error = lambda reason: log.warning("sd_notify_failed", reason=reason)
        if api_key is None and not self.simulate and _uses_provider(config, "anthropic"):
            raise StartupError(
                "no Anthropic API key: set ANTHROPIC_API_KEY or upstream.api_key_file, or run with --simulate"
            )
        if _uses_provider(config, "bedrock") and not _importable("botocore"):
            # The SDK signs Bedrock calls and decodes its streams with botocore: fail now, not on the first stream.
            raise StartupError("bedrock targets need botocore: pip install 'sidecard[bedrock]'")
        if _uses_provider(config, "vertex") and not self.simulate and not _importable("google.auth"):
            # Google credentials (application default, service account) are loaded by google-auth.
            raise StartupError("vertex targets need google-auth: pip install 'sidecard[vertex]'")
        self.nofile = raise_fd_limit()
        return_memory_eagerly()
        up = config.upstream
        pool = ConnectionPool(
            max_connections=up.max_connections,
            max_idle_per_origin=up.max_idle_connections,
            idle_timeout_s=up.idle_timeout_s,
            connect_timeout_s=up.connect_timeout_s,
        )
        try:
            async with trio.open_nursery() as services:
                await services.start(pool.run)
                if self.notifier.watchdog_interval_s is not None:
                    services.start_soon(self._ping_watchdog, self.notifier.watchdog_interval_s)
                credentials: dict[str, str] = {}
                if self.simulate:
                    self.sim_url = await self._start_simulator(services)
                    credentials = {"bedrock": SIM_API_KEY, "vertex": SIM_API_KEY}
                upstream = Upstream(
                    pool,
                    api_key=api_key,
                    base_url=up.base_url,
                    anthropic_version=up.anthropic_version,
                    fast_path=up.fast_path,
                    provider_credentials=credentials,
                    redirect_to=self.sim_url,
                )
                try:
                    await upstream.prepare(_targets(config))
                    await self._serve(config, upstream, services, task_status)
                finally:
                    with trio.CancelScope(shield=True), trio.move_on_after(5):
                        await upstream.aclose()
                services.cancel_scope.cancel()
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(5):
                await pool.aclose()

    async def _start_simulator(self, services: trio.Nursery) -> str:
        from .sim import Simulator, serve_sim  # only a simulated run needs it

        if self.simulator is None:
            self.simulator = Simulator(seed=0, latency_ms=self.config.sim.latency_ms)
        sim = self.config.sim
        url: str = await _start_tcp(services, "the simulated upstream", f"{sim.host}:{sim.port}",
                                    "set [sim] port = 0 for any free port", serve_sim, self.simulator, sim.host, sim.port)
        return url

    async def _serve(
        self, config: Config, upstream: Upstream, services: trio.Nursery, task_status: trio.TaskStatus[Daemon]
    ) -> None:
        log = self.log
        self.prompts = await self._start_prompts(services)
        self.cache, self.cache_store = await self._start_cache(services)
        self.traffic = await self._start_traffic(services)
        engine = self.engine = Engine(
            config, upstream, metrics=self.metrics, log=log, prompts=self.prompts, cache=self.cache,
            traffic=self.traffic, rng=self._rng,
        )
        if self.cache_store is not None:
            engine.on_cache_store = self.cache_store.put
        await self._start_quality(services, engine)
        self._restore_state()
        budget = BufferBudget(config.server.max_incomplete_bytes)  # one for both faces
        server = self.server = AppServer(engine, config=config.server, metrics=self.metrics, log=log, budget=budget)
        if config.metrics.enabled:
            host, port = parse_address(config.metrics.address)
            # The fixed default port is taken when a second daemon runs on the host (`make run` beside a service).
            self.metrics_address = await _start_tcp(
                services, "metrics", config.metrics.address,
                "another sidecard on this host? Run with --metrics off or --metrics 127.0.0.1:PORT, or set [metrics] address",
                serve_metrics, self.metrics.registry, host, port,
            )
        passed = _activated_sockets(self._listen_sockets, log)
        # The app socket first: a socket directory the daemon creates takes the app socket's group.
        app_socket = self._listen("app", passed, config.server.socket, config.server.socket_mode, config.server.socket_group)
        try:
            admin_socket = self._listen("admin", passed, config.admin.socket, config.admin.socket_mode, config.admin.socket_group)
        except BaseException:
            app_socket.unlink()
            raise
        http_sockets = self._http_listeners(config, passed, admin_socket, app_socket)
        admin = AdminServer(self, **({"peer_check": self._admin_peer_check} if self._admin_peer_check else {}))
        # The app and admin sockets keep accepting when descriptors run out (process.py); the HTTP face is capped.
        listener = ReservedListener(trio.SocketListener(app_socket.sock), FdReserve())
        admin_listener = ReservedListener(trio.SocketListener(admin_socket.sock), FdReserve())
        http_connections = min(config.http.max_connections, max(1, self.nofile // 4))
        accepting, accepting_http = trio.CancelScope(), trio.CancelScope()
        try:
            services.start_soon(trio.serve_listeners, admin.handle, [admin_listener])
            async with trio.open_nursery() as handlers:

                async def accept() -> None:
                    with accepting:
                        await trio.serve_listeners(server.handle, [listener], handler_nursery=handlers)

                services.start_soon(accept)
                if http_sockets:
                    face = self.http = HttpFace(engine, log)

                    async def accept_http() -> None:
                        with accepting_http:
                            await serve_http(
                                face.handle, http_sockets[1], handler_nursery=handlers,
                                max_connections=http_connections, idle_timeout_s=config.http.idle_timeout_s,
                                budget=budget, refusal=face.refusal,
                                on_error=lambda exc: log.internal_error("http_server", exc),
                            )

                    services.start_soon(accept_http)
                log.info(
                    "started",
                    version=__version__,
                    pid=os.getpid(),
                    socket=app_socket.path,
                    admin_socket=admin_socket.path,
                    http_socket=http_sockets[0].path if http_sockets else None,
                    http_address=_address(self.http_address),
                    http_max_connections=http_connections if http_sockets else None,
                    nofile=self.nofile,
                    **({"socket_activated": self.activated} if self.activated else {}),
                    metrics=_address(self.metrics_address),
                    simulate=self.simulate,
                    sim_url=self.sim_url,
                    config=self.config_path,
                    routes={name: target_names(engine.routes.get(name).targets) for name in engine.routes.names()},  # type: ignore[union-attr]
                )
                self.ready = True
                task_status.started(self)
                self.notifier.ready(f"serving on {app_socket.path}")
                if self.notifier.enabled:
                    services.start_soon(self._report_status)
                await self._shutdown.wait()
                accepting_http.cancel()
                await self._drain(server, accepting, listener, app_socket, handlers)
        finally:
            listener.reserve.close()
            admin_listener.reserve.close()
            app_socket.unlink()
            admin_socket.unlink()
            if http_sockets:
                http_sockets[0].unlink()

    def _http_listeners(
        self, config: Config, passed: dict[str, socket.socket], *bound: BoundSocket
    ) -> tuple[BoundSocket, list[trio.SocketListener]] | None:
        """The HTTP face's Unix socket (and loopback TCP port, if configured), or None when it is off."""
        if not config.http.enabled:
            return None
        try:
            http_socket = self._listen("http", passed, config.http.socket, config.http.socket_mode, config.http.socket_group)
        except BaseException:
            for other in bound:
                other.unlink()
            raise
        listeners = [trio.SocketListener(http_socket.sock)]
        if config.http.address:
            host, port = parse_address(config.http.address)
            sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((host, port))
                sock.listen(4096)
            except OSError as exc:
                sock.close()
                http_socket.unlink()
                for other in bound:
                    other.unlink()
                raise StartupError(f"cannot serve HTTP on {config.http.address}: {_reason(exc)} "
                                   "(choose another [http] address, or remove it to serve on the Unix socket alone)") from None
            self.http_address = sock.getsockname()[:2]
            listeners.append(trio.SocketListener(trio.socket.from_stdlib_socket(sock)))
        return http_socket, listeners

    async def _drain(
        self, server: AppServer, accepting: trio.CancelScope, listener: ReservedListener, bound: BoundSocket,
        handlers: trio.Nursery,
    ) -> None:
        grace = self.config.server.drain_grace_s
        engine = self.engine
        assert engine is not None
        self.log.info("draining", in_flight=engine.in_flight, grace_s=grace)
        self.notifier.stopping(f"draining: {engine.in_flight} requests in flight, grace {grace:g}s")
        accepting.cancel()
        await listener.aclose()
        bound.unlink()
        server.drain()
        if self.http is not None:
            self.http.draining = True
        with trio.move_on_after(grace) as waited:
            await server.wait_idle()
            if self.http is not None:
                await self.http.wait_idle()
        cancelled = engine.in_flight if waited.cancelled_caught else 0
        if cancelled:
            self.log.warning("drain_timeout", cancelled_requests=cancelled)
        handlers.cancel_scope.cancel()
        self.log.info("stopped", cancelled_requests=cancelled)

    # ------------------------------------------------------------------ systemd

    def _listen(
        self, name: str, passed: dict[str, socket.socket], path: str, mode: int, group: str | None
    ) -> BoundSocket:
        """The socket systemd passed as `name` if there is one (systemd owns it), else bind `path`."""
        sock = passed.get(name)
        if sock is None:
            bound = _bind(path, mode, group)
        else:
            try:
                bound = adopt_unix(sock, name)
            except SocketInUse as exc:
                raise StartupError(str(exc)) from None
            self.activated.append(name)
        self._listening[name] = bound.path
        return bound

    async def _ping_watchdog(self, interval_s: float) -> None:
        """WATCHDOG=1 from inside the loop: if the loop stalls, the pings stop and systemd restarts us."""
        while True:
            self.notifier.watchdog()
            await trio.sleep(interval_s)

    async def _report_status(self) -> None:
        while True:
            await trio.sleep(self.STATUS_INTERVAL_S)
            self.notifier.status(self.status_line())

    def requests_served(self) -> int:
        """Requests answered so far, any outcome. Summed from the one counter family every STATUS_INTERVAL_S
        rather than counted on the request path: nothing is added to the hot path for this."""
        total = 0.0
        for family in self.metrics.requests.metric.collect():
            total += sum(s.value for s in family.samples if s.name.endswith("_total"))
        return int(total)

    def status_line(self) -> str:
        """One line for `systemctl status`: requests served, in flight, connections, breakers."""
        engine, server = self.engine, self.server
        if engine is None or server is None:
            return "starting"
        states: dict[str, list[str]] = {}
        for health, _ in engine.breakers():
            states.setdefault(health.breaker.state.name.lower().replace("_", "-"), []).append(health.name)
        breakers = ", ".join(
            f"{len(names)} {state}" + ("" if state == "closed" else f" ({' '.join(sorted(names))})")
            for state, names in sorted(states.items())
        )
        return (
            ("draining; " if server.draining else "")
            + f"requests: {self.requests_served()} served, {engine.in_flight} in flight; "
            f"{server.connections} connections; breakers: {breakers or 'none'}"
        )

    # ------------------------------------------------------------------ parts

    def _relative(self, path: str) -> Path:
        """Paths in a config file are relative to that file's directory."""
        resolved = Path(path)
        if not resolved.is_absolute() and self.config_path:
            resolved = Path(self.config_path).parent / resolved
        return resolved

    def prompt_directory(self) -> str | None:
        directory = self._relative(self.config.prompts.directory)
        return str(directory) if directory.is_dir() else None

    async def _start_prompts(self, services: trio.Nursery) -> PromptStore:
        directory = self.prompt_directory()
        store = PromptStore(directory, rng=self._rng, builtins={JUDGE_PROMPT: BUILTIN_RUBRIC.encode()})
        if directory is None:
            self.log.warning("no_prompt_directory", directory=self.config.prompts.directory)
            return store
        self._prompts_loaded(store.reload())
        if self.config.prompts.watch:

            async def on_change() -> None:
                self._prompts_loaded(await store.reload_async())

            await services.start(watch_directory, directory, on_change)
        return store

    def _prompts_loaded(self, snapshot: Snapshot) -> None:
        errors = self.prompts.errors() if self.prompts is not None else snapshot.errors  # None: the first load
        self.metrics.prompt_reloads("errors" if snapshot.errors else "ok").inc()
        self.metrics.prompt_load_errors.set(len(errors))
        self.log.event(
            "prompts_loaded",
            "warning" if errors else "info",
            prompts=sorted(snapshot.prompts),
            errors=[{"file": e.path, "reason": e.reason} for e in errors],
        )

    def count_prompt_errors(self) -> None:
        """Files refused and overrides naming a missing version, after the overrides changed."""
        assert self.prompts is not None
        self.metrics.prompt_load_errors.set(len(self.prompts.errors()))

    def firing_on(self, prompt: str, version: int) -> list[AlertEvent]:
        """Quality alerts firing now on PROMPT's VERSION (any model)."""
        if self.quality is None:
            return []
        return [e for e in self.quality.monitor.firing() if e.key[0] == prompt and e.key[1] == str(version)]

    def guard_prompt_traffic(self, name: str, before: Effective, after: Effective, *, force: bool, clearing: bool) -> str | None:
        """An admin op must not quietly give traffic back to a version whose quality alert fires (the monitor acts
        only when an alert first fires). `prompt clear` keeps such a canary stopped; any other op is refused
        without `force`. Forced, the version's alerts are re-measured: if it still fails they fire, and act, again.
        Returns a note for the operator, if any."""
        assert self.prompts is not None
        for version in _gaining(before, after):
            alerts = self.firing_on(name, version)
            if not alerts:
                continue
            what = "; ".join(f"{e.signal} = {e.value:.2f} on {e.key[2]}, floor {e.threshold:.2f}" for e in alerts)
            if force:
                assert self.quality is not None
                for event in alerts:
                    self.quality.monitor.remeasure(event.key)
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

    def _cache_dropped(self, cache: ResponseCache, store: SqliteStore | None, keys: list[str]) -> None:
        if store is not None:
            store.delete(keys)
        self.metrics.cache_entries.set(len(cache))
        self.metrics.cache_bytes.set(cache.bytes)

    def _cache_undecodable(self, count: int) -> None:
        """Counted every time, logged the first time: a damaged file may hold many such entries."""
        self.metrics.cache_undecodable.inc()
        if count == 1:
            self.log.warning("cache_entry_undecodable", action="dropped, answered as a miss",
                             more="further ones are counted in sidecard_cache_undecodable_total, not logged")

    async def _start_cache(self, services: trio.Nursery) -> tuple[ResponseCache | None, SqliteStore | None]:
        settings = self.config.cache
        if not settings.enabled:
            return None, None
        cache = ResponseCache(
            max_entries=settings.max_entries, max_bytes=settings.max_bytes, max_entry_bytes=settings.max_entry_bytes
        )
        cache.on_drop = lambda keys: self._cache_dropped(cache, None, keys)  # entries found expired on lookup
        cache.on_undecodable = self._cache_undecodable
        if settings.store != "sqlite":
            return cache, None
        store = SqliteStore(str(self._relative(settings.path)), wall=self._wall)
        try:
            entries = await store.open_async(cache)
        except (OSError, sqlite3.Error) as exc:
            # The cache is an optimisation: without its file the daemon still serves, from memory.
            self.log.error("cache_store_unavailable", path=store.path, reason=str(exc))
            return cache, None
        if store.moved_aside:
            self.log.error("cache_store_corrupt", path=store.path, moved_to=store.moved_aside, reason=store.open_error)
        for key, entry in entries:
            cache.put(key, entry)
        cache.on_drop = lambda keys: self._cache_dropped(cache, store, keys)
        self.metrics.cache_entries.set(len(cache))
        self.metrics.cache_bytes.set(cache.bytes)
        self.log.info("cache_loaded", path=store.path, entries=len(cache))
        await services.start(store.run_writer)
        return cache, store

    async def _start_traffic(self, services: trio.Nursery) -> Traffic:
        """Rate limits, queues and throttling always; budgets with their durable spend file when configured."""
        config = self.config
        budgets = [Budget.of(b) for b in config.budgets]
        if budgets:
            store = SpendStore(
                str(self._relative(config.spend.path)),
                flush_interval_s=config.spend.flush_interval_s,
                on_error=lambda problem: self.log.error("spend_store_write_failed", reason=problem),
            )
            ledger, problem = store.load(budgets)
            if problem is not None:
                self.log.error("spend_store_corrupt", reason=problem)
                self.spend_error = problem
            await services.start(store.run, ledger)
        else:
            ledger = SpendLedger([])
        traffic = Traffic(config, ledger, metrics=self.metrics, log=self.log, wall=self._wall, on_alert=self.alert)
        if budgets:
            await services.start(traffic.run)
        return traffic

    def alert(self, event: dict[str, Any]) -> None:
        """An operational alert (a budget's soft limit, ...): to the alert sinks (webhook, command) if any."""
        if self.alert_sinks is not None:
            self.alert_sinks.submit(event)

    async def _start_quality(self, services: trio.Nursery, engine: Engine) -> None:
        """Alert sinks (shared with budget alerts) and, when enabled, the quality pipeline."""
        q = self.config.quality
        log = self.log
        if q.webhook_url or q.command:
            self.alert_sinks = AlertSinks(
                log=lambda event: None if isinstance(event, dict) else log_alert(log, event),
                webhook_url=q.webhook_url,
                webhook_retries=q.webhook_retries,
                command=q.command,
                on_drop=lambda: self.metrics.quality_dropped("alerts").inc(),
                on_delivery=lambda sink, ok: None if ok else log.warning("alert_delivery_failed", sink=sink),
            )
            await services.start(self.alert_sinks.run)
        if not q.enabled:
            return
        pipeline = self.quality = QualityPipeline(
            q, complete=lambda request: engine.complete(request, internal=True), metrics=self.metrics, log=log, sinks=self.alert_sinks,
            on_alert=self._quality_action, wall=self._wall, rng=self._rng,
        )
        await services.start(pipeline.run)
        services.start_soon(self._expire_quality_switches, pipeline)
        engine.quality = pipeline

    async def _quality_action(self, event: AlertEvent) -> None:
        """Act on a quality alert: roll a failing canary back, else switch the prompt to its fallback route."""
        engine, prompts, pipeline = self.engine, self.prompts, self.quality
        if engine is None or prompts is None or pipeline is None:
            return
        if await self._rollback_canary(event):
            return  # the rollback is the remedy: that version gets no more traffic
        name, version, model = event.key
        scope = self.config.quality.prompts.get(name)
        route = scope.fallback_route_on_alert if scope is not None else None
        if scope is None or route is None:
            return
        if event.state == "firing" and not self._serves(name, version):
            return  # e.g. a canary rolled back a moment ago: switching the route cannot help
        if event.state == "resolved":
            ended = pipeline.switches.resolve(name, (event.key, event.signal))
            if ended is not None:
                self._quality_switch_ended(ended, "resolved", event.reason)
            return
        fallback = engine.routes.get(route)
        if fallback is not None and any(t.model == model for t in fallback.targets):
            return  # an alert about the fallback itself: switching to it again cannot help
        switch = pipeline.switches.fire(name, (event.key, event.signal), route, scope.fallback_hold_s, trio.current_time())
        if switch is None:
            return  # already switched: the alert joins the switch's causes
        engine.alert_routes[name] = route
        self.metrics.quality_route_switched(name).set(1)
        self._switches_changed.set()
        pipeline.actions.appendleft({
            "action": "route_switched", "prompt": name, "route": route, "version": version, "model": model,
            "signal": event.signal, "value": round(event.value, 4), "hold_s": scope.fallback_hold_s, "at": round(self._wall(), 3),
        })
        self.log.warning("admin", op="quality.route_switch", args={"prompt": name, "route": route}, peer="quality-monitor",
                         result="ok", before=None, after=switch.describe(trio.current_time()), reason=event.reason)

    def _serves(self, prompt: str, version: str) -> bool:
        """Whether PROMPT's VERSION ("-": any) still answers requests (as its stable or canary version)."""
        assert self.prompts is not None
        try:
            effective = self.prompts.effective(prompt)
        except SidecardError:
            return False
        return version == "-" or version in (str(effective.stable), str(effective.canary))

    async def _rollback_canary(self, event: AlertEvent) -> bool:
        """Roll the prompt's canary back if a firing alert is about it; True if it did."""
        engine, prompts, pipeline = self.engine, self.prompts, self.quality
        assert engine is not None and prompts is not None and pipeline is not None
        name, version, model = event.key
        if event.state != "firing" or not self.config.quality.auto_rollback_canary or name not in prompts.snapshot.prompts:
            return False
        effective = prompts.effective(name)
        if effective.canary is None or str(effective.canary) != version:
            return False
        before, after = prompts.stop_canary(name)
        action = {"action": "canary_rolled_back", "prompt": name, "version": effective.canary, "model": model,
                  "signal": event.signal, "value": round(event.value, 4), "at": round(self._wall(), 3)}
        pipeline.actions.appendleft(action)
        self.metrics.quality_rollbacks(name).inc()
        # The same audit line an operator's rollback writes, with the monitor as the actor.
        self.log.warning("admin", op="prompt.canary_rollback", args={"prompt": name}, peer="quality-monitor",
                         result="ok", before=before.describe(), after=after.describe(), reason=event.reason)
        try:
            await self.save_state()
        except SidecardError:
            pass  # logged by save_state; the rollback itself is in force
        return True

    def end_quality_switch(self, prompt: str) -> dict[str, Any] | None:
        """An operator ends PROMPT's fallback route switch (`sidecardctl quality unswitch`); None if there is none."""
        pipeline = self.quality
        switch = pipeline.switches.end(prompt) if pipeline is not None else None
        if switch is None:
            return None
        view = switch.describe(trio.current_time())
        self._quality_switch_ended(switch, "operator", "ended by an operator")
        return view

    def _quality_switch_ended(self, switch: Switch, why: str, reason: str) -> None:
        """Traffic back on the prompt's own route; unless its alerts resolved, they are re-measured there."""
        engine, pipeline = self.engine, self.quality
        assert engine is not None and pipeline is not None
        engine.alert_routes.pop(switch.prompt, None)
        self.metrics.quality_route_switched(switch.prompt).set(0)
        if why != "resolved":
            for key, _signal in switch.causes:
                pipeline.monitor.remeasure(key)
        pipeline.actions.appendleft({"action": "route_switch_ended", "prompt": switch.prompt, "route": switch.route,
                                     "why": why, "at": round(self._wall(), 3)})
        if why != "operator":  # an operator's call has the admin socket's own audit line
            self.log.warning("admin", op="quality.route_switch_end", args={"prompt": switch.prompt, "route": switch.route},
                             peer="quality-monitor", result="ok", before=switch.describe(trio.current_time()), after=None,
                             why=why, reason=reason)

    async def _expire_quality_switches(self, pipeline: QualityPipeline) -> None:
        """End each fallback route switch when its hold is over (its original model gets no samples meanwhile)."""
        while True:
            deadline = pipeline.switches.next_expiry()
            with trio.move_on_at(math.inf if deadline is None else deadline):
                await self._switches_changed.wait()
            self._switches_changed = trio.Event()
            for switch in pipeline.switches.expired(trio.current_time()):
                hold = switch.expires_at - switch.since
                self._quality_switch_ended(switch, "expired", f"held for {hold:g}s without samples of the original model")

    def flush_cache(self, *, feature: str | None = None, prompt: str | None = None) -> int:
        if self.cache is None:
            return 0
        keys = self.cache.flush(feature=feature, prompt=prompt)
        if self.cache_store is not None:
            self.cache_store.delete(keys)
        self.metrics.cache_entries.set(len(self.cache))
        self.metrics.cache_bytes.set(self.cache.bytes)
        return len(keys)

    # ------------------------------------------------------------------ operator state

    def wall_now(self) -> float:
        return self._wall()

    def _clock_shift(self) -> float:
        """Wall clock minus the daemon's clock: converts times for the state file."""
        return self._wall() - trio.current_time()

    def _restore_state(self) -> None:
        engine = self.engine
        assert engine is not None and self.prompts is not None
        self.state_file = state_file = state.StateFile(str(self._relative(self.config.state.path).absolute()))
        path = str(state_file.path)
        if leftovers := state_file.remove_leftovers():
            self.log.info("state_temp_files_removed", path=path, removed=leftovers)
        try:
            saved = state_file.load()
        except state.CorruptState as exc:
            if self.config.state.on_corrupt == "refuse":
                raise StartupError(
                    f"the state file {path} cannot be read ({exc.reason}); it may hold kill switches that must stay on: "
                    f'inspect it, then move it aside, or set [state] on_corrupt = "open", to start without it'
                ) from None
            moved_to = state_file.move_aside(self._wall())
            self.state_error = f"{path}: {exc.reason} (moved to {moved_to or '(could not be moved)'})"
            self.metrics.state_discarded.set(1)
            self.log.error("state_corrupt", path=path, reason=exc.reason, moved_to=moved_to, on_corrupt="open")
            saved = state.State()  # from the config alone, with a new salt saved below
        if saved.salt:
            engine.user_salt = bytes.fromhex(saved.salt)
        else:  # first start: fix the salt now, so user pseudonyms (and per-user spend) survive restarts
            saved.salt = engine.user_salt.hex()
            try:
                self.state_file.save(saved)
            except OSError as exc:
                self.log.error("state_save_failed", path=str(self.state_file.path), reason=exc.strerror)
        shift = self._clock_shift()
        now = engine.now()
        for stored in saved.kills:
            switch = state.kill_from_disk(stored, shift)
            if not switch.expired(now):
                engine.kills.set(switch)
        for name, stack in saved.routes.items():
            if engine.routes.get(name) is not None:
                engine.routes.overrides[name] = stack
        engine.configure(engine.config)
        for name, stored in saved.prompts.items():
            self.prompts.overrides[name] = Override(stored.stable, stored.canary, stored.canary_percent, stored.canary_cleared)
            self.prompts.history[name] = list(stored.history)
        kills = engine.kills.active(now)
        self.metrics.kill_switches.set(len(kills))
        if kills or engine.routes.overrides or self.prompts.overrides:
            # A warning: what an operator (or a try-out) left in force, and how to undo each, before serving.
            self.log.warning(
                "state_restored",
                path=path,
                kills=[self.describe_kill(k) for k in kills],
                route_overrides={name: target_names(stack[-1]) for name, stack in sorted(engine.routes.overrides.items())},
                prompt_overrides={name: effective.describe() for name in sorted(self.prompts.overrides)
                                  if (effective := self.prompts.effective_or_none(name)) is not None},
                undo="sidecardctl unkill SCOPE; sidecardctl route rollback ROUTE; sidecardctl prompt clear PROMPT",
            )
        self.count_prompt_errors()
        for problem in self.prompts.override_problems():
            self.log.error("prompt_override_missing", file=problem.path, reason=problem.reason)

    async def save_state(self) -> None:
        """Persist operator state; raises `SidecardError` if the disk refuses (the change is then not acked)."""
        engine, prompts, state_file = self.engine, self.prompts, self.state_file
        assert engine is not None and prompts is not None and state_file is not None
        shift = self._clock_shift()
        snapshot = state.State(
            salt=engine.user_salt.hex(),
            kills=[state.kill_to_disk(k, shift) for k in engine.kills.active(engine.now())],
            routes={name: [list(ts) for ts in stack] for name, stack in engine.routes.overrides.items()},
            prompts={
                name: state.StoredPrompt(
                    stable=o.stable, canary=o.canary, canary_percent=o.canary_percent, canary_cleared=o.canary_cleared,
                    history=list(prompts.history.get(name, [])),
                )
                for name, o in prompts.overrides.items()
            },
        )
        async with self._state_lock:
            try:
                await trio.to_thread.run_sync(state_file.save, snapshot)
            except OSError as exc:
                self.log.error("state_save_failed", path=str(state_file.path), reason=exc.strerror)
                raise SidecardError(Code.INTERNAL, f"applied, but could not be saved to {state_file.path}: {exc.strerror}") from None

    # ------------------------------------------------------------------ reload and status

    async def reload(self) -> dict[str, Any]:
        """Re-read the config file and the prompts (SIGHUP, or the admin op). A bad config is refused.

        systemd sees RELOADING=1 before and READY=1 after, refused or not (the daemon serves either way).
        """
        self.notifier.reloading("reloading config and prompts")
        outcome = "reload refused, the running config stays"
        try:
            result = await self._reload()
            outcome = "reloaded"
            return result
        finally:
            self.notifier.reloaded(f"{outcome}; {self.status_line()}")

    async def _reload(self) -> dict[str, Any]:
        result: dict[str, Any] = {"config": None, "prompts": None}
        engine = self.engine
        assert engine is not None and self.prompts is not None
        if self.config_path:
            try:
                fresh = load(self.config_path)
            except ConfigError as exc:
                self.log.error("reload_refused", reason=str(exc))
                raise SidecardError(Code.BAD_REQUEST, f"config refused, the running one stays: {exc}") from None
            needs_restart = [
                section
                for section in (
                    "server", "admin", "http", "upstream", "metrics", "cache", "state", "prompts", "log", "sim",
                    "spend", "budgets", "quality",
                )
                if msgspec.to_builtins(getattr(fresh, section)) != msgspec.to_builtins(getattr(self.config, section))
            ]
            # Sections bound at start-up (sockets, pool, stores) keep their running values until a restart.
            try:
                applied = msgspec.structs.replace(fresh, **{section: getattr(self.config, section) for section in needs_restart})
            except ValueError as exc:  # e.g. a route removed that a kept section (budgets, quality) still names
                self.log.error("reload_refused", reason=str(exc), needs_restart=needs_restart)
                raise SidecardError(Code.BAD_REQUEST, f"config refused, the running one stays: {exc} (the running "
                                    f"{', '.join(needs_restart)} still apply until a restart)") from None
            await engine.upstream.prepare(_targets(applied))  # a new Bedrock or Vertex target needs the SDK path
            dropped = engine.configure(applied)
            self.config = applied
            result["config"] = {"applied": True, "needs_restart": needs_restart, "route_overrides_dropped": dropped}
        snapshot = await self.prompts.reload_async()
        self._prompts_loaded(snapshot)
        result["prompts"] = {"loaded": sorted(snapshot.prompts), "errors": len(snapshot.errors)}
        self.log.info("reloaded", **result)
        return result

    def describe_kill(self, switch: KillSwitch | None) -> dict[str, Any] | None:
        if switch is None:
            return None
        now = trio.current_time()
        return {
            "scope": switch.scope,
            "mode": switch.mode,
            "text": switch.text,
            "reason": switch.reason,
            "expires_in_s": None if switch.expires_at is None else round(switch.expires_at - now, 3),
        }

    def status(self) -> dict[str, Any]:
        engine, prompts, server = self.engine, self.prompts, self.server
        assert engine is not None and prompts is not None and server is not None
        breakers = {(h.target.provider, h.target.model, h.target.base_url): (h, wait) for h, wait in engine.breakers()}
        routes = {}
        for name in engine.routes.names():
            route = engine.routes.get(name)
            assert route is not None
            targets = []
            for t in route.targets:
                health, wait = breakers.get((t.provider, t.model, t.base_url), (engine.health(t), 0.0))
                targets.append(
                    {"provider": t.provider, "model": t.model, "breaker": health.breaker.state.name.lower(), "retry_in_s": round(wait, 3)}
                )
            routes[name] = {
                "targets": targets,
                "overridden": name in engine.routes.overrides,
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
        return {
            "version": __version__,
            "pid": os.getpid(),
            "uptime_s": round(trio.current_time() - self.started_at, 3),
            "config": self.config_path,
            "socket": self.socket_path,
            "simulate": self.simulate,
            "in_flight": engine.in_flight,
            "connections": server.connections,
            "draining": server.draining,
            "routes": routes,
            "prompts": prompt_status,
            "prompt_errors": [{"file": e.path, "reason": e.reason} for e in prompts.errors()],
            "kills": [self.describe_kill(k) for k in engine.kills.active(engine.now())],
            "cache": None
            if cache is None
            else {
                "entries": len(cache),
                "bytes": cache.bytes,
                "max_entries": cache.max_entries,
                "max_bytes": cache.max_bytes,
                "store": "sqlite" if self.cache_store is not None else "memory",  # memory if the file was unusable
            },
            "state_error": self.state_error,
            "quality": None if self.quality is None else {
                "firing": len(self.quality.monitor.firing()), "actions": list(self.quality.actions)[:5],
                "switches": self.quality.switches.describe(trio.current_time()),
            },
        }


def _bind(path: str, mode: int, group: str | None) -> BoundSocket:
    try:
        return bind_unix(path, mode=mode, group=group)
    except SocketInUse as exc:
        raise StartupError(str(exc)) from None
    except OSError as exc:
        hint = "choose a shorter path" if exc.strerror is None else "choose a directory the daemon can write to"
        raise StartupError(f"cannot listen on {path}: {_reason(exc)} ({hint}: --socket, or the socket keys "
                           "of [server], [admin] and [http])") from None


async def _start_tcp(services: trio.Nursery, what: str, address: str, hint: str, serve: Any, *args: Any) -> Any:
    """Start a TCP service; an address it cannot bind is a `StartupError` saying what to do."""
    try:
        return await services.start(serve, *args)
    except* OSError as group:
        raise StartupError(f"cannot serve {what} on {address}: {_reason(first_leaf(group))} ({hint})") from None


def _reason(exc: OSError) -> str:
    return exc.strerror or str(exc)  # e.g. "AF_UNIX path too long" has no strerror


def _activated_sockets(passed: dict[str, list[socket.socket]], log: JsonLog) -> dict[str, socket.socket]:
    """Sockets from systemd by role: `app` and `admin` (FileDescriptorName=); a lone unnamed fd is the app socket."""
    if not passed:
        return {}
    if list(passed) == [UNNAMED] and len(passed[UNNAMED]) == 1:
        return {"app": passed[UNNAMED][0]}
    chosen: dict[str, socket.socket] = {}
    for name, socks in passed.items():
        if name not in ("app", "admin", "http"):
            log.warning("socket_activation_ignored", name=name, fds=[s.fileno() for s in socks])
            for s in socks:
                s.close()  # our copy only: systemd keeps its own
            continue
        if len(socks) > 1:
            raise StartupError(f"systemd passed {len(socks)} sockets named {name!r}; give each its own FileDescriptorName=")
        chosen[name] = socks[0]
    return chosen


def _gaining(before: Effective, after: Effective) -> list[int]:
    """The versions AFTER gives a larger share of traffic than BEFORE did."""

    def share(e: Effective, version: int) -> float:
        return (100.0 - e.canary_percent if version == e.stable else 0.0) + (e.canary_percent if version == e.canary else 0.0)

    return [v for v in dict.fromkeys((after.stable, after.canary)) if v is not None and share(after, v) > share(before, v)]


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # its parent package is missing
        return False


def _targets(config: Config) -> list[Target]:
    return [t for r in config.routes.values() for t in r.targets]


def _uses_provider(config: Config, provider: str) -> bool:
    return any(t.provider == provider for t in _targets(config))


def _address(address: tuple[str, int] | None) -> str | None:
    return None if address is None else f"{address[0]}:{address[1]}"
