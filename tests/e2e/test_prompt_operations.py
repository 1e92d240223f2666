"""Operator prompt commands at their edges: an override whose version is gone after a restart, and a version
whose quality alert still fires being given traffic again."""

import shutil

import pytest
import trio

from tests.e2e.test_quality import ECHO, MONITOR, until
from tests.harness import ECHO_VERSION, admin, connect, metric, prompts_with_echo

REFUSAL = "[[sim:say:I'm sorry, but I can't help with that request.]]"


@pytest.fixture
def bad_canary(short_tmp):
    """echo v1 answers well; its canary v2, for half the users, answers with refusals."""
    root = prompts_with_echo(short_tmp, 1)
    (root / "echo" / "v2.toml").write_text(ECHO.format(n=2, prefix=REFUSAL))
    (root / "echo" / "release.toml").write_text("stable = 1\ncanary = 2\ncanary_percent = 50\n")
    return root


async def test_an_override_naming_a_deleted_version_falls_back_to_the_release_loudly(persistent, short_tmp, capture_log):
    root = prompts_with_echo(short_tmp, 3)
    (root / "echo" / "release.toml").write_text("stable = 2\n")
    first = await persistent(prompts={"directory": str(root)})
    assert (await admin(first, {"op": "prompt.use", "prompt": "echo", "version": 3}))["ok"]
    await persistent.stop(first)
    (root / "echo" / "v3.toml").unlink()  # the pinned version's file is deleted while the daemon is down

    d = await persistent(prompts={"directory": str(root)})
    reply = await (await connect(d)).call({"op": "complete", "prompt": "echo", "vars": {"q": "hi"}})
    assert reply["ok"] and reply["prompt_version"] == 2  # release.toml serves
    entry = d.status()["prompts"]["echo"]
    assert entry["stable"] == 2 and entry["override_missing"] == [3]
    (problem,) = d.status()["prompt_errors"]
    assert problem["file"].endswith("echo/v3.toml") and "sidecardctl prompt clear echo" in problem["reason"]
    assert metric(d, "sidecard_prompt_load_errors") == 1
    (logged,) = capture_log.events("prompt_override_missing")
    assert logged["level"] == "error" and logged["file"] == problem["file"]
    for op in ({"op": "prompt.rollback"}, {"op": "prompt.use", "version": 2}, {"op": "prompt.clear"}):
        reply = await admin(d, {**op, "prompt": "echo"})
        assert reply["ok"], reply
    assert metric(d, "sidecard_prompt_load_errors") == 0 and d.status()["prompt_errors"] == []


async def _until_rolled_back(d, client, rollbacks: int) -> None:
    for u in range(200):
        if len([a for a in d.control.remedies.actions if a["action"] == "canary_rolled_back"]) >= rollbacks:
            return
        reply = await client.call({"op": "complete", "prompt": "echo", "vars": {"q": f"question {u}"}, "user": f"user-{u}"})
        assert reply["ok"]
        await trio.sleep(0.05)
    raise AssertionError(f"the canary was not rolled back {rollbacks} times")


async def test_a_rolled_back_canary_gets_no_traffic_back_while_its_alert_fires(daemon_factory, bad_canary, autojump_clock):
    quality = {"enabled": True, "sample_rate": 1.0, "canary_sample_rate": 1.0, "monitor": MONITOR}
    d = await daemon_factory(quality=quality, prompts={"directory": str(bad_canary)})
    client = await connect(d)
    await _until_rolled_back(d, client, 1)
    assert d.prompts.effective("echo").canary is None and d.control.remedies.firing_on("echo", 2)

    # The playbook's undo drops the overrides, but the monitor's rollback stays in force and says why.
    cleared = await admin(d, {"op": "prompt.clear", "prompt": "echo"})
    assert cleared["ok"] and cleared["after"]["canary"] is None
    assert "canary v2 stays stopped" in cleared["result"]["note"] and "--force" in cleared["result"]["note"]
    # Asking for the bad version by name is refused, saying why, and changes nothing.
    for op in ({"op": "prompt.canary", "percent": 30, "version": 2}, {"op": "prompt.use", "version": 2}):
        refused = await admin(d, {**op, "prompt": "echo"})
        assert refused["ok"] is False and refused["error"]["code"] == "bad_request"
        assert "echo v2 has a firing quality alert" in refused["error"]["message"] and "--force" in refused["error"]["message"]
        assert d.prompts.effective("echo").canary is None
    # Forced, it serves again, its alert is re-measured, and the monitor acts again when it still fails.
    forced = await admin(d, {"op": "prompt.canary", "prompt": "echo", "percent": 50, "version": 2, "force": True})
    assert forced["ok"] and forced["after"]["canary"] == 2
    await _until_rolled_back(d, client, 2)
    await until(lambda: d.prompts.effective("echo").canary is None)


async def test_a_restart_with_an_override_on_a_prompt_that_cannot_serve_still_starts(persistent, short_tmp, capture_log):
    root = prompts_with_echo(short_tmp, 2)
    first = await persistent(prompts={"directory": str(root)})
    assert (await admin(first, {"op": "prompt.use", "prompt": "echo", "version": 2}))["ok"]
    await persistent.stop(first)
    (root / "echo" / "v2.toml").unlink()
    (root / "echo" / "release.toml").write_text("stable = 7\n")  # and the release names a version that is not there

    d = await persistent(prompts={"directory": str(root)})
    assert d.status()["prompts"]["echo"]["error"] == "no valid release"
    assert "echo" not in capture_log.events("state_restored")[-1]["prompt_overrides"]
    assert (await admin(d, {"op": "status"}))["ok"]


async def test_an_edit_refused_while_live_goes_in_as_the_release_moves_off_it(daemon_factory, sim, short_tmp, capture_log):
    """Found by a fresh-clone trial: the refused edit stayed out (and reported) until some unrelated reload."""
    root = prompts_with_echo(short_tmp, 2)
    d = await daemon_factory(prompts={"directory": str(root), "watch": False})
    client = await connect(d)

    async def sent(**fields) -> str:
        reply = await client.call({"op": "complete", "prompt": "echo", "vars": {"q": "hi"}, "cache": "bypass", **fields})
        assert reply["ok"], reply
        return sim.calls[-1].body["messages"][0]["content"]

    (root / "echo" / "v1.toml").write_text(ECHO_VERSION.format(n=1).replace("[v1]", "[v1 edited]"))
    assert (await admin(d, {"op": "reload"}))["ok"]
    (refused,) = d.status()["prompt_errors"]
    assert refused["file"].endswith("echo/v1.toml") and "v1 is live and must not be edited" in refused["reason"]
    assert await sent() == "[v1] hi"

    assert (await admin(d, {"op": "prompt.use", "prompt": "echo", "version": 2}))["ok"]
    assert d.status()["prompt_errors"] == [] and metric(d, "sidecard_prompt_load_errors") == 0
    (settled,) = capture_log.events("prompts_settled")
    assert settled["prompts"] == ["echo"] and settled["errors"] == []
    assert await sent(version=1) == "[v1 edited] hi"
    assert (await admin(d, {"op": "prompt.use", "prompt": "echo", "version": 1}))["ok"]
    assert await sent() == "[v1 edited] hi"


async def test_a_prompt_whose_directory_is_removed_is_gone(daemon_factory, short_tmp, capture_log):
    """Found by a fresh-clone trial: `rm -rf prompts/NAME` kept it serving, with a misleading status, until a restart."""
    root = prompts_with_echo(short_tmp, 1)
    d = await daemon_factory(prompts={"directory": str(root), "watch": False})
    client = await connect(d)
    assert (await admin(d, {"op": "prompt.use", "prompt": "echo", "version": 1}))["ok"]  # an override left on it
    shutil.rmtree(root / "echo")
    assert (await admin(d, {"op": "reload"}))["ok"]
    reply = await client.call({"op": "complete", "prompt": "echo", "vars": {"q": "hi"}})
    assert reply["error"]["code"] == "prompt_not_found"
    assert "echo" not in d.status()["prompts"]
    assert capture_log.events("prompts_loaded")[-1]["removed"] == ["echo"]
    (problem,) = d.status()["prompt_errors"]  # only the override left over, and how to drop it
    assert problem["file"].endswith("/echo") and "directory is gone" in problem["reason"]
    assert "sidecardctl prompt clear echo" in problem["reason"]
    cleared = await admin(d, {"op": "prompt.clear", "prompt": "echo"})
    assert cleared["ok"] and "override is dropped" in cleared["result"]["note"]
    assert d.status()["prompt_errors"] == [] and metric(d, "sidecard_prompt_load_errors") == 0
    refused = await admin(d, {"op": "prompt.clear", "prompt": "echo"})
    assert refused["error"]["code"] == "prompt_not_found"
