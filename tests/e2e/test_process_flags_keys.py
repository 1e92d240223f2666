"""Start-up as an operator configures it: the API key's sources, command-line flags over the config file,
SIGINT's drain, and `--admin-socket`. Key tests run in-process; flag and signal tests run `sidecard serve`."""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest
import trio
from prometheus_client import CollectorRegistry

from sidecard.config import load
from sidecard.daemon import Daemon, resolve_api_key
from sidecard.sim import Simulator, serve_sim
from tests.e2e.test_process import SIDECARD, LogLines, request
from tests.harness import connect, fake_api_key, http_get, make_config, stream_frame

FILE_KEY = fake_api_key("from-the-key-file-0123456789abcdef")
ENV_KEY = fake_api_key("from-the-environment-0123456789ab")


@pytest.fixture
def no_key_sources(monkeypatch):
    monkeypatch.delenv("ANTHROPIC_API_KEY", raising=False)
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)


def test_resolve_api_key_prefers_the_key_file_over_the_environment(short_tmp, monkeypatch, no_key_sources):
    key_file = f"{short_tmp}/key"
    with open(key_file, "w") as f:
        f.write(FILE_KEY + "\n")  # a trailing newline, as editors leave one
    monkeypatch.setenv("ANTHROPIC_API_KEY", ENV_KEY)
    assert resolve_api_key(make_config(short_tmp, upstream={"api_key_file": key_file})) == FILE_KEY
    assert resolve_api_key(make_config(short_tmp)) == ENV_KEY
    monkeypatch.delenv("ANTHROPIC_API_KEY")
    assert resolve_api_key(make_config(short_tmp)) is None


async def _serve_with_real_key_path(nursery, short_tmp, capture_log, **upstream) -> tuple[Daemon, Simulator]:
    """A daemon that is not in simulate mode (so it resolves its key itself) against a simulator that
    refuses any call without the right key."""
    strict = Simulator(seed=1, api_key=FILE_KEY if "api_key_file" in upstream else ENV_KEY)
    url = await nursery.start(serve_sim, strict)
    config = make_config(short_tmp, upstream={"base_url": url, **upstream})
    d = Daemon(config, log_write=capture_log.write, registry=CollectorRegistry(), rng=random.Random(7))
    return await nursery.start(d.run), strict


@pytest.mark.parametrize("source", ["api_key_file", "environment"])
async def test_the_resolved_key_is_used_upstream_and_never_logged(nursery, short_tmp, capture_log, monkeypatch, no_key_sources, source):
    if source == "api_key_file":
        key_file = f"{short_tmp}/key"
        with open(key_file, "w") as f:
            f.write(FILE_KEY)
        monkeypatch.setenv("ANTHROPIC_API_KEY", ENV_KEY)  # the file wins
        d, strict = await _serve_with_real_key_path(nursery, short_tmp, capture_log, api_key_file=key_file)
        key = FILE_KEY
    else:
        monkeypatch.setenv("ANTHROPIC_API_KEY", ENV_KEY)
        d, strict = await _serve_with_real_key_path(nursery, short_tmp, capture_log)
        key = ENV_KEY
    assert not d.simulate
    client = await connect(d)
    reply = await client.complete(f"my key is {key}, keep it safe", cache="bypass")
    assert reply["ok"], reply  # the simulator answers 401 to any other key
    assert strict.calls_for("claude-sonnet-4-6") == 1
    assert capture_log.events("request")
    assert key not in capture_log.text
    d.shutdown()


@pytest.mark.parametrize("fast_path", [True, False], ids=["fast-path", "sdk-path"])
async def test_anthropic_base_url_is_honoured_when_base_url_is_unset(nursery, short_tmp, capture_log, monkeypatch,
                                                                    no_key_sources, fast_path):
    monkeypatch.setenv("ANTHROPIC_API_KEY", ENV_KEY)
    gateway = Simulator(seed=1, api_key=ENV_KEY)  # a corporate gateway, say
    monkeypatch.setenv("ANTHROPIC_BASE_URL", await nursery.start(serve_sim, gateway))
    config = make_config(short_tmp, upstream={"fast_path": fast_path})
    d = await nursery.start(Daemon(config, log_write=capture_log.write, registry=CollectorRegistry(), rng=random.Random(7)).run)
    client = await connect(d)
    assert (await client.complete("hello", cache="bypass"))["ok"]
    events, done = await stream_frame(client, {"op": "complete", "messages": [{"role": "user", "content": "streamed"}]})
    assert events and done["ok"], done
    assert gateway.calls_for("claude-sonnet-4-6") == 2
    d.shutdown()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _environment() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in ("SIDECARD_CONFIG", "ANTHROPIC_API_KEY", "SIDECARD_SOCKET")}


class Served:
    """`sidecard serve --simulate ARGS...` in its own process, killed if a test leaves it running."""

    def __init__(self, cwd: str, *args: str) -> None:
        self.proc = subprocess.Popen(
            [*SIDECARD, "serve", "--simulate", *args], stderr=subprocess.PIPE, text=True, env=_environment(), cwd=cwd
        )
        self.log = LogLines(self.proc.stderr)

    def __enter__(self) -> "Served":
        self.log.wait_for('"event":"started"')
        return self

    def __exit__(self, *exc) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def _write_config(path: str, text: str) -> str:
    with open(path, "w") as f:
        f.write(text)
    return path


def test_flags_override_the_config_file(short_tmp):
    config_port, flag_port = _free_port(), _free_port()
    config = _write_config(
        f"{short_tmp}/sidecard.toml",
        f'[server]\nsocket = "{short_tmp}/from-config.sock"\n'
        f'[metrics]\nenabled = true\naddress = "127.0.0.1:{config_port}"\n'
        "[quality]\nenabled = false\n",
    )
    flag_socket = f"{short_tmp}/from-flag.sock"
    with Served(short_tmp, "--config", config, "--socket", flag_socket, "--metrics", f"127.0.0.1:{flag_port}") as served:
        started = served.log.wait_for('"event":"started"')
        assert flag_socket in started and f"127.0.0.1:{flag_port}" in started
        assert request(flag_socket, {"op": "ping", "id": 1})["ok"]
        assert not os.path.exists(f"{short_tmp}/from-config.sock")
        status, body = trio.run(http_get, "127.0.0.1", flag_port, "/metrics")
        assert status == 200 and "sidecard_build_info" in body
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", config_port), timeout=1).close()
        # The config file still counts for what no flag overrides: the judge stays off.
        assert request(f"{short_tmp}/admin.sock", {"op": "status", "id": 2})["result"]["quality"] is None
        served.proc.send_signal(signal.SIGTERM)
        assert served.proc.wait(timeout=30) == 0


def test_metrics_off_flag_overrides_an_enabled_config(short_tmp):
    port = _free_port()
    config = _write_config(f"{short_tmp}/sidecard.toml", f'[metrics]\nenabled = true\naddress = "127.0.0.1:{port}"\n')
    with Served(short_tmp, "--config", config, "--socket", f"{short_tmp}/app.sock", "--metrics", "off") as served:
        assert '"metrics":null' in served.log.wait_for('"event":"started"')
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", port), timeout=1).close()


def test_sigint_drains_in_flight_requests_like_sigterm(short_tmp):
    # Every simulated answer takes 1.5 s (real time: this is another process), so a request is in flight.
    config = _write_config(f"{short_tmp}/sidecard.toml", "[sim]\nlatency_ms = 1500\n[quality]\nenabled = false\n")
    path = f"{short_tmp}/app.sock"
    with Served(short_tmp, "--config", config, "--socket", path, "--metrics", "off") as served:
        replies: list[dict] = []
        worker = threading.Thread(
            target=lambda: replies.append(request(path, {"op": "complete", "id": 1, "messages": [{"role": "user", "content": "hi"}]}))
        )
        worker.start()
        deadline = time.monotonic() + 20
        while request(f"{short_tmp}/admin.sock", {"op": "status", "id": 2})["result"]["in_flight"] < 1:
            assert time.monotonic() < deadline, "the request never reached the daemon"
            time.sleep(0.02)
        served.proc.send_signal(signal.SIGINT)
        served.log.wait_for('"event":"draining"')
        worker.join(timeout=30)
        assert replies and replies[0]["ok"], replies  # finished, not cut off
        assert served.proc.wait(timeout=30) == 0
        stopped = served.log.wait_for('"event":"stopped"')
        assert '"stopped_requests":0' in stopped
        assert '"in_flight":1' in served.log.wait_for('"event":"draining"')
        assert not os.path.exists(path)


def test_admin_socket_flag_overrides_the_config_file(short_tmp):
    config = _write_config(f"{short_tmp}/sidecard.toml", f'[admin]\nsocket = "{short_tmp}/cfg-admin.sock"\n')
    flag_admin = f"{short_tmp}/flag-admin.sock"
    with Served(short_tmp, "--config", config, "--socket", f"{short_tmp}/app.sock", "--admin-socket", flag_admin,
                "--metrics", "off") as served:
        assert flag_admin in served.log.wait_for('"event":"started"')
        reply = request(flag_admin, {"op": "status", "id": 1})
        assert reply["ok"] and reply["result"]["socket"] == f"{short_tmp}/app.sock"
        assert oct(os.stat(flag_admin).st_mode & 0o777) == oct(0o600)
        assert not os.path.exists(f"{short_tmp}/cfg-admin.sock")
        assert not os.path.exists(f"{short_tmp}/admin.sock")
        ctl = subprocess.run([sys.executable, "-m", "sidecard.ctl", "--socket", flag_admin, "status"],
                             capture_output=True, text=True, timeout=30)
        assert ctl.returncode == 0 and "ROUTE" in ctl.stdout
        served.proc.send_signal(signal.SIGTERM)
        assert served.proc.wait(timeout=30) == 0
    assert not os.path.exists(flag_admin)


def test_admin_socket_flag_without_a_config_file(short_tmp):
    flag_admin = f"{short_tmp}/ops.sock"
    with Served(short_tmp, "--socket", f"{short_tmp}/app.sock", "--admin-socket", flag_admin, "--metrics", "off"):
        assert request(flag_admin, {"op": "status", "id": 1})["ok"]
        assert not os.path.exists(f"{short_tmp}/admin.sock")


def test_config_loads_unchanged_by_flags_when_none_given(short_tmp):
    # The flags only replace what they name: a config without them keeps its own socket.
    config = _write_config(f"{short_tmp}/sidecard.toml", f'[server]\nsocket = "{short_tmp}/cfg.sock"\n')
    assert load(config).server.socket == f"{short_tmp}/cfg.sock"
    with Served(short_tmp, "--config", config, "--metrics", "off"):
        assert request(f"{short_tmp}/cfg.sock", {"op": "ping", "id": 1})["ok"]
        assert os.path.exists(f"{short_tmp}/admin.sock")  # beside the configured app socket
