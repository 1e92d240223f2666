"""Traffic control through the real daemon: budgets, rate limits, provider throttling, queueing, shedding."""

import json
import os

import pytest
import trio

from sidecard.sim import Fault
from tests.harness import admin, connect, make_config, new_daemon

PRIMARY, CHEAP = "claude-sonnet-4-6", "claude-haiku-4-5-20251001"
ROUTES = {
    "default": {"targets": [{"model": PRIMARY, "max_attempts": 1}]},
    "cheap": {"targets": [{"model": CHEAP, "max_attempts": 1}]},
}


def frame(text, **fields):
    return {"op": "complete", "messages": [{"role": "user", "content": text}], "max_tokens": 50, "cache": "bypass", **fields}


async def call_all(client, frames, *, every_s=0.0):
    """Each frame from a task of its own, `every_s` apart; the replies, in the frames' order."""
    replies = [None] * len(frames)

    async def one(index):
        replies[index] = await client.call(frames[index])

    async with trio.open_nursery() as n:
        for index in range(len(frames)):
            n.start_soon(one, index)
            if every_s:
                await trio.sleep(every_s)
    return replies


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
    # What is left is under the request's worst case: the message says so, not "is spent" (a third trial).
    assert "left, less than this request's worst case" in refused["error"]["message"], refused
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
    # One target, and a config that would rather wait for the window than answer `rate_limited` (the default waits
    # out no more than 8 s of it: see the test below).
    d = await daemon_factory(routes=ROUTES, retry={"max_retry_after_ms": 60_000})
    replies = await call_all(await connect(d), [frame(f"q{i}", deadline_ms=180_000) for i in range(12)], every_s=1)
    assert all(r["ok"] for r in replies), [r for r in replies if not r["ok"]]
    assert sim.stats_total()["throttled"] == 0  # never a 429: sidecard waited for the window to reset
    assert d.metrics.throttled("anthropic", PRIMARY).value >= 1


async def test_a_spent_window_is_waited_out_only_briefly_then_the_request_is_told_when_to_come_back(daemon_factory, sim, autojump_clock):
    """A spent window holds the target as a retry-after does, and is waited out as briefly: on a route's last
    target up to `retry.max_retry_after_ms` (8 s), however long the request's deadline."""
    sim.set_limits(requests_per_minute=2)
    d = await daemon_factory(routes=ROUTES)
    client = await connect(d)
    assert all([(await client.call(frame(f"spend {i}")))["ok"] for i in range(2)])
    started = trio.current_time()
    told = await client.call(frame("too long a wait", deadline_ms=180_000))
    assert told["error"]["code"] == "rate_limited" and 55_000 < told["error"]["retry_after_ms"] <= 62_000
    assert trio.current_time() - started < 0.1 and sim.stats_total()["throttled"] == 0  # told, not sent for a 429


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


async def test_a_spend_file_that_cannot_be_written_is_counted_for_an_alert(daemon_factory, sim, capture_log, autojump_clock):
    """A spend file write failing after the start (a full disk, permissions lost) was only logged, once per distinct
    error: nothing an operator could alert on, while a restart would lose the day's spend. Each failed write is
    counted in sidecard_spend_write_failures_total, present at 0 from the start."""
    d = await daemon_factory(routes=ROUTES, budgets=[{"scope": "global", "window": "day", "hard_usd": 10}],
                             spend={"flush_interval_s": 1.0})
    assert d.metrics.registry.get_sample_value("sidecard_spend_write_failures_total") == 0
    os.makedirs(f"{d.config.spend.path}/in-the-way")  # the rename onto it fails, as it would for root too
    assert (await (await connect(d)).call(frame("spend")))["ok"]
    with trio.fail_after(30):
        while d.metrics.registry.get_sample_value("sidecard_spend_write_failures_total") < 2:  # retried each flush
            await trio.sleep(0.5)
    assert len(capture_log.events("spend_store_write_failed")) == 1  # the log line stays once per distinct error


async def test_raising_one_limit_keeps_the_other(daemon_factory, sim, capture_log):
    """`budget raise app:billing --hard 80`, as safety.md shows it, deleted the soft limit: the alert and the soft
    route were lost (a third fresh-clone trial). A limit not given stays; `none` removes one."""
    from tests.e2e.test_admin import run_ctl

    d = await daemon_factory(routes=ROUTES, budgets=[{"scope": "global", "window": "day", "soft_usd": 4.0, "hard_usd": 5.0}])
    raised = await run_ctl(d, "--json", "budget", "raise", "global", "--hard", "8")
    assert raised.returncode == 0, raised.stderr
    after = json.loads(raised.stdout)["after"]
    assert (after["soft_usd"], after["hard_usd"]) == (4.0, 8.0)
    removed = json.loads((await run_ctl(d, "--json", "budget", "raise", "global", "--soft", "none")).stdout)["after"]
    assert (removed["soft_usd"], removed["hard_usd"]) == (None, 8.0)
    nothing = await run_ctl(d, "budget", "raise", "global")
    assert nothing.returncode == 1 and "soft limit, the hard limit or both" in nothing.stderr
    assert "UNSET" not in str(capture_log.events("admin"))


# ---------------------------------------------------------------------- reloads, adaptive limits, pauses, gauges, alerts

TARGET = f"anthropic:{PRIMARY}"


def write_config(path, directory, **sections):
    """A TOML config file for reload tests: one route to PRIMARY, plus `sections` (flat tables)."""
    text = (f'[server]\nsocket = "{directory}/app.sock"\n[metrics]\nenabled = false\n[quality]\nenabled = false\n'
            f'[state]\npath = "{directory}/state.json"\n'
            f'[routes.default]\ntargets = [{{ model = "{PRIMARY}", max_attempts = 1 }}]\n')
    for name, values in sections.items():
        text += f"[{name}]\n" + "".join(f"{k} = {str(v).lower() if isinstance(v, bool) else v}\n" for k, v in values.items())
    with open(path, "w") as f:
        f.write(text)


async def test_a_reload_reconfigures_queues_in_use_without_dropping_waiters(nursery, sim, capture_log, short_tmp, autojump_clock):
    from sidecard.config import load
    path = f"{short_tmp}/sidecard.toml"
    write_config(path, short_tmp, queue={"max_concurrency": 1, "max_queue": 10})
    sim.set_fault(PRIMARY, Fault(latency_ms=1000))
    d = await nursery.start(new_daemon(load(path), sim, capture_log, config_path=path).run)
    client = await connect(d)
    done = {}

    async def one(i):
        reply = await client.call(frame(f"q{i}", deadline_ms=30_000))
        done[i] = (reply["ok"], trio.current_time())

    started = trio.current_time()
    async with trio.open_nursery() as n:
        for i in range(3):
            n.start_soon(one, i)
        await trio.sleep(0.1)
        assert d.traffic.limits_status()["targets"][TARGET]["queued"] == 2
        write_config(path, short_tmp, queue={"max_concurrency": 3, "max_queue": 0, "shed": False})
        reply = await admin(d, {"op": "reload"})
        assert reply["ok"] and "queue" not in reply["result"]["config"]["needs_restart"]
    assert all(ok for ok, _ in done.values())
    # The two waiters got slots at the reload, not one after the other (which would end at 2 s and 3 s).
    assert max(t for _, t in done.values()) - started < 1.5
    stats = d.traffic.limits_status()["targets"][TARGET]
    assert stats["limit"] == 3 and stats["expired"] == stats["shed"] == 0
    assert sim.stats_total()["max_in_flight"] == 3
    queue = d.traffic.queue(d.config.routes["default"].targets[0])
    assert queue.max_queue == 0 and queue.shed is False


async def test_a_reload_dropping_a_route_a_kept_section_names_is_refused(nursery, sim, capture_log, short_tmp, mock_clock):
    """Budgets wait for a restart, so a reload that drops their soft_route would leave them naming a missing
    route: the reload is refused (it used to crash the daemon), and the daemon serves on as before."""
    from sidecard.config import load
    path = f"{short_tmp}/sidecard.toml"

    def write(soft_route):
        write_config(path, short_tmp, **({"routes.cheap": {"targets": f'[{{ model = "{CHEAP}" }}]'}} if soft_route else {}))
        with open(path, "a") as f:
            f.write(f'[spend]\npath = "{short_tmp}/spend.json"\n[[budgets]]\nscope = "global"\nsoft_usd = 1.0\n'
                    + ('soft_route = "cheap"\n' if soft_route else ""))

    write(soft_route=True)
    d = await nursery.start(new_daemon(load(path), sim, capture_log, config_path=path).run)
    write(soft_route=False)  # valid on its own
    reply = await admin(d, {"op": "reload"})
    assert reply["error"]["code"] == "bad_request" and "soft_route 'cheap'" in reply["error"]["message"]
    assert "cheap" in d.control.state.routes.names() and capture_log.events("reload_refused")
    assert (await (await connect(d)).call(frame("still served")))["ok"]


async def test_a_request_larger_than_the_token_bucket_is_admitted_when_it_is_full(daemon_factory, sim, mock_clock):
    # 40,000 tokens a minute, 10 s of burst: a bucket of 6,667 tokens; this request is estimated above 10,000.
    d = await daemon_factory(routes=ROUTES, rate_limits=[{"scope": "global", "tokens_per_minute": 40_000, "burst_s": 10}])
    client = await connect(d)
    big = frame("a long answer please", max_tokens=10_000)
    assert (await client.call(big))["ok"]
    assert d.metrics.refusals("rate_limited").value == 0


@pytest.mark.parametrize("adaptive", ["aimd", "gradient"])
async def test_adaptive_limit_is_honoured_end_to_end(daemon_factory, sim, autojump_clock, adaptive):
    d = await daemon_factory(routes=ROUTES, queue={"max_concurrency": 16, "adaptive": adaptive},
                             breaker={"consecutive_failures": 1000, "min_volume": 1000})
    client = await connect(d)
    limit = lambda: d.traffic.limits_status()["targets"][TARGET]["limit"]  # noqa: E731

    async def load(rounds, workers=16):
        async def worker(w):
            for r in range(rounds):
                await client.call(frame(f"{adaptive} {w} {r}", deadline_ms=60_000))
        async with trio.open_nursery() as n:
            for w in range(workers):
                n.start_soon(worker, w)

    sim.set_fault(PRIMARY, Fault(latency_ms=100))
    await client.call(frame("first"))
    assert limit() == 4  # adaptive limits start at a quarter of max_concurrency
    await load(rounds=6)
    grown = limit()
    assert grown > 8
    # Upstream overload: 529s for AIMD; for the gradient, calls ten times slower (queueing at the provider).
    sim.set_fault(PRIMARY, Fault(status=529, latency_ms=100) if adaptive == "aimd" else Fault(latency_ms=1000))
    await load(rounds=4, workers=grown)
    shrunk = limit()
    assert shrunk < grown - 2
    assert d.metrics.concurrency_limit("anthropic", PRIMARY).value == shrunk
    sim.set_fault(PRIMARY, Fault(latency_ms=100))
    await load(rounds=8)
    assert limit() > shrunk + 2  # grows back once the upstream recovers


async def test_a_429_with_retry_after_holds_the_whole_target(daemon_factory, sim, autojump_clock):
    d = await daemon_factory(routes=ROUTES)
    client = await connect(d)
    sim.set_fault(PRIMARY, Fault(status=429, retry_after_s=5, count=1))
    first = await client.call(frame("draws a 429"))
    assert not first["ok"]
    held_from = trio.current_time()
    calls = sim.stats_total()["requests"]
    replies = {}

    async def one(i):
        replies[i] = (await client.call(frame(f"after {i}", deadline_ms=30_000)), trio.current_time())

    async with trio.open_nursery() as n:
        for i in range(3):
            n.start_soon(one, i)
        await trio.sleep(4.8)
        assert not replies and sim.stats_total()["requests"] == calls  # nothing sent during the pause
        assert d.traffic.limits_status()["targets"][TARGET]["paused_for_s"] > 0
    assert all(reply["ok"] for reply, _ in replies.values())
    assert min(t for _, t in replies.values()) - held_from >= 4.9
    assert d.metrics.throttled("anthropic", PRIMARY).value >= 1



async def test_a_429_without_retry_after_holds_nothing(daemon_factory, sim, autojump_clock):
    d = await daemon_factory(routes=ROUTES)
    client = await connect(d)
    sim.set_fault(PRIMARY, Fault(status=429, count=1))
    assert not (await client.call(frame("draws a 429")))["ok"]
    start = trio.current_time()
    assert (await client.call(frame("right after")))["ok"]
    assert trio.current_time() - start < 0.1  # no guessed pause: only the provider knows its window
    assert d.traffic.limits_status()["targets"][TARGET]["paused_for_s"] == 0

def budget_gauges(d, scope, window):
    read = lambda name: d.metrics.registry.get_sample_value(name, {"scope": scope, "window": window})  # noqa: E731
    return {k: read(f"sidecard_budget_{k}") for k in ("spent_usd", "remaining_usd", "spend_ratio")}


async def test_budget_gauges_follow_resets_raises_and_rollovers(daemon_factory, sim, mock_clock):
    d = await daemon_factory(routes=ROUTES, budgets=[
        {"scope": "global", "window": "day", "hard_usd": 10}, {"scope": "user", "window": "day", "soft_usd": 1},
    ])
    assert budget_gauges(d, "global", "day") == {"spent_usd": 0, "remaining_usd": 10, "spend_ratio": 0}
    client = await connect(d)
    for user in ("alice", "bob", "carol"):
        assert (await client.call(frame("spend", user=user)))["ok"]
    spent = budget_gauges(d, "global", "day")["spent_usd"]
    assert spent > 0 and budget_gauges(d, "global", "day")["remaining_usd"] == pytest.approx(10 - spent)
    per_user = budget_gauges(d, "user", "day")
    assert per_user["spent_usd"] == pytest.approx(spent / 3, rel=0.3) and per_user["remaining_usd"] is None  # no hard limit
    series = [s for m in d.metrics.registry.collect() if m.name == "sidecard_budget_spent_usd" for s in m.samples]
    assert len(series) == 2  # one per configured budget, never one per user

    await admin(d, {"op": "budget.raise", "scope": "global", "window": "day", "hard_usd": 20})
    assert budget_gauges(d, "global", "day")["remaining_usd"] == pytest.approx(20 - spent)
    await admin(d, {"op": "budget.reset", "scope": "global", "window": "day"})
    assert budget_gauges(d, "global", "day") == {"spent_usd": 0, "remaining_usd": 20, "spend_ratio": 0}
    assert (await client.call(frame("spend again")))["ok"]
    assert budget_gauges(d, "global", "day")["spent_usd"] > 0
    mock_clock.jump(86_400)  # the next UTC day: the spend and the raise are over, with nothing new spent
    await trio.testing.wait_all_tasks_blocked()
    assert budget_gauges(d, "global", "day") == {"spent_usd": 0, "remaining_usd": 10, "spend_ratio": 0}
    assert budget_gauges(d, "user", "day")["spent_usd"] == 0


async def test_budget_raise_survives_a_restart(nursery, sim, capture_log, short_tmp, mock_clock):
    settings = {
        "routes": ROUTES,
        "budgets": [{"scope": "global", "window": "day", "hard_usd": 0.001}],
        "spend": {"path": f"{short_tmp}/spend.json", "flush_interval_s": 0.5},
    }
    async with trio.open_nursery() as n:
        first = await n.start(new_daemon(make_config(short_tmp, **settings), sim, capture_log).run)
        client = await connect(first)
        while (await client.call(frame("spend")))["ok"]:
            pass
        assert (await admin(first, {"op": "budget.raise", "scope": "global", "window": "day", "hard_usd": 10}))["ok"]
        first.shutdown()
    second = await nursery.start(new_daemon(make_config(short_tmp, **settings), sim, capture_log).run)
    assert (await (await connect(second)).call(frame("after restart")))["ok"]
    (status,) = (await admin(second, {"op": "budget"}))["result"]["budgets"]
    assert status["hard_usd"] == 10 and status["spent_usd"] > 0
    second.shutdown()


async def test_a_budget_soft_limit_crossing_reaches_the_alert_webhook(daemon_factory, sim, nursery, autojump_clock):
    import msgspec

    from sidecard.httpserver import serve_tcp_http

    received = []

    async def hook(request, responder):
        received.append(msgspec.json.decode(request.body))
        await responder.send(200, [(b"content-type", b"application/json")], b"{}")

    host, port = await nursery.start(serve_tcp_http, hook, "127.0.0.1", 0)
    d = await daemon_factory(routes=ROUTES, quality={"enabled": False, "webhook_url": f"http://{host}:{port}/alerts"},
                             budgets=[{"scope": "feature:chat", "window": "day", "soft_usd": 0.000001, "hard_usd": 10}])
    client = await connect(d)
    assert (await client.call(frame("crosses the soft limit", feature="chat")))["ok"]
    with trio.fail_after(10):
        while not received:
            await trio.sleep(0.05)
    (event,) = received
    assert event["alert"] == "budget_soft_limit" and event["source"] == "sidecard"
    assert event["scope"] == "feature:chat" and event["window"] == "day" and event["spent_usd"] > event["soft_usd"]
    assert (await client.call(frame("already over", feature="chat")))["ok"]
    await trio.sleep(1)
    assert len(received) == 1  # once per window


# ---------------------------------------------------------------------- issue 16: budgets under concurrency, throttling

async def test_concurrent_requests_cannot_overshoot_a_hard_budget_together(daemon_factory, sim, autojump_clock):
    """Each admitted request reserves its worst case until it ends: 30 at once cannot spend past the limit."""
    sim.set_fault(PRIMARY, Fault(latency_ms=600))
    hard = 0.01
    d = await daemon_factory(routes=ROUTES, budgets=[{"scope": "global", "window": "day", "hard_usd": hard}])
    replies = await call_all(await connect(d), [frame(f"[[sim:long]] at once {i}", max_tokens=100) for i in range(30)])
    served = [r for r in replies if r["ok"]]
    spent = sum(r["cost_usd"] for r in served)
    assert served and spent <= hard, f"{len(served)} of 30 admitted, ${spent:.4f} spent against a ${hard} limit"
    refused = [r for r in replies if not r["ok"]]
    assert refused and all(r["error"]["code"] == "budget_exceeded" for r in refused)
    (status,) = (await admin(d, {"op": "budget"}))["result"]["budgets"]
    assert status["spent_usd"] == pytest.approx(spent) and status["reserved_usd"] == 0  # settled to the real cost


async def test_a_failed_request_releases_its_reservation(daemon_factory, sim, autojump_clock):
    """What a request reserved is given back when it fails: the budget lets the next one through."""
    d = await daemon_factory(routes=ROUTES, budgets=[{"scope": "global", "window": "day", "hard_usd": 0.0035}])
    client = await connect(d)
    sim.set_fault(PRIMARY, Fault(status=500, latency_ms=600))
    failed = []

    async def two_fail():
        failed.extend(await call_all(client, [frame(f"fails {i}", max_tokens=100) for i in range(2)]))

    async with trio.open_nursery() as n:
        n.start_soon(two_fail)
        await trio.sleep(0.1)
        # Both reserve their worst case while in flight: a third does not fit beside them.
        assert (await client.call(frame("meanwhile", max_tokens=100)))["error"]["code"] == "budget_exceeded"
    assert [r["error"]["code"] for r in failed] == ["upstream_unavailable"] * 2
    sim.clear_faults()
    assert (await client.call(frame("after the failures", max_tokens=100)))["ok"]


async def test_the_soft_limit_switches_once_spend_reaches_it_pinned_models_included(daemon_factory, sim, capture_log, autojump_clock):
    """The switch follows spend, as the alert does: not spend plus a request's worst case. A request that pins a
    model is switched too (the operator's budget outranks the app's choice), and its answer is cached under the
    model that gave it."""
    soft = 0.001  # below one request's worst case (max_tokens 100: $0.0015 on Sonnet), above its real cost
    d = await daemon_factory(routes=ROUTES, budgets=[
        {"scope": "feature:chat", "window": "day", "soft_usd": soft, "hard_usd": 1, "soft_route": "cheap"}])
    client = await connect(d)
    served, spent = [], 0.0
    while spent < soft:
        reply = await client.call(frame(f"q{len(served)}", feature="chat", max_tokens=100))
        served.append(reply["served_by"]["model"])
        spent += reply["cost_usd"]
    assert served == [PRIMARY] * len(served) and len(served) > 1
    assert capture_log.events("budget_soft_limit")  # the alert and the switch come together
    pinned = frame("pinned and cacheable", feature="chat", model=PRIMARY, temperature=0, cache="use")
    reply = await client.call(pinned)
    assert reply["served_by"]["model"] == CHEAP and reply["model"] == CHEAP
    assert (await admin(d, {"op": "budget.raise", "scope": "feature:chat", "window": "day", "soft_usd": 10, "hard_usd": 10}))["ok"]
    again = await client.call(pinned)
    assert again["served_by"]["model"] == PRIMARY and not again.get("cached")  # never the cheap model's cached answer


async def test_throttling_believes_the_providers_reset_and_never_guesses_a_minute(daemon_factory, sim, autojump_clock):
    """Ten requests per 4 s window, as the headers say: a burst of 30 is served in three windows, never held for a
    guessed minute, and without drawing 429s."""
    sim.set_limits(requests_per_minute=10, window_s=4)
    d = await daemon_factory(routes={"default": {"targets": [{"model": PRIMARY}]}})
    client = await connect(d)
    assert (await client.call(frame("learn the window")))["ok"]
    started = trio.current_time()
    replies = await call_all(client, [frame(f"burst {i}", deadline_ms=30_000) for i in range(30)])
    took = trio.current_time() - started
    refused = [r["error"] for r in replies if not r["ok"]]
    throttled = sim.stats_total()["throttled"]
    assert not refused and throttled == 0, (
        f"{len(refused)} of 30 refused (retry_after_ms {sorted({e.get('retry_after_ms') for e in refused})}), "
        f"{throttled} 429s drawn")
    assert took < 14, f"the burst took {took:.1f} s"  # three windows of 4 s, and the rounding of reset times


async def test_after_a_retry_after_pause_waiters_go_at_the_providers_rate(daemon_factory, sim, autojump_clock):
    """A pause ends with one call whose answer tells how many more the provider takes, not with a burst."""
    sim.set_limits(requests_per_minute=5, window_s=4)
    d = await daemon_factory(routes={"default": {"targets": [{"model": PRIMARY}]}})
    client = await connect(d)
    sim.set_fault(PRIMARY, Fault(status=429, retry_after_s=2, count=1))
    async with trio.open_nursery() as n:
        n.start_soon(client.call, frame("draws the 429", deadline_ms=30_000))
        await trio.sleep(0.1)  # the target is paused for 2 s
        replies = await call_all(client, [frame(f"after the pause {i}", deadline_ms=30_000) for i in range(11)])
    throttled = sim.stats_total()["throttled"]
    assert all(r["ok"] for r in replies) and throttled == 0, f"{throttled} fresh 429s after the pause"


async def test_at_four_times_capacity_refusals_are_immediate_and_the_admitted_finish_in_time(daemon_factory, sim, capture_log, autojump_clock):
    """Admission counts the call's own duration and keeps its promises: a request either gets an answer within
    its deadline or is refused on arrival, however much interactive work arrives after it."""
    sim.set_fault(PRIMARY, Fault(latency_ms=1000))
    d = await daemon_factory(routes=ROUTES, queue={"max_concurrency": 4, "max_queue": 200})
    client = await connect(d)
    assert (await client.call(frame("learn how long a call takes")))["ok"]

    # 16 a second for 10 s: four times what 4 calls of 1 s can serve
    frames = [frame(f"load {i}", priority="batch" if i % 2 else "interactive", deadline_ms=3000) for i in range(160)]
    replies = await call_all(client, frames, every_s=1 / 16)
    served = {p: sum(1 for f, r in zip(frames, replies) if r["ok"] and f["priority"] == p) for p in ("interactive", "batch")}
    # The daemon's own timing: the test client shares one reader between its tasks, which delays replies.
    requests = capture_log.events("request")[1:]
    late = [(e["outcome"], e["latency_ms"]) for e in requests
            if e["outcome"] not in ("ok", "overloaded") or (e["outcome"] == "ok" and e["latency_ms"] > 3000)]
    refusals = [e["latency_ms"] for e in requests if e["outcome"] == "overloaded"]
    assert not late, f"{len(late)} admitted requests ended past their deadline: {late[:5]}"
    assert max(refusals) == 0, f"{sum(1 for ms in refusals if ms > 0)} refusals came late, the latest after {max(refusals)} ms"
    assert sum(served.values()) >= 0.9 * 4 * 10, f"{served} served in 10 s"
    assert served["interactive"] >= 3 * served["batch"], served  # interactive alone is twice what can be served


async def test_the_budget_example_in_traffic_md_serves_on_the_built_in_default_route(nursery, sim, capture_log, short_tmp, mock_clock):
    """It defines `[routes.cheap]` alone: the built-in default route is kept beside it, and the daemon starts."""
    import re
    from pathlib import Path

    from sidecard.config import load
    example = re.findall(r"```toml\n(.*?)```", (Path(__file__).parents[2] / "docs" / "traffic.md").read_text(), re.DOTALL)[0]
    path = f"{short_tmp}/sidecard.toml"
    with open(path, "w") as f:
        f.write(f'[server]\nsocket = "{short_tmp}/app.sock"\n[metrics]\nenabled = false\n[quality]\nenabled = false\n'
                f'[state]\npath = "{short_tmp}/state.json"\n[spend]\npath = "{short_tmp}/spend.json"\n' + example)
    d = await nursery.start(new_daemon(load(path), sim, capture_log, config_path=path).run)
    reply = await (await connect(d)).call(frame("hello", feature="chat", user="alice"))
    assert reply["ok"] and reply["served_by"]["model"] == PRIMARY
    assert sorted(d.control.state.routes.names()) == ["cheap", "default", "judge"]
