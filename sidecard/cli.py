"""`sidecard`: run the daemon, the simulated upstream, or check a config file."""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
from typing import Any

import msgspec
import trio

from . import __version__
from .closedpipe import EXIT_UNREACHABLE, EXIT_USAGE, quiet_on_closed_pipe
from .config import (
    Config, ConfigError, config_relative, default_socket_path, kept_files, load, parse_address, read_toml, with_overrides,
)
from .errors import describe_validation_error, first_leaf
from .fleet.settings import StoreSecretError, parse_url


def _fail(message: str, status: int = EXIT_USAGE) -> None:
    print(f"sidecard: {message}", file=sys.stderr)
    sys.exit(status)


def _warn(message: str) -> None:
    print(f"sidecard: warning: {message}", file=sys.stderr)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sidecard", description="A production-reliability sidecar for Claude.")
    parser.add_argument("--version", action="version", version=f"sidecard {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser("serve", help="run the daemon", description="Run the daemon in the foreground.")
    serve.add_argument("--config", metavar="FILE", default=os.environ.get("SIDECARD_CONFIG") or None,
                       help="TOML config file (default: $SIDECARD_CONFIG, else built-in defaults)")
    serve.add_argument("--socket", metavar="PATH", help="app socket path (overrides server.socket)")
    serve.add_argument("--admin-socket", metavar="PATH", help="admin socket path (overrides admin.socket)")
    serve.add_argument("--metrics", metavar="ADDR", help="metrics HOST:PORT, or 'off' (overrides [metrics])")
    serve.add_argument("--simulate", action="store_true",
                       help="answer from the built-in simulated upstream instead of Anthropic")

    sim = commands.add_parser("sim", help="run the simulated Anthropic upstream alone",
                              description="Serve the simulated Messages API (and its /_sim control endpoint).")
    sim.add_argument("--host", default="127.0.0.1")
    sim.add_argument("--port", type=int, default=8787)
    sim.add_argument("--latency-ms", type=float, default=0.0, help="added to every answer")
    sim.add_argument("--seed", type=int, default=0, help="seed for fault rates")
    sim.add_argument("--requests-per-minute", type=int, metavar="N",
                     help="the account's request limit: advertised in the rate-limit headers and enforced with 429s "
                          "(default: 4000 advertised, never enforced)")
    sim.add_argument("--tokens-per-minute", type=int, metavar="N",
                     help="the account's token limit, like --requests-per-minute (default: 2,000,000 advertised)")
    sim.add_argument("--fault", action="append", default=[], metavar="MODEL=SPEC",
                     help="a fault from the start, as POST /_sim/faults would set it; repeatable. SPEC: KEY=VALUE,... "
                          "(e.g. claude-sonnet-4-6=status=529,rate=0.5; MODEL '*' for every model) or a JSON object. "
                          "See docs/simulator.md")

    commands.add_parser("eval", help="run an eval set through the daemon and gate on regressions", add_help=False,
                        description="sidecard eval PROMPT --version N --set FILE.jsonl: see `sidecard eval --help`.")

    check = commands.add_parser("check-config", help="validate a config file without starting",
                                description="Validate a config file; exit 0 if it is good, 2 with the reason if not.")
    check.add_argument("file")

    call = commands.add_parser("call", help="send NDJSON frames from stdin to the app socket, print the replies",
                               description="Send each line of stdin to the daemon's app socket as a frame and print "
                                           "every reply line, until the daemon has answered them all (no socat needed). "
                                           "Exit status 3 if the daemon cannot be reached, as for sidecardctl.")
    call.add_argument("--socket", help="the app socket (default: $SIDECARD_SOCKET, else the per-user default)")

    token = commands.add_parser("new-token", help="make an app token for the HTTP face (access control)",
                                description="Print a new random token for APP, and the line that goes in the "
                                            "credentials file (its SHA-256: the file never holds the token).")
    token.add_argument("app")
    audit = commands.add_parser("audit-export", help="print audit records between two times, as JSON lines",
                                description="Print the audit trail's records from DIRECTORY ([safety.audit] directory) "
                                            "as JSON lines, oldest first; a torn last line is skipped and counted.")
    audit.add_argument("directory")
    audit.add_argument("--since", metavar="TIME", help="ISO 8601 (2026-03-02T14:00:00Z) or Unix seconds")
    audit.add_argument("--until", metavar="TIME", help="ISO 8601 or Unix seconds")
    return parser


@quiet_on_closed_pipe
def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["eval"]:
        from .evaltool import main as eval_main

        sys.exit(eval_main(argv[1:]))
    args = _parser().parse_args(argv)
    if args.command == "check-config":
        _check_config(args.file)
    elif args.command == "new-token":
        _new_token(args.app)
    elif args.command == "call":
        _call(args.socket or default_socket_path())
    elif args.command == "audit-export":
        _audit_export(args)
    elif args.command == "sim":
        _run_sim(args)
    else:
        _run_serve(args)


def _call(path: str) -> None:
    """Frames from stdin, replies to stdout: the writing side is shut after the last frame, and the daemon closes
    once it has answered everything in flight (protocol.md: half-close)."""
    import socket
    import threading

    def send_all() -> None:
        with contextlib.suppress(OSError):  # the daemon closed first: its replies say why
            for line in sys.stdin.buffer:
                conn.sendall(line)
            conn.shutdown(socket.SHUT_WR)

    with socket.socket(socket.AF_UNIX) as conn:
        try:
            conn.connect(path)
        except OSError as exc:
            _fail(f"cannot connect to {path}: {_why(exc)} (is `sidecard serve` running? --socket or $SIDECARD_SOCKET)",
                  EXIT_UNREACHABLE)
        # Written beside the reading, so a long input never waits on replies nobody reads (the daemon stops reading
        # a client that does not read).
        threading.Thread(target=send_all, daemon=True).start()
        try:
            while data := conn.recv(65536):
                sys.stdout.buffer.write(data)
                sys.stdout.buffer.flush()
        except KeyboardInterrupt:
            sys.exit(130)
        except OSError as exc:
            _fail(f"the connection to {path} failed: {_why(exc)}", EXIT_UNREACHABLE)


def _why(exc: OSError) -> str:
    """The OS's words for EXC; its own text when it has none (a socket path too long for AF_UNIX)."""
    return exc.strerror or str(exc)


def _check_config(path: str) -> None:
    from .durable import require_regular
    from .errors import StartupError
    from .safety.rules import check

    try:
        config = load(path)
        check(config, path)
        for kept, setting in kept_files(config, os.path.abspath(path)):
            require_regular(kept, setting)  # as `serve` would refuse it
        if config.fleet is not None:
            config.fleet.address(config_dir=os.path.dirname(path))  # the store's password, as serve reads it (never shown)
    except (ConfigError, StartupError) as exc:
        _fail(str(exc))
    except StoreSecretError as exc:
        _fail(f"{path}: {exc}")
    problem = _unservable_experiment(config, path)
    if problem is not None:
        _fail(f"{path}: {problem}")
    from .pricing import unpriced_models, unpriced_problem

    for each in unpriced_models(config):  # a warning, not a refusal: a model newer than the table must still start
        _warn(f"{path}: {each.where}: {unpriced_problem(each.model)}")
    routes = ", ".join(f"{name} ({len(r.targets)} targets)" for name, r in config.routes.items())
    fleet = "" if config.fleet is None else f"; fleet: {parse_url(config.fleet.url)} namespace {config.fleet.namespace}"
    print(f"{path}: ok; routes: {routes}; socket: {config.server.socket}{fleet}")


def _unservable_experiment(config: Config, path: str) -> str | None:
    """An experiment of prompt versions the prompt directory does not have: `serve` would start without it
    (`experiment_refused` in its log), so checking the config says so first."""
    experiments = [spec for spec in config.experiments if spec.prompt is not None]
    if not experiments:
        return None
    from .errors import SidecardError
    from .prompts.registry import PromptStore

    directory = config_relative(config.prompts.directory, path)
    if not directory.is_dir():
        return f"experiment {experiments[0].name}: prompt {experiments[0].prompt}: the prompt directory {directory} does not exist"
    store = PromptStore(directory)
    store.reload()
    for spec in experiments:
        for arm in spec.arms:
            try:
                store.resolve(spec.prompt, version=arm.version)  # type: ignore[arg-type]
            except SidecardError as err:
                return f"experiment {spec.name}, arm {arm.name}: {err.message}"
    return None


def _new_token(app: str) -> None:
    from .safety.access import hash_token, new_token

    token = new_token()
    print(f"token for {app} (give it to the app as its API key; it is not kept anywhere): {token}")
    print(f"credentials file line, under [tokens]:\n{app} = \"{hash_token(token)}\"")


def _audit_export(args: argparse.Namespace) -> None:
    from .safety.audit import Export

    try:
        export = Export(args.directory, _when(args.since, "--since"), _when(args.until, "--until"))
        out = sys.stdout.buffer
        for line in export:
            out.write(line)
        out.flush()
    except OSError as exc:
        _fail(f"{args.directory}: {exc.strerror or exc}")
    if export.skipped:
        print(f"sidecard: skipped {export.skipped} unreadable lines", file=sys.stderr)


def _when(text: str | None, flag: str) -> float | None:
    from datetime import datetime

    if text is None:
        return None
    try:
        return float(text)
    except ValueError:
        pass
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
    except ValueError:
        _fail(f"{flag}: {text!r} is neither ISO 8601 nor Unix seconds")
        raise


def _flag_overrides(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """What the command line's flags change in the config (at start, and in every config a reload reads)."""
    overrides: dict[str, dict[str, Any]] = {}
    if args.socket:
        overrides.setdefault("server", {})["socket"] = args.socket
        # The admin and HTTP sockets follow the app socket unless the config file places them itself.
        directory = os.path.dirname(args.socket) or "."
        for section, name in (("admin", "admin.sock"), ("http", "http.sock")):
            if not _socket_configured(args.config, section) and not (section == "admin" and args.admin_socket):
                overrides.setdefault(section, {})["socket"] = os.path.join(directory, name)
    if args.admin_socket:
        overrides.setdefault("admin", {})["socket"] = args.admin_socket
    if args.metrics:
        if args.metrics == "off":
            overrides["metrics"] = {"enabled": False}
        else:
            try:
                parse_address(args.metrics)
            except ValueError as exc:
                _fail(f"--metrics: {exc}")
            overrides["metrics"] = {"enabled": True, "address": args.metrics}
    return overrides


def _socket_configured(path: str | None, section: str) -> bool:
    if not path:
        return False
    try:
        return bool(read_toml(path).get(section, {}).get("socket"))
    except (OSError, ValueError):  # (unreadable, not UTF-8, not TOML: `load` says which)
        return False


def _run_serve(args: argparse.Namespace) -> None:
    from .systemd import Notifier, listen_fds

    notifier = Notifier.from_environment()  # no-ops unless systemd started us
    try:
        config = load(args.config)
    except ConfigError as exc:
        notifier.status(f"config error: {exc}")
        _fail(str(exc))
    flags = _flag_overrides(args)
    try:
        config = with_overrides(config, flags)
    except msgspec.ValidationError as exc:
        _fail(f"command line: {describe_validation_error(exc)}")
    # Imported only once the config is good: a bad one fails as fast as check-config.
    from .daemon import Daemon
    from .errors import StartupError

    daemon = Daemon(
        config,
        config_path=os.path.abspath(args.config) if args.config else None,
        config_overrides=flags,
        simulate=args.simulate,
        notifier=notifier,
        listen_sockets=listen_fds(),  # socket activation; {} without it
    )
    try:
        trio.run(_serve_until_signalled, daemon)
    except* (StartupError, OSError) as group:
        failure = first_leaf(group)
        if isinstance(failure, OSError):
            if daemon.ready:
                raise
            # Any other file or address the daemon could not use while starting: one line, never a traceback.
            where = f"{failure.filename}: " if failure.filename else ""
            message = f"cannot start: {where}{failure.strerror or failure} (check the path or address in the config)"
        else:
            message = str(failure)
        notifier.status(f"failed to start: {message}")
        _fail(message)


async def _serve_until_signalled(daemon: Any) -> None:
    from .process import freeze_startup_heap

    async with trio.open_nursery() as nursery:
        nursery.start_soon(_on_signals, daemon, nursery.cancel_scope)
        async with trio.open_nursery() as serving:
            await serving.start(daemon.run)
            freeze_startup_heap()  # the process is the daemon's alone (unlike the tests' in-process daemons)
        nursery.cancel_scope.cancel()


async def _on_signals(daemon: Any, scope: trio.CancelScope) -> None:
    from .errors import SidecardError

    async def reload() -> None:
        try:
            await daemon.reload()
        except SidecardError:
            pass  # refused and logged; the running config stays

    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        drains = 0
        async with trio.open_nursery() as reloads:
            async for signum in signals:
                if signum == signal.SIGHUP:
                    if daemon.control is not None:
                        reloads.start_soon(reload)
                    continue
                drains += 1
                if drains == 1:
                    daemon.shutdown()  # stop accepting, finish in-flight work within the grace period
                else:
                    scope.cancel()  # a second signal: stop now


def _run_sim(args: argparse.Namespace) -> None:
    from .sim import Fault, Simulator, serve_sim
    from .sim.faults import parse_fault_option

    faults: dict[str, Fault] = {}
    for option in args.fault:
        try:
            model, fault = parse_fault_option(option)
        except ValueError as exc:
            _fail(f"--fault {exc}")
        faults[model] = fault  # a later --fault for the same model wins, as a later POST /_sim/faults would
    for flag, value in (("--requests-per-minute", args.requests_per_minute), ("--tokens-per-minute", args.tokens_per_minute)):
        if value is not None and value < 1:
            _fail(f"{flag} must be at least 1")

    async def run() -> None:
        simulator = Simulator(
            seed=args.seed, latency_ms=args.latency_ms, requests_per_minute=args.requests_per_minute,
            tokens_per_minute=args.tokens_per_minute, faults=faults,
        )
        async with trio.open_nursery() as nursery:
            url = await nursery.start(serve_sim, simulator, args.host, args.port)
            print(f"sidecard sim: serving the Messages API on {url} (control: {url}/_sim/stats)", file=sys.stderr, flush=True)
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                async for _ in signals:
                    nursery.cancel_scope.cancel()
                    return

    try:
        trio.run(run)
    except* OSError as group:
        _fail(f"cannot serve on {args.host}:{args.port}: {first_leaf(group).strerror}")
