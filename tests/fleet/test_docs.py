"""docs/fleet.md is what an operator acts on: its store settings start a real server, its ACL line gives a user
that can run fleet mode, its commands parse, and the keys, metrics, alerts, panels and log lines it names exist.
(Its TOML examples load: tests/test_docs_config.py.)"""

from __future__ import annotations

import contextlib
import json
import re
import shlex
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import msgspec

from sidecard import ctl
from sidecard.config import load
from sidecard.control.backend import State
from sidecard.fleet.devserver import LocalStore, find_server
from sidecard.fleet.heartbeat import Heartbeat, beat, instances
from sidecard.fleet.keys import Keys
from sidecard.fleet.scripts import Admit, Admitted, RateCheck, RequestPath
from sidecard.fleet.settings import FleetSettings
from sidecard.fleet.state import FleetStateStore
from sidecard.observe.metrics import Metrics

ROOT = Path(__file__).parents[2]
DOC = (ROOT / "docs" / "fleet.md").read_text()


def shell_lines(starting: str) -> list[str]:
    return [line.split("  #")[0].strip() for block in re.findall(r"```sh\n(.*?)```", DOC, re.DOTALL)
            for line in block.splitlines() if line.startswith(starting)]


@contextlib.contextmanager
def doc_server(directory: str) -> Iterator[LocalStore]:
    """The doc's redis-server line, run here: on loopback, on a free port and a Unix socket, its ACL file in DIRECTORY."""
    (command,) = shell_lines("redis-server ")
    args = shlex.split(command)[1:]
    args[args.index("--bind") + 1] = "127.0.0.1"  # the doc's private address is not on this machine
    args[args.index("--port") + 1] = "0"
    acl_file = Path(directory) / "users.acl"
    acl_file.touch()  # created empty before the first start, as the doc says
    args[args.index("--aclfile") + 1] = str(acl_file)
    sock = f"{directory}/doc.sock"
    process = subprocess.Popen([find_server(), *args, "--dir", directory, "--unixsocket", sock],
                               cwd=directory, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        store = LocalStore.__new__(LocalStore)  # only its `command`, on the doc's server
        store.socket_path = sock
        for _ in range(500):
            try:
                if store.command("PING") == b"PONG":
                    break
            except OSError:
                time.sleep(0.01)  # the server starting, as devserver.LocalStore waits for it
        yield store
    finally:
        process.terminate()
        process.wait(timeout=10)


def test_the_store_settings_start_a_real_server(short_tmp):
    with doc_server(short_tmp) as store:
        assert store.command("CONFIG", "GET", "appendonly") == [b"appendonly", b"yes"]
        assert store.command("CONFIG", "GET", "maxmemory-policy") == [b"maxmemory-policy", b"noeviction"]


def test_the_acl_user_survives_a_restart_of_the_store(short_tmp):
    (setuser,) = shell_lines("redis-cli ACL SETUSER")
    (save,) = shell_lines("redis-cli ACL SAVE")
    args = shlex.split(setuser)[1:]
    with doc_server(short_tmp) as store:
        assert store.command(*args) == b"OK"
        assert store.command(*shlex.split(save)[1:]) == b"OK"
    with doc_server(short_tmp) as store:  # restarted: the user is read back from the ACL file
        assert store.command("AUTH", args[2], args[4].removeprefix(">")) == b"OK"


async def test_the_acl_line_gives_a_user_that_can_run_fleet_mode(store_server, connect):
    (command,) = shell_lines("redis-cli ACL SETUSER")
    args = shlex.split(command)[1:]
    assert store_server.command(*args) == b"OK"
    user, password = args[2], args[4].removeprefix(">")
    try:
        url = f"unix://{user}:{password}@{store_server.socket_path}"
        connection = await connect(url=url)
        keys = Keys("sidecard")  # the doc's namespace, which the user is limited to
        path = RequestPath(connection, keys)
        assert isinstance(await path.admit(Admit(1e9, rates=[RateCheck("global", "requests", 1.0, 5.0)], cache_key="k",
                                                 cache_mode="lead", lease_token="t")), Admitted)
        store = FleetStateStore(connection, keys, instance="doc")
        assert await store.save(State(salt="00"), 0) == 1
        await beat(connection, keys, Heartbeat(instance="doc", version="0", config_hash="x"), ttl_s=15, now=1e9)
        assert [h.instance for h in await instances(connection, keys, now=1e9)] == ["doc"]
        other = RequestPath(connection, Keys("another-app"))
        assert "NOPERM" in str(await _refused(other))  # another namespace is out of reach
    finally:
        store_server.command("ACL", "DELUSER", user)
        store_server.command("DEL", *(k for k in store_server.command("KEYS", "{sidecard}:*")))


async def _refused(path: RequestPath) -> Exception:
    try:
        await path.admit(Admit(1e9, rates=[RateCheck("global", "requests", 1.0, 5.0)]))
    except Exception as exc:  # noqa: BLE001 (the test wants the error itself)
        return exc
    raise AssertionError("another namespace was reachable")


def test_the_sidecardctl_commands_parse():
    commands = shell_lines("sidecardctl ")
    assert any(c.startswith("sidecardctl fleet") for c in commands)
    for command in commands:
        assert ctl._frame(ctl._parser().parse_args(shlex.split(command)[1:]))["op"]


def test_every_key_block_is_the_defaults(tmp_path):
    block = next(b for b in re.findall(r"```toml\n(.*?)```", DOC, re.DOTALL) if "[fleet.breaker]" in b)
    (tmp_path / "fleet.toml").write_text(block)
    loaded = load(tmp_path / "fleet.toml").fleet
    assert loaded == msgspec.convert({"url": loaded.url}, FleetSettings)
    documented = set(re.findall(r"^(\w+) = ", block, re.M)) | set(re.findall(r"^# (\w+) = ", block, re.M))
    fields = set(FleetSettings.__struct_fields__) | {"l2", "max_entry_bytes", "lease_ms", "consecutive_failures", "failure_rate",
                                                     "min_volume", "window_s", "cooldown_s", "bucket_s", "retention_s",
                                                     "flush_interval_s"}
    assert fields - {"breaker", "cache", "quality"} <= documented


def test_the_metrics_alerts_panels_and_log_lines_it_names_exist():
    exported = {m._name for m in (getattr(a, "metric", a) for a in vars(Metrics()).values()) if hasattr(m, "_name")}
    named = set(re.findall(r"`(sidecard_fleet_\w+?)(?:_total)?(?:\{[^}]*\})?`", DOC))
    assert named and named <= exported, named - exported
    alerts = set(re.findall(r"- alert: (\w+)", (ROOT / "deploy" / "alerts.yml").read_text()))
    assert {"SidecardFleetStoreDown", "SidecardFleetMembersDisagree", "SidecardFleetStateStale"} <= alerts
    assert set(re.findall(r"`(SidecardFleet\w+)`", DOC)) <= alerts
    panels = json.loads((ROOT / "deploy" / "grafana-dashboard.json").read_text())["panels"]
    assert any(p["type"] == "row" and p["title"] == "Fleet" for p in panels)
    source = "".join(p.read_text() for p in (ROOT / "sidecard").rglob("*.py"))
    for event in set(re.findall(r"`(fleet_[a-z_]+)`", DOC)):
        assert f'"{event}"' in source, event


def test_the_reply_shown_is_what_sidecardctl_prints():
    printed = ctl.render({"op": "kill", "ok": True, "before": None, "after": {"scope": "feature:chat"}, "result": {"kept": "fleet"}})
    assert "  fleet-wide: every sidecar of the namespace applies it" in printed
    assert "fleet-wide: every sidecar of the namespace applies it" in DOC
