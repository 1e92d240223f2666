"""Assembles the daemon from its parts and runs it: start-up, serving, graceful drain.

The parts are built in dependency order, each given what it needs (nothing is assigned after construction):
operator state first (the engine reads it), then the engine, the quality pipeline that judges through it, and
the control layer that operates them all, which the admin socket is given. Ownership: `Daemon.run` owns two
nurseries. `services` holds what lives as long as the daemon (metrics endpoint, simulated upstream, prompt
watcher, cache writer, admin socket, accept loop); `handlers` holds client connections and so every request in
flight. Shutdown stops accepting, lets `handlers` finish within the grace period, then cancels it.

Under systemd (see systemd.py) the daemon reports READY=1 once it serves, STATUS= lines, WATCHDOG=1 pings
from inside the Trio loop, RELOADING=1 around a reload and STOPPING=1 when the drain starts; sockets passed
by socket activation are served instead of bound (listeners.py). Without systemd none of this does anything.

At a little over 500 lines this module is kept whole on purpose: it is the one place that knows every part, and
the assembly (`_serve`) reads best as one sequence from the first part built to the drain.
"""

from __future__ import annotations

import importlib.util
import os
import random
import socket
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec
import trio
from prometheus_client import CollectorRegistry

from . import __version__
from .admin import AdminServer
from .cache import ResponseCache
from .cache_store import SqliteStore, start_cache
from .config import Config, ConfigError, config_relative, jobs_path, kept_files, parse_address, written_paths
from .control import Control, prompts_loaded, prompts_settled, unpriced_warned
from .control.backend import CorruptState, LocalFileBackend, SaveFailed
from .control.experiments import ExperimentControl
from .control.fleet import FleetBackend, FleetMonitor, FleetQuality, FleetSync, keeping_own, replayed
from .control.quality import QualityRemedies
from .control.state import OperatorState
from .durable import require_regular, require_written
from .engine import Engine
from .engine.jobs import JobDesk
from .errors import StartupError, first_leaf
from .experiments.feedback import Issued
from .fleet.errors import StoreError
from .fleet.flushes import FlushFollower
from .fleet.gate import FleetGate
from .fleet.heartbeat import Heartbeat, Release
from .fleet.node import FleetNode, config_hash
from .fleet.quality import QualityBatch
from .fleet.settings import StoreSecretError
from .fleet.state import FleetStateStore
from .engine.account import Sink
from .engine.usage import UsageSink
from .faces.http import HttpFace
from .faces.ndjson import AppServer
from .httpserver import serve_http
from .jobs.store import JobStore
from .jobs.store import StoreError as JobStoreError
from .limits.spend import Budget, SpendLedger
from .limits.spend_store import SpendStore
from .metrics_endpoint import serve_metrics
from .observe.log import JsonLog, LineBatcher, open_destination, route_library_logging
from .observe.metrics import Metrics
from .observe.redact import Redactor
from .policies.buffers import BufferBudget
from .listeners import Sockets, reason, start_tcp
from .loop.experiments import ExperimentBook
from .loop.feedback import FeedbackDesk
from .loop.review import ReviewDesk
from .loop.shadow import ShadowMirror
from .process import FdReserve, ReservedListener, raise_fd_limit, return_memory_eagerly
from .prompts.registry import PromptStore
from .prompts.watcher import watch_directory
from .quality.checks import Sample
from .quality.judge import BUILTIN_RUBRIC, JUDGE_PROMPT
from .quality.monitor import QualityMonitor
from .quality.pipeline import QualityPipeline, SampleQueue, log_alert
from .quality.sinks import AlertSinks
from .routes import RouteTable, target_names
from .safety import rules as safety_rules
from .safety.access import AccessControl, CredentialsError, load_credentials
from .safety.audit import AuditDirectoryError, AuditLog, AuditSink
from .safety.audit import channel as audit_channel
from .safety.audit import run_writer as run_audit_writer
from .safety.settings import SafetySettings
from .systemd import Notifier
from .pricing import PriceTable
from .tracing.spans import Ids
from .traffic import Traffic
from .usage.anomalies import SpendWatch
from .usage.store import UsageRecord, UsageStore, UsageWriter, open_store
from .unixsock import BoundSocket
from .upstream.client import Upstream
from .upstream.pool import ConnectionPool

if TYPE_CHECKING:
    from .sim import Simulator
    from .tracing.recorder import Recorder

SIM_API_KEY = "sim-key-not-a-secret"
CREDENTIAL_NAME = "anthropic_api_key"  # systemd LoadCredential= name


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


class Daemon:
    def __init__(
        self,
        config: Config,
        *,
        config_path: str | None = None,
        config_overrides: Mapping[str, Mapping[str, Any]] | None = None,
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
        jobs_store_in_thread: bool = True,
    ) -> None:
        """`jobs_store_in_thread=False`: the job store's calls run on the event loop (tests on a mock clock)."""
        self._config = config
        self.config_path = config_path
        self.config_overrides = config_overrides or {}  # the command line's flags, kept on every reload
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
        # The parts, once built (for status, and for tests to look at).
        self.pool: ConnectionPool | None = None
        self.engine: Engine | None = None
        self.control: Control | None = None
        self.server: AppServer | None = None
        self.http: HttpFace | None = None
        self.prompts: PromptStore | None = None
        self.cache: ResponseCache | None = None
        self.cache_store: SqliteStore | None = None
        self.traffic: Traffic | None = None
        self.quality: QualityPipeline | None = None
        self.alert_sinks: AlertSinks | None = None
        self.feedback: FeedbackDesk | None = None
        self.jobs: JobDesk | None = None
        self._upstream_key: str | None = None
        self._jobs_store_in_thread = jobs_store_in_thread
        self.fleet: FleetNode | None = None
        self.fleet_gate: FleetGate | None = None
        self._spend_error: str | None = None
        self._spend_stores: list[SpendStore] = []
        self.recorder: Recorder | None = None  # tracing on: the span pipeline
        self.usage_store: UsageStore | None = None
        self.usage_writer: UsageWriter | None = None
        self.spend_watch: SpendWatch | None = None
        # systemd: the notify socket (a no-op without one), and sockets passed by socket activation.
        self.notifier = notifier if notifier is not None else Notifier.from_environment()
        self._listen_sockets = dict(listen_sockets or {})
        self.sockets: Sockets | None = None

    STATUS_INTERVAL_S = 10.0  # how often STATUS= goes to systemd

    @property
    def config(self) -> Config:
        """The config in force: the control layer's once it runs (a reload replaces it)."""
        return self.control.config if self.control is not None else self._config

    @property
    def socket_path(self) -> str:
        return self.sockets.paths.get("app", self.config.server.socket) if self.sockets else self.config.server.socket

    @property
    def admin_socket_path(self) -> str:
        return self.sockets.paths.get("admin", self.config.admin.socket) if self.sockets else self.config.admin.socket

    @property
    def activated(self) -> list[str]:
        """The sockets systemd passed (socket activation), by role."""
        return self.sockets.activated if self.sockets else []

    @property
    def http_address(self) -> tuple[str, int] | None:
        """The HTTP face's loopback TCP address, if it has one."""
        return self.sockets.http_address if self.sockets else None

    def shutdown(self) -> None:
        """Begin a graceful drain (what SIGTERM does)."""
        self._shutdown.set()

    # ------------------------------------------------------------------ running

    async def run(self, *, task_status: trio.TaskStatus[Daemon] = trio.TASK_STATUS_IGNORED) -> None:
        config = self.config
        self.started_at = trio.current_time()
        api_key = self._upstream_key = self._api_key or (SIM_API_KEY if self.simulate else resolve_api_key(config))
        batcher = None  # the log file's lines written in batches, off the request path (not a test's own writer)
        try:
            write = self._log_write or (batcher := LineBatcher(open_destination(config.log.destination)))
        except OSError as exc:
            raise StartupError(f"cannot open the log file {config.log.destination}: {reason(exc)} "
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
        for path, setting in kept_files(config, self.config_path):
            require_regular(path, setting)
        unpriced_warned(config, log)
        self.nofile = raise_fd_limit()
        return_memory_eagerly()
        up = config.upstream
        pool = self.pool = ConnectionPool(
            max_connections=up.max_connections,
            max_idle_per_origin=up.max_idle_connections,
            idle_timeout_s=up.idle_timeout_s,
            connect_timeout_s=up.connect_timeout_s,
        )
        try:
            async with trio.open_nursery() as services:
                if batcher is not None:
                    await services.start(batcher.run)
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
                    await upstream.prepare(config.targets())
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
        url: str = await start_tcp(services, "the simulated upstream", f"{sim.host}:{sim.port}",
                                    "set [sim] port = 0 for any free port", serve_sim, self.simulator, sim.host, sim.port)
        return url

    async def _serve(
        self, config: Config, upstream: Upstream, services: trio.Nursery, task_status: trio.TaskStatus[Daemon]
    ) -> None:
        log, metrics, wall = self.log, self.metrics, self._wall
        settings, access, audit = await self._start_safety(config, services)
        # Each app's own rate limit and budget, as limits of scope app:NAME (read by traffic control from here on).
        config = self._config = safety_rules.with_app_limits(config, settings)
        prompts = self.prompts = await self._start_prompts(services)
        self.cache, self.cache_store = await start_cache(
            config.cache, str(self._relative(config.cache.path)), services, metrics=metrics, log=log, wall=wall
        )
        q = config.quality
        sinks = self.alert_sinks = await self._start_alert_sinks(services)
        traffic = self.traffic = await self._start_traffic(services, sinks)
        routes = RouteTable(config.routes)
        book = ExperimentBook(user_salt=lambda: state.salt, rng=self._rng)
        state_file = LocalFileBackend(str(self._relative(config.state.path).absolute()))
        node = backend = None
        if config.fleet is not None:
            try:
                address = config.fleet.address(config_dir=str(self._relative(".")))
            except StoreSecretError as exc:
                raise StartupError(f"{self.config_path or 'the config'}: {exc}") from None
            node = self.fleet = FleetNode(config.fleet, metrics=metrics, log=log, wall=wall, address=address)
            backend = await self._join_fleet(node, state_file, services)
        state = OperatorState(backend or state_file, routes=routes, prompts=prompts, metrics=metrics, log=log, wall=wall,
                              experiments=book, budgets=traffic.ledger if node is not None else None)
        state.restore(config.state.on_corrupt)
        sync = gate = None
        if node is not None and backend is not None:
            sync = FleetSync(state, backend, resync_interval_s=node.settings.resync_interval_s, metrics=metrics, log=log, wall=wall,
                             rng=self._rng)
            sync.watcher.version = backend.version
            sync.watcher.attach(node.subscriber)
            node.on_up.append(sync.watcher.poke)
            if self.cache is not None:
                flushes = FlushFollower(node.connection, node.keys, self.cache, resync_interval_s=node.settings.resync_interval_s,
                                        wall=wall)
                flushes.attach(node.subscriber)
                await services.start(flushes.run)
            await services.start(node.subscriber.run)
            await services.start(sync.run)
            gate = self.fleet_gate = FleetGate(node, traffic, metrics=metrics, log=log, wall=wall)
            if config.budgets:  # what the store did not count, kept across a restart
                store = self._spend_store(config.spend.fleet_outage_path)
                _, problem = store.load_with(gate.restore)
                self._spend_problem(problem)
                await services.start(store.run, gate)
            await services.start(gate.run)
        monitor = QualityMonitor(q.monitor, settings_for=q.monitor_for) if q.enabled else None
        fleet_canaries = node is not None and q.enabled and q.auto_rollback_canary
        if node is not None and q.enabled:
            # The fleet judges canaries on its whole sample (FleetQuality, below), once for all of it.
            monitor = FleetMonitor(q.monitor, settings_for=q.monitor_for, batch=QualityBatch(node.settings.quality.bucket_s), wall=wall)
            q = msgspec.structs.replace(q, auto_rollback_canary=False)
        remedies = QualityRemedies(q, monitor=monitor, prompts=prompts, routes=routes, save=state.save, metrics=metrics,
                                   log=log, wall=wall)
        samples = SampleQueue(q, metrics) if q.enabled else None
        review = self._review_desk(config, book, served=lambda request_id: feedback.ledger.lookup(request_id, trio.current_time()))
        if review is not None:
            await services.start(review.run)
        feedback = self.feedback = self._feedback_desk(config, book, review)
        await services.start(feedback.run)
        mirror = ShadowMirror(config.shadows, complete=lambda request: engine.complete(request, internal=True),
                              metrics=metrics, quality=q, judge=self._judge_score if q.enabled else None, rng=self._rng)
        await services.start(mirror.run)
        span_ids, observers = await self._start_observers(services, sinks, state.salt, lambda: engine.accounting.prices)
        engine = self.engine = Engine(
            config, upstream, metrics=metrics, log=log, kills=state.kills, routes=routes, prompts=prompts,
            cache=self.cache, traffic=traffic, route_for_prompt=remedies.route_for,
            on_cache_store=_both(self.cache_store.put if self.cache_store is not None else None, gate.stored if gate else None),
            quality_sink=samples.submit if samples is not None else None, user_salt=state.salt, rng=self._rng, fleet=gate,
            audit=audit, wall=wall, clock=trio.lowlevel.current_clock().current_time,  # (trio.current_time, less two calls)
            sinks=[feedback, book, mirror, *observers, *([review.flagged] if review is not None else [])], arms=book.assign, route_models=book.route_model, span_ids=span_ids,
            named_features=book.names_feature,
        )
        if node is not None and backend is not None:
            heartbeat = self._heartbeat(node, backend, prompts)
            await services.start(node.run_heartbeats, heartbeat)
        if samples is not None and monitor is not None:
            pipeline = self.quality = QualityPipeline(
                q, samples, monitor, complete=lambda request, about: engine.complete(request, internal=True, about=about), metrics=metrics,
                log=log, sinks=sinks, on_alert=remedies.act, wall=wall, rng=self._rng,
                on_value=_values_to(book, review),
            )
            await services.start(pipeline.run)
            services.start_soon(remedies.run)
        jobs = self.jobs = await self._start_jobs(services, engine, access)
        self.control = Control(
            config, config_path=self.config_path, config_overrides=self.config_overrides, state=state, remedies=remedies, engine=engine, traffic=traffic,
            cache=self.cache, cache_store=self.cache_store, quality=self.quality, metrics=metrics, log=log, wall=wall,
            spend_error=self._spend_error, process=self._process_status, on_drain=self.shutdown, on_reload=self._reloading,
            access=access,
            experiments=ExperimentControl(config, book=book, prompts=prompts, routes=routes, metrics=metrics, log=log,
                                          wall=wall, track=engine.walker.track,
                                          alert=sinks.submit if sinks is not None else None),
            shadows=mirror, review=review,
            jobs=jobs.runner if jobs is not None else None,
            fleet=(node, sync) if node is not None and sync is not None else None,
            usage=self.usage_store, spend_watch=self.spend_watch,
        )
        services.start_soon(self.control.run_experiments)
        if fleet_canaries and node is not None and isinstance(monitor, FleetMonitor):
            canaries = FleetQuality(node, monitor.batch, execute=self.control.execute, remedies=remedies, prompts=prompts,
                                    config=config.quality, metrics=metrics, log=log, wall=wall)
            await services.start(canaries.run)
        budget = BufferBudget(config.server.max_incomplete_bytes)  # one for both faces
        server = self.server = AppServer(engine, config=config.server, metrics=metrics, log=log, budget=budget, access=access,
                                         feedback=feedback, jobs=jobs)
        if config.metrics.enabled:
            host, port = parse_address(config.metrics.address)
            # The fixed default port is taken when a second daemon runs on the host (`make run` beside a service).
            self.metrics_address = await start_tcp(
                services, "metrics", config.metrics.address,
                "another sidecard on this host? Run with --metrics off or --metrics 127.0.0.1:PORT, or set [metrics] address",
                serve_metrics, metrics.registry, host, port,
            )
        sockets = self.sockets = Sockets(self._listen_sockets, log)
        # The app socket first: a socket directory the daemon creates takes the app socket's group.
        app_socket = sockets.listen("app", config.server.socket, config.server.socket_mode, config.server.socket_group)
        try:
            admin_socket = sockets.listen("admin", config.admin.socket, config.admin.socket_mode, config.admin.socket_group)
        except BaseException:
            app_socket.unlink()
            raise
        http_sockets = sockets.http(config, admin_socket, app_socket)
        admin = AdminServer(self.control, config=config.admin, metrics=metrics, log=log,
                            **({"peer_check": self._admin_peer_check} if self._admin_peer_check else {}))
        # The app and admin sockets keep accepting when descriptors run out (process.py); the HTTP face is capped.
        listener = ReservedListener(trio.SocketListener(app_socket.sock), FdReserve(), on_shortage=self._shortage("app"))
        admin_listener = ReservedListener(trio.SocketListener(admin_socket.sock), FdReserve(), on_shortage=self._shortage("admin"))
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
                    face = self.http = HttpFace(engine, log, access, feedback, jobs, config.http)

                    async def accept_http() -> None:
                        with accepting_http:
                            # No reserve of its own (its connections are capped), but the same patience.
                            http_listeners = [ReservedListener(each, FdReserve(0), on_shortage=self._shortage("http"))
                                              for each in http_sockets[1]]
                            await serve_http(
                                face.handle, http_listeners, handler_nursery=handlers,
                                max_connections=http_connections, idle_timeout_s=config.http.idle_timeout_s,
                                write_timeout_s=config.server.client_write_timeout_s, budget=budget, refusal=face.refusal,
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
                    http_address=_address(sockets.http_address),
                    http_max_connections=http_connections if http_sockets else None,
                    nofile=self.nofile,
                    **({"socket_activated": sockets.activated} if sockets.activated else {}),
                    metrics=_address(self.metrics_address),
                    simulate=self.simulate,
                    sim_url=self.sim_url,
                    config=self.config_path,
                    routes={name: target_names(routes.get(name).targets) for name in routes.names()},  # type: ignore[union-attr]
                )
                self.ready = True
                task_status.started(self)
                self.notifier.ready(f"serving on {app_socket.path}")
                if self.notifier.enabled:
                    services.start_soon(self._report_status)
                await self._shutdown.wait()
                accepting_http.cancel()
                await self._drain(server, accepting, listener, app_socket, handlers)
                if gate is not None:
                    await gate.flush()
        finally:
            listener.reserve.close()
            admin_listener.reserve.close()
            app_socket.unlink()
            admin_socket.unlink()
            if http_sockets:
                http_sockets[0].unlink()

    def _shortage(self, listener: str) -> Callable[[OSError | None, float], None]:
        """Reports a listener's episode of accept(2) finding no descriptors (or memory): one line as it begins,
        one as it ends, and the count."""

        def report(error: OSError | None, seconds: float) -> None:
            if error is None:
                self.log.info("accept_recovered", listener=listener, after_s=round(seconds, 3))
                return
            self.metrics.accept_exhausted(listener).inc()
            self.log.error("accept_exhausted", listener=listener, reason=reason(error),
                           action="accepting again as descriptors free up; see docs/operations.md")

        return report

    async def _drain(
        self, server: AppServer, accepting: trio.CancelScope, listener: ReservedListener, bound: BoundSocket,
        handlers: trio.Nursery,
    ) -> None:
        grace = self.config.server.drain_grace_s
        engine = self.engine
        assert engine is not None
        self.log.info("draining", in_flight=engine.in_flight, grace_s=grace)
        self.notifier.stopping(f"draining: {engine.in_flight} requests in flight, grace {grace:g}s")
        if self.jobs is not None:
            self.jobs.drain()  # waits answer now; the runner stops with the services, its jobs kept
        accepting.cancel()
        await listener.aclose()
        bound.unlink()
        server.drain()
        if self.http is not None:
            self.http.drain()
        with trio.move_on_after(grace) as waited:
            await server.wait_idle()
            if self.http is not None:
                await self.http.wait_idle()
        # The requests the grace did not see finish: stopped now, each answered `shutting_down` and logged so.
        stopped = engine.in_flight if waited.cancelled_caught else 0
        if stopped:
            self.log.warning("drain_timeout", stopped_requests=stopped)
        engine.stop()  # what is cancelled now, the daemon stopped: each face's last word says `shutting_down`
        handlers.cancel_scope.cancel()
        self.log.info("stopped", stopped_requests=stopped)

    # ------------------------------------------------------------------ systemd

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
        for family in self.metrics.requests.collect():
            total += sum(s.value for s in family.samples if s.name.endswith("_total"))
        return int(total)

    def status_line(self) -> str:
        """One line for `systemctl status`: requests served, in flight, connections, breakers."""
        engine, server = self.engine, self.server
        if engine is None or server is None:
            return "starting"
        states: dict[str, list[str]] = {}
        for health, _ in engine.walker.breakers():
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

    # ------------------------------------------------------------------ fleet mode

    async def _join_fleet(self, node: FleetNode, state_file: LocalFileBackend, services: trio.Nursery) -> FleetBackend:
        """Connect to the store (waiting at most its connect timeout) and make the fleet's operator state, when the
        store has one, this sidecar's last-known state before it is restored: the fleet's kill switches are in
        force from the first request, and the pseudonym salt is the fleet's, so per-user limits are shared."""
        log = self.log
        await node.connect(services)
        store = FleetStateStore(node.connection, node.keys, instance=node.instance)
        backend = FleetBackend(state_file, store, log=log, on_version=node.beat_soon)
        try:
            version, document = await store.load()
        except StoreError as exc:
            log.warning("fleet_state_unavailable_at_start", store=str(node.address), reason=str(exc),
                        fallback=f"the last-known state in {state_file.location}")
            return backend
        if document is not None:
            try:
                own = state_file.load()
            except CorruptState:
                own = None  # (restore sets it aside)
            if own is not None and own.pending:
                # Commands taken before a restart while the store was unreachable: in force from the first request,
                # on the fleet's state, and written to the store by the first resync.
                document, backend.kept_out = replayed(document, own.pending, wall_now=self._wall())
            try:
                state_file.write(keeping_own(document, own))
            except SaveFailed as exc:
                log.error("state_save_failed", path=state_file.location, reason=exc.reason)
            backend.version = version
            self.metrics.fleet_state_version.set(version)
        return backend

    def _heartbeat(self, node: FleetNode, backend: FleetBackend, prompts: PromptStore) -> Callable[[float], Heartbeat]:
        digest, started = config_hash(self.config), self._wall()

        def make(now: float) -> Heartbeat:
            releases = {name: Release(stable=o.stable, canary=o.canary, canary_percent=o.canary_percent)
                        for name, o in sorted(prompts.overrides.items())}
            return Heartbeat(instance=node.instance, version=__version__, config_hash=digest, state_version=backend.version,
                             prompts=releases, started_at=started, sent_at=now)

        return make

    # ------------------------------------------------------------------ parts

    async def _start_safety(
        self, config: Config, services: trio.Nursery
    ) -> tuple[SafetySettings, AccessControl, AuditSink | None]:
        """The `[safety]` table checked (a bad one fails the start with its key named), the app identities and
        their tokens, and the audit writer when some feature is audited."""
        try:
            settings = safety_rules.check(config, self.config_path or "<config>")
        except ConfigError as exc:
            raise StartupError(str(exc)) from None
        # Every file the daemon will write, before anything is: a spend file it cannot write would leave a hard
        # budget to be overspent after a restart, with one log line to say so.
        require_written(written_paths(safety_rules.with_app_limits(config, settings), self.config_path,
                                      audit_directory=settings.audit.written))
        access = settings.access
        credentials = None
        if access.enabled and access.credentials_file:
            try:
                credentials = load_credentials(str(self._relative(access.credentials_file)), list(access.apps))
            except CredentialsError as exc:
                raise StartupError(str(exc)) from None
        if not settings.audit.enabled:
            return settings, AccessControl(access, credentials), None
        sink, receive = audit_channel(settings.audit)
        # Real time: the writer runs in a worker thread, and file names and retention are wall-clock facts.
        log = AuditLog(str(self._relative(settings.audit.directory)), settings.audit, self.log.redactor)
        # Both series the SidecardAuditRecordsLost alert adds up exist from the start: a sum with one absent is empty.
        self.metrics.audit_failed.source = lambda: log.failed_records
        self.metrics.audit_records("dropped")
        try:
            await services.start(run_audit_writer, receive, log)
        except* AuditDirectoryError as group:
            raise StartupError(str(first_leaf(group))) from None
        return settings, AccessControl(access, credentials), sink

    def _relative(self, path: str) -> Path:
        return config_relative(path, self.config_path)

    def prompt_directory(self) -> str | None:
        directory = self._relative(self.config.prompts.directory)
        return str(directory) if directory.is_dir() else None

    async def _start_prompts(self, services: trio.Nursery) -> PromptStore:
        directory = self.prompt_directory()
        store = PromptStore(directory, rng=self._rng, builtins={JUDGE_PROMPT: BUILTIN_RUBRIC.encode()},
                            on_settled=lambda names: prompts_settled(store, names, self.metrics, self.log))
        if directory is None:
            self.log.warning("no_prompt_directory", directory=self.config.prompts.directory)
            return store
        prompts_loaded(store, store.reload(), self.metrics, self.log, first=True)
        if self.config.prompts.watch:

            async def on_change() -> None:
                # The watcher's first tick reloads in case an edit beat it: counted and logged only if it found one.
                before = store.snapshot
                after = await store.reload_async()
                if after != before:
                    prompts_loaded(store, after, self.metrics, self.log)

            await services.start(watch_directory, directory, on_change)
        return store

    async def _judge_score(self, sample: Sample) -> float | None:
        return await self.quality.score(sample) if self.quality is not None else None

    def _review_desk(self, config: Config, book: ExperimentBook, served: Callable[[str], Issued | None]) -> ReviewDesk | None:
        if not config.review.enabled:
            return None
        return ReviewDesk(config.review, str(self._relative(config.review.path)), book=book, served=served,
                          redactor=self.log.redactor, metrics=self.metrics, wall=self._wall, rng=self._rng,
                          quality=config.quality)

    def _feedback_desk(self, config: Config, book: ExperimentBook, review: ReviewDesk | None) -> FeedbackDesk:
        """Feedback on answers; with quality monitoring on, each item is a signal to the monitor too."""

        async def to_monitor(key: tuple[str, str, str], negative: bool) -> None:
            if self.quality is not None:
                await self.quality.record_feedback(key, negative)

        listeners = [book.on_feedback] if review is None else [book.on_feedback, review.on_feedback]
        return FeedbackDesk(config.feedback, metrics=self.metrics, listeners=listeners,
                            monitor=to_monitor if config.quality.enabled else None)

    async def _start_traffic(self, services: trio.Nursery, sinks: AlertSinks | None) -> Traffic:
        """Rate limits, queues and throttling always; budgets with their durable spend file when configured."""
        config = self.config
        budgets = [Budget.of(b) for b in config.budgets]
        if budgets:
            store = self._spend_store(config.spend.path)
            ledger, problem = store.load(budgets)
            self._spend_problem(problem)
            await services.start(store.run, ledger)
        else:
            ledger = SpendLedger([])
        # An operational alert (a budget's soft limit) goes to the alert sinks (webhook, command) if any.
        traffic = Traffic(config, ledger, metrics=self.metrics, log=self.log, wall=self._wall,
                          clock=trio.lowlevel.current_clock().current_time, on_alert=sinks.submit if sinks is not None else None)
        if budgets and config.fleet is None:  # in fleet mode the gauges follow the fleet's spend (each settle)
            await services.start(traffic.run)
        return traffic

    def _spend_store(self, path: str) -> SpendStore:
        """A durable spend file, its failed writes counted (`sidecard_spend_write_failures_total`, every file's)."""
        store = SpendStore(str(self._relative(path)), flush_interval_s=self.config.spend.flush_interval_s,
                           on_error=lambda problem: self.log.error("spend_store_write_failed", reason=problem))
        self._spend_stores.append(store)
        self.metrics.spend_write_failures.source = lambda: sum(kept.write_failures for kept in self._spend_stores)
        return store

    def _spend_problem(self, problem: str | None) -> None:
        """A spend file that could not be used (set aside; spend starts from zero): logged, and in `status`."""
        if problem is not None:
            self.log.error("spend_store_corrupt", reason=problem)
            self._spend_error = self._spend_error or problem

    async def _start_jobs(self, services: trio.Nursery, engine: Engine, access: AccessControl) -> JobDesk | None:
        """Async jobs, when `[jobs]` is enabled: their store (in the state directory unless placed), the runner."""
        settings = self.config.jobs
        if not settings.enabled:
            return None
        path = jobs_path(self.config, self.config_path)
        secret = None
        if settings.webhook.allowed_prefixes:
            try:
                secret = self._relative(settings.webhook.secret_file).read_bytes().strip()
            except OSError as exc:
                raise StartupError(f"cannot read jobs.webhook.secret_file {settings.webhook.secret_file}: {reason(exc)}") from None
            if not secret:
                raise StartupError(f"jobs.webhook.secret_file {settings.webhook.secret_file} is empty")
        try:
            store = JobStore(path, synchronous=settings.synchronous)
        except JobStoreError as exc:
            raise StartupError(str(exc)) from None
        assert self.pool is not None
        desk = JobDesk(engine, store, settings, pool=self.pool, api_key=self._upstream_key,
                       anthropic_version=self.config.upstream.anthropic_version, log=self.log, metrics=self.metrics,
                       webhook_secret=secret, wall=self._wall, store_in_thread=self._jobs_store_in_thread, access=access)  # fmt: skip
        await services.start(desk.run)
        return desk

    async def _start_observers(
        self, services: trio.Nursery, alerts: AlertSinks | None, salt: bytes, prices: Callable[[], PriceTable]
    ) -> tuple[Ids | None, list[Sink]]:
        """Tracing, usage rollups and the unusual-spend watch, each an accounting sink in front of a background
        part (bounded, never slowing a request); with all three off, nothing at all."""
        config, metrics, log = self.config, self.metrics, self.log
        sinks: list[Sink] = []
        span_ids = None
        if config.tracing.enabled:
            from .engine.spans import TraceSpans
            from .tracing.recorder import Recorder

            recorder = self.recorder = Recorder(config.tracing, rng=self._rng)
            await services.start(recorder.run)
            metrics.tracing_spans.source = recorder.counts
            span_ids = recorder.ids
            sinks.append(TraceSpans(recorder, user_salt=salt, clock=trio.current_time))
        submit: list[Callable[[UsageRecord], None]] = []
        if config.usage.enabled:
            path = self._relative(config.usage.path)
            try:
                store, problem = await trio.to_thread.run_sync(open_store, path)
            except OSError as exc:
                raise StartupError(f"cannot open the usage file {path}: {reason(exc)} (set [usage] path)") from None
            if problem is not None:
                log.error("usage_store_corrupt", reason=problem)
            self.usage_store = store
            writer = self.usage_writer = UsageWriter(
                store, queue_size=config.usage.queue_size, flush_interval_s=config.usage.flush_interval_s,
                retention_s=config.usage.retention_days * 86_400, wall_clock=self._wall,
                on_error=lambda problem: log.error("usage_store_write_failed", reason=problem),
            )
            await services.start(writer.run)
            submit.append(writer.submit)
        if config.anomaly.enabled:
            watch = self.spend_watch = SpendWatch(
                config.anomaly, metrics=metrics, log=log, wall=self._wall, queue_size=config.usage.queue_size,
                on_alert=alerts.submit if alerts is not None else None,
                path=self._relative(config.anomaly.path) if config.anomaly.path else None,
            )
            await trio.to_thread.run_sync(watch.restore, self._wall())
            await services.start(watch.run)
            submit.append(watch.submit)
        if submit:
            writer, watch = self.usage_writer, self.spend_watch
            metrics.usage_records.source = lambda: {"dropped": (writer.dropped if writer else 0) + (watch.dropped if watch else 0)}
            sinks.append(UsageSink(submit, prices=prices, user_salt=salt, wall=self._wall))
        return span_ids, sinks

    async def _start_alert_sinks(self, services: trio.Nursery) -> AlertSinks | None:
        """Where alerts go besides the log (quality alerts and budget alerts alike): a webhook, a command."""
        q, log = self.config.quality, self.log
        if not (q.webhook_url or q.command):
            return None
        sinks = AlertSinks(
            log=lambda event: None if isinstance(event, dict) else log_alert(log, event),
            webhook_url=q.webhook_url,
            webhook_retries=q.webhook_retries,
            command=q.command,
            on_drop=lambda: self.metrics.quality_dropped("alerts").inc(),
            on_delivery=lambda sink, ok: None if ok else log.warning("alert_delivery_failed", sink=sink),
        )
        await services.start(sinks.run)
        return sinks

    # ------------------------------------------------------------------ control

    async def reload(self) -> dict[str, Any]:
        """Re-read the config file and the prompts (SIGHUP). A bad config is refused (`SidecardError`)."""
        assert self.control is not None
        return await self.control.reload()

    def _reloading(self, applied: bool | None) -> None:
        """systemd sees RELOADING=1 before a reload and READY=1 after, refused or not (the daemon serves either way)."""
        if applied is None:
            self.notifier.reloading("reloading config and prompts")
            return
        outcome = "reloaded" if applied else "reload refused, the running config stays"
        self.notifier.reloaded(f"{outcome}; {self.status_line()}")

    def status(self) -> dict[str, Any]:
        assert self.control is not None
        return self.control.status()

    def _process_status(self) -> dict[str, Any]:
        """The daemon's own lines of the status view."""
        engine, server = self.engine, self.server
        assert engine is not None and server is not None
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
        }


def _values_to(book: ExperimentBook, review: ReviewDesk | None) -> Callable[[Sample, str, float, list[str]], None]:
    """The quality pipeline's values of an answer (pass rate, judge score), to the experiments and the review queue."""

    def told(sample: Sample, metric: str, value: float, failed: list[str]) -> None:
        book.judged(sample.prompt, sample.version, sample.feature, sample.model, metric, value, sample.route)
        if review is not None:
            review.on_value(sample, metric, value, failed)

    return told


def _both(*calls: Callable[[str, Any], None] | None) -> Callable[[str, Any], None] | None:
    """One callback that calls each of CALLS given (None: none given)."""
    given = [c for c in calls if c is not None]
    if len(given) < 2:
        return given[0] if given else None
    return lambda key, value: [call(key, value) for call in given] and None


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # its parent package is missing
        return False


def _uses_provider(config: Config, provider: str) -> bool:
    return any(t.provider == provider for t in config.targets())


def _address(address: tuple[str, int] | None) -> str | None:
    return None if address is None else f"{address[0]}:{address[1]}"
