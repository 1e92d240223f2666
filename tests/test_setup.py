"""The README's set-up step (the Makefile's venv): safe to start twice at once, and a failed one is redone.

The real set-up installs from PyPI for a minute; here a stub stands in for python (it logs each step and,
inside `pip install -e`, waits for the test's word), so the race is made to happen, not hoped for.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import stat
import subprocess
import tomllib
from pathlib import Path

import pytest

from tests.e2e.test_process import LogLines

ROOT = Path(__file__).parents[1]
STUB = r"""#!/bin/sh
# python3 for `-m venv DIR` (makes DIR/bin/python, this stub again) and the venv's python for pip.
echo "$*" >> "$SETUP_LOG"
case "$*" in
  "-m venv"*)
    for dir; do :; done
    mkdir -p "$dir/bin" && cp "$0" "$dir/bin/python" ;;
  *"install --quiet -e"*)
    echo "PYTHONWARNINGS=$PYTHONWARNINGS" >> "$SETUP_LOG"
    echo installing > "$SETUP_STARTED"
    read -r word < "$SETUP_GO"
    [ "$word" = ok ] ;;
esac
"""


def make_env() -> dict[str, str]:
    """This environment for a `make` of our own: a suite started by `make test` must not hand its make's flags
    (job server, level) down."""
    return {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL", "SIDECARD_SETUP_LOCKED")}


def checkout(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """The Makefile and what its set-up depends on, a stub python, and the stub's channels (FIFOs)."""
    repo = tmp_path / "repo"
    (repo / "clients" / "python").mkdir(parents=True)
    for name in ("Makefile", "pyproject.toml", "clients/python/pyproject.toml"):
        shutil.copy(ROOT / name, repo / name)
    stub = tmp_path / "python3"
    stub.write_text(STUB)
    stub.chmod(stub.stat().st_mode | stat.S_IEXEC)
    for fifo in ("started", "go"):
        os.mkfifo(tmp_path / fifo)
    env = make_env()
    env.update(SETUP_LOG=str(tmp_path / "log"), SETUP_STARTED=str(tmp_path / "started"), SETUP_GO=str(tmp_path / "go"),
               PYTHON=str(stub))
    return repo, env


@pytest.fixture
def set_up():
    """`make .venv/.installed` in a checkout; whatever a failing test leaves running is killed."""
    started: list[subprocess.Popen] = []

    def start(repo: Path, env: dict[str, str]) -> subprocess.Popen:
        proc = subprocess.Popen(["make", "PYTHON=" + env["PYTHON"], ".venv/.installed"], cwd=repo, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
        started.append(proc)
        return proc

    yield start
    for proc in started:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)  # make and the stub it runs
            proc.wait()


def installing(env: dict[str, str]) -> None:
    """Wait until a set-up is inside `pip install -e`."""
    with open(env["SETUP_STARTED"]) as started:
        assert started.read().strip() == "installing"


def go(env: dict[str, str], word: str) -> None:
    """Let the set-up inside `pip install -e` finish: "ok" succeeds, anything else fails."""
    with open(env["SETUP_GO"], "w") as fifo:
        fifo.write(word + "\n")


def steps(env: dict[str, str]) -> list[str]:
    return Path(env["SETUP_LOG"]).read_text().splitlines()


def test_two_set_ups_started_together_install_once(tmp_path, set_up):
    repo, env = checkout(tmp_path)
    first = set_up(repo, env)
    installing(env)
    second = set_up(repo, env)
    LogLines(second.stdout).wait_for("venv")  # the second has decided to set up: it waits for the lock (or races)
    go(env, "ok")
    assert first.wait(timeout=30) == 0
    assert second.wait(timeout=30) == 0
    assert [s for s in steps(env) if "venv" in s] == ["-m venv --clear .venv"]  # one set-up, the other waited
    assert (repo / ".venv" / ".installed").exists()
    # setuptools' "Editable installation" box, once per package, is silenced (only it: the caller's filters stay)
    assert "PYTHONWARNINGS=ignore:Editable installation" in steps(env)  # after any of the caller's own, so it wins


def test_a_failed_set_up_leaves_no_stamp_and_is_redone(tmp_path, set_up):
    repo, env = checkout(tmp_path)
    failing = set_up(repo, env)
    installing(env)
    go(env, "fail")
    assert failing.wait(timeout=30) != 0
    assert not (repo / ".venv" / ".installed").exists()
    retry = set_up(repo, env)
    installing(env)
    go(env, "ok")
    assert retry.wait(timeout=30) == 0
    assert (repo / ".venv" / ".installed").exists()
    assert [s for s in steps(env) if "venv" in s] == ["-m venv --clear .venv"] * 2  # from empty, both times


def test_the_package_metadata_builds_without_deprecation_warnings():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert isinstance(project["project"]["license"], str)  # an SPDX expression: a table is deprecated (setuptools 77)
    assert "setuptools>=77" in project["build-system"]["requires"][0]


def test_the_readme_says_how_to_run_beside_another_daemon():
    # A second daemon on the host finds the metrics port taken (tests/e2e/test_startup_errors.py): the README's way out.
    commands = re.findall(r'^make run ARGS="(--metrics [^"]+)"$', (ROOT / "README.md").read_text(), re.M)
    assert commands == ["--metrics 127.0.0.1:9465", "--metrics off"]
    env = {k: v for k, v in make_env().items() if k != "ANTHROPIC_API_KEY"}
    for args in commands:  # -n: print the command, do not run it; -o: leave the venv alone
        dry = subprocess.run(["make", "-n", "-o", ".venv/.installed", "run", f"ARGS={args}"], cwd=ROOT, env=env,
                             capture_output=True, text=True, check=True)
        assert dry.stdout.strip() == f".venv/bin/sidecard serve --simulate {args}"
