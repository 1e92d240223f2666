"""Async jobs survive a crash: `sidecard serve` in its own process is killed with SIGKILL while a Message Batch is in
flight and jobs are running on the engine, then started again on the same store. Every job completes exactly
once: the batch is read once (no second batch is created for its jobs), the engine runs cut short run again, and
each job's result is intact. The simulator is a `sidecard sim` process of its own, so the batch outlives the daemon."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.test_hostile_process import call
from tests.e2e.test_process import LogLines

MODEL = "claude-sonnet-4-6"
BATCHED, ON_ENGINE = 12, 3
WAIT_S = 30.0


def sim_call(url: str, path: str, body: dict | None = None) -> dict:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(f"{url}{path}", data=data, method="GET" if body is None else "POST",
                                     headers={"content-type": "application/json"})  # fmt: skip
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


@pytest.fixture
def sim_url() -> Iterator[str]:
    proc = subprocess.Popen([sys.executable, "-m", "sidecard", "sim", "--port", "0"], stderr=subprocess.PIPE, text=True)
    try:
        banner = proc.stderr.readline()  # printed once the port listens
        url = re.search(r"on (http://\S+) ", banner).group(1)
        sim_call(url, "/_sim/batches", {"processing_s": 2.0})  # long enough to kill the daemon with the batch in flight
        # An engine call takes 2 s: the daemon is killed with these in flight.
        sim_call(url, "/_sim/faults", {"model": MODEL, "latency_ms": 2000})
        yield url
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=20)


def start(directory: str, sim_url: str) -> tuple[subprocess.Popen, LogLines]:
    config = Path(directory) / "sidecard.toml"
    config.write_text(f"""
[server]
socket = "{directory}/app.sock"
[metrics]
enabled = false
[quality]
enabled = false
[routes.default]
targets = [{{ provider = "anthropic", model = "{MODEL}", base_url = "{sim_url}", timeout_s = 30 }}]
[jobs]
enabled = true
synchronous = "full"
batch_max_age_s = 0.2
expected_turnaround_s = 30
min_slack_s = 5
poll_initial_s = 0.3
poll_max_s = 0.5
""")
    env = {k: v for k, v in os.environ.items() if k != "SIDECARD_CONFIG"}
    env["ANTHROPIC_API_KEY"] = "sk-test-not-a-secret"
    proc = subprocess.Popen([sys.executable, "-m", "sidecard", "serve", "--config", str(config)],
                            stderr=subprocess.PIPE, text=True, env=env, cwd=directory)  # fmt: skip
    log = LogLines(proc.stderr)
    log.wait_for('"event":"started"')
    return proc, log


def submit(app: str, text: str, by: object) -> str:
    frame = {"op": "submit", "id": 1, "messages": [{"role": "user", "content": text}], "by": by}
    reply = call(app, frame)
    assert reply["ok"], reply
    return reply["jobs"][0]["id"]


def wait_until(check, what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not check():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def test_sigkill_mid_batch_then_restart_completes_every_job_exactly_once(short_tmp, sim_url):
    app, admin = f"{short_tmp}/app.sock", f"{short_tmp}/admin.sock"
    proc, _ = start(short_tmp, sim_url)
    try:
        batched = [submit(app, f"Summarise ticket {i}", "1h") for i in range(BATCHED)]
        on_engine = [submit(app, f"Answer ticket {i} now", 30) for i in range(ON_ENGINE)]  # too soon for a batch
        wait_until(lambda: call(admin, {"op": "jobs", "id": 1})["result"]["batches_in_flight"] == 1, "no batch in flight")
        wait_until(lambda: sim_call(sim_url, "/_sim/stats")["total"]["in_flight"] >= ON_ENGINE, "the engine runs never started")
    finally:
        proc.kill()  # SIGKILL: no drain, no cleanup
        proc.wait()
    assert sim_call(sim_url, "/_sim/stats")["total"]["requests"] == ON_ENGINE  # the engine runs, cut short unanswered

    proc, log = start(short_tmp, sim_url)
    try:
        jobs = {}
        for job_id in batched + on_engine:
            reply = call(app, {"op": "wait", "id": 1, "job": job_id, "timeout_ms": int(WAIT_S * 1000)}, timeout=WAIT_S + 5)
            jobs[job_id] = reply["job"]
        assert all(job["state"] == "succeeded" for job in jobs.values()), jobs
        batches = {jobs[j]["outcome"]["batch"] for j in batched}
        assert len(batches) == 1 and all(jobs[j]["outcome"]["served"] == "batch" for j in batched)
        assert all(jobs[j]["outcome"]["served"] == "engine" for j in on_engine)
        assert all(job["outcome"]["message"]["content"][0]["text"] for job in jobs.values())
        stats = sim_call(sim_url, "/_sim/stats")["total"]
        assert stats["batched"] == BATCHED  # one batch, read after the restart: none of its jobs was batched again
        assert stats["requests"] == 2 * ON_ENGINE  # each cut-short run ran again once, to its answer
        recovered = json.loads(log.wait_for('"event":"jobs_recovered"'))
        assert recovered["engine"] == ON_ENGINE
        status = call(admin, {"op": "jobs", "id": 1})["result"]
        assert status["jobs"]["succeeded"] == BATCHED + ON_ENGINE and status["batches_in_flight"] == 0
        assert not [line for line in log.lines if "internal_error" in line or "Traceback" in line]
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=20)
