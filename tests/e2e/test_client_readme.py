"""The README's client snippets, run as written against the real daemon: both adoption paths, end to end.

Each `python - <<'EOF'` and `node - <<'EOF'` block of README.md runs in its own process with `$SIDECARD_SOCKET`
pointing at a test daemon, and the official-SDK block as written, with `$XDG_RUNTIME_DIR` where the test daemon
has its sockets, as a reader's daemon would.
(The TypeScript SDK block needs `@anthropic-ai/sdk` and undici from npm, which the test environment does not
install; docs/http.md says which versions it was checked with.)
"""

from __future__ import annotations

import os
import re
import shutil
import sys
from pathlib import Path

import msgspec
import pytest
import trio

from sidecard.errors import Code, SidecardError
from sidecard.faces.http import _error_response

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()
HEREDOCS = re.findall(r"^(\.venv/bin/python|node --input-type=module) - <<'EOF'\n(.*?)\nEOF$", README, re.M | re.S)
PYTHON = [code for runner, code in HEREDOCS if runner.startswith(".venv")]
NODE = [code for runner, code in HEREDOCS if runner.startswith("node")]
SDK = re.search(r"```python\n(import os, anthropic, httpx2.*?)```", README, re.S).group(1)


async def run(command: list[str], code: str, socket_path: str, **env_vars: str) -> str:
    env = {**os.environ, "SIDECARD_SOCKET": socket_path, **env_vars}
    with trio.fail_after(60):
        done = await trio.run_process(command, stdin=code.encode(), capture_stdout=True, capture_stderr=True,
                                      check=False, cwd=ROOT, env=env)
    assert done.returncode == 0, done.stderr.decode()
    return done.stdout.decode()


def test_the_readme_shows_every_client():
    assert len(PYTHON) >= 5 and len(NODE) == 1  # complete, async, prompt, stream, tools; and Node
    assert any("AsyncClient" in code for code in PYTHON)
    assert "baseURL: 'http://sidecard'" in README and "socketPath" in README  # the TypeScript SDK's switch, on the socket


@pytest.mark.parametrize("index", range(len(PYTHON)))
async def test_a_python_snippet_runs(daemon, index):
    out = await run([sys.executable, "-"], PYTHON[index], daemon.socket_path)
    assert out.strip() and "no answer" not in out


@pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed")
async def test_the_node_snippet_runs(daemon):
    out = await run(["node", "--input-type=module", "-"], NODE[0], daemon.socket_path)
    assert "input tokens" in out and "no answer" not in out


async def test_the_sdk_snippet_runs_on_the_http_socket(daemon_factory, sim, short_tmp):
    d = await daemon_factory(server={"socket": f"{short_tmp}/sidecard/app.sock"})  # the default place, under $XDG_RUNTIME_DIR
    out = await run([sys.executable, "-"], SDK + "\nprint(message.content[0].text)\n", d.socket_path, XDG_RUNTIME_DIR=short_tmp)
    assert out.strip() and sim.calls[-1].headers.get("x-sidecard-feature") is None  # an option, not sent upstream
    assert d.metrics.requests("ok", "claude-sonnet-4-6", "support-chat").value == 1


async def test_the_sdk_snippet_is_answered_across_a_restart(short_tmp):
    """A request a restart stops gets the 503 `shutting_down`, `x-should-retry: true` (docs/http.md): the README's
    client must retry it against the next daemon. It had `max_retries=0`, so the app got `ServiceUnavailableError`
    on every restart, though the docs said the SDK retries it (a fresh-clone trial with the SDKs)."""
    os.makedirs(f"{short_tmp}/sidecard")
    status, headers, body = _error_response(SidecardError(Code.SHUTTING_DOWN, "the daemon stopped before the answer"))
    stopped = b"HTTP/1.1 %d Service Unavailable\r\n%bcontent-length: %d\r\nconnection: close\r\n\r\n%b" % (
        status, b"".join(b"%b: %b\r\n" % header for header in headers), len(body), body)
    message = msgspec.json.encode({"id": "msg_1", "type": "message", "role": "assistant", "model": "claude-sonnet-4-6",
                                   "content": [{"type": "text", "text": "answered by the next daemon"}],
                                   "stop_reason": "end_turn", "stop_sequence": None, "usage": {"input_tokens": 1, "output_tokens": 5}})
    answered = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\nconnection: close\r\n\r\n%b" % (
        len(message), message)
    listener = trio.socket.socket(trio.socket.AF_UNIX)
    await listener.bind(f"{short_tmp}/sidecard/http.sock")
    listener.listen()
    requests = 0

    async def serve() -> None:  # the daemon that stops, then the one that replaces it, as the SDK sees them
        nonlocal requests
        while True:
            conn, _ = await listener.accept()
            with conn:
                received = b""
                while b"\r\n\r\n" not in received:
                    received += await conn.recv(65536)
                head, _, body_read = received.partition(b"\r\n\r\n")
                length = int(re.search(rb"(?i)content-length: *(\d+)", head).group(1))
                while len(body_read) < length:
                    body_read += await conn.recv(65536)
                requests += 1
                await conn.send(stopped if requests == 1 else answered)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve)
        out = await run([sys.executable, "-"], SDK + "\nprint(message.content[0].text)\n", "", XDG_RUNTIME_DIR=short_tmp)
        nursery.cancel_scope.cancel()
    assert out.strip() == "answered by the next daemon" and requests == 2


def readme_shell_blocks(first_line: str) -> list[str]:
    return [block for block in re.findall(r"```sh\n(.*?)```", README, re.S) if block.startswith(first_line)]


async def test_the_try_out_operator_commands_and_their_undo_leave_nothing_behind(daemon_factory, capture_log):
    d = await daemon_factory(prompts={"directory": str(ROOT / "prompts")})
    moves, undos = readme_shell_blocks(".venv/bin/sidecardctl status")[0], readme_shell_blocks(".venv/bin/sidecardctl unkill")[0]
    bin_dir = str(Path(sys.executable).parent)
    env = {**os.environ, "SIDECARD_ADMIN_SOCKET": d.admin_socket_path}

    async def sh(block: str) -> None:
        script = "set -e\n" + block.replace(".venv/bin", bin_dir)
        done = await trio.run_process(["bash", "-c", script], capture_stdout=True, capture_stderr=True, check=False, env=env)
        assert done.returncode == 0, done.stderr.decode()

    await sh(moves)
    status = d.status()
    assert status["kills"] and status["routes"]["default"]["overridden"] and status["prompts"]["support-reply"]["overridden"]
    assert status["prompts"]["support-reply"]["canary"] is None  # the shipped canary rolled back
    await sh(undos)
    status = d.status()
    assert status["kills"] == [] and not status["routes"]["default"]["overridden"]
    assert status["prompts"]["support-reply"] == {**status["prompts"]["support-reply"], "overridden": False, "canary": 2}


async def test_the_started_line_the_try_out_names_comes_after_the_prompts_load_and_names_every_socket(daemon, capture_log):
    assert "`prompts_loaded` first, then\n`\"event\": \"started\"`" in README and "(`http_socket`)" in README
    events = capture_log.events()
    names = [e["event"] for e in events]
    assert names.index("prompts_loaded") < names.index("started")
    started = events[names.index("started")]
    assert started["socket"] == daemon.socket_path and started["http_socket"] and started["admin_socket"]
    assert started["sim_url"].startswith("http://127.0.0.1:")


SHELL_CALLS = [line for doc in (README, (ROOT / "docs/protocol.md").read_text())
               for line in doc.splitlines() if line.endswith("| .venv/bin/sidecard call")]


@pytest.mark.parametrize("line", SHELL_CALLS)
async def test_the_shell_example_runs_without_socat(daemon, line):
    """The README's shell example needed socat, which `make run` does not install (a fresh-clone trial)."""
    out = await run(["bash", "-e"], line + "\necho '{\"op\":\"ping\",\"id\":2}' | .venv/bin/sidecard call\n", daemon.socket_path)
    replies = [msgspec.json.decode(reply) for reply in out.splitlines()]
    assert [r["id"] for r in replies] == [1, 2] and all(r["ok"] for r in replies) and replies[0]["text"]


async def test_sidecard_call_says_when_there_is_no_daemon(short_tmp):
    """Exit status 3, as sidecardctl's for a daemon it cannot reach (docs/operations.md): it was 2, bad usage's (a
    fresh-clone trial)."""
    bin_dir = Path(sys.executable).parent
    with trio.fail_after(60):
        done = await trio.run_process([str(bin_dir / "sidecard"), "call", "--socket", f"{short_tmp}/none.sock"],
                                      stdin=b"{}\n", capture_stderr=True, check=False)
        ctl = await trio.run_process([str(bin_dir / "sidecardctl"), "--socket", f"{short_tmp}/none.sock", "status"],
                                     capture_stderr=True, check=False)
    assert ctl.returncode == 3, ctl.stderr
    assert done.returncode == 3 and b"cannot connect" in done.stderr and b"Traceback" not in done.stderr


async def test_sidecard_call_says_why_it_cannot_connect(short_tmp):
    """A socket path too long for AF_UNIX has no OS error text: the message said "cannot connect to ...: None"."""
    long_path = f"{short_tmp}/{'x' * 120}.sock"
    with trio.fail_after(60):
        done = await trio.run_process([str(Path(sys.executable).parent / "sidecard"), "call", "--socket", long_path],
                                      stdin=b"", capture_stderr=True, check=False)
    assert done.returncode == 3 and b": AF_UNIX path too long (is `sidecard serve`" in done.stderr, done.stderr
