"""The README's client snippets, run as written against the real daemon: both adoption paths, end to end.

Each `python - <<'EOF'` and `node - <<'EOF'` block of README.md runs in its own process with `$SIDECARD_SOCKET`
pointing at a test daemon, and the official-SDK block with its socket path swapped for the daemon's HTTP socket.
(The TypeScript SDK block needs `@anthropic-ai/sdk` and undici from npm, which the test environment does not
install; docs/http.md says which versions it was checked with.)
"""

from __future__ import annotations

import os
import re
import shutil
import sys
from pathlib import Path

import pytest
import trio

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()
HEREDOCS = re.findall(r"^(\.venv/bin/python|node --input-type=module) - <<'EOF'\n(.*?)\nEOF$", README, re.M | re.S)
PYTHON = [code for runner, code in HEREDOCS if runner.startswith(".venv")]
NODE = [code for runner, code in HEREDOCS if runner.startswith("node")]
SDK = re.search(r"```python\n(import anthropic, httpx2.*?)```", README, re.S).group(1)


async def run(command: list[str], code: str, socket_path: str) -> str:
    env = {**os.environ, "SIDECARD_SOCKET": socket_path}
    with trio.fail_after(60):
        done = await trio.run_process(command, stdin=code.encode(), capture_stdout=True, capture_stderr=True,
                                      check=False, cwd=ROOT, env=env)
    assert done.returncode == 0, done.stderr.decode()
    return done.stdout.decode()


def test_the_readme_shows_every_client():
    assert len(PYTHON) >= 5 and len(NODE) == 1  # complete, async, prompt, stream, tools; and Node
    assert any("AsyncClient" in code for code in PYTHON)
    assert "maxRetries: 0" in README and "socketPath" in README  # the TypeScript SDK's switch, on the socket


@pytest.mark.parametrize("index", range(len(PYTHON)))
async def test_a_python_snippet_runs(daemon, index):
    out = await run([sys.executable, "-"], PYTHON[index], daemon.socket_path)
    assert out.strip() and "no answer" not in out


@pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed")
async def test_the_node_snippet_runs(daemon):
    out = await run(["node", "--input-type=module", "-"], NODE[0], daemon.socket_path)
    assert "input tokens" in out and "no answer" not in out


async def test_the_sdk_snippet_runs_on_the_http_socket(daemon, sim):
    code = SDK.replace("/tmp/sidecard-1000/http.sock", daemon.config.http.socket) + "\nprint(message.content[0].text)\n"
    assert code != SDK + "\nprint(message.content[0].text)\n"
    out = await run([sys.executable, "-"], code, daemon.socket_path)
    assert out.strip() and sim.calls[-1].headers.get("x-sidecard-feature") is None  # an option, not sent upstream
    assert daemon.metrics.requests("ok", "claude-sonnet-4-6", "support-chat")._value.get() == 1
