"""Fleet mode end to end: real daemons, in-process, on one real redis-server, against the simulated upstream.

The clock is trio's `MockClock` without autojump: the daemons' wall clock (the store's time base) moves only when a
test jumps it, so limits and budgets are exact; what crosses the store (a change message, a landing) is waited
for with `eventually`, in real time, bounded."""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from typing import Any

import pytest
import trio
import trio.testing

from tests.e2e.test_quality import prompt_dir, quality  # noqa: F401  (a fixture)
from tests.harness import ECHO_VERSION, admin, capture_log, connect, daemon_factory, metric, prompts_with_echo, sim  # noqa: F401  (fixtures)

PRIMARY = "claude-sonnet-4-6"
ROUTES = {"default": {"targets": [{"model": PRIMARY, "max_attempts": 1}]}}


async def eventually(check: Callable[[], Any], *, within_s: float = 5.0) -> Any:
    """Until `check()` (sync or async) is truthy, in real time (what crosses the store takes real milliseconds)."""
    deadline = time.monotonic() + within_s
    while True:
        result = check()
        if hasattr(result, "__await__"):
            result = await result
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError("the fleet did not converge in time")
        await trio.testing.wait_all_tasks_blocked(cushion=0.002)


def jump_when_idle(clock: Any, daemons: list[Any], seconds: float) -> None:
    """Move the test's clock on over timers (a reconnection's backoff), but never while a daemon awaits a store reply:
    that jump would end the operation at its timeout, which the store's real milliseconds never reach (a busy machine
    only makes them more likely to fall under a jump)."""
    if not any(d.fleet.connection.in_flight for d in daemons):
        clock.jump(seconds)


async def back_up(clock: Any, daemons: list[Any]) -> None:
    """Until each daemon has its store connection and its change subscription back (the subscriber reconnects on a
    backoff of its own: a change announced before it is subscribed again is heard only at the next resync, 30 s of
    the test's clock away), jumping the clock over the reconnections' backoff."""

    def reconnected() -> bool:
        jump_when_idle(clock, daemons, 1.0)
        return all(metric(d, "sidecard_fleet_up") == 1 and d.fleet.subscriber.subscribed for d in daemons)

    await eventually(reconnected)


@pytest.fixture
def fleet(daemon_factory, store_server, namespace):  # noqa: F811
    """`await fleet(n, **sections)`: n daemons on the session's store, one namespace."""

    async def start(n: int, *, url: str | None = None, **sections: Any) -> list[Any]:
        fleet_section = {"url": url or store_server.url, "namespace": namespace, "op_timeout_ms": 2000.0}
        own = sections.pop("fleet", {})
        return [await daemon_factory(routes=ROUTES, fleet={**fleet_section, "instance": f"d{i}", **own}, **sections) for i in range(n)]

    return start


def frame(text: str, **fields: Any) -> dict[str, Any]:
    return {"op": "complete", "messages": [{"role": "user", "content": text}], "max_tokens": 50, "cache": "bypass", **fields}


async def test_a_kill_switch_set_on_one_sidecar_is_honoured_by_the_others(fleet, mock_clock, capture_log):  # noqa: F811
    d0, d1, d2 = await fleet(3)
    reply = await admin(d1, {"op": "kill", "scope": "feature:chat", "mode": "static", "text": "later", "reason": "incident"})
    assert reply["ok"] and reply["result"] == {"kept": "fleet"}

    async def killed_everywhere() -> bool:
        replies = [await (await connect(d)).call(frame("hi", feature="chat")) for d in (d0, d2)]
        return all(r.get("text") == "later" for r in replies)

    await eventually(killed_everywhere)
    audit = [e for e in capture_log.events("admin") if e["op"] == "kill"]
    assert audit[0]["instance"] == "d1" and audit[0]["kept"] == "fleet"
    assert (await (await connect(d0)).call(frame("other feature", feature="search")))["ok"]
    assert (await admin(d2, {"op": "unkill", "scope": "feature:chat"}))["result"] == {"kept": "fleet"}

    async def lifted_everywhere() -> bool:
        replies = [await (await connect(d)).call(frame("hi", feature="chat")) for d in (d0, d1)]
        return all(r.get("ok") and r.get("text") != "later" for r in replies)

    await eventually(lifted_everywhere)


async def test_a_rate_limit_holds_across_sidecars(fleet, mock_clock):
    daemons = await fleet(3, rate_limits=[{"scope": "user", "requests_per_minute": 6, "burst_s": 20}])
    clients = [await connect(d) for d in daemons]
    # A burst of 20 s at 6 a minute is 2 requests, for the whole fleet.
    assert (await clients[0].call(frame("a", user="alice")))["ok"]
    assert (await clients[1].call(frame("b", user="alice")))["ok"]
    refused = await clients[2].call(frame("c", user="alice"))
    assert refused["error"]["code"] == "rate_limited" and refused["error"]["retry_after_ms"] == 10_000
    assert (await clients[2].call(frame("bob is separate", user="bob")))["ok"]
    mock_clock.jump(10)
    assert (await clients[2].call(frame("on time", user="alice")))["ok"]


async def test_a_budget_holds_across_sidecars(fleet, sim, mock_clock, capture_log):  # noqa: F811
    daemons = await fleet(2, budgets=[{"scope": "global", "window": "day", "soft_usd": 0.004, "hard_usd": 0.01}])
    clients = [await connect(d) for d in daemons]
    spent, refused = 0.0, set()
    for i in range(200):
        reply = await clients[i % 2].call(frame(f"q{i}"))
        if reply["ok"]:
            spent += reply["cost_usd"]
        else:
            assert reply["error"]["code"] == "budget_exceeded" and "fleet" in reply["error"]["message"]
            refused.add(i % 2)
            if refused == {0, 1}:
                break
    assert refused == {0, 1}  # both sidecars refuse: they share one budget
    assert 0.005 < spent <= 0.01
    # The soft limit is crossed once for the fleet; each sidecar's gauge shows the fleet's spend.
    crossings = capture_log.events("budget_soft_limit")
    assert len(crossings) == 1 and crossings[0]["fleet"] is True
    await eventually(lambda: all(abs(metric(d, "sidecard_budget_spent_usd", scope="global", window="day") - spent) < 0.003 for d in daemons))


async def test_a_cache_fill_on_one_sidecar_is_a_hit_on_another(fleet, sim, mock_clock):  # noqa: F811
    d0, d1 = await fleet(2)
    first = await (await connect(d0)).complete("cache me", temperature=0.0)
    assert first["cached"] is False
    second = await eventually(lambda: _cached(d1, "cache me"))
    assert second["text"] == first["text"] and sim.calls_for(PRIMARY) == 1
    # Now in the second sidecar's own cache: no store round trip for it. (Its first answer may have been a hit in
    # the store or, when d0's write was still on its way, a wait on d0's lease: count from here.)
    hits = metric(d1, "sidecard_cache_requests_total", result="hit")
    assert (await (await connect(d1)).complete("cache me", temperature=0.0))["cached"] is True
    assert metric(d1, "sidecard_cache_requests_total", result="hit") == hits + 1


async def _cached(d: Any, text: str) -> dict[str, Any] | None:
    reply = await (await connect(d)).complete(text, temperature=0.0)
    return reply if reply["cached"] else None


async def test_identical_requests_on_different_sidecars_make_one_upstream_call(fleet, sim, autojump_clock):  # noqa: F811
    from sidecard.sim import Fault

    sim.set_fault(PRIMARY, Fault(latency_ms=500))
    daemons = await fleet(3)
    replies: list[dict[str, Any]] = []

    async def one(d: Any) -> None:
        replies.append(await (await connect(d)).complete("everyone asks this", temperature=0.0))

    async with trio.open_nursery() as nursery:
        for d in daemons:
            nursery.start_soon(one, d)
    assert all(r["ok"] for r in replies) and len({r["text"] for r in replies}) == 1
    assert sim.calls_for(PRIMARY) == 1
    assert sorted(r["cached"] for r in replies) == [False, True, True]


async def test_the_store_stopped_mid_traffic_is_no_outage_and_state_converges_when_it_returns(
    fleet, private_store, mock_clock, capture_log  # noqa: F811
):
    d0, d1 = await fleet(2, url=private_store.url, rate_limits=[{"scope": "global", "requests_per_minute": 600}])
    c0, c1 = await connect(d0), await connect(d1)
    assert (await admin(d0, {"op": "kill", "scope": "feature:chat", "mode": "static", "text": "later"}))["result"] == {"kept": "fleet"}
    await eventually(lambda: _answers(c1, "chat", "later"))

    private_store.stop()
    for i in range(4):  # answered all the same, on local state: limits, cache, and the kill switch last seen
        assert (await c0.call(frame(f"q{i}", feature="search")))["ok"]
        assert (await c1.call(frame(f"q{i}", feature="chat")))["text"] == "later"
    await eventually(lambda: metric(d0, "sidecard_fleet_up") == 0 and metric(d1, "sidecard_fleet_up") == 0)
    assert metric(d0, "sidecard_fleet_fallbacks_total", what="limits") >= 1
    assert [e["fallback"] for e in capture_log.events("fleet_store_down")][:1] == ["local limits, local cache, last-known operator state"]
    # A command taken while the store is away is kept on this sidecar, and says so.
    local = await admin(d1, {"op": "kill", "scope": "feature:search", "mode": "static", "text": "not now"})
    assert local["result"]["kept"].startswith("local (the fleet store did not answer")

    private_store.start()  # empty: a restart without persistence

    await back_up(mock_clock, [d0, d1])
    # The store was given the newest last-known state back: the command taken during the outage reaches d0.
    await eventually(lambda: _answers(c0, "search", "not now"))
    assert await _answers(c0, "chat", "later")
    # (d0 may hear of the write before d1's task that wrote it runs again and logs it)
    replayed = await eventually(lambda: capture_log.events("fleet_state_local_ops_replayed"))
    assert [e["ops"][0]["kills_set"] for e in replayed] == [["feature:search"]]


async def test_a_state_read_that_fails_while_the_store_answers_is_tried_again_within_seconds(
    fleet, store_server, keys, mock_clock, capture_log  # noqa: F811
):
    """A store that answers but whose state cannot be read yet (loading its data after a restart, too slow) was read
    again only at the next resync, 30 s later: a change made meanwhile, or commands kept during an outage, waited
    that long."""
    from sidecard.control.backend import State, StoredKill
    from sidecard.fleet.state import encode

    (d0,) = await fleet(1)
    client = await connect(d0)
    store_server.command("HSET", keys.state, "v", "not a version")
    store_server.command("PUBLISH", keys.state_channel, "99")  # a change message: d0 reads, and fails
    await eventually(lambda: capture_log.events("fleet_state_resync_failed"))
    fixed = State(kills=[StoredKill(scope="feature:chat", mode="static", text="read again")])
    store_server.command("HSET", keys.state, "v", "50", "doc", encode(fixed), "by", "another")  # readable, and no message
    started = trio.current_time()

    async def read_again() -> bool:
        jump_when_idle(mock_clock, [d0], 0.5)
        return await _answers(client, "chat", "read again")

    await eventually(read_again)
    assert trio.current_time() - started < 10


async def _answers(client: Any, feature: str, text: str) -> bool:
    return (await client.call(frame("hi", feature=feature))).get("text") == text


async def test_sidecardctl_fleet_lists_the_members_and_flags_one_that_disagrees(fleet, mock_clock):
    from tests.e2e.test_admin import run_ctl

    d0, d1 = await fleet(2)
    odd = (await fleet(1, fleet={"instance": "odd"}, cache={"ttl_s": 60}))[0]  # another config: another hash


    async def one_disagrees() -> bool:  # a sidecar beats as soon as it applies another state version
        result = (await admin(d0, {"op": "fleet"}))["result"]
        return len(result["members"]) == 3 and result["disagreeing"] == {"odd": ["config_hash"]}

    await eventually(one_disagrees)
    listing = await run_ctl(d0, "fleet")
    assert listing.returncode == 0, listing.stderr
    out = listing.stdout
    assert "namespace test-" in out and ": up" in out and "members: 3 live, 1 disagreeing" in out
    assert "odd" in out and "config_hash" in out and "last full read" in out
    killed = await run_ctl(d1, "kill", "feature:x")
    assert "fleet-wide: every sidecar of the namespace applies it" in killed.stdout
    status = await run_ctl(odd, "status")
    assert f"fleet: odd in namespace {d0.config.fleet.namespace} on unix://" in status.stdout
    assert "password" not in listing.stdout


async def test_garbage_under_the_namespace_is_a_clear_error_and_local_behaviour(fleet, store_server, namespace, mock_clock, capture_log):  # noqa: F811
    store_server.command("SET", f"{{{namespace}}}:schema", "sidecard-fleet/99")  # another version's keys
    d0, d1 = await fleet(2, rate_limits=[{"scope": "global", "requests_per_minute": 60}])
    for d in (d0, d1):
        assert (await (await connect(d)).call(frame("still answered")))["ok"]
    errors = capture_log.events("fleet_store_data_error")
    assert errors and "sidecard-fleet/99" in errors[0]["reason"] and errors[0]["fallback"] == "limits"
    assert metric(d0, "sidecard_fleet_fallbacks_total", what="limits") == 1
    local = await admin(d0, {"op": "kill", "scope": "feature:x"})
    assert local["result"]["kept"].startswith("local")


async def test_a_canary_is_judged_on_the_fleets_sample_and_rolled_back_once(fleet, sim, prompt_dir, capture_log, autojump_clock):  # noqa: F811
    # Each sidecar alone sees too few canary answers to judge them: together they see enough.
    monitor = {"window": 50, "min_samples": 8, "baseline": 0.9, "threshold": 0.6, "max_drop": 0.1, "hysteresis": 0.05}
    daemons = await fleet(2, **quality(monitor=monitor), prompts={"directory": str(prompt_dir)})
    clients = [await connect(d) for d in daemons]
    canary_answers = [0, 0]
    for u in range(40):
        reply = await clients[u % 2].call({"op": "complete", "prompt": "echo", "vars": {"q": f"question {u}"}, "user": f"user-{u}"})
        assert reply["ok"]
        canary_answers[u % 2] += reply["prompt_version"] == 2
        if sum(canary_answers) >= 10:
            break
    assert max(canary_answers) < 8 <= sum(canary_answers)

    def rollbacks() -> list[dict[str, Any]]:
        return [e for e in capture_log.events("admin") if e.get("peer") == "quality-monitor" and e["op"] == "prompt.canary_rollback"]

    async def rolled_back_everywhere() -> bool:
        await trio.sleep(0.5)  # the judge's calls, the flushes (virtual time)
        # The audit line comes once the change is kept (in the store, then the state file).
        return bool(rollbacks()) and all(d.prompts.effective("echo").canary is None for d in daemons)

    await eventually(rolled_back_everywhere, within_s=20)
    await trio.sleep(3)  # more flushes and verdicts: nobody rolls it back again
    (rollback,) = rollbacks()
    assert rollback["fleet"] is True and rollback["checked"] >= 8
    for client in clients:
        replies = [await client.call({"op": "complete", "prompt": "echo", "vars": {"q": "x"}, "user": f"user-{u}"}) for u in range(10)]
        assert {r["prompt_version"] for r in replies} == {1}



async def test_each_release_of_a_canary_that_fails_is_rolled_back_and_prompt_clear_keeps_it_stopped(
        fleet, sim, prompt_dir, capture_log, autojump_clock):  # noqa: F811
    monitor = {"window": 50, "min_samples": 8, "baseline": 0.9, "threshold": 0.6, "max_drop": 0.1, "hysteresis": 0.05}
    daemons = await fleet(2, **quality(monitor=monitor), prompts={"directory": str(prompt_dir)})
    clients = [await connect(d) for d in daemons]

    def rollbacks() -> list[dict[str, Any]]:
        return [e for e in capture_log.events("admin") if e.get("peer") == "quality-monitor" and e["op"] == "prompt.canary_rollback"]

    users = itertools.count()

    async def rolled_back(count: int) -> bool:
        for _ in range(4):  # answers (half of the users get the canary), on both sidecars
            u = next(users)
            await clients[u % 2].call({"op": "complete", "prompt": "echo", "vars": {"q": f"question {u}"}, "user": f"user-{u}"})
        await trio.sleep(0.5)
        return len(rollbacks()) == count and all(d.prompts.effective("echo").canary is None for d in daemons)

    await eventually(lambda: rolled_back(1), within_s=20)
    # `prompt clear` drops the operators' overrides, but not the fleet's rollback: release.toml's canary stays stopped.
    cleared = await admin(daemons[1], {"op": "prompt.clear", "prompt": "echo"})
    assert cleared["result"]["note"].startswith("canary v2 stays stopped: the fleet's quality monitor rolled it back")
    assert cleared["after"]["canary"] is None
    # The same version released again within the hour, still bad: judged on its own answers, and rolled back again.
    await trio.sleep(60)  # (past the bucket of the first rollback: the new release's answers start in the next one)
    again = await admin(daemons[0], {"op": "prompt.canary", "prompt": "echo", "version": 2, "percent": 50, "force": True})
    assert again["ok"] and again["after"]["canary"] == 2
    await eventually(lambda: all(d.prompts.effective("echo").canary == 2 for d in daemons))
    await eventually(lambda: rolled_back(2), within_s=20)
    forced = await admin(daemons[0], {"op": "prompt.clear", "prompt": "echo", "force": True})
    assert forced["after"]["canary"] == 2 and forced["result"] == {"kept": "fleet"}

async def test_a_slow_store_costs_a_request_at_most_op_timeout_ms(fleet, private_store, autojump_clock, capture_log):  # noqa: F811
    (d,) = await fleet(1, url=private_store.url, fleet={"op_timeout_ms": 50.0},
                       rate_limits=[{"scope": "global", "requests_per_minute": 600}])
    client = await connect(d)
    assert (await client.call(frame("warm")))["ok"]
    private_store.slow(2.0)  # DEBUG SLEEP: the store answers nobody meanwhile
    spent = []
    for i in range(5):
        started = trio.current_time()
        assert (await client.call(frame(f"q{i}")))["ok"]
        spent.append(trio.current_time() - started)
    # The first requests wait out the deadline; then the store's breaker skips it at once.
    assert max(spent) <= 0.05 + 1e-6 and spent[-1] == 0
    assert metric(d, "sidecard_fleet_store_errors_total", op="request", kind="timeout") >= 1
    assert metric(d, "sidecard_fleet_fallbacks_total", what="limits") == 5


async def test_concurrent_requests_on_every_sidecar_stay_within_a_hard_budget(fleet, mock_clock):
    hard = 0.02
    daemons = await fleet(3, budgets=[{"scope": "global", "window": "day", "hard_usd": hard}])
    replies: list[dict[str, Any]] = []

    async def one(d: Any, i: int) -> None:
        replies.append(await (await connect(d)).call(frame(f"q{i}")))

    async with trio.open_nursery() as nursery:
        for i in range(60):
            nursery.start_soon(one, daemons[i % 3], i)
    spent = sum(r["cost_usd"] for r in replies if r["ok"])
    assert {r["error"]["code"] for r in replies if not r["ok"]} == {"budget_exceeded"}
    assert 0 < spent <= hard



async def test_a_stale_answer_from_the_shared_cache_when_every_target_fails(fleet, sim, mock_clock):  # noqa: F811
    from sidecard.sim import Fault

    d0, d1, d2 = await fleet(3, cache={"ttl_s": 10, "stale_ttl_s": 3600})
    first = await (await connect(d0)).complete("remember me", temperature=0.0)
    await eventually(lambda: _cached(d1, "remember me"))  # in the shared cache
    mock_clock.jump(60)  # expired everywhere, still within the stale window
    sim.set_fault(PRIMARY, Fault(status=500))
    reply = await (await connect(d2)).complete("remember me", temperature=0.0)  # d2 never had it itself
    assert reply["ok"] and reply["degraded"] and reply["text"] == first["text"]
    assert metric(d2, "sidecard_degraded_total", route="default", kind="stale") == 1


async def test_a_request_with_nothing_to_share_makes_no_round_trip(fleet, mock_clock):
    (d,) = await fleet(1)  # no limits, no budgets; a bypassed cache
    ops = metric(d, "sidecard_fleet_store_duration_seconds_count", op="request")
    assert (await (await connect(d)).call(frame("q")))["ok"]
    assert metric(d, "sidecard_fleet_store_duration_seconds_count", op="request") == ops


async def test_a_drained_sidecar_settles_what_it_reserved(fleet, store_server, namespace, mock_clock):
    (d,) = await fleet(1, budgets=[{"scope": "global", "window": "day", "hard_usd": 5.0}])
    connection, held = d.fleet_gate.path.connection, []
    # The settle is held back here: queued, any store operation (a heartbeat's) would carry it before the drain.
    connection.run_script_later = lambda *write: held.append(write) or True
    assert (await (await connect(d)).call(frame("q")))["ok"]
    assert store_server.command("ZCARD", f"{{{namespace}}}:res") == 1 and len(held) == 1  # reserved, not settled yet
    del connection.run_script_later
    connection.run_script_later(*held[0])  # queued as it would have been, as the drain begins
    d.shutdown()
    await eventually(lambda: store_server.command("ZCARD", f"{{{namespace}}}:res") == 0)


async def test_an_experiment_started_in_fleet_mode_says_it_runs_on_that_sidecar_only(fleet, mock_clock):
    """Experiments and rollouts are each sidecar's own (docs/experiments.md); the reply said "fleet-wide: every
    sidecar of the namespace applies it", and the operator believed the whole fleet was split."""
    d0, d1 = await fleet(2)
    spec = {"name": "tone", "feature": "chat", "primary": "latency",
            "arms": [{"name": "a", "model": PRIMARY}, {"name": "b", "model": "claude-haiku-4-5-20251001"}]}  # fmt: skip
    started = await admin(d0, {"op": "experiment.start", "experiment": spec})
    assert started["ok"] and started["result"]["kept"].startswith("local: this sidecar only"), started
    assert (await admin(d1, {"op": "experiment.status", "name": "tone"}))["error"]["code"] == "bad_request"
    stopped = await admin(d0, {"op": "experiment.stop", "name": "tone"})
    assert stopped["result"]["kept"].startswith("local: this sidecar only"), stopped
    killed = await admin(d0, {"op": "kill", "scope": "feature:chat"})  # operator state proper is the fleet's
    assert killed["result"] == {"kept": "fleet"}


async def test_a_cache_flush_on_one_sidecar_empties_the_shared_cache_and_every_sidecars_own(fleet, sim, mock_clock):  # noqa: F811
    d0, d1, d2 = await fleet(3)
    await (await connect(d0)).complete("cache me", temperature=0.0)
    await (await connect(d0)).complete("keep me", temperature=0.0, feature="other")
    await eventually(lambda: _cached(d1, "cache me"))  # now in the store and in d0's and d1's own caches
    reply = await admin(d2, {"op": "cache.flush", "feature": "default"})
    assert reply["ok"] and reply["result"] == {"fleet": "flushed: the shared cache, and every sidecar's own as it hears of it",
                                               "flushed": 0}
    await eventually(lambda: len(d0.cache) == 1 and len(d1.cache) == 0)  # the other feature's answer stays
    calls = sim.calls_for(PRIMARY)
    assert (await (await connect(d2)).complete("cache me", temperature=0.0))["cached"] is False  # nor the shared cache
    assert sim.calls_for(PRIMARY) == calls + 1
    assert (await (await connect(d2)).complete("keep me", temperature=0.0, feature="other"))["cached"] is True


async def test_the_store_password_from_a_file_as_systemd_credentials_give_it(fleet, store_server, namespace, short_tmp, mock_clock,
                                                                              monkeypatch):
    user, password = f"{namespace}-user", "a-long-random-password"
    assert store_server.command("ACL", "SETUSER", user, "on", f">{password}", f"~{{{namespace}}}:*", f"&{{{namespace}}}:*",
                                "+@all", "-@admin") == b"OK"
    try:
        with open(f"{short_tmp}/store-password", "w") as f:
            f.write(password + "\n")  # as `printf '%s\n'` writes it
        monkeypatch.setenv("CREDENTIALS_DIRECTORY", short_tmp)  # as systemd's LoadCredential=store-password:... gives it
        (d,) = await fleet(1, url=f"unix://{user}@{store_server.socket_path}", fleet={"password_file": "store-password"})
        assert d.fleet.health.up and password not in str(d.fleet.status())
        assert (await admin(d, {"op": "kill", "scope": "feature:chat"}))["result"] == {"kept": "fleet"}
    finally:
        store_server.command("ACL", "DELUSER", user)


async def test_budget_shows_resets_and_raises_the_fleets_budget(fleet, mock_clock):
    daemons = await fleet(2, budgets=[{"scope": "global", "window": "day", "hard_usd": 0.01},
                                      {"scope": "user", "window": "day", "hard_usd": 0.5}])
    clients = [await connect(d) for d in daemons]

    async def spend_until_refused() -> float:
        spent = 0.0
        for i in range(200):
            reply = await clients[i % 2].call(frame(f"q{i}", user="alice"))
            if not reply["ok"]:
                assert reply["error"]["code"] == "budget_exceeded"
                return spent
            spent += reply["cost_usd"]
        raise AssertionError("never refused")

    spent = await spend_until_refused()
    await trio.testing.wait_all_tasks_blocked(cushion=0.05)  # the last settles
    row, user = (await admin(daemons[1], {"op": "budget"}))["result"]["budgets"]
    assert row["spent_usd"] == pytest.approx(spent, abs=1e-6) and row["reserved_usd"] == 0 and row["hard_usd"] == 0.01
    assert user["key"].startswith("user:") and user["spent_usd"] == pytest.approx(spent, abs=1e-6)  # (alice's pseudonym)
    # A reset on one sidecar zeroes the fleet's spend: both admit again.
    reset = await admin(daemons[0], {"op": "budget.reset", "scope": "global"})
    assert reset["ok"] and reset["result"] == {"kept": "fleet"}
    assert reset["before"]["spent_usd"] == pytest.approx(spent, abs=1e-6) and reset["after"]["spent_usd"] == 0
    assert (await admin(daemons[1], {"op": "budget"}))["result"]["budgets"][0]["spent_usd"] == 0
    assert all([(await c.call(frame("after the reset")))["ok"] for c in clients])
    await spend_until_refused()
    # A raise on one sidecar is the fleet's: the other admits under the new limit.
    raised = await admin(daemons[1], {"op": "budget.raise", "scope": "global", "hard_usd": 1.0})
    assert raised["ok"] and raised["result"] == {"kept": "fleet"} and raised["after"]["hard_usd"] == 1.0


    async def raised_on_the_other() -> bool:
        return (await admin(daemons[0], {"op": "budget"}))["result"]["budgets"][0]["hard_usd"] == 1.0

    await eventually(raised_on_the_other)
    assert (await clients[0].call(frame("under the raised limit")))["ok"]


async def test_status_gives_the_latest_reason_the_store_is_down(fleet, private_store, autojump_clock):  # noqa: F811
    from tests.e2e.test_admin import run_ctl

    (d,) = await fleet(1, url=private_store.url, fleet={"op_timeout_ms": 50.0},
                       rate_limits=[{"scope": "global", "requests_per_minute": 600}])
    client = await connect(d)
    private_store.slow(2.0)  # DEBUG SLEEP: timeouts, until the store's breaker opens
    for i in range(4):
        assert (await client.call(frame(f"q{i}")))["ok"]
    first = (await admin(d, {"op": "status"}))["result"]["fleet"]["down_reason"]
    assert first == "the store's breaker opened after failures (timeout)"
    private_store.stop()  # then it is gone altogether

    async def reason_now() -> str | None:
        reason = (await admin(d, {"op": "status"}))["result"]["fleet"]["down_reason"]
        return reason if reason != first else None

    latest = await eventually(reason_now)
    assert latest.startswith(("lost the connection", "cannot connect to")), latest
    shown = await run_ctl(d, "status")
    assert "STORE DOWN (" in shown.stdout and first not in shown.stdout


async def test_an_edit_refused_while_live_goes_in_as_the_fleet_moves_the_release_off_it(fleet, sim, short_tmp, mock_clock):  # noqa: F811
    """A `prompt use` on another sidecar moves this one off a version whose edit it refused: the edit goes in then."""
    root = prompts_with_echo(short_tmp, 2)
    d0, d1 = await fleet(2, prompts={"directory": str(root), "watch": False})
    (root / "echo" / "v1.toml").write_text(ECHO_VERSION.format(n=1).replace("[v1]", "[v1 edited]"))
    assert (await admin(d1, {"op": "reload"}))["ok"]
    assert "v1 is live" in d1.status()["prompt_errors"][0]["reason"]
    assert (await admin(d0, {"op": "prompt.use", "prompt": "echo", "version": 2}))["ok"]
    await eventually(lambda: d1.prompts.effective("echo").stable == 2)
    assert d1.status()["prompt_errors"] == [] and metric(d1, "sidecard_prompt_load_errors") == 0
    reply = await (await connect(d1)).call({"op": "complete", "prompt": "echo", "version": 1, "vars": {"q": "hi"}, "cache": "bypass"})
    assert reply["ok"] and sim.calls[-1].body["messages"][0]["content"] == "[v1 edited] hi"
