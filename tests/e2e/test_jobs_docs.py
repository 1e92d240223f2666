"""docs/jobs.md's examples, run as written against a real daemon with jobs on: the Python client snippet, the
webhook check, the HTTP face's curl lines and the operator's sidecardctl lines. (Its TOML is loaded by
tests/test_docs_config.py.)"""

from __future__ import annotations

import os
import re
import shutil
import sys
from pathlib import Path

import pytest
import trio

from sidecard.jobs.webhook import signature
from sidecard.sim import Simulator
from sidecard.sim.batches import BatchTiming
from tests.harness import admin, connect

DOC = (Path(__file__).resolve().parents[2] / "docs" / "jobs.md").read_text()
PYTHON = re.findall(r"```python\n(.*?)```", DOC, re.S)
SHELL = re.findall(r"```sh\n(.*?)```", DOC, re.S)
BIN = Path(sys.executable).parent


@pytest.fixture
def slow_batches() -> Simulator:
    return Simulator(seed=1, batch_timing=BatchTiming(processing_s=3600))  # a batch stays in flight for the test


async def jobs_on(daemon_factory, sim):
    return await daemon_factory(sim, jobs={"enabled": True, "batch_max_age_s": 0.1, "synchronous": "normal"})


async def run(script: list[str], stdin: str = "", **env: str) -> str:
    with trio.fail_after(60):
        done = await trio.run_process(script, stdin=stdin.encode(), capture_stdout=True, capture_stderr=True, check=False,
                                      env={**os.environ, **env})  # fmt: skip
    assert done.returncode == 0, done.stdout.decode() + done.stderr.decode()
    return done.stdout.decode()


def test_the_doc_has_its_examples():
    assert len(PYTHON) == 2 and len(SHELL) == 2


async def test_the_client_snippet_runs(daemon_factory, slow_batches):
    d = await jobs_on(daemon_factory, slow_batches)
    out = await run([sys.executable, "-"], PYTHON[0], SIDECARD_SOCKET=d.socket_path)
    first, answered, polled = out.strip().splitlines()
    assert first.startswith("job_") and first.endswith(" accepted")
    assert answered.startswith("engine $")
    assert polled in ("queued_batch", "running")


async def test_the_webhook_check_runs():
    namespace: dict = {}
    exec(PYTHON[1], namespace)
    body = b'{"type":"job.finished","job":{"id":"job_1","state":"succeeded"}}'
    signed = {"sidecard-signature": signature(b"s3cret", body, int(__import__("time").time()))}
    assert namespace["on_delivery"](signed, body, b"s3cret") == (200, "job_1 succeeded")
    assert namespace["on_delivery"](signed, body, b"another") == (400, "signature")


@pytest.mark.skipif(not (shutil.which("curl") and shutil.which("jq")), reason="the examples need curl and jq")
async def test_the_http_lines_run(daemon_factory, slow_batches, tmp_path):
    d = await jobs_on(daemon_factory, slow_batches)
    script = "set -euo pipefail\n" + SHELL[0].replace("/run/sidecard/http.sock", d.config.http.socket).replace(
        "/tmp/job.json", str(tmp_path / "job.json"))
    out = await run(["bash", "-c", script])
    assert out.startswith('{"jobs":[{"id":"job_') and out.endswith('"succeeded"\n"engine"\n')


async def test_the_operator_lines_run(daemon_factory, slow_batches):
    d = await jobs_on(daemon_factory, slow_batches)
    client = await connect(d)
    ask = [{"role": "user", "content": "later"}]
    ids = [(await client.call({"op": "submit", "messages": ask, "by": "6h"}))["jobs"][0]["id"] for _ in range(2)]
    while not (status := (await admin(d, {"op": "jobs"}))["result"])["batches"]:
        await trio.sleep(0.05)
    script = "set -euo pipefail\n" + SHELL[1].replace("sidecardctl", f"{BIN}/sidecardctl --socket {d.admin_socket_path}").replace(
        "job_3f0c...", ids[0]).replace("bat_...", status["batches"][0]["id"])  # fmt: skip
    out = await run(["bash", "-c", script])
    assert "STATE" in out and "batches in flight: 1 (2 jobs)" in out and "jobs.cancel: done" in out
    assert "jobs.cancel_batch: done" in out
    assert (await client.call({"op": "job", "job": ids[0]}))["job"]["state"] == "cancelled"
