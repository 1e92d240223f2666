"""Prompt behaviours test_prompts.py leaves open: a switch never touches a request in flight nor loses one
under traffic, a refused file shows in the log and the metrics, and requests are counted per version."""

import pytest
import trio

from sidecard.sim import Fault
from tests.harness import ECHO_VERSION, admin, connect, metric, prompts_with_echo

PRIMARY = "claude-sonnet-4-6"


@pytest.fixture
def prompt_dir(short_tmp):
    return prompts_with_echo(short_tmp, versions=2)


def echo(q: str, **fields) -> dict:
    return {"op": "complete", "prompt": "echo", "vars": {"q": q}, "cache": "bypass", **fields}


async def test_a_request_in_flight_keeps_its_version_across_a_switch(daemon_factory, sim, prompt_dir, capture_log, mock_clock):
    # Time stands still until the test moves it: the held answer waits exactly as long as the test wants.
    d = await daemon_factory(prompts={"directory": str(prompt_dir), "watch": False})
    client = await connect(d)
    sim.set_fault(PRIMARY, Fault(latency_ms=5000, count=1))  # only the first call is held
    held: dict = {}

    async def slow() -> None:
        held.update(await client.call(echo("held")))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(slow)
        await sim.wait_for_calls(1)
        switched = await admin(d, {"op": "prompt.use", "prompt": "echo", "version": 2})
        assert switched["after"]["stable"] == 2
        fresh = await client.call(echo("fresh"))
        assert fresh["ok"] and fresh["prompt_version"] == 2
        assert not held  # the held request is still waiting for its answer
        mock_clock.jump(5)
    assert held["ok"] and held["prompt_version"] == 1
    sent = {call.body["messages"][0]["content"] for call in sim.calls}
    assert sent == {"[v1] held", "[v2] fresh"}
    logged = {line["prompt_version"] for line in capture_log.events("request")}
    assert logged == {1, 2}


async def test_switches_under_concurrent_traffic_lose_no_request(daemon_factory, sim, prompt_dir, autojump_clock):
    d = await daemon_factory(prompts={"directory": str(prompt_dir), "watch": False})
    sim.set_fault(PRIMARY, Fault(latency_ms=30))  # answers overlap the switches
    replies: dict[str, dict] = {}
    done = trio.Event()

    async def worker(w: int) -> None:
        client = await connect(d)
        for i in range(25):
            replies[f"w{w}-{i}"] = await client.call(echo(f"w{w}-{i}", user=f"user-{w}"))

    async def switcher() -> None:
        ops = [
            {"op": "prompt.use", "prompt": "echo", "version": 2},
            {"op": "prompt.rollback", "prompt": "echo"},
            {"op": "prompt.canary", "prompt": "echo", "version": 2, "percent": 50},
            {"op": "prompt.promote", "prompt": "echo"},
            {"op": "prompt.rollback", "prompt": "echo"},
        ]
        while not done.is_set():
            for op in ops:
                assert (await admin(d, op))["ok"]
                await trio.sleep(0.05)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(switcher)
        async with trio.open_nursery() as workers:
            for w in range(8):
                workers.start_soon(worker, w)
        done.set()
        nursery.cancel_scope.cancel()
    assert len(replies) == 200
    assert all(r["ok"] for r in replies.values()), [r.get("error") for r in replies.values() if not r["ok"]][:3]
    assert {r["prompt_version"] for r in replies.values()} == {1, 2}
    # Each answer was rendered from the version its reply reports.
    rendered = {call.body["messages"][0]["content"] for call in sim.calls}
    assert rendered == {f"[v{r['prompt_version']}] {q}" for q, r in replies.items()}


async def test_an_invalid_file_is_reported_in_the_log_and_the_metrics(daemon_factory, sim, prompt_dir, capture_log):
    d = await daemon_factory(prompts={"directory": str(prompt_dir)})
    assert metric(d, "sidecard_prompt_load_errors") == 0
    reloads_with_errors = metric(d, "sidecard_prompt_reloads_total", result="errors")
    bad = prompt_dir / "echo" / "v3.toml"
    bad.write_text(ECHO_VERSION.format(n=3).replace("{q}", "{nope}"))  # a placeholder nobody declared
    with trio.fail_after(10):
        while not d.prompts.snapshot.errors:
            await trio.sleep(0.02)
    assert metric(d, "sidecard_prompt_load_errors") == 1
    assert metric(d, "sidecard_prompt_reloads_total", result="errors") > reloads_with_errors
    line = capture_log.events("prompts_loaded")[-1]
    assert line["level"] == "warning"
    assert [e["file"] for e in line["errors"]] == [str(bad)] and "nope" in line["errors"][0]["reason"]
    assert d.status()["prompt_errors"][0]["file"] == str(bad)
    client = await connect(d)
    assert (await client.call(echo("still")))["prompt_version"] == 1  # the others keep serving
    bad.unlink()
    with trio.fail_after(10):
        while d.prompts.snapshot.errors:
            await trio.sleep(0.02)
    assert metric(d, "sidecard_prompt_load_errors") == 0
    assert capture_log.events("prompts_loaded")[-1]["errors"] == []


async def test_requests_errors_and_bad_outputs_are_counted_per_prompt_version(daemon_factory, sim, prompt_dir, autojump_clock):
    d = await daemon_factory(prompts={"directory": str(prompt_dir), "watch": False})
    client = await connect(d)
    for q in ("a", "b"):
        assert (await client.call(echo(q)))["prompt_version"] == 1
    assert (await client.call(echo("pinned", version=2)))["prompt_version"] == 2
    sim.set_fault("*", Fault(status=529))
    failed = await client.call(echo("down"))
    assert failed["error"]["code"] == "upstream_unavailable"
    sim.clear_faults()
    # The simulator's plain-word answers are not the JSON ticket-triage declares: one retry, then bad_output.
    bad = await client.call({"op": "complete", "prompt": "ticket-triage", "vars": {"ticket": "card declined"}})
    assert bad["error"]["code"] == "bad_output"
    assert metric(d, "sidecard_prompt_requests_total", prompt="echo", version="1", outcome="ok") == 2
    assert metric(d, "sidecard_prompt_requests_total", prompt="echo", version="2", outcome="ok") == 1
    assert metric(d, "sidecard_prompt_requests_total", prompt="echo", version="1", outcome="upstream_unavailable") == 1
    assert metric(d, "sidecard_prompt_requests_total", prompt="ticket-triage", version="2", outcome="bad_output") == 1
    assert metric(d, "sidecard_prompt_bad_outputs_total", prompt="ticket-triage", version="2") == 2
    assert metric(d, "sidecard_prompt_duration_seconds_count", prompt="echo", version="1") == 3
    assert metric(d, "sidecard_prompt_duration_seconds_count", prompt="echo", version="2") == 1
