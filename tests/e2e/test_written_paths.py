"""Every file the daemon writes is writable, or it does not start (found by a fresh-clone trial: with the shipped
unit and config, the spend file went to the read-only /etc/sidecard; the daemon served, logged
`spend_store_write_failed`, and after a restart a hard budget began the day at $0 again).

The shipped unit and config are checked against each other; the real daemon is started (`sidecard serve` in
its own process) with its config in a read-only directory, as ProtectSystem=strict makes /etc/sidecard, and
reloaded (in this process) with a path it could not write.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from sidecard.config import load, written_paths
from sidecard.safety.rules import check
from tests.e2e.test_process import SIDECARD
from tests.e2e.test_startup_errors import failure_line
from tests.e2e.test_systemd import unit_settings
from tests.harness import admin, new_daemon

ROOT = Path(__file__).parents[2]


def writable_directories() -> list[Path]:
    """What sidecard.service lets the daemon write (systemd.exec(5)); PrivateTmp's /tmp does not outlive a stop."""
    service = unit_settings("sidecard.service")
    bases = {"StateDirectory": "/var/lib", "RuntimeDirectory": "/run", "LogsDirectory": "/var/log", "CacheDirectory": "/var/cache"}
    directories = [Path(bases[key]) / name for key in bases for value in service.get(key, []) for name in value.split()]
    directories += [Path(path.lstrip("-")) for value in service.get("ReadWritePaths", []) for path in value.split()]
    assert Path("/var/lib/sidecard") in directories
    return directories


def test_the_shipped_config_writes_only_where_the_shipped_unit_lets_it():
    """Every path the daemon could write with deploy/sidecard.toml, each part turned on (an operator adds
    [[budgets]] or enables review without thinking of paths), and its sockets, resolve under the unit's writable
    directories."""
    path = ROOT / "deploy" / "sidecard.toml"
    config = load(path)
    audit = check(config, str(path)).audit.directory
    written = written_paths(config, str(path), audit_directory=audit, every=True)
    assert {w.setting for w in written} >= {"[state] path", "[spend] path", "[cache] path", "[jobs] path", "[review] path",
                                          "[usage] path", "[anomaly] path", "[safety.audit] directory"}
    sockets = [Path(config.server.socket), Path(config.admin.socket), Path(config.http.socket)]
    allowed = writable_directories()
    outside = [f"{w.setting} {w.path}" for w in written if not any(w.path.is_relative_to(d) for d in allowed)]
    outside += [str(s) for s in sockets if not any(s.is_relative_to(d) for d in allowed)]
    assert not outside, f"written outside {', '.join(map(str, allowed))}"


def serve_read_only(etc: str, config: str) -> subprocess.CompletedProcess:
    """`sidecard serve` with ETC read-only to it, as ProtectSystem=strict makes /etc: as root (which ignores mode
    bits) in a mount namespace of its own with ETC bound read-only over itself (nothing outlives the process),
    else with ETC mode 0555."""
    command = [*SIDECARD, "serve", "--simulate", "--config", config]
    if os.geteuid() == 0:
        command = ["unshare", "--mount", "--propagation", "private", "sh", "-c", 'mount --bind -o ro "$0" "$0" && exec "$@"',
                   etc, *command]
    else:
        os.chmod(etc, 0o555)
    try:
        return subprocess.run(command, capture_output=True, text=True, timeout=60, cwd=os.path.dirname(etc))
    finally:
        os.chmod(etc, 0o755)


BUDGET = "[[budgets]]\nscope = 'global'\nwindow = 'day'\nhard_usd = 5.0\n"
# The setting left to its default (relative: into the read-only config directory) and what turns its part on.
UNWRITABLE = {
    "[spend] path": ("sidecard-spend.json", BUDGET),
    "[state] path": ("sidecard-state.json", "[state]\npath = 'sidecard-state.json'\n"),
    "[review] path": ("sidecard-review.db", "[review]\nenabled = true\n"),
    "[anomaly] path": ("sidecard-anomaly.json", "[anomaly]\nenabled = true\n"),
    "[safety.audit] directory": ("audit", "[safety.audit]\nfeatures = ['*']\n"),
    "[quality] review_log": ("review.jsonl", "[quality]\nenabled = true\nreview_log = '{etc}/review.jsonl'\n"),
}


def deployed(short_tmp: str, extra: str) -> tuple[str, str]:
    """A config in SHORT_TMP/etc (to be made read-only) that keeps its state in SHORT_TMP/lib, as the shipped
    one does, plus EXTRA; returns the config's path and the directory."""
    etc = f"{short_tmp}/etc"
    os.mkdir(etc)
    os.mkdir(f"{short_tmp}/lib")
    path = f"{etc}/sidecard.toml"
    with open(path, "w") as f:
        f.write(f"[server]\nsocket = '{short_tmp}/app.sock'\n[metrics]\nenabled = false\n"
                + ("" if "[state]" in extra else f"[state]\npath = '{short_tmp}/lib/state.json'\n") + extra.format(etc=etc))
    return path, etc


@pytest.mark.parametrize("setting", list(UNWRITABLE))
def test_a_file_it_could_not_write_refuses_the_start_naming_the_setting(short_tmp, setting):
    """Exit 2 and one line naming the setting and the path (before: the spend, state and anomaly files were only
    a log line once written, the others a line naming neither the setting). The SQLite cache is the exception: an
    optimisation, it falls back to memory (tests/e2e/test_cache.py)."""
    name, extra = UNWRITABLE[setting]
    path, etc = deployed(short_tmp, extra)
    result = serve_read_only(etc, path)
    assert result.returncode == 2
    line = failure_line(result.stderr)
    assert line.startswith(f"sidecard: {setting} {etc}/{name} cannot be written: {etc} is ")
    assert ("on a read-only file system" if os.geteuid() == 0 else f"not writable by uid {os.getuid()}") in line
    assert f"set {setting} to a path sidecard's user may write" in line
    assert not os.path.exists(f"{short_tmp}/app.sock")  # nothing was served


def test_a_missing_directory_is_judged_by_the_one_it_would_be_made_in(short_tmp):
    path, etc = deployed(short_tmp, BUDGET + "[spend]\npath = 'spend/today/spend.json'\n")
    result = serve_read_only(etc, path)
    assert f"[spend] path {etc}/spend/today/spend.json cannot be written: {etc} is " in failure_line(result.stderr)


EVERY_PART = BUDGET + """[spend]\npath = '{lib}/spend/spend.json'\n[cache]\nstore = 'sqlite'\npath = '{lib}/cache.db'
[review]\nenabled = true\npath = '{lib}/review.db'\n[anomaly]\nenabled = true\npath = '{lib}/anomaly.json'
[usage]\nenabled = true\npath = '{lib}/usage.sqlite3'\n[jobs]\nenabled = true\n[safety.audit]\nfeatures = ['*']\ndirectory = '{lib}/audit'
"""


async def test_the_shipped_layout_starts_with_every_part_on(short_tmp, nursery, sim, capture_log):
    """Every written file in the state directory (a missing directory is made there): served, nothing written
    beside the config."""
    path, etc = deployed(short_tmp, EVERY_PART.replace("{lib}", f"{short_tmp}/lib"))
    d = new_daemon(load(path), sim, capture_log, config_path=path)
    await nursery.start(d.run)
    assert (await admin(d, {"id": "s", "op": "status"}))["result"]
    assert os.path.isdir(f"{short_tmp}/lib/audit") and os.path.exists(f"{short_tmp}/lib/jobs.sqlite")
    assert os.listdir(etc) == ["sidecard.toml"]


async def test_a_reload_moving_a_file_where_it_could_not_be_written_is_refused(short_tmp, nursery, sim, capture_log):
    """Refused now rather than at the next restart, which would fail (exit 2) and leave the service down; the
    running config stays. A reload that keeps the paths is taken as ever."""
    path, etc = deployed(short_tmp, BUDGET + f"[spend]\npath = '{short_tmp}/lib/spend.json'\n")
    with open(path) as f:
        text = f.read()
    ro = f"{short_tmp}/notes"  # a file where the new spend file's directory would be made
    with open(ro, "w") as f:
        f.write("notes")
    d = new_daemon(load(path), sim, capture_log, config_path=path)
    await nursery.start(d.run)
    with open(path, "w") as f:
        f.write(text.replace(f"{short_tmp}/lib/spend.json", f"{ro}/spend.json"))
    reply = await admin(d, {"id": "r1", "op": "reload"})
    assert reply["error"]["code"] == "bad_request"
    assert f"config refused, the running one stays: [spend] path {ro}/spend.json cannot be written: {ro} is not a directory" in reply["error"]["message"]
    assert d.config.spend.path == f"{short_tmp}/lib/spend.json"
    with open(path, "w") as f:
        f.write(text.replace("hard_usd = 5.0", "hard_usd = 6.0"))
    reply = await admin(d, {"id": "r2", "op": "reload"})
    assert reply["result"]["config"]["applied"] is True
