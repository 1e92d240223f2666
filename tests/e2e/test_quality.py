"""Quality monitoring through the real daemon: the simulator degrades answers and acts as the judge."""

import shutil
from pathlib import Path

import msgspec
import pytest
import trio

from sidecard import ctl
from sidecard.httpserver import serve_tcp_http
from sidecard.quality.judge import judge_request, rubric_vars
from sidecard.quality.trend import plot_png
from sidecard.sim import Fault
from tests.harness import admin, connect

PRIMARY, JUDGE_MODEL = "claude-sonnet-4-6", "claude-haiku-4-5-20251001"
REPO_PROMPTS = Path(__file__).parents[2] / "prompts"
MONITOR = {"window": 10, "min_samples": 5, "baseline": 0.9, "threshold": 0.6, "max_drop": 0.1, "hysteresis": 0.05}
ECHO = '''description = "v{n}"
temperature = 0.0
[variables]
q = {{}}
[[messages]]
role = "user"
content = "{prefix}{{q}}"
'''


def quality(**overrides):
    return {"quality": {"enabled": True, "sample_rate": 1.0, "canary_sample_rate": 1.0, "monitor": MONITOR, **overrides}}


async def until(predicate, timeout=30.0):
    """Wait for background work (judge calls run over real loopback sockets; time here is virtual)."""
    with trio.fail_after(timeout):
        while not predicate():
            await trio.sleep(0.05)


@pytest.fixture
def prompt_dir(short_tmp):
    root = Path(short_tmp) / "prompts"
    shutil.copytree(REPO_PROMPTS, root)
    (root / "echo").mkdir()
    (root / "echo" / "v1.toml").write_text(ECHO.format(n=1, prefix=""))
    refusal = "[[sim:say:I'm sorry, but I can't help with that request.]]"
    (root / "echo" / "v2.toml").write_text(ECHO.format(n=2, prefix=refusal))
    (root / "echo" / "release.toml").write_text("stable = 1\ncanary = 2\ncanary_percent = 50\n")
    return root


async def test_a_quality_drop_is_alerted_within_a_bounded_number_of_samples(daemon_factory, sim, autojump_clock):
    d = await daemon_factory(**quality(), routes={"default": {"targets": [{"model": PRIMARY}]}})
    client = await connect(d)
    for i in range(6):
        assert (await client.complete(f"healthy {i}", cache="bypass"))["ok"]
    await until(lambda: sim.calls_for(JUDGE_MODEL) >= 6)
    await until(lambda: d.quality.monitor.summary() and d.quality.monitor.summary()[0]["scores"] >= 6)
    assert not d.quality.monitor.firing()
    sim.set_fault(PRIMARY, Fault(quality="offtopic"))  # still "up": fast, no errors, but answers rot
    sent = 0
    while not d.quality.monitor.firing():
        assert (await client.complete(f"rotting {sent}", cache="bypass"))["ok"]
        sent += 1
        await trio.sleep(0.2)
        assert sent <= 10, "no alert within 10 degraded samples"
    firing = d.quality.monitor.firing()[0]
    assert firing.signal == "score" and firing.key[0] == "feature:default"
    text = (await _metrics(d))
    assert 'sidecard_quality_alert_firing{model="claude-sonnet-4-6",prompt="feature:default",version="-"} 1.0' in text


async def _metrics(d):
    from prometheus_client import generate_latest

    return generate_latest(d.metrics.registry).decode()


async def test_a_degraded_canary_is_rolled_back_while_stable_keeps_serving(daemon_factory, sim, prompt_dir, capture_log, autojump_clock):
    d = await daemon_factory(**quality(), prompts={"directory": str(prompt_dir)})
    client = await connect(d)
    versions = []
    for u in range(60):
        reply = await client.call({"op": "complete", "prompt": "echo", "vars": {"q": f"question {u}"}, "user": f"user-{u}"})
        assert reply["ok"]
        versions.append(reply["prompt_version"])
        await trio.sleep(0.05)
        if d.control.remedies.actions:
            break
    await until(lambda: bool(d.control.remedies.actions))
    assert 2 in versions and 1 in versions
    action = d.control.remedies.actions[0]
    assert action["action"] == "canary_rolled_back" and action["prompt"] == "echo" and action["version"] == 2
    assert d.prompts.effective("echo").canary is None
    after = [await client.call({"op": "complete", "prompt": "echo", "vars": {"q": "x"}, "user": f"user-{u}"}) for u in range(20)]
    assert {r["prompt_version"] for r in after} == {1}  # everyone on stable, no failed request
    audit = [e for e in capture_log.events("admin") if e.get("peer") == "quality-monitor"]
    assert audit and audit[-1]["op"] == "prompt.canary_rollback"


async def test_the_judge_takes_nothing_of_the_apps_rate_limits(daemon_factory, sim, autojump_clock):
    """A second fresh-clone trial: judge calls took tokens from the global rate limit, so judging answers pushed the
    apps' own requests over it. Sidecard's own calls are held to budgets, not to the limits that divide the apps'
    traffic: with every answer judged, the apps get all 4 of their 4 requests of burst."""
    d = await daemon_factory(**quality(), routes={"default": {"targets": [{"model": PRIMARY}]}},
                             rate_limits=[{"scope": "global", "requests_per_minute": 6, "burst_s": 40}])
    client = await connect(d)
    for i in range(2):
        assert (await client.complete(f"judged {i}", cache="bypass"))["ok"]
    await until(lambda: d.metrics.quality_judged("ok").value == 2)
    for i in range(2, 4):
        reply = await client.complete(f"judged {i}", cache="bypass")
        assert reply["ok"], reply
    assert (await client.complete("one too many", cache="bypass"))["error"]["code"] == "rate_limited"


async def test_a_judge_reply_off_its_format_is_a_judge_error_after_one_call(daemon_factory, sim, autojump_clock):
    d = await daemon_factory(**quality(), routes={"default": {"targets": [{"model": PRIMARY}]}})
    sim.set_fault(JUDGE_MODEL, Fault(quality="offtopic"))  # the judge answers in prose, not its rubric's JSON
    client = await connect(d)
    for i in range(3):
        assert (await client.complete(f"q{i}", cache="bypass"))["ok"]
    await until(lambda: d.metrics.quality_judged("error").value == 3)
    assert sim.calls_for(JUDGE_MODEL) == 3  # no corrective retry: sidecard's own calls make one attempt
    assert d.metrics.quality_judged("ok").value == 0


async def test_a_full_judge_queue_drops_samples_without_slowing_requests(daemon_factory, sim, autojump_clock):
    d = await daemon_factory(**quality(judge_queue=1, judge_concurrency=1), routes={"default": {"targets": [{"model": PRIMARY}]}})
    sim.set_fault(JUDGE_MODEL, Fault(hang=True))  # the judge never answers
    client = await connect(d)
    started = trio.current_time()
    for i in range(20):
        assert (await client.complete(f"q{i}", cache="bypass"))["ok"]
    assert trio.current_time() - started < 1.0  # requests are not held up by the stuck judge
    await until(lambda: d.metrics.quality_dropped("judge").value >= 15)


async def test_the_webhook_receives_firing_and_resolved_events(daemon_factory, sim, nursery, autojump_clock):
    received = []

    async def hook(request, responder):
        received.append(msgspec.json.decode(request.body))
        await responder.send(200, [(b"content-type", b"application/json")], b"{}")

    host, port = await nursery.start(serve_tcp_http, hook, "127.0.0.1", 0)
    d = await daemon_factory(**quality(webhook_url=f"http://{host}:{port}/alerts"),
                             routes={"default": {"targets": [{"model": PRIMARY}]}})
    client = await connect(d)
    sim.set_fault(PRIMARY, Fault(quality="offtopic"))
    i = 0
    while not any(e["state"] == "firing" for e in received):
        await client.complete(f"bad {i}", cache="bypass")
        i += 1
        await trio.sleep(0.2)
        assert i < 30
    sim.clear_faults()
    while not any(e["state"] == "resolved" for e in received):
        await client.complete(f"good {i}", cache="bypass")
        i += 1
        await trio.sleep(0.2)
        assert i < 80
    firing = next(e for e in received if e["state"] == "firing")
    assert firing["source"] == "sidecard" and firing["model"] == PRIMARY and firing["signal"] == "score"


async def test_heuristics_count_every_answer(daemon_factory, sim, autojump_clock):
    d = await daemon_factory(**quality(sample_rate=0.0), routes={"default": {"targets": [{"model": PRIMARY}]}})
    client = await connect(d)
    sim.set_fault(PRIMARY, Fault(quality="empty"))
    for i in range(3):
        await client.complete(f"q{i}", cache="bypass")
    await until(lambda: d.metrics.quality_checks("feature:default", "-", PRIMARY, "empty").value == 3)
    assert sim.calls_for(JUDGE_MODEL) == 0  # sample rate 0: nothing judged


async def test_sidecardctl_quality_shows_scores_and_trends(daemon_factory, sim, autojump_clock):
    from tests.e2e.test_admin import run_ctl

    d = await daemon_factory(**quality(), routes={"default": {"targets": [{"model": PRIMARY}]}})
    client = await connect(d)
    for i in range(3):
        await client.complete(f"q{i}", cache="bypass")
    await until(lambda: sim.calls_for(JUDGE_MODEL) >= 3)
    await until(lambda: bool(d.quality.monitor.summary()) and d.quality.monitor.summary()[0]["scores"] >= 3)
    result = await run_ctl(d, "quality")
    assert result.returncode == 0 and "feature:default" in result.stdout and "SCORE" in result.stdout


async def test_judge_calls_log_what_they_are_never_the_answer_under_review(daemon_factory, sim, capture_log, autojump_clock):
    d = await daemon_factory(**quality(), routes={"default": {"targets": [{"model": PRIMARY}]}})
    client = await connect(d)
    answer = (await client.complete("hi", cache="bypass"))["text"]
    await until(lambda: any(e["feature"] == "quality-judge" for e in capture_log.events("request")))
    # the eval command's judge calls come over the app socket, as an app's would
    assert (await client.call(judge_request(rubric_vars("hi", answer))))["ok"]
    judged = [e for e in capture_log.events("request") if e["feature"] == "quality-judge"]
    assert len(judged) == 2
    internal, over_the_socket = judged
    assert internal["internal"] is True and "internal" not in over_the_socket
    # what the judge judged: the app's answer (no prompt of its own here), not only the judge's prompt
    assert (internal["judged_feature"], internal["judged_model"]) == ("default", PRIMARY) and "judged_prompt" not in internal
    assert not any(key.startswith("judged_") for key in over_the_socket)
    for line in judged:
        assert (line["prompt"], line["prompt_version"]) == ("quality-judge", 1) and "prompt_prefix" not in line
    assert answer[:20] not in capture_log.text  # answers are never logged
    (app,) = [e for e in capture_log.events("request") if e["feature"] == "default"]
    assert app["prompt_prefix"] == "hi"  # an app's own request keeps its redacted prefix


async def test_the_quality_plot_of_a_rolled_back_canary(daemon_factory, sim, prompt_dir, tmp_path, autojump_clock):
    pytest.importorskip("matplotlib")
    d = await daemon_factory(**quality(), prompts={"directory": str(prompt_dir)})
    client = await connect(d)
    for u in range(80):
        reply = await client.call({"op": "complete", "prompt": "echo", "vars": {"q": f"question {u}"}, "user": f"user-{u}"})
        assert reply["ok"]
        await trio.sleep(30)  # spread over the trend's one-minute buckets
    reply = await admin(d, ctl._frame(ctl._parser().parse_args(["quality", "--png", "x.png"])))
    panels = ctl.quality_panels(reply["result"])
    lines = {line.label: line for line in panels["echo"]}
    bad = lines["v2 · claude-sonnet-4-6"]
    assert bad.floor == 0.8 and bad.alerts and bad.alerts[0][1] is None  # still firing: the span runs to the end
    assert len(bad.points) >= 2 and lines["v1 · claude-sonnet-4-6"].alerts == ()
    path = tmp_path / "quality.png"
    plot_png(panels, str(path), title="sidecard answer quality (judge score)")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
