"""Experiments and progressive rollouts through the real daemon and the simulator, on virtual time: an A/B test
that reaches the right verdict on simulated feedback, a rollout that promotes step by step, one that rolls back
by itself, and one that survives a restart."""

import random

import trio

from sidecard import ctl
from sidecard.sim import Fault
from tests.harness import admin, connect, metric, prompts_with_echo

FAST = {"evaluate_every_s": 1.0, "min_samples": 60, "guards": [{"metric": "error_rate", "margin": 0.05}]}
HAIKU = "claude-haiku-4-5-20251001"


async def ask(client, users, *, feature="default"):
    """One echo request per user (distinct questions: no cached answers); the replies."""
    return [await client.call({"op": "complete", "prompt": "echo", "vars": {"q": f"question {user}"}, "user": f"u{user}",
                               "feature": feature}) for user in users]


async def until_settled(d, client) -> dict:
    """Traffic (20 new users a second) until the rollout is no longer running; its status then."""
    users = iter(range(100_000))
    for _ in range(60):
        await ask(client, [next(users) for _ in range(20)])
        await trio.sleep(1.5)
        (rollout,) = (await admin(d, {"op": "rollout.status"}))["result"]["rollouts"]
        if rollout["state"] != "running":
            return rollout
    raise AssertionError(f"the rollout is still running: {rollout}")


async def test_an_ab_test_reaches_the_right_verdict_on_feedback_and_promotes_the_winner(daemon_factory, short_tmp, autojump_clock, capture_log):
    root = prompts_with_echo(short_tmp, 2)
    spec = {"name": "tone", "prompt": "echo", "primary": "feedback_score", "min_samples": 40,
            "arms": [{"name": "plain", "version": 1}, {"name": "warm", "version": 2}],
            "guardrails": [{"metric": "error_rate", "margin": 0.05}]}
    d = await daemon_factory(prompts={"directory": str(root)}, experiments=[spec], rollout={"evaluate_every_s": 1.0})
    client, rng = await connect(d), random.Random(20)
    quality = {1: 0.55, 2: 0.75}  # users like v2's answers better: a 20-point difference in mean feedback
    seen, decided, users = {1: 0, 2: 0}, None, iter(range(10_000))
    while decided is None:
        for reply in await ask(client, [next(users) for _ in range(20)]):
            version = reply["prompt_version"]
            seen[version] += 1
            score = min(1.0, max(0.0, rng.gauss(quality[version], 0.2)))
            assert (await client.call({"op": "feedback", "request_id": reply["request_id"], "score": round(score, 2)}))["ok"]
        await trio.sleep(1.5)
        (view,) = (await admin(d, {"op": "experiment.status"}))["result"]["experiments"]
        decided = view if view["state"] != "running" else None
    assert (decided["state"], decided["winner"]) == ("decided", "warm") and 40 <= min(seen.values()) < 400, seen
    primary = next(c for c in decided["comparisons"] if c["kind"] == "primary")
    assert primary["decision"] == "better" and primary["ci_low"] > 0 and primary["p_value"] < 0.05
    assert metric(d, "sidecard_experiment_state", experiment="tone", state="decided") == 1
    (line,) = capture_log.events("experiment_decided")
    assert line["winner"] == "warm" and line["evidence"][0]["decision"] == "better"
    assert "DECIDED, winner warm" in ctl.render({"op": "experiment.status", "ok": True, "result": {"experiments": [decided]}})
    # Decided: everyone gets the winner, until an operator promotes it to stable.
    assert {r["prompt_version"] for r in await ask(client, range(20_000, 20_010))} == {2}
    assert (await admin(d, {"op": "experiment.promote", "name": "tone"}))["ok"]
    assert d.status()["prompts"]["echo"]["stable"] == 2 and not (await admin(d, {"op": "experiment.status"}))["result"]["experiments"]


async def test_a_rollout_promotes_a_good_version_step_by_step(daemon_factory, short_tmp, autojump_clock, capture_log):
    root = prompts_with_echo(short_tmp, 2)
    d = await daemon_factory(prompts={"directory": str(root)}, rollout=FAST)
    client = await connect(d)
    started = await admin(d, {"op": "prompt.rollout", "prompt": "echo", "version": 2, "steps": [25, 50, 100]})
    assert started["ok"] and started["after"]["percent"] == 25
    rollout = await until_settled(d, client)
    assert rollout["state"] == "completed" and [e["action"] for e in rollout["history"]] == ["start", "promote", "complete"]
    assert d.status()["prompts"]["echo"]["stable"] == 2 and d.status()["prompts"]["echo"]["canary"] is None
    assert [line["action"] for line in capture_log.events("rollout_step")] == ["start", "promote", "complete"]
    assert metric(d, "sidecard_rollout_percent", prompt="echo") == 100


async def test_a_rollout_rolls_back_a_failing_version_at_the_first_step(daemon_factory, short_tmp, sim, autojump_clock, capture_log):
    root = prompts_with_echo(short_tmp, 2)
    version = (root / "echo" / "v2.toml").read_text()
    (root / "echo" / "v2.toml").write_text('route = "cheap"\n' + version)  # v2 goes to a model that fails
    sim.set_fault(HAIKU, Fault(status=500, should_retry=False))
    d = await daemon_factory(prompts={"directory": str(root)}, rollout=FAST,
                             routes={"cheap": {"targets": [{"provider": "anthropic", "model": HAIKU}]}})
    client = await connect(d)
    assert (await admin(d, {"op": "prompt.rollout", "prompt": "echo", "version": 2, "steps": [25, 50, 100]}))["ok"]
    rollout = await until_settled(d, client)
    assert rollout["state"] == "rolled_back" and rollout["percent"] == 0 and "error_rate" in rollout["reason"]
    assert [e["action"] for e in rollout["history"]] == ["start", "rollback"]  # at the first step
    assert d.status()["prompts"]["echo"]["canary"] is None
    assert {r["prompt_version"] for r in await ask(client, range(50_000, 50_020))} == {1}


async def test_a_rollout_resumes_after_a_restart(persistent, short_tmp, autojump_clock):
    root = prompts_with_echo(short_tmp, 2)
    first = await persistent(prompts={"directory": str(root)}, rollout=FAST)
    assert (await admin(first, {"op": "prompt.rollout", "prompt": "echo", "version": 2, "steps": [25, 50, 100]}))["ok"]
    assert (await admin(first, {"op": "rollout.control", "prompt": "echo", "action": "pause"}))["ok"]
    await persistent.stop(first)

    d = await persistent(prompts={"directory": str(root)}, rollout=FAST)
    (rollout,) = (await admin(d, {"op": "rollout.status"}))["result"]["rollouts"]
    assert (rollout["state"], rollout["percent"], d.status()["prompts"]["echo"]["canary"]) == ("paused", 25, 2)
    assert (await admin(d, {"op": "rollout.control", "prompt": "echo", "action": "resume"}))["ok"]
    rollout = await until_settled(d, await connect(d))
    assert rollout["state"] == "completed"
    assert [e["action"] for e in rollout["history"]] == ["start", "pause", "resume", "promote", "complete"]


async def test_an_experiment_and_its_tally_survive_a_restart(persistent, short_tmp, autojump_clock):
    root = prompts_with_echo(short_tmp, 2)
    spec = {"name": "kept", "prompt": "echo", "primary": "latency", "min_samples": 1000,
            "arms": [{"name": "one", "version": 1}, {"name": "two", "version": 2}]}
    first = await persistent(prompts={"directory": str(root)})
    assert (await admin(first, {"op": "experiment.start", "experiment": spec}))["ok"]
    sticky = {r["prompt_version"] for r in await ask(await connect(first), [7] * 5)}
    await ask(await connect(first), range(30))
    await persistent.stop(first)  # (no evaluation tick since: the values are kept at shutdown)

    d = await persistent(prompts={"directory": str(root)})
    (view,) = (await admin(d, {"op": "experiment.status", "name": "kept"}))["result"]["experiments"]
    assert view["state"] == "running" and sum(arm["samples"]["latency"] for arm in view["arms"]) == 30  # (cached answers give no latency)
    assert {r["prompt_version"] for r in await ask(await connect(d), [7] * 3)} == sticky  # the same arm after it
    assert len(sticky) == 1


async def test_a_route_rollout_of_a_new_model_completes_or_rolls_back_by_itself(daemon_factory, sim, autojump_clock):
    guards = [{"metric": "error_rate", "margin": 0.05}, {"metric": "latency", "margin": 0.05}]
    d = await daemon_factory(rollout={**FAST, "guards": guards})
    client = await connect(d)

    async def settle() -> dict:
        for n in range(60):
            for user in range(20):
                await client.complete(f"question {n}-{user}", user=f"u{n}-{user}")
            await trio.sleep(1.5)
            (rollout,) = (await admin(d, {"op": "rollout.status", "prompt": "route:default"}))["result"]["rollouts"]
            if rollout["state"] != "running":
                return rollout
        raise AssertionError(rollout)

    sim.set_fault(HAIKU, Fault(latency_ms=400))  # the new model is 400 ms slower: the latency guard breaks
    assert (await admin(d, {"op": "route.rollout", "route": "default", "model": HAIKU, "steps": [25, 50, 100]}))["ok"]
    rollout = await settle()
    assert rollout["state"] == "rolled_back" and rollout["reason"].startswith("latency")
    assert d.status()["routes"]["default"]["targets"][0]["model"] == "claude-sonnet-4-6"

    sim.clear_faults()
    assert (await admin(d, {"op": "route.rollout", "route": "default", "model": HAIKU, "steps": [25, 50, 100]}))["ok"]
    rollout = await settle()
    assert rollout["state"] == "completed" and [e["action"] for e in rollout["history"]] == ["start", "promote", "complete"]
    assert [t["model"] for t in d.status()["routes"]["default"]["targets"]] == [HAIKU, "claude-sonnet-4-6"]
    assert (await client.complete("after the rollout"))["served_by"]["model"] == HAIKU


async def test_a_request_the_safety_rules_refuse_says_nothing_about_its_arm(daemon_factory, autojump_clock):
    import os

    split = {"name": "models", "feature": "other", "primary": "error_rate",
             "arms": [{"name": "sonnet", "model": "claude-sonnet-4-6"}, {"name": "haiku", "model": HAIKU}]}
    d = await daemon_factory(experiments=[split], safety={
        "access": {"enabled": True, "apps": {"chat": {"uids": [os.getuid()], "features": ["chat"]}}}})
    client = await connect(d)
    refused = await client.call({"op": "complete", "feature": "other", "user": "u1",
                                 "messages": [{"role": "user", "content": "hi"}]})
    assert refused["error"]["code"] == "forbidden"
    (view,) = (await admin(d, {"op": "experiment.status"}))["result"]["experiments"]
    assert all(arm["samples"]["error_rate"] == 0 for arm in view["arms"]), view  # the caller's refusal, not the arm's error


async def test_sidecards_own_rate_limit_says_nothing_about_an_arm_but_the_providers_429_does(daemon_factory, sim, mock_clock):
    """Found by a fresh-clone trial: a local [[rate_limits]] refusal, made before any upstream call, counted as the
    arm's error and could fail its error-rate guardrail."""
    split = {"name": "models", "feature": "other", "primary": "error_rate",
             "arms": [{"name": "sonnet", "model": "claude-sonnet-4-6"}, {"name": "haiku", "model": HAIKU}]}
    d = await daemon_factory(experiments=[split], rate_limits=[{"scope": "user", "requests_per_minute": 6, "burst_s": 20}])
    client = await connect(d)

    async def call(user: str) -> dict:
        return await client.call({"op": "complete", "feature": "other", "user": user, "cache": "bypass",
                                  "messages": [{"role": "user", "content": f"hi from {user}"}], "max_tokens": 20})

    async def error_rates() -> list[tuple[int, float]]:
        (view,) = (await admin(d, {"op": "experiment.status"}))["result"]["experiments"]
        return [(arm["samples"]["error_rate"], arm["means"]["error_rate"]) for arm in view["arms"] if arm["samples"]["error_rate"]]

    assert [(await call("u1"))["ok"] for _ in range(2)] == [True, True]  # a burst of 2
    refused = await call("u1")
    assert refused["error"]["code"] == "rate_limited" and "over the user rate limit" in refused["error"]["message"]
    assert await error_rates() == [(2, 0.0)]  # u1's arm: two answers, the refusal not counted

    sim.set_fault("*", Fault(status=429, should_retry=False, retry_after_s=30))
    throttled = await call("u1-again")
    assert throttled["error"]["code"] == "rate_limited" and throttled["error"]["message"] != refused["error"]["message"]
    assert sorted(await error_rates()) in ([(1, 1.0), (2, 0.0)], [(3, 1 / 3)])  # the provider's 429 is the arm's


async def test_sidecards_own_full_queue_says_nothing_about_an_arm_but_the_providers_529_does(daemon_factory, sim, short_tmp,
                                                                                             autojump_clock):
    """A request every target's admission queue turned away (`overloaded`, queue_full) never reached the arm's
    target, as a local rate limit's refusal does not (e4156b0), yet it counted as the arm's error."""
    spec = {"name": "tone", "prompt": "echo", "primary": "error_rate",
            "arms": [{"name": "plain", "version": 1}, {"name": "warm", "version": 2}]}
    d = await daemon_factory(prompts={"directory": str(prompts_with_echo(short_tmp, 2))}, experiments=[spec],
                             routes={"default": {"targets": [{"model": "claude-sonnet-4-6", "max_attempts": 1}]}},
                             queue={"max_concurrency": 1, "max_queue": 0, "shed": False})
    sim.set_fault("*", Fault(latency_ms=1000))
    client = await connect(d)
    replies = []

    async def call(text: str) -> None:
        replies.append(await client.call({"op": "complete", "prompt": "echo", "vars": {"q": text}, "user": "u1",
                                          "cache": "bypass"}))

    async def error_rates() -> list[tuple[int, float]]:
        (view,) = (await admin(d, {"op": "experiment.status"}))["result"]["experiments"]
        return [(arm["samples"]["error_rate"], arm["means"]["error_rate"]) for arm in view["arms"] if arm["samples"]["error_rate"]]

    async with trio.open_nursery() as n:
        n.start_soon(call, "first")
        await trio.sleep(0.1)
        n.start_soon(call, "second")  # the one target holds its one slot and has no room to queue
    refused, answered = replies
    assert refused["error"]["code"] == "overloaded" and "queue_full" in refused["error"]["message"] and answered["ok"]
    assert await error_rates() == [(1, 0.0)]  # the answer; the local refusal not counted (was [(2, 0.5)])

    sim.set_fault("*", Fault(status=529, should_retry=False))
    await call("third")
    assert replies[-1]["error"]["code"] == "upstream_unavailable" and "529" in replies[-1]["error"]["message"]
    assert await error_rates() == [(2, 0.5)]  # the provider's 529 for the arm's target is the arm's
