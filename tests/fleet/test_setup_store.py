"""The fleet tests' server: `make test` installs it when missing (`make run` never needs it), and a missing or
too old one is an error that says what to install, never a skip."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from sidecard.fleet.devserver import ServerMissing, find_server
from tests.test_setup import make_env

ROOT = Path(__file__).parents[2]
TOOLS = ("sh", "timeout", "mktemp", "tail", "rm", "chmod", "openssl")


def stub(directory: Path, name: str, body: str) -> None:
    path = directory / name
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


def machine(tmp_path: Path, *, uid: int, apt: bool) -> dict[str, str]:
    """A PATH with the script's tools, a stub `id`, and a stub apt-get that logs and 'installs' a server stub."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in TOOLS:
        os.symlink(shutil.which(tool), bin_dir / tool)
    stub(bin_dir, "id", f"echo {uid}\n")
    if apt:
        stub(bin_dir, "apt-get", f'echo "$*" >> {tmp_path}/apt.log\n'
             f'case "$*" in *install*) printf "#!/bin/sh\\n" > {bin_dir}/redis-server; chmod +x {bin_dir}/redis-server ;; esac\n')
    env = {"PATH": str(bin_dir), "HOME": str(tmp_path)}
    return env


def store_server(env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(["sh", str(ROOT / ".ci" / "store-server")], env=env, capture_output=True, text=True, timeout=60)


def test_a_missing_server_is_installed_from_debians_package(tmp_path):
    env = machine(tmp_path, uid=0, apt=True)
    done = store_server(env)
    assert done.returncode == 0, done.stderr
    assert "installing redis-server" in done.stderr and "could not" not in done.stderr
    log = (tmp_path / "apt.log").read_text().splitlines()
    assert log[0].endswith("update -qq") and log[1].endswith("install -y -qq --no-install-recommends redis-server")
    again = store_server(env)  # now there: nothing to do
    assert again.returncode == 0 and again.stderr == ""
    assert len((tmp_path / "apt.log").read_text().splitlines()) == 2


@pytest.mark.parametrize("uid, apt", [(1000, True), (0, False)])
def test_without_root_or_apt_it_says_what_to_install_and_goes_on(tmp_path, uid, apt):
    done = store_server(machine(tmp_path, uid=uid, apt=apt))
    assert done.returncode == 0
    assert "missing for the fleet tests: redis-server;" in done.stderr and "SIDECARD_REDIS_SERVER" in done.stderr
    assert not (tmp_path / "apt.log").exists()


def test_make_test_sees_to_the_server_and_make_run_does_not():
    env = {k: v for k, v in make_env().items() if k != "ANTHROPIC_API_KEY"}

    def dry(target: str) -> str:
        return subprocess.run(["make", "-n", "-o", ".venv/.installed", target], cwd=ROOT, env=env, capture_output=True,
                              text=True, check=True).stdout

    assert "store-server" in dry("test")
    assert "store-server" not in dry("run")


def test_a_missing_server_is_an_error_that_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setenv("SIDECARD_REDIS_SERVER", str(tmp_path / "nowhere"))
    with pytest.raises(ServerMissing, match="cannot run.*apt-get install redis-server"):
        find_server()
    stub(tmp_path, "old-server", 'echo "Redis server v=6.2.14 sha=00000000:0 malloc=jemalloc-5.2.1 bits=64"\n')
    monkeypatch.setenv("SIDECARD_REDIS_SERVER", str(tmp_path / "old-server"))
    with pytest.raises(ServerMissing, match="version 6.2.14; fleet mode needs 7 or later"):
        find_server()
    monkeypatch.delenv("SIDECARD_REDIS_SERVER")
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(ServerMissing, match="no redis-server or valkey-server on PATH"):
        find_server()


def test_openssl_is_installed_too_when_missing(tmp_path):
    env = machine(tmp_path, uid=0, apt=True)
    (tmp_path / "bin" / "openssl").unlink()
    done = store_server(env)
    assert "installing redis-server openssl" in done.stderr
    assert (tmp_path / "apt.log").read_text().splitlines()[1].endswith("--no-install-recommends redis-server openssl")
