"""The Node client's own tests (clients/node: `npm test`, node's test runner), so that `make test` covers them.

They start the real daemon (`sidecard serve --simulate`) from this venv and run the conformance cases through
the Node client. Skipped when `node` is not installed.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "clients" / "node"
NODE = shutil.which("node")


def sidecard_bin() -> str:
    beside = Path(sys.executable).with_name("sidecard")
    return str(beside) if beside.exists() else shutil.which("sidecard") or str(beside)


@pytest.mark.skipif(NODE is None, reason="node is not installed")
def test_node_client_suite():
    # `npm test` is `node --test FILES`: run the same command without needing npm.
    command = shlex.split(json.loads((PACKAGE / "package.json").read_text())["scripts"]["test"])
    assert command[0] == "node"
    env = {k: v for k, v in os.environ.items() if k not in ("ANTHROPIC_API_KEY", "SIDECARD_SOCKET", "SIDECARD_CONFIG")}
    env["SIDECARD_BIN"] = sidecard_bin()
    result = subprocess.run(
        [NODE, *command[1:]], cwd=PACKAGE, env=env, capture_output=True, text=True, timeout=120
    )
    failed = [line for line in result.stdout.splitlines() if line.startswith("not ok")]
    assert result.returncode == 0, "\n".join(failed) + "\n" + result.stdout[-6000:] + result.stderr[-3000:]
    assert "# fail 0" in result.stdout and "# pass 0" not in result.stdout
