"""Admin behaviours test_admin.py leaves open: prompt overrides across a restart, and the `drain` op."""

import trio

from sidecard.sim import Fault
from tests.harness import AppClient, admin, connect

PRIMARY = "claude-sonnet-4-6"


async def test_prompt_overrides_survive_a_restart(persistent, sim, capture_log):
    first = await persistent()
    assert (await admin(first, {"op": "prompt.use", "prompt": "support-reply", "version": 2}))["after"]["stable"] == 2
    canary = await admin(first, {"op": "prompt.canary", "prompt": "ticket-triage", "version": 1, "percent": 30})
    assert canary["after"] == {"stable": 2, "canary": 1, "canary_percent": 30, "overridden": True}
    await persistent.stop(first)

    second = await persistent()
    restored = capture_log.events("state_restored")[-1]
    assert sorted(restored["prompt_overrides"]) == ["support-reply", "ticket-triage"]
    prompts = second.status()["prompts"]
    assert prompts["support-reply"]["stable"] == 2 and prompts["support-reply"]["canary"] is None
    assert prompts["support-reply"]["overridden"] is True
    assert prompts["ticket-triage"]["canary"] == 1 and prompts["ticket-triage"]["canary_percent"] == 30
    client = await connect(second)
    for user in ("a", "b", "c"):  # the release file's 10% canary of v2 was replaced by the override: all on v2
        reply = await client.call({"op": "complete", "prompt": "support-reply", "vars": {"question": "q"}, "user": user})
        assert reply["ok"] and reply["prompt_version"] == 2
    # The history came back too: rollback returns to the version before the override.
    assert (await admin(second, {"op": "prompt.rollback", "prompt": "support-reply"}))["after"]["stable"] == 1
    await persistent.stop(second)

    third = await persistent()
    assert third.status()["prompts"]["support-reply"]["stable"] == 1


async def test_a_cleared_override_stays_cleared_after_a_restart(persistent):
    first = await persistent()
    await admin(first, {"op": "prompt.use", "prompt": "support-reply", "version": 2})
    cleared = await admin(first, {"op": "prompt.clear", "prompt": "support-reply"})
    assert cleared["ok"] and cleared["after"]["overridden"] is False
    await persistent.stop(first)
    second = await persistent()
    entry = second.status()["prompts"]["support-reply"]
    assert entry["overridden"] is False and entry["stable"] == 1 and entry["canary"] == 2  # release.toml decides


async def test_drain_finishes_in_flight_requests_refuses_new_ones_and_exits(persistent, sim, capture_log, autojump_clock):
    d = await persistent()
    client = await connect(d)
    sim.set_fault(PRIMARY, Fault(latency_ms=2000, count=1))
    held: dict = {}

    async def slow() -> None:
        held.update(await client.complete("held", cache="bypass"))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(slow)
        await sim.wait_for_calls(1)
        reply = await admin(d, {"op": "drain"})
        assert reply["ok"] and reply["result"] == {"in_flight": 1}
        assert capture_log.events("admin")[-1]["op"] == "drain"
        # New work is refused at once: no new connections, and none on the open one.
        with trio.fail_after(1):
            while True:
                try:
                    late = await AppClient.connect(d.socket_path)
                except OSError:
                    break
                await late.aclose()
                await trio.sleep(0.01)
        refused = await client.complete("too late", cache="bypass")
        assert refused["error"]["code"] == "shutting_down"
    assert held["ok"] and held["text"]
    await persistent.stop(d)  # returns once the daemon has exited
    assert capture_log.events("stopped")[-1]["stopped_requests"] == 0
    assert sim.stats_total()["requests"] == 1
