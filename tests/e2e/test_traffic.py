"""Traffic control through the real daemon: budgets, rate limits, provider throttling, queueing, shedding."""

import os

import pytest
import trio

from sidecard.sim import Fault
from tests.harness import connect, make_config, new_daemon

PRIMARY, CHEAP = "claude-sonnet-4-6", "claude-haiku-4-5-20251001"
ROUTES = {
    "default": {"targets": [{"model": PRIMARY, "max_attempts": 1}]},
    "cheap": {"targets": [{"model": CHEAP, "max_attempts": 1}]},
}


def frame(text, **fields):
    return {"op": "complete", "messages": [{"role": "user", "content": text}], "max_tokens": 50, "cache": "bypass", **fields}


async def test_soft_limit_alerts_and_switches_route_then_hard_limit_refuses(daemon_factory, sim, capture_log, mock_clock):
    budgets = [{"scope": "feature:chat", "window": "day", "soft_usd": 0.002, "hard_usd": 0.004, "soft_route": "cheap"}]
    d = await daemon_factory(routes=ROUTES, budgets=budgets)
    client = await connect(d)
    served = []
    refused = None
    for i in range(60):
        reply = await client.call(frame(f"q{i}", feature="chat"))
        if not reply["ok"]:
            refused = reply
            break
        served.append(reply["served_by"]["model"])
    assert PRIMARY in served and CHEAP in served  # Sonnet until the soft limit, then Haiku
    assert served.index(CHEAP) > 0 and set(served[served.index(CHEAP):]) == {CHEAP}
    assert capture_log.events("budget_soft_limit")
    assert refused["error"]["code"] == "budget_exceeded" and refused["error"]["retryable"] is False
    assert 0 < refused["error"]["retry_after_ms"] <= 86_400_000
    other = await client.call(frame("another feature", feature="search"))
    assert other["ok"]  # the budget is the chat feature's
    calls = sim.stats_total()["requests"]
    assert (await client.call(frame("still refused", feature="chat")))["error"]["code"] == "budget_exceeded"
    assert sim.stats_total()["requests"] == calls  # a refused request never reaches the upstream
    mock_clock.jump(86_400)  # the next UTC day
    assert (await client.call(frame("new day", feature="chat")))["ok"]


async def test_spend_survives_a_restart_and_a_corrupt_file_is_moved_aside(nursery, sim, capture_log, short_tmp, mock_clock):
    settings = {
        "routes": ROUTES,
        "budgets": [{"scope": "global", "window": "day", "hard_usd": 0.003}],
        "spend": {"path": f"{short_tmp}/spend.json", "flush_interval_s": 0.5},
    }
    async with trio.open_nursery() as n:
        first = await n.start(new_daemon(make_config(short_tmp, **settings), sim, capture_log).run)
        client = await connect(first)
        while (await client.call(frame("spend")))["ok"]:
            pass
        first.shutdown()
    assert os.path.exists(f"{short_tmp}/spend.json")
    second = await nursery.start(new_daemon(make_config(short_tmp, **settings), sim, capture_log).run)
    assert (await (await connect(second)).call(frame("after restart")))["error"]["code"] == "budget_exceeded"
    second.shutdown()
    await trio.testing.wait_all_tasks_blocked()

    with open(f"{short_tmp}/spend.json", "w") as f:
        f.write("{not json")
    third = await nursery.start(new_daemon(make_config(short_tmp, **settings), sim, capture_log).run)
    assert capture_log.events("spend_store_corrupt")
    assert any(name.startswith("spend.json.corrupt-") for name in os.listdir(short_tmp))
    assert (await (await connect(third)).call(frame("fresh start")))["ok"]


async def test_rate_limit_refusals_are_exact(daemon_factory, sim, mock_clock):
    d = await daemon_factory(routes=ROUTES, rate_limits=[{"scope": "user", "requests_per_minute": 6, "burst_s": 20}])
    client = await connect(d)
    answers = [await client.call(frame(f"q{i}", user="alice")) for i in range(2)]
    assert all(a["ok"] for a in answers)  # a burst of 20 s at 6 a minute: 2 requests at once
    refused = await client.call(frame("one too many", user="alice"))
    assert refused["error"]["code"] == "rate_limited" and refused["error"]["retryable"] is True
    assert refused["error"]["retry_after_ms"] == 10_000  # one request per 10 s
    assert (await client.call(frame("bob is separate", user="bob")))["ok"]
    mock_clock.jump(9.9)
    assert (await client.call(frame("still early", user="alice")))["error"]["code"] == "rate_limited"
    mock_clock.jump(0.1)
    assert (await client.call(frame("on time", user="alice")))["ok"]


async def test_provider_headers_hold_traffic_instead_of_drawing_429s(daemon_factory, sim, autojump_clock):
    sim.set_limits(requests_per_minute=5)
    d = await daemon_factory(routes=ROUTES)
    client = await connect(d)
    replies = []

    async def one(i):
        replies.append(await client.call(frame(f"q{i}", deadline_ms=180_000)))

    async with trio.open_nursery() as n:
        for i in range(12):
            n.start_soon(one, i)
            await trio.sleep(1)
    assert all(r["ok"] for r in replies), [r for r in replies if not r["ok"]]
    assert sim.stats_total()["throttled"] == 0  # never a 429: sidecard waited for the window to reset
    assert d.metrics.throttled("anthropic", PRIMARY)._value.get() >= 1


async def test_overload_interactive_before_batch_and_refusals_are_immediate(daemon_factory, sim, capture_log, autojump_clock):
    sim.set_fault(PRIMARY, Fault(latency_ms=1000))
    sim.set_limits(concurrency_limit=4)
    d = await daemon_factory(routes=ROUTES, queue={"max_concurrency": 4, "max_queue": 4, "shed": True})
    client = await connect(d)
    results = {}

    async def one(name, priority, deadline_ms):
        started = trio.current_time()
        reply = await client.call(frame(name, priority=priority, deadline_ms=deadline_ms))
        results[name] = (reply, trio.current_time() - started)

    async with trio.open_nursery() as n:
        for i in range(4):  # fill the four slots
            n.start_soon(one, f"running{i}", "interactive", 30_000)
        await trio.sleep(0.1)
        for i in range(4):  # fill the queue with batch work
            n.start_soon(one, f"batch{i}", "batch", 30_000)
        await trio.sleep(0.1)
        for i in range(4):  # interactive arrivals push batch work out of the full queue
            n.start_soon(one, f"inter{i}", "interactive", 30_000)
        await trio.sleep(0.1)
        n.start_soon(one, "hopeless", "interactive", 500)  # cannot be served within 0.5 s
    assert all(results[f"running{i}"][0]["ok"] for i in range(4))
    assert all(results[f"inter{i}"][0]["ok"] for i in range(4))
    shed = [results[f"batch{i}"][0] for i in range(4) if not results[f"batch{i}"][0]["ok"]]
    assert shed and all(r["error"]["code"] == "overloaded" and r["error"]["retryable"] for r in shed)
    assert results["hopeless"][0]["error"]["code"] == "overloaded"
    # Every refusal was immediate (the daemon's own timing; the test client shares one reader between tasks).
    refusals = [e for e in capture_log.events("request") if e["outcome"] == "overloaded"]
    assert len(refusals) == len(shed) + 1 and all(e["latency_ms"] < 300 for e in refusals)
    assert sim.stats_total()["max_in_flight"] <= 4 and sim.stats_total()["throttled"] == 0
    served_inter = max(t for name, (r, t) in results.items() if name.startswith("inter"))
    assert served_inter <= 2.3  # the queued interactive requests were served in the next round


@pytest.mark.parametrize("command", [["budget"], ["limits"]])
async def test_sidecardctl_budget_and_limits(daemon_factory, sim, command):
    from tests.e2e.test_admin import run_ctl

    d = await daemon_factory(routes=ROUTES, budgets=[{"scope": "global", "window": "day", "hard_usd": 10}])
    await (await connect(d)).call(frame("warm"))
    result = await run_ctl(d, *command)
    assert result.returncode == 0
    assert ("global" in result.stdout) if command == ["budget"] else ("anthropic:claude-sonnet-4-6" in result.stdout)


async def test_budget_raise_and_reset_are_audited(daemon_factory, sim, capture_log):
    from tests.e2e.test_admin import admin

    d = await daemon_factory(routes=ROUTES, budgets=[{"scope": "global", "window": "day", "hard_usd": 0.001}])
    client = await connect(d)
    first = await client.call(frame("costly"))
    assert first["ok"], first
    assert (await client.call(frame("refused")))["error"]["code"] == "budget_exceeded"
    raised = await admin(d, {"op": "budget.raise", "scope": "global", "window": "day", "hard_usd": 10})
    assert raised["ok"] and raised["after"]["hard_usd"] == 10
    assert (await client.call(frame("allowed again")))["ok"]
    reset = await admin(d, {"op": "budget.reset", "scope": "global", "window": "day"})
    assert reset["ok"] and reset["after"]["spent_usd"] == 0
    assert [e["op"] for e in capture_log.events("admin")][-2:] == ["budget.raise", "budget.reset"]
