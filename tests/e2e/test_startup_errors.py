"""A daemon that cannot start says why in one line and exits 2: never a traceback, never exit 1.

The headline case (a second daemon on the host finds the metrics port taken) runs `sidecard serve` in its own
process; the others call the same command in-process, which is the same code without an interpreter start.
"""

from __future__ import annotations

import os
import shutil
import socket
import stat
import subprocess
from pathlib import Path

import pytest

from sidecard.cli import main
from tests.e2e.test_process import SIDECARD

REPO = Path(__file__).parents[2]


@pytest.fixture
def taken_port():
    """A loopback port something else is listening on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


def failure_line(stderr: str) -> str:
    """The one line that is not a JSON log line; the daemon may have logged before it failed."""
    assert "Traceback" not in stderr
    lines = [line for line in stderr.splitlines() if not line.startswith("{")]
    assert len(lines) == 1, stderr
    return lines[0]


def test_a_taken_metrics_port_says_what_to_do(short_tmp, taken_port):
    result = subprocess.run(
        [*SIDECARD, "serve", "--simulate", "--socket", f"{short_tmp}/app.sock", "--metrics", f"127.0.0.1:{taken_port}"],
        capture_output=True, text=True, timeout=60, cwd=short_tmp,
    )
    assert result.returncode == 2
    line = failure_line(result.stderr)
    assert f"cannot serve metrics on 127.0.0.1:{taken_port}: Address already in use" in line
    assert "--metrics off" in line


def serve(short_tmp: str, capfd, config: str, *flags: str) -> str:
    """`sidecard serve --simulate` with CONFIG, expected to fail to start; returns its failure line."""
    path = f"{short_tmp}/sidecard.toml"
    with open(path, "w") as f:
        f.write(config)
    with pytest.raises(SystemExit) as exited:
        main(["serve", "--simulate", "--config", path, "--metrics", "off", *flags])
    assert exited.value.code == 2
    line = failure_line(capfd.readouterr().err)
    assert line.startswith("sidecard: ")
    return line


def test_a_taken_simulator_port(short_tmp, capfd, taken_port):
    line = serve(short_tmp, capfd, f"[server]\nsocket = '{short_tmp}/app.sock'\n[sim]\nport = {taken_port}\n")
    assert "cannot serve the simulated upstream" in line and "sim] port = 0" in line


def test_a_taken_http_port(short_tmp, capfd, taken_port):
    line = serve(short_tmp, capfd, f"[server]\nsocket = '{short_tmp}/app.sock'\n[http]\naddress = '127.0.0.1:{taken_port}'\n")
    assert f"cannot serve HTTP on 127.0.0.1:{taken_port}" in line and "[http] address" in line


@pytest.mark.parametrize(
    "config, expected",
    [
        ("[log]\ndestination = '/nonexistent/sidecard.log'\n", "cannot open the log file /nonexistent/sidecard.log"),
        ("[quality]\nreview_log = '/nonexistent/review.log'\n", "cannot start: /nonexistent/review.log: No such file"),
    ],
    ids=["log-file", "review-log"],
)
def test_a_file_that_cannot_be_opened(short_tmp, capfd, config, expected):
    assert expected in serve(short_tmp, capfd, f"[server]\nsocket = '{short_tmp}/app.sock'\n" + config)


def test_a_socket_path_too_long(short_tmp, capfd):
    line = serve(short_tmp, capfd, "", "--socket", f"{short_tmp}/{'x' * 120}.sock")
    assert "AF_UNIX path too long" in line and "shorter path" in line


def _fifo(path: str) -> None:
    os.mkfifo(path)


def _null_device(path: str) -> None:
    """A node for the null device (what /dev/null is), in a test directory: the real one is never pointed at."""
    os.mknod(path, 0o666 | stat.S_IFCHR, os.makedev(1, 3))


def _link(path: str) -> None:
    with open(f"{path}.target", "w") as f:
        f.write("{}")
    os.symlink(f"{path}.target", path)


NOT_REGULAR = {
    "directory": (os.mkdir, "a directory"),
    "named-pipe": (_fifo, "a named pipe"),
    "symlink": (_link, "a symbolic link"),
    "null-device": (_null_device, "a character device"),
}
KEPT_FILES = {  # the setting, and the config that makes the daemon keep a file there
    "state": ("[state] path", "[state]\non_corrupt = 'open'\npath = '{path}'\n"),
    "spend": ("[spend] path", "[spend]\npath = '{path}'\n[[budgets]]\nscope = 'global'\nwindow = 'day'\nhard_usd = 5.0\n"),
    "cache": ("[cache] path", "[cache]\nenabled = true\nstore = 'sqlite'\npath = '{path}'\n"),
}
CASES = [("state", kind) for kind in NOT_REGULAR] + [(kept, kind) for kept in ("spend", "cache") for kind in ("directory", "null-device")]


@pytest.mark.parametrize("kept, kind", CASES, ids=[f"{kept}-{kind}" for kept, kind in CASES])
def test_a_kept_file_path_that_is_not_a_regular_file_refuses_the_start_and_is_left_alone(short_tmp, kept, kind):
    """The real command in its own process: before the fix some of these started and moved the path aside."""
    make, described = NOT_REGULAR[kind]
    if kind == "null-device" and os.geteuid() != 0:
        pytest.skip("making a device node needs root")
    setting, section = KEPT_FILES[kept]
    path = f"{short_tmp}/{kept}-file"
    make(path)
    before = os.lstat(path)
    with open(f"{short_tmp}/sidecard.toml", "w") as f:
        f.write(f"[server]\nsocket = '{short_tmp}/app.sock'\n" + section.format(path=path))
    result = subprocess.run([*SIDECARD, "serve", "--simulate", "--config", f"{short_tmp}/sidecard.toml", "--metrics", "off"],
                            capture_output=True, text=True, timeout=30, cwd=short_tmp)
    assert result.returncode == 2
    line = failure_line(result.stderr)
    assert f"{path} ({setting}) is {described}, not a regular file" in line and f"set {setting} to a file" in line
    after = os.lstat(path)
    assert (after.st_ino, after.st_mode, after.st_rdev) == (before.st_ino, before.st_mode, before.st_rdev)
    assert not [name for name in os.listdir(short_tmp) if ".corrupt-" in name]  # nothing set aside


def test_a_socket_path_taken_by_a_file_says_what_to_do(short_tmp, capfd):
    with open(f"{short_tmp}/app.sock", "w") as f:
        f.write("notes")
    line = serve(short_tmp, capfd, "", "--socket", f"{short_tmp}/app.sock")
    assert f"{short_tmp}/app.sock exists and is a regular file, not a socket" in line
    assert "remove it if nothing needs it, or choose another path (--socket" in line
    with open(f"{short_tmp}/app.sock") as f:
        assert f.read() == "notes"


def test_check_config_refuses_a_kept_file_path_that_is_not_a_regular_file(short_tmp, capfd):
    """As `serve` would: check-config once said ok to a state path naming a directory (relative to the config)."""
    os.mkdir(f"{short_tmp}/state")
    with open(f"{short_tmp}/sidecard.toml", "w") as f:
        f.write("[state]\npath = 'state'\n")
    with pytest.raises(SystemExit) as exited:
        main(["check-config", f"{short_tmp}/sidecard.toml"])
    assert exited.value.code == 2
    line = failure_line(capfd.readouterr().err)
    assert f"{short_tmp}/state ([state] path) is a directory, not a regular file" in line


EXPERIMENT = """[prompts]
directory = "prompts"
[[experiments]]
name = "tone"
prompt = "support-reply"
primary = "latency"
[[experiments.arms]]
name = "stable"
version = 1
[[experiments.arms]]
name = "candidate"
version = {candidate}
"""


@pytest.mark.parametrize(("prompts", "candidate", "expected"), [
    (False, 2, "experiment tone: prompt support-reply: the prompt directory {tmp}/prompts does not exist"),
    (True, 9, "experiment tone, arm candidate: prompt 'support-reply' has no version 9"),
])
def test_check_config_refuses_an_experiment_its_prompts_cannot_serve(short_tmp, capfd, prompts, candidate, expected):
    """`serve` starts without such an experiment (`experiment_refused` in its log); check-config said ok to it."""
    if prompts:
        shutil.copytree(REPO / "prompts", f"{short_tmp}/prompts")
    with open(f"{short_tmp}/sidecard.toml", "w") as f:
        f.write(EXPERIMENT.format(candidate=candidate))
    with pytest.raises(SystemExit) as exited:
        main(["check-config", f"{short_tmp}/sidecard.toml"])
    assert exited.value.code == 2
    assert expected.format(tmp=short_tmp) in failure_line(capfd.readouterr().err)


def test_check_config_takes_an_experiment_its_prompts_can_serve(short_tmp, capfd):
    shutil.copytree(REPO / "prompts", f"{short_tmp}/prompts")
    with open(f"{short_tmp}/sidecard.toml", "w") as f:
        f.write(EXPERIMENT.format(candidate=2))
    main(["check-config", f"{short_tmp}/sidecard.toml"])
    assert ": ok;" in capfd.readouterr().out


FLEET_PASSWORD_ENV = """[fleet]
url = "redis://sidecard@10.0.0.5:6379/0"
password_env = "SIDECARD_TEST_UNSET_PASSWORD"
"""


@pytest.mark.parametrize("command", ["serve", "check-config"])
def test_a_fleet_password_variable_that_is_not_set_is_one_line_naming_it(short_tmp, command):
    """Once a traceback and exit 1 from `serve`, while check-config said ok (fleet mode trial)."""
    path = f"{short_tmp}/sidecard.toml"
    with open(path, "w") as f:
        f.write(FLEET_PASSWORD_ENV)
    args = ["serve", "--simulate", "--config", path, "--socket", f"{short_tmp}/app.sock", "--metrics", "off"] if command == "serve" else [
        "check-config", path]
    env = {k: v for k, v in os.environ.items() if k != "SIDECARD_TEST_UNSET_PASSWORD"}
    result = subprocess.run([*SIDECARD, *args], capture_output=True, text=True, timeout=60, cwd=short_tmp, env=env)
    assert result.returncode == 2
    assert failure_line(result.stderr) == (f"sidecard: {path}: [fleet] password_env: the environment variable "
                                           "SIDECARD_TEST_UNSET_PASSWORD is not set")


def test_check_config_refuses_a_fleet_password_file_it_cannot_read(short_tmp, capfd):
    with open(f"{short_tmp}/sidecard.toml", "w") as f:
        f.write(f'[fleet]\nurl = "redis://sidecard@10.0.0.5:6379/0"\npassword_file = "{short_tmp}/missing"\n')
    with pytest.raises(SystemExit) as exited:
        main(["check-config", f"{short_tmp}/sidecard.toml"])
    assert exited.value.code == 2
    assert failure_line(capfd.readouterr().err).endswith(f"[fleet] password_file: {short_tmp}/missing cannot be read: No such file or directory")


def test_a_config_file_not_saved_as_utf8_says_so(short_tmp, capfd):
    """Saved as UTF-16 (an editor's default on some systems): one line naming the file, never a traceback. Its
    byte-order-marked UTF-8 twin is read as it means (tests/unit/test_config.py)."""
    path = f"{short_tmp}/sidecard.toml"
    with open(path, "wb") as f:
        f.write(f"[server]\nsocket = '{short_tmp}/app.sock'\n".encode("utf-16"))
    with pytest.raises(SystemExit) as exited:
        main(["serve", "--simulate", "--config", path, "--metrics", "off"])
    assert exited.value.code == 2
    assert failure_line(capfd.readouterr().err) == f"sidecard: config error in {path}: not UTF-8 text (byte 0): save it as UTF-8"


@pytest.mark.parametrize("command", ["serve", "check-config"])
def test_a_non_finite_number_in_the_config_is_one_line_naming_the_key(short_tmp, command):
    """`ttl_s = inf` was taken by both (answers cached forever), as inf or nan was by any float setting: in a process
    of its own, as serve once started (and served) with it."""
    path = f"{short_tmp}/sidecard.toml"
    with open(path, "w") as f:
        f.write(f"[server]\nsocket = '{short_tmp}/app.sock'\n[cache]\nttl_s = inf\n")
    args = ["serve", "--simulate", "--config", path, "--metrics", "off"] if command == "serve" else ["check-config", path]
    result = subprocess.run([*SIDECARD, *args], capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert failure_line(result.stderr) == f"sidecard: config error in {path}: cache.ttl_s: expected a finite number, got inf"


def test_check_config_warns_of_a_model_the_price_table_does_not_know(short_tmp, capfd):
    """It said ok in silence to a route on a typo, whose calls then counted $0 against budgets; still ok (exit 0: a
    model newer than the table must not block a start), with one warning line for each such model."""
    path = f"{short_tmp}/sidecard.toml"
    with open(path, "w") as f:
        f.write('[routes.fast]\ntargets = [{model = "claude-sonet-4-6"}, {model = "claude-haiku-4-5"}]\n'
                '[[shadows]]\nname = "next"\nfeature = "chat"\nmodel = "claude-opus-9"\n')
    main(["check-config", path])
    out, err = capfd.readouterr()
    assert out.startswith(f"{path}: ok;")
    assert err.splitlines() == [
        f"sidecard: warning: {path}: {where}: model '{model}' is not in the price table: a typo? (Its calls would cost $0 "
        f'against budgets.) Add [prices."{model}"] with its input and output prices (USD per million tokens) to the config'
        for where, model in (("route fast", "claude-sonet-4-6"), ("shadow next", "claude-opus-9"))
    ]
