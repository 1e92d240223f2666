"""`sidecard sim`'s command line: faults and limits set at start (`--fault`, `--requests-per-minute`)."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import urllib.error
import urllib.request

import pytest

from sidecard.sim import Fault, Simulator
from sidecard.sim.faults import parse_fault_option
from sidecard.sim.replies import REFUSAL

MODEL = "claude-sonnet-4-6"


def test_a_fault_option_is_key_values_or_the_control_endpoints_json():
    assert parse_fault_option(f"{MODEL}=status=529,rate=0.5") == (MODEL, Fault(status=529, rate=0.5))
    assert parse_fault_option("*=hang=true, count=2 ,quality=empty") == ("*", Fault(hang=True, count=2, quality="empty"))
    assert parse_fault_option(f'{MODEL}={{"retry_after_s": 1.5, "should_retry": false, "status": 429}}') == (
        MODEL, Fault(status=429, retry_after_s=1.5, should_retry=False),
    )


@pytest.mark.parametrize(
    ("option", "message"),
    [
        ("status=529", "'529' is not KEY=VALUE"),  # no model: "status" is read as the model
        ("=status=529", "expected MODEL=SPEC"),
        (f"{MODEL}=status=200", "status must be an HTTP error status"),
        (f"{MODEL}=status", "'status' is not KEY=VALUE"),
        (f"{MODEL}=stauts=529", "stauts: unknown key"),
        (f"{MODEL}=status=many", "status: expected int | null, got str"),
        (f"{MODEL}={{broken", "malformed"),
        (f"{MODEL}=[529]", "not KEY=VALUE"),
    ],
)
def test_a_bad_fault_option_says_what_is_wrong(option, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        parse_fault_option(option)


def test_faults_given_at_start_are_active_and_come_back_after_a_reset():
    sim = Simulator(faults={MODEL: Fault(status=529, count=1), "*": Fault(latency_ms=5)})
    assert sim.active_faults() == {MODEL: Fault(status=529, count=1), "*": Fault(latency_ms=5)}
    sim.clear_faults()
    sim.set_fault("other", Fault(status=500))
    sim.reset()
    assert sim.active_faults() == {MODEL: Fault(status=529, count=1), "*": Fault(latency_ms=5)}


# ---------------------------------------------------------------------- the real process


def _call(url: str, method: str = "GET", body: dict | None = None) -> tuple[int, dict, dict]:
    data = None if body is None else json.dumps(body).encode()
    headers = {"content-type": "application/json", "anthropic-version": "2023-06-01"}
    request = urllib.request.Request(url, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, dict(response.headers), json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), json.loads(error.read())


def test_sim_command_installs_faults_and_limits_at_start():
    proc = subprocess.Popen(
        [sys.executable, "-m", "sidecard", "sim", "--port", "0", "--requests-per-minute", "50",
         "--tokens-per-minute", "90000", "--fault", f"{MODEL}=status=529,count=1,retry_after_s=2", "--fault", '*={"quality": "refusal"}'],
        stderr=subprocess.PIPE, text=True,
    )
    try:
        banner = proc.stderr.readline()  # printed once the port listens: no polling needed
        url = re.search(r"on (http://\S+) ", banner).group(1)
        _, _, stats = _call(f"{url}/_sim/stats")
        assert stats["faults"] == {MODEL: {"status": 529, "count": 1, "retry_after_s": 2.0}, "*": {"quality": "refusal"}}
        assert stats["limits"]["requests_per_minute"] == 50 and stats["limits"]["tokens_per_minute"] == 90000

        ask = {"model": MODEL, "max_tokens": 50, "messages": [{"role": "user", "content": "hi"}]}
        status, headers, body = _call(f"{url}/v1/messages", "POST", ask)
        assert status == 529 and body["error"]["type"] == "overloaded_error" and headers["retry-after"] == "2"
        status, headers, body = _call(f"{url}/v1/messages", "POST", ask)  # the counted fault is spent
        assert status == 200 and body["content"][0]["text"] and headers["anthropic-ratelimit-requests-limit"] == "50"
        status, _, body = _call(f"{url}/v1/messages", "POST", {**ask, "model": "claude-haiku-4-5-20251001"})
        assert status == 200 and body["content"][0]["text"] == REFUSAL  # the "*" fault

        _call(f"{url}/_sim/reset", "POST", {})
        assert MODEL in _call(f"{url}/_sim/stats")[2]["faults"]  # reset restores what the command line set
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=20)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--fault", f"{MODEL}=status=200"], "--fault 'claude-sonnet-4-6=status=200': status must be an HTTP error"),
        (["--requests-per-minute", "0"], "--requests-per-minute must be at least 1"),
        (["--tokens-per-minute", "0"], "--tokens-per-minute must be at least 1"),
    ],
)
def test_sim_command_refuses_bad_options_in_one_line(args, message):
    result = subprocess.run([sys.executable, "-m", "sidecard", "sim", "--port", "0", *args],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and result.stderr.startswith(f"sidecard: {message}"), result.stderr
