"""examples/python_app.py and examples/node_app.mjs against a real daemon (`sidecard serve --simulate`, in its
own process): the answer path, and every way to the non-AI path — degraded, ai_disabled, unavailable, no daemon.
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import subprocess
import sys
import tempfile
import threading
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
NODE = shutil.which("node")
APPS = {
    "python": [sys.executable, str(ROOT / "examples" / "python_app.py")],
    "node": [NODE or "node", str(ROOT / "examples" / "node_app.mjs")],
}


class RunningDaemon:
    def __init__(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="scx-", dir="/tmp")
        self.socket = os.path.join(self.dir, "app.sock")
        self.admin_socket = os.path.join(self.dir, "admin.sock")
        env = {k: v for k, v in os.environ.items() if k not in ("ANTHROPIC_API_KEY", "SIDECARD_CONFIG")}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "sidecard", "serve", "--simulate", "--socket", self.socket, "--metrics", "off"],
            cwd=self.dir,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=lambda: [lines.put(line) for line in self.process.stderr], daemon=True).start()
        self.sim_url = None
        while self.sim_url is None:
            try:
                record = json.loads(lines.get(timeout=30))
            except queue.Empty:
                self.stop()
                raise RuntimeError("the daemon did not start within 30 s") from None
            except ValueError:
                continue
            if record.get("event") == "started":
                self.sim_url = record["sim_url"]

    def ctl(self, *args: str) -> None:
        command = [sys.executable, "-c", "import sys; from sidecard.ctl import main; main(sys.argv[1:])"]
        subprocess.run([*command, "--socket", self.admin_socket, *args], check=True, capture_output=True, timeout=30)

    def fault(self, spec: dict | None) -> None:
        if spec is None:
            request = urllib.request.Request(f"{self.sim_url}/_sim/faults", method="DELETE")
        else:
            request = urllib.request.Request(f"{self.sim_url}/_sim/faults", data=json.dumps(spec).encode(), method="POST")
        urllib.request.urlopen(request, timeout=10).read()

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture(scope="module")
def running():
    d = RunningDaemon()
    try:
        # An operator's kill switches: one feature degraded to a static answer, one switched off.
        d.ctl("kill", "feature:faq-only", "--mode", "static", "--text", "See our FAQ: https://example.com/faq")
        d.ctl("kill", "feature:switched-off", "--mode", "error", "--reason", "incident 42")
        yield d
    finally:
        d.stop()


def run_app(app: str, *args: str, socket: str) -> subprocess.CompletedProcess:
    if app == "node" and NODE is None:
        pytest.skip("node is not installed")
    env = {**os.environ, "SIDECARD_SOCKET": socket}
    return subprocess.run([*APPS[app], *args], capture_output=True, text=True, timeout=60, env=env)


@pytest.fixture(params=["python", "node"])
def app(request):
    return request.param


def test_the_answer_is_streamed(app, running):
    result = run_app(app, f"How do I reset my password? ({app})", socket=running.socket)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == f"Q: How do I reset my password? ({app})"
    assert lines[1].startswith("A: ") and len(lines[1]) > 10
    assert lines[2].startswith("[answered by claude-sonnet-4-6, first token after ")
    assert len(lines) == 3


def test_a_degraded_answer_is_shown_with_the_non_ai_path(app, running):
    result = run_app(app, "--feature", "faq-only", f"Where is the FAQ? ({app})", socket=running.socket)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[1:] == [
        "A: See our FAQ: https://example.com/faq",
        "[degraded: this is our standard answer, not the assistant's]",
        "More help: https://example.com/help",
    ]


def test_ai_disabled_takes_the_non_ai_path(app, running):
    result = run_app(app, "--feature", "switched-off", f"Anyone there? ({app})", socket=running.socket)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[1:] == [
        "The assistant is switched off for now (AI is switched off for feature:switched-off: incident 42).",
        "Our help pages: https://example.com/help",
    ]


def test_unavailable_takes_the_non_ai_path(app, running):
    running.fault({"model": "*", "status": 529, "should_retry": False, "retry_after_s": 2})
    try:
        result = run_app(app, f"Is everything down? ({app})", socket=running.socket)
    finally:
        running.fault(None)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[1:] == [
        "The assistant is unavailable right now (upstream_unavailable). Try again in 2 s.",
        "Meanwhile, our help pages: https://example.com/help",
    ]


def test_no_daemon_takes_the_non_ai_path(app, short_tmp):
    result = run_app(app, "Hello?", socket=f"{short_tmp}/nothing.sock")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "Q: Hello?",
        "The assistant is unavailable right now (connection_lost).",
        "Meanwhile, our help pages: https://example.com/help",
    ]
