"""The daemon as an operator runs it: the `sidecard` command in its own process, signals, exit codes."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

SIDECARD = [sys.executable, "-m", "sidecard"]


def run(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*SIDECARD, *args], capture_output=True, text=True, timeout=60, env=env)


def test_check_config_accepts_a_good_file(tmp_path):
    f = tmp_path / "ok.toml"
    f.write_text('[server]\nsocket = "/tmp/x.sock"\n')
    result = run("check-config", str(f))
    assert result.returncode == 0 and "ok" in result.stdout


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("[server]\nsocket_mode = 'rw'\n", "server.socket_mode: expected int, got str"),
        ("[upstream]\nbase_urll = 'x'\n", "upstream.base_urll: unknown key"),
        ("[retry]\nbudget_ratio = 2.0\n", "retry.budget_ratio: expected float <= 1.0"),
    ],
)
def test_bad_config_is_one_clear_line_never_a_traceback(tmp_path, text, fragment):
    f = tmp_path / "bad.toml"
    f.write_text(text)
    for command in (["check-config", str(f)], ["serve", "--simulate", "--config", str(f)]):
        result = run(*command)
        assert result.returncode == 2
        assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
        assert str(f) in result.stderr and fragment in result.stderr


def imported(result_stderr: str) -> set[str]:
    """The modules `python -X importtime` reports on stderr."""
    return {line.rsplit("|", 1)[1].strip() for line in result_stderr.splitlines() if line.startswith("import time:")}


def test_a_bad_config_fails_before_the_daemon_is_imported(tmp_path):
    f = tmp_path / "bad.toml"
    f.write_text("[server]\nsocket_mode = 'rw'\n")
    result = subprocess.run([sys.executable, "-X", "importtime", "-m", "sidecard", "serve", "--config", str(f)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "server.socket_mode" in result.stderr
    assert "sidecard.config" in imported(result.stderr) and "sidecard.daemon" not in imported(result.stderr)


@pytest.mark.parametrize("provider, sdk", [("anthropic", False), ("bedrock", True)])
def test_the_sdk_is_imported_only_when_a_target_needs_it(short_tmp, provider, sdk):
    config = f"{short_tmp}/sidecard.toml"
    with open(config, "w") as f:
        f.write(f'[routes.default]\ntargets = [{{ model = "claude-sonnet-4-6", provider = "{provider}", region = "us-east-1" }}]\n'
                "[quality]\nenabled = false\n")
    path = f"{short_tmp}/app.sock"
    proc = subprocess.Popen(
        [sys.executable, "-X", "importtime", "-m", "sidecard", "serve", "--simulate", "--config", config, "--socket", path,
         "--metrics", "off"], stderr=subprocess.PIPE, text=True, cwd=short_tmp,
    )
    log = LogLines(proc.stderr)
    try:
        log.wait_for('"event":"started"')
        assert request(path, {"op": "complete", "id": 1, "messages": [{"role": "user", "content": "hi"}]})["ok"]
        modules = imported("".join(log.lines))
        assert ("anthropic" in modules, "httpx2" in modules) == (sdk, sdk)
    finally:
        proc.kill()
        proc.wait()


def request(path: str, frame: dict) -> dict:
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(30)
        s.connect(path)
        s.sendall(json.dumps(frame).encode() + b"\n")
        data = b""
        while not data.endswith(b"\n"):
            data += s.recv(65536)
    return json.loads(data)


class LogLines:
    """Collects a process's stderr lines in a thread, so a test can wait for one."""

    def __init__(self, stream) -> None:
        self.lines: list[str] = []
        self._changed = threading.Condition()
        threading.Thread(target=self._pump, args=(stream,), daemon=True).start()

    def _pump(self, stream) -> None:
        for line in stream:
            with self._changed:
                self.lines.append(line)
                self._changed.notify_all()

    def wait_for(self, fragment: str, timeout: float = 20.0) -> str:
        with self._changed:
            found = self._changed.wait_for(lambda: any(fragment in l for l in self.lines), timeout)
        assert found, f"{fragment!r} never logged; got {self.lines}"
        return next(l for l in self.lines if fragment in l)


@pytest.fixture
def served(short_tmp):
    """`sidecard serve --simulate` in its own process; yields (process, socket path, its log lines)."""
    path = f"{short_tmp}/app.sock"
    env = {k: v for k, v in os.environ.items() if k != "SIDECARD_CONFIG"}
    env.pop("ANTHROPIC_API_KEY", None)
    proc = subprocess.Popen(
        [*SIDECARD, "serve", "--simulate", "--socket", path, "--metrics", "off"],
        stderr=subprocess.PIPE, text=True, env=env, cwd=short_tmp,
    )
    log = LogLines(proc.stderr)
    try:
        log.wait_for('"event":"started"')
        yield proc, path, log
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_sigterm_drains_and_exits_zero(served):
    proc, path, log = served
    assert request(path, {"op": "complete", "id": 1, "messages": [{"role": "user", "content": "hi"}]})["ok"]
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0
    log.wait_for('"event":"stopped"')
    assert any('"event":"draining"' in line for line in log.lines)
    assert all(line.startswith("{") for line in log.lines)  # every line on stderr is JSON
    assert not os.path.exists(path)  # the socket file is removed on the way out


def test_a_second_daemon_on_the_same_socket_is_refused(served, short_tmp):
    _, path, _ = served
    result = subprocess.run(
        [*SIDECARD, "serve", "--simulate", "--socket", path, "--metrics", "off"],
        capture_output=True, text=True, timeout=60, cwd=short_tmp,
    )
    assert result.returncode == 2 and "another process is already serving" in result.stderr
    assert "stop it, or give this daemon paths of its own (--socket" in result.stderr  # what to do, not only what


def test_sighup_reloads_and_keeps_serving(served):
    proc, path, log = served
    proc.send_signal(signal.SIGHUP)
    log.wait_for('"event":"reloaded"')
    assert request(path, {"op": "ping", "id": 1})["ok"]


def test_no_api_key_without_simulate_is_a_clear_startup_error(short_tmp):
    env = {k: v for k, v in os.environ.items() if k != "ANTHROPIC_API_KEY"}
    env["CREDENTIALS_DIRECTORY"] = short_tmp
    result = subprocess.run(
        [*SIDECARD, "serve", "--socket", f"{short_tmp}/a.sock", "--metrics", "off"],
        capture_output=True, text=True, timeout=60, env=env, cwd=short_tmp,
    )
    assert result.returncode == 2 and "no Anthropic API key" in result.stderr


def test_sim_command_serves_the_messages_api():
    port = _free_port()
    proc = subprocess.Popen([*SIDECARD, "sim", "--port", str(port)], stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                assert time.monotonic() < deadline
                time.sleep(0.02)
        import anthropic

        client = anthropic.Anthropic(api_key="k", base_url=f"http://127.0.0.1:{port}", max_retries=0)
        message = client.messages.create(model="claude-sonnet-4-6", max_tokens=50, messages=[{"role": "user", "content": "hi"}])
        assert message.content[0].text and message.usage.output_tokens > 0
        client.close()
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=20)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_readme_names_exactly_two_setup_commands():
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    first_block = readme.split("```sh", 1)[1].split("```", 1)[0].strip().splitlines()
    assert [line.split("#")[0].strip() for line in first_block] == ["make run", "make test"]


def test_a_prompt_written_while_serving_is_loaded_and_the_daemon_lives(short_tmp):
    """The watcher's thread logs each change; the batched log writer raised there and the daemon died on every
    edit of the prompt directory (a fresh-clone trial: `make run`, then a new version file). The daemon's own
    tests capture the log lines and never met the batcher: this one runs the command as an operator does."""
    prompts = Path(short_tmp) / "prompts"
    prompts.mkdir()
    path = f"{short_tmp}/app.sock"
    env = {k: v for k, v in os.environ.items() if k not in ("SIDECARD_CONFIG", "ANTHROPIC_API_KEY")}
    proc = subprocess.Popen([*SIDECARD, "serve", "--simulate", "--socket", path, "--metrics", "off"],
                            stderr=subprocess.PIPE, text=True, env=env, cwd=short_tmp)
    log = LogLines(proc.stderr)
    try:
        log.wait_for('"event":"started"')
        (prompts / "demo").mkdir()
        (prompts / "demo" / "v1.toml").write_text(
            'description = "d"\n[variables]\nq = {}\n[[messages]]\nrole = "user"\ncontent = "{q}"\n')
        (prompts / "demo" / "release.toml").write_text("stable = 1\n")
        log.wait_for('"demo"')  # prompts_loaded names it
        reply = request(path, {"op": "complete", "id": 1, "prompt": "demo", "vars": {"q": "hi"}})
        assert reply["ok"] and proc.poll() is None, (reply, log.lines[-3:])
    finally:
        proc.kill()
        proc.wait()


def test_a_reload_keeps_the_command_lines_flags(short_tmp):
    """`--metrics ADDR` (and `--socket`) changed the config only at start: a reload read the file alone and said
    `needs_restart: ["metrics", ...]` with nothing changed (a second fresh-clone trial)."""
    config = Path(short_tmp) / "sidecard.toml"
    config.write_text('[log]\nlevel = "info"\n')
    path, metrics = f"{short_tmp}/app.sock", f"127.0.0.1:{_free_port()}"
    env = {k: v for k, v in os.environ.items() if k not in ("SIDECARD_CONFIG", "ANTHROPIC_API_KEY")}
    proc = subprocess.Popen([*SIDECARD, "serve", "--simulate", "--config", str(config), "--socket", path,
                             "--metrics", metrics], stderr=subprocess.PIPE, text=True, env=env, cwd=short_tmp)
    log = LogLines(proc.stderr)
    try:
        log.wait_for('"event":"started"')
        reload = subprocess.run([sys.executable, "-m", "sidecard.ctl", "--socket", f"{short_tmp}/admin.sock", "--json",
                                 "reload"], capture_output=True, text=True, timeout=30)
        assert reload.returncode == 0, reload.stderr
        assert json.loads(reload.stdout)["result"]["config"]["needs_restart"] == []
    finally:
        proc.kill()
        proc.wait()


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]
