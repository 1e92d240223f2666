"""docs/simulator.md's shell examples, run in order against a real `sidecard sim` process, so they cannot drift."""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

DOC = Path(__file__).parents[2] / "docs" / "simulator.md"
DOC_URL = "http://127.0.0.1:8787"
# An HTTP error fails the example (`curl -s` alone exits 0 on a 4xx).
PRELUDE = "set -euo pipefail\ncurl() { command curl --fail-with-body \"$@\"; }\n"


def runnable_blocks() -> list[str]:
    """The examples that talk to a simulator (not the synopsis, not the journal lookup)."""
    blocks = re.findall(r"```sh\n(.*?)```", DOC.read_text(), re.DOTALL)
    return [b for b in blocks if "$SIM/" in b and "journalctl" not in b]


@pytest.mark.skipif(not (shutil.which("curl") and shutil.which("jq")), reason="the examples need curl and jq")
def test_the_simulator_docs_examples_run():
    blocks = runnable_blocks()
    assert len(blocks) == 3
    proc = subprocess.Popen([sys.executable, "-m", "sidecard", "sim", "--port", "0"], stderr=subprocess.PIPE, text=True)
    try:
        url = re.search(r"on (http://\S+) ", proc.stderr.readline()).group(1)
        for block in blocks:
            script = PRELUDE + f"SIM={url}\n" + block.replace(DOC_URL, url)
            result = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=60)
            assert result.returncode == 0, f"{block}\n{result.stdout}\n{result.stderr}"
        assert '"type":"succeeded"' in result.stdout  # the batch's results came back
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=20)
