"""A daemon that cannot start says why in one line and exits 2: never a traceback, never exit 1.

The headline case (a second daemon on the host finds the metrics port taken) runs `sidecard serve` in its own
process; the others call the same command in-process, which is the same code without an interpreter start.
"""

from __future__ import annotations

import socket
import subprocess

import pytest

from sidecard.cli import main
from tests.e2e.test_process import SIDECARD


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
