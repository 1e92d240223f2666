"""The shipped eval set through the real daemon (in-process, simulated upstream), and `sidecard eval` itself."""

import json
import shutil
from pathlib import Path

import pytest
import trio

from sidecard.evaltool import compare, load_cases, main, run_eval
from sidecard.quality.judge import judge_request, parse_scores, rubric_vars
from tests.harness import connect

ROOT = Path(__file__).parents[2]
EVAL_SET = str(ROOT / "evals" / "support-reply.jsonl")
# v3 makes the simulator refuse everything: its directive comes before any in the question, so it wins.
REFUSING = '''description = "v3: a broken version that refuses everything."
temperature = 0.0
system = "You are the support assistant for {product}."
[variables]
product = { default = "Acme Cloud" }
question = {}
[[messages]]
role = "user"
content = "[[sim:say:I'm sorry, but I can't help with that request.]] {question}"
'''


@pytest.fixture
def prompt_dir(short_tmp):
    root = Path(short_tmp) / "prompts"
    shutil.copytree(ROOT / "prompts", root)
    (root / "support-reply" / "v3.toml").write_text(REFUSING)
    return root


async def test_the_shipped_eval_set_gates_versions(daemon_factory, prompt_dir, capture_log):
    d = await daemon_factory(prompts={"directory": str(prompt_dir)})
    client = await connect(d)
    cases = load_cases(EVAL_SET)
    assert 6 <= len(cases) <= 10
    v1 = await run_eval(client.call, "support-reply", 1, cases)
    v2 = await run_eval(client.call, "support-reply", 2, cases)
    assert [r.failures for r in v1.results if not r.passed] == [] and v1.pass_rate == 1.0
    assert v2.pass_rate == 1.0 and v1.mean_judge is not None and v1.mean_judge >= 0.85
    assert all(r.judge is not None for r in v1.results if r.name != "refund-policy")
    assert compare(v2, v1) == (False, []) and compare(v1, v1) == (False, [])
    sent = {(line["feature"], line["prompt"]) for line in capture_log.events("request")}
    assert sent == {("eval", "support-reply"), ("quality-judge", "quality-judge")}  # labelled apart
    v3 = await run_eval(client.call, "support-reply", 3, cases)
    assert v3.pass_rate == 0.0 and v3.mean_judge == pytest.approx(0.1)
    assert all(r.answer_excerpt == "I'm sorry, but I can't help with that request." for r in v3.results)
    regressed, reasons = compare(v3, v1, tolerance=0.5)
    assert regressed and reasons[0] == "pass rate 0% is below the baseline's 100%"
    assert "case reset-password passed on v1 but fails on v3" in reasons
    [reset] = [r for r in v3.results if r.name == "reset-password"]
    assert reset.failures == ["contains \"I'm sorry\"", "judge overall 0.10 < 0.7"]


async def test_the_judge_prompt_through_the_daemon(daemon_factory, prompt_dir, sim):
    d = await daemon_factory(prompts={"directory": str(prompt_dir)})
    client = await connect(d)
    reply = await client.call(judge_request(rubric_vars("How do I reset my password?", "Open Settings.")))
    assert reply["ok"] and reply["prompt"] == "quality-judge" and reply["prompt_version"] == 1
    scores = parse_scores(reply["text"])
    assert scores is not None and scores.overall >= 0.85
    assert sim.calls[-1].body["temperature"] == 0.0 and sim.calls[-1].body["max_tokens"] == 300
    refusal = "I'm sorry, but I can't help with that request."
    refused = await client.call(judge_request(rubric_vars("How do I reset my password?", refusal)))
    assert parse_scores(refused["text"]).overall == 0.1


async def test_the_command(daemon_factory, prompt_dir, capsys):
    d = await daemon_factory(prompts={"directory": str(prompt_dir)})
    common = ["support-reply", "--set", EVAL_SET, "--socket", d.socket_path]
    # the baseline is the stable version, asked from the admin socket beside the app socket
    assert await trio.to_thread.run_sync(main, [*common, "--version", "2"]) == 0
    out = capsys.readouterr().out
    assert "support-reply: v2 (candidate) against v1 (baseline)" in out and out.rstrip().endswith("no regression")
    assert "pass rate / mean judge  100%  100%" in out
    assert await trio.to_thread.run_sync(main, [*common, "--version", "3", "--admin-socket", d.admin_socket_path]) == 1
    out = capsys.readouterr().out
    assert "REGRESSED" in out and "reset-password (v3): contains \"I'm sorry\"" in out
    assert await trio.to_thread.run_sync(main, [*common, "--version", "3", "--baseline-version", "3", "--json"]) == 0
    document = json.loads(capsys.readouterr().out)
    assert document["regressed"] is False and document["candidate"]["version"] == 3
    assert document["candidate"] == document["baseline"]  # the same version runs once
    # A prompt the daemon lacks (bad usage, 2), and no daemon at all (3, as for sidecardctl), each say so (not "give
    # --baseline-version"; a trial).
    nope = ["nope", "--set", EVAL_SET, "--socket", d.socket_path, "--version", "2"]
    assert await trio.to_thread.run_sync(main, nope) == 2
    assert capsys.readouterr().err.strip() == "sidecard eval: the daemon has no prompt 'nope'"
    gone = ["support-reply", "--set", EVAL_SET, "--socket", str(prompt_dir / "none.sock"), "--version", "2"]
    assert await trio.to_thread.run_sync(main, gone) == 3
    err = capsys.readouterr().err
    assert "cannot connect" in err and "--baseline-version" not in err, err



async def test_a_version_the_daemon_does_not_have_is_a_usage_error_found_at_once(daemon_factory, prompt_dir, sim, capsys):
    d = await daemon_factory(prompts={"directory": str(prompt_dir)})
    common = ["support-reply", "--set", EVAL_SET, "--socket", d.socket_path, "--baseline-version", "1"]
    calls = len(sim.calls)
    assert await trio.to_thread.run_sync(main, [*common, "--version", "9", "--concurrency", "1"]) == 2
    captured = capsys.readouterr()
    assert captured.err.strip() == "sidecard eval: prompt_not_found: prompt 'support-reply' has no version 9"
    assert "REGRESSED" not in captured.out
    assert len(sim.calls) == calls  # no case ran against the baseline (nor the judge)
