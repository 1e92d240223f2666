"""Shadow traffic through the real daemon: the copy goes to the candidate off the request path, so a hanging or
failing candidate never changes the answer or the latency of the real request, and the shadow stops when its
window's budget is spent."""

import shutil
from pathlib import Path

import trio

from sidecard import ctl
from sidecard.sim import Fault
from tests.harness import admin, connect, metric

HAIKU, SONNET = "claude-haiku-4-5-20251001", "claude-sonnet-4-6"
SHADOW = {"name": "haiku", "feature": "chat", "model": HAIKU, "share": 1.0, "budget_usd": 0.0008, "max_in_flight": 2,
          "deadline_ms": 30_000}


async def test_a_hanging_shadow_neither_slows_nor_changes_the_real_answer_and_the_budget_stops_it(daemon_factory, sim, autojump_clock):
    d = await daemon_factory(shadows=[SHADOW])
    client = await connect(d)
    sim.set_fault(SONNET, Fault(latency_ms=200))  # the real answers take 200 ms (virtual time)
    sim.set_fault(HAIKU, Fault(hang=True))  # the candidate never answers
    for n in range(20):
        reply = await client.complete(f"[[sim:say:answer {n}]]", feature="chat")
        assert (reply["text"], reply["served_by"]["model"]) == (f"answer {n}", SONNET)
        assert 200 <= reply["latency_ms"] < 201, reply["latency_ms"]  # as without a shadow
    await trio.sleep(31)  # the shadow calls reach their own deadline
    assert metric(d, "sidecard_shadow_requests_total", shadow="haiku", result="failed") == 2  # max_in_flight at a time

    sim.clear_faults()
    for n in range(500):
        await client.complete(f"[[sim:say:answer {n}]]", feature="chat")
        await trio.testing.wait_all_tasks_blocked()
        if metric(d, "sidecard_shadow_requests_total", shadow="haiku", result="skipped_budget"):
            break
    answered = metric(d, "sidecard_shadow_requests_total", shadow="haiku", result="answered")
    for n in range(10):  # the window's budget is spent: nothing more is mirrored in it
        await client.complete(f"[[sim:say:later {n}]]", feature="chat")
        await trio.testing.wait_all_tasks_blocked()
    assert answered >= 5 and metric(d, "sidecard_shadow_requests_total", shadow="haiku", result="answered") == answered
    assert 0 < metric(d, "sidecard_shadow_cost_usd_total", shadow="haiku") <= SHADOW["budget_usd"]
    assert metric(d, "sidecard_requests_total", outcome="ok", model=HAIKU, feature="shadow") == answered

    (status,) = (await admin(d, {"op": "shadow.status"}))["result"]["shadows"]
    assert status["budget"]["exhausted"] and status["metrics"]["cost"]["pairs"] == answered
    assert status["metrics"]["cost"]["shadow"] < status["metrics"]["cost"]["real"]  # haiku is cheaper
    assert "shadow haiku: claude-haiku" in ctl.render({"op": "shadow.status", "ok": True, "result": {"shadows": [status]}})


async def test_the_judge_scores_both_answers_of_a_shadow_pair(daemon_factory, autojump_clock):
    quality = {"enabled": True, "sample_rate": 0.0, "canary_sample_rate": 0.0}
    d = await daemon_factory(shadows=[{**SHADOW, "budget_usd": 1.0}], quality=quality)
    client = await connect(d)
    for n in range(3):
        assert (await client.complete(f"[[sim:say:answer {n}]] question {n}", feature="chat"))["ok"]
    await trio.sleep(5)
    (status,) = (await admin(d, {"op": "shadow.status"}))["result"]["shadows"]
    judged = status["metrics"]["judge_score"]
    assert judged["pairs"] == 3 and 0 <= judged["real"] <= 1 and 0 <= judged["shadow"] <= 1
    assert metric(d, "sidecard_quality_judged_total", result="ok") == 6


async def test_a_shadow_answer_off_its_prompts_format_gets_the_corrective_retry_a_live_one_would(daemon_factory, sim, short_tmp, autojump_clock):
    # (sidecard's own judge makes one attempt; a shadow is the candidate as it would serve, retry included)
    prompts = Path(short_tmp) / "prompts"
    shutil.copytree(Path(__file__).parents[2] / "prompts", prompts)
    d = await daemon_factory(shadows=[{**SHADOW, "budget_usd": 1.0}], prompts={"directory": str(prompts)})
    sim.set_fault(HAIKU, Fault(quality="offtopic"))  # the candidate answers in prose, not the prompt's JSON
    said = '{"category": "billing", "urgency": "high", "summary": "Card declined"}'
    reply = await (await connect(d)).call({"op": "complete", "prompt": "ticket-triage", "feature": "chat",
                                           "vars": {"ticket": f"[[sim:say:{said}]]"}, "cache": "bypass"})
    assert reply["ok"], reply
    await trio.sleep(5)
    assert sim.calls_for(HAIKU) == 2  # the off-format answer, then the corrective retry
