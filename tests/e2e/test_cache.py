"""The response cache through the real daemon."""

import copy
import os
import sqlite3
from contextlib import closing

import pytest
import trio

from sidecard.errors import StartupError
from sidecard.sim import Fault
from tests.harness import connect, make_config, metric, new_daemon

PRIMARY = "claude-sonnet-4-6"


async def test_a_repeat_is_served_from_cache(daemon, sim):
    client = await connect(daemon)
    first = await client.complete("cache me", temperature=0.0)
    second = await client.complete("cache me", temperature=0.0)
    assert first["cached"] is False and second["cached"] is True
    assert second["text"] == first["text"] and second["cost_usd"] == 0.0
    assert sim.calls_for(PRIMARY) == 1


async def test_a_hit_is_answered_in_the_readers_turn_and_accounted_once(daemon, sim, capture_log):
    # A hit needs no task of its own (Engine.begin); behind a slow miss on the same connection it comes first.
    client = await connect(daemon)
    assert (await client.complete("cache me", temperature=0.0))["cached"] is False
    sim.set_fault(PRIMARY, Fault(latency_ms=200))
    await client.send({"op": "complete", "id": "slow", "messages": [{"role": "user", "content": "not cached"}],
                       "temperature": 0.0})
    await client.send({"op": "complete", "id": "hit", "messages": [{"role": "user", "content": "cache me"}],
                       "temperature": 0.0})
    first, second = await client.next_frame(), await client.next_frame()
    assert (first["id"], first["cached"], second["id"], second["cached"]) == ("hit", True, "slow", False)
    lines = capture_log.events("request")
    assert [line["cache"] for line in lines] == ["miss", "hit", "miss"]
    assert metric(daemon, "sidecard_cache_requests_total", result="hit") == 1


async def test_temperature_above_zero_is_not_cached_unless_opted_in(daemon_factory, sim):
    d = await daemon_factory()
    client = await connect(d)
    for _ in range(2):
        assert (await client.complete("hot", temperature=0.7))["cached"] is False
    assert (await client.complete("default temperature"))["cached"] is False
    assert sim.calls_for(PRIMARY) == 3
    opted = await daemon_factory(features={"faq": {"cache_any_temperature": True}})
    client = await connect(opted)
    await client.complete("hot", temperature=0.7, feature="faq")
    assert (await client.complete("hot", temperature=0.7, feature="faq"))["cached"] is True


async def test_any_change_is_a_miss(daemon, sim):
    client = await connect(daemon)
    base = {"temperature": 0.0, "max_tokens": 100}
    await client.complete("q", **base)
    tool = {"name": "lookup", "description": "Look a word up", "input_schema": {"type": "object", "properties": {}}}
    changes = [
        {"max_tokens": 101}, {"system": "be brief"}, {"stop_sequences": ["x"]}, {"model": "claude-opus-4-6"},
        {"tools": [tool]}, {"tools": [{**tool, "description": "Look a word up, briefly"}]}, {"top_k": 5},
    ]
    for change in changes:
        assert (await client.complete("q", **{**base, **change}))["cached"] is False
        assert (await client.complete("q", **{**base, **change}))["cached"] is True
    assert (await client.complete("q2", **base))["cached"] is False


async def test_one_hundred_identical_concurrent_requests_make_one_call(daemon, sim, mock_clock):
    sim.set_fault(PRIMARY, Fault(latency_ms=1000))
    client = await connect(daemon)
    ids = [await client.send({"op": "complete", "temperature": 0.0, "messages": [{"role": "user", "content": "same"}]}) for _ in range(100)]
    await sim.wait_for_calls(1)
    await trio.testing.wait_all_tasks_blocked()
    mock_clock.jump(1)
    replies = [await client.reply(i) for i in ids]
    assert all(r["ok"] for r in replies)
    assert len({r["text"] for r in replies}) == 1
    assert sim.calls_for(PRIMARY) == 1
    assert sum(r["cached"] for r in replies) == 99


async def test_followers_take_over_when_the_leader_leaves(daemon, sim, mock_clock):
    sim.set_fault(PRIMARY, Fault(latency_ms=1000))
    leader = await connect(daemon)
    follower = await connect(daemon)
    await leader.send({"op": "complete", "temperature": 0.0, "messages": [{"role": "user", "content": "shared"}]})
    await sim.wait_for_calls(1)
    fid = await follower.send({"op": "complete", "temperature": 0.0, "messages": [{"role": "user", "content": "shared"}]})
    await trio.testing.wait_all_tasks_blocked()
    await leader.aclose()  # the leader's client goes away: its call is cancelled
    await sim.wait_for_calls(2)  # the follower leads a new call instead of hanging
    mock_clock.jump(1)
    assert (await follower.reply(fid))["ok"]


async def test_ttl_expiry(daemon_factory, sim, mock_clock):
    d = await daemon_factory(cache={"ttl_s": 60})
    client = await connect(d)
    await client.complete("ttl", temperature=0.0)
    mock_clock.jump(59)
    assert (await client.complete("ttl", temperature=0.0))["cached"] is True
    mock_clock.jump(2)
    assert (await client.complete("ttl", temperature=0.0))["cached"] is False
    assert sim.calls_for(PRIMARY) == 2


async def test_byte_bound_holds_with_large_answers(daemon_factory, sim):
    d = await daemon_factory(cache={"max_bytes": 64 * 1024, "max_entry_bytes": 16 * 1024})
    client = await connect(d)
    for i in range(40):
        assert (await client.complete(f"long answer {i} [[sim:long]]", temperature=0.0, max_tokens=600))["ok"]
        assert d.cache.bytes <= 64 * 1024
    assert len(d.cache) >= 2


async def test_policies_bypass_refresh_only(daemon, sim):
    client = await connect(daemon)
    miss = await client.complete("policy", temperature=0.0, cache="only")
    assert miss["error"]["code"] == "cache_miss" and sim.calls_for(PRIMARY) == 0
    await client.complete("policy", temperature=0.0)
    assert (await client.complete("policy", temperature=0.0, cache="only"))["cached"] is True
    assert (await client.complete("policy", temperature=0.0, cache="bypass"))["cached"] is False
    assert sim.calls_for(PRIMARY) == 2
    refreshed = await client.complete("policy", temperature=0.0, cache="refresh")
    assert refreshed["cached"] is False and sim.calls_for(PRIMARY) == 3
    assert (await client.complete("policy", temperature=0.0))["upstream_request_id"] == refreshed["upstream_request_id"]


async def test_stale_if_error(daemon_factory, sim, mock_clock):
    d = await daemon_factory(cache={"ttl_s": 10, "stale_ttl_s": 600}, routes={"default": {"targets": [{"model": PRIMARY, "max_attempts": 1}]}})
    client = await connect(d)
    first = await client.complete("stale", temperature=0.0)
    mock_clock.jump(100)
    sim.set_fault("*", Fault(status=529))
    reply = await client.complete("stale", temperature=0.0)
    assert reply["ok"] and reply["cached"] and reply["stale"] and reply["degraded"]
    assert reply["text"] == first["text"]


async def test_sqlite_store_survives_a_restart_for_stale_if_error(nursery, sim, capture_log, short_tmp, mock_clock):
    settings = {
        "cache": {"store": "sqlite", "path": f"{short_tmp}/cache.db", "ttl_s": 10},
        "routes": {"default": {"targets": [{"model": PRIMARY, "max_attempts": 1}]}},
        "state": {"path": f"{short_tmp}/state.json"},
    }
    first = new_daemon(make_config(short_tmp, **settings), sim, capture_log)
    async with trio.open_nursery() as n:
        await n.start(first.run)
        original = await (await connect(first)).complete("persist", temperature=0.0)
        first.shutdown()
    import os
    import stat

    assert stat.S_IMODE(os.stat(f"{short_tmp}/cache.db").st_mode) == 0o600
    sim.set_fault("*", Fault(status=529))
    mock_clock.jump(60)
    second = new_daemon(make_config(short_tmp, **settings), sim, capture_log)
    await nursery.start(second.run)
    reply = await (await connect(second)).complete("persist", temperature=0.0)
    assert reply["ok"] and reply["stale"] and reply["text"] == original["text"]


async def test_corrupt_sqlite_file_is_moved_aside(nursery, sim, capture_log, short_tmp):
    junk = b"this is not a database" * 100
    with open(f"{short_tmp}/cache.db", "wb") as f:
        f.write(junk)
    config = make_config(short_tmp, cache={"store": "sqlite", "path": f"{short_tmp}/cache.db"})
    d = new_daemon(config, sim, capture_log)
    await nursery.start(d.run)
    (event,) = capture_log.events("cache_store_corrupt")
    with open(event["moved_to"], "rb") as f:
        assert f.read() == junk
    assert (await (await connect(d)).complete("works", temperature=0.0))["ok"]
    assert d.status()["cache"]["store"] == "sqlite" and len(d.cache) == 1


async def test_a_cache_path_that_is_a_directory_refuses_the_start_and_is_left_alone(nursery, sim, capture_log, short_tmp):
    """Once moved aside like a corrupt file; only a regular file ever is (test_startup_errors.py covers each kind)."""
    os.mkdir(f"{short_tmp}/cache.db")
    config = make_config(short_tmp, cache={"store": "sqlite", "path": f"{short_tmp}/cache.db"})
    with pytest.raises(StartupError, match=r"cache\.db \(\[cache\] path\) is a directory"):
        await nursery.start(new_daemon(config, sim, capture_log).run)
    assert os.path.isdir(f"{short_tmp}/cache.db") and not [n for n in os.listdir(short_tmp) if ".corrupt-" in n]


async def test_unusable_sqlite_directory_falls_back_to_memory(nursery, sim, capture_log, short_tmp):
    with open(f"{short_tmp}/blocker", "w") as f:
        f.write("a file where the cache's directory should be")
    config = make_config(short_tmp, cache={"store": "sqlite", "path": f"{short_tmp}/blocker/cache.db"})
    d = new_daemon(config, sim, capture_log)
    await nursery.start(d.run)
    (event,) = capture_log.events("cache_store_unavailable")
    assert event["level"] == "error" and event["path"] == f"{short_tmp}/blocker/cache.db"
    assert d.cache_store is None and d.status()["cache"]["store"] == "memory"
    client = await connect(d)
    await client.complete("memory only", temperature=0.0)
    assert (await client.complete("memory only", temperature=0.0))["cached"] is True


def rows(path: str) -> list[str]:
    with closing(sqlite3.connect(path)) as db:
        return sorted(key for (key,) in db.execute("SELECT key FROM entries"))


async def test_evictions_and_expiries_are_deleted_from_sqlite(nursery, sim, capture_log, short_tmp, mock_clock):
    path = f"{short_tmp}/cache.db"
    config = make_config(short_tmp, cache={"store": "sqlite", "path": path, "max_entries": 3, "ttl_s": 10, "stale_ttl_s": 5})
    d = new_daemon(config, sim, capture_log)
    async with trio.open_nursery() as n:
        await n.start(d.run)
        client = await connect(d)
        for i in range(6):
            await client.complete(f"evict {i}", temperature=0.0)
        kept = sorted(key for key, _ in d.cache.items())
        mock_clock.jump(20)  # past TTL and stale window: the next look-up drops the entry
        for i in range(3, 6):
            assert (await client.complete(f"evict {i}", temperature=0.0, cache="only"))["error"]["code"] == "cache_miss"
        assert len(d.cache) == 0
        d.shutdown()  # the writer commits what is queued before it stops
    assert len(kept) == 3
    assert rows(path) == []
    assert not capture_log.events("cache_store_corrupt") and d.cache_store.dropped_writes == 0


async def test_sqlite_rows_past_the_bounds_are_deleted_on_eviction(nursery, sim, capture_log, short_tmp):
    path = f"{short_tmp}/cache.db"
    config = make_config(short_tmp, cache={"store": "sqlite", "path": path, "max_entries": 3})
    d = new_daemon(config, sim, capture_log)
    async with trio.open_nursery() as n:
        await n.start(d.run)
        client = await connect(d)
        for i in range(8):
            await client.complete(f"bounded {i}", temperature=0.0)
        kept = sorted(key for key, _ in d.cache.items())
        d.shutdown()
    assert rows(path) == kept and len(kept) == 3


async def test_start_up_loads_only_the_newest_entries_within_the_bounds(nursery, sim, capture_log, short_tmp, mock_clock):
    path = f"{short_tmp}/cache.db"
    settings = {"cache": {"store": "sqlite", "path": path}, "state": {"path": f"{short_tmp}/state.json"}}
    first = new_daemon(make_config(short_tmp, **settings), sim, capture_log)
    async with trio.open_nursery() as n:
        await n.start(first.run)
        client = await connect(first)
        for i in range(5):
            await client.complete(f"warm {i}", temperature=0.0)
            mock_clock.jump(1)  # distinct stored_at times
        newest = [key for key, _ in first.cache.items()][-2:]
        first.shutdown()
    settings["cache"]["max_entries"] = 2
    second = new_daemon(make_config(short_tmp, **settings), sim, capture_log)
    await nursery.start(second.run)
    assert [key for key, _ in second.cache.items()] == newest
    assert rows(path) == sorted(newest)  # the rest are gone from the file too


async def test_keys_and_bodies_never_reach_the_log(daemon_factory, sim, capture_log, short_tmp):
    # The prompt's own text may be logged as a redacted prefix (log.prompt_prefix_chars); 0 turns that off,
    # so anything of the request or answer found in the log came from the cache or its store.
    d = await daemon_factory(
        cache={"store": "sqlite", "path": f"{short_tmp}/c.db", "max_entries": 1}, log={"level": "debug", "prompt_prefix_chars": 0}
    )
    client = await connect(d)
    prompt = "confidential question 7f3a9c"
    answer = (await client.complete(prompt, temperature=0.0))["text"]
    (key,) = [k for k, _ in d.cache.items()]
    assert (await client.complete(prompt, temperature=0.0))["cached"] is True
    await client.complete("another question, evicting the first", temperature=0.0)
    await d.control.flush_cache()
    log = capture_log.text
    assert capture_log.events("request") and len(answer) > 20
    for secret in (prompt, answer, key):
        assert secret not in log


async def test_followers_get_the_leaders_error(daemon, sim, mock_clock):
    sim.set_fault(PRIMARY, Fault(latency_ms=1000, status=400))
    leader, follower = await connect(daemon), await connect(daemon)
    frame = {"op": "complete", "temperature": 0.0, "messages": [{"role": "user", "content": "doomed"}]}
    lid = await leader.send(frame)
    await sim.wait_for_calls(1)
    fid = await follower.send(frame)
    await trio.testing.wait_all_tasks_blocked()
    mock_clock.jump(1)
    led, followed = await leader.reply(lid), await follower.reply(fid)
    assert led["error"]["code"] == followed["error"]["code"] == "invalid_request"
    assert followed["error"]["message"] == led["error"]["message"]
    assert sim.calls_for(PRIMARY) == 1  # the follower made no call of its own


async def test_a_hit_never_touches_the_breaker_or_the_retry_budget(daemon_factory, sim, mock_clock):
    d = await daemon_factory(
        routes={"default": {"targets": [{"model": PRIMARY, "max_attempts": 1}]}},
        breaker={"consecutive_failures": 2, "cooldown_s": 600},
    )
    client = await connect(d)
    warm = await client.complete("warm", temperature=0.0)
    sim.set_fault("*", Fault(status=503))
    for i in range(3):
        assert not (await client.complete(f"fail {i}"))["ok"]
    assert d.status()["routes"]["default"]["targets"][0]["breaker"] == "open"
    breakers = [health.breaker for health, _ in d.engine.walker.breakers()]
    registry = d.metrics.registry

    def snapshot():
        samples = {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in registry.collect()
            if family.name.startswith(("sidecard_breaker", "sidecard_retr", "sidecard_upstream"))
            for s in family.samples
        }
        return copy.deepcopy([vars(b) for b in breakers]), copy.deepcopy(vars(d.engine.walker.budget)), samples, sim.calls_for(PRIMARY)

    before = snapshot()
    hit = await client.complete("warm", temperature=0.0)
    assert hit["ok"] and hit["cached"] and not hit["stale"] and hit["text"] == warm["text"]
    assert snapshot() == before


async def test_ttl_per_feature_and_route(daemon_factory, sim, mock_clock):
    target = [{"model": PRIMARY}]
    d = await daemon_factory(
        cache={"ttl_s": 300},
        routes={"default": {"targets": target, "cache_ttl_s": 100}, "never": {"targets": target, "cache_ttl_s": 0}},
        features={"faq": {"cache_ttl_s": 20}},
    )
    client = await connect(d)

    async def cached(text, **fields):
        reply = await client.complete(text, temperature=0.0, cache="only", **fields)
        return reply["ok"]

    await client.complete("routed", temperature=0.0)
    await client.complete("featured", temperature=0.0, feature="faq")
    await client.complete("uncached", temperature=0.0, route="never")
    assert not await cached("uncached", route="never")
    mock_clock.jump(19)
    assert await cached("featured", feature="faq") and await cached("routed")
    mock_clock.jump(2)  # 21 s: past the feature's TTL, within the route's
    assert not await cached("featured", feature="faq") and await cached("routed")
    mock_clock.jump(80)  # 101 s: past the route's TTL (the default of 300 s does not apply)
    assert not await cached("routed")


async def test_cache_metrics_values(daemon_factory, sim, mock_clock):
    d = await daemon_factory(
        cache={"max_entries": 2, "ttl_s": 10, "stale_ttl_s": 600},
        routes={"default": {"targets": [{"model": PRIMARY, "max_attempts": 1}]}},
    )
    client = await connect(d)
    await client.complete("a", temperature=0.0)  # miss
    await client.complete("a", temperature=0.0)  # hit
    sim.set_fault(PRIMARY, Fault(latency_ms=1000))
    frame = {"op": "complete", "temperature": 0.0, "messages": [{"role": "user", "content": "b"}]}
    ids = [await client.send(frame) for _ in range(2)]  # miss, then coalesced onto it
    await sim.wait_for_calls(2)
    await trio.testing.wait_all_tasks_blocked()
    mock_clock.jump(1)
    for i in ids:
        assert (await client.reply(i))["ok"]
    sim.clear_faults()
    await client.complete("c", temperature=0.0)  # miss; evicts "a" (max_entries 2)
    mock_clock.jump(100)
    sim.set_fault("*", Fault(status=529))
    assert (await client.complete("c", temperature=0.0))["stale"] is True
    assert [metric(d, "sidecard_cache_requests_total", result=r) for r in ("hit", "miss", "coalesced", "stale")] == [1, 3, 1, 1]
    assert metric(d, "sidecard_cache_evictions_total") == 1
    assert metric(d, "sidecard_cache_entries") == len(d.cache) == 2
    assert metric(d, "sidecard_cache_bytes") == d.cache.bytes > 0
    mock_clock.jump(1000)  # past stale_ttl: the next lookup drops the entry, and the gauges follow
    sim.clear_faults()
    await client.complete("c", temperature=0.0, cache="bypass")
    await client.complete("b", temperature=0.0, cache="only")
    assert metric(d, "sidecard_cache_entries") == len(d.cache) == 1
    assert metric(d, "sidecard_cache_bytes") == d.cache.bytes


async def test_an_undecodable_row_is_a_miss_dropped_counted_and_logged_once(persistent, sim, capture_log, short_tmp):
    path = f"{short_tmp}/cache.db"
    settings = {"cache": {"store": "sqlite", "path": path, "ttl_s": 3600}}
    first = await persistent(**settings)
    client = await connect(first)
    for question in ("one", "two"):
        assert (await client.complete(question, temperature=0.0))["ok"]
    await persistent.stop(first)
    with closing(sqlite3.connect(path)) as db, db:
        db.execute("UPDATE entries SET payload = x'c1ffee'")  # damaged on disk, or stored in an older layout

    d = await persistent(**settings)
    client = await connect(d)
    calls = sim.stats_total()["requests"]
    for question in ("one", "two"):
        reply = await client.complete(question, temperature=0.0)
        assert reply["ok"] and not reply["cached"]  # a miss, answered upstream: never `internal`
    assert sim.stats_total()["requests"] == calls + 2
    assert metric(d, "sidecard_cache_undecodable_total") == 2
    (logged,) = capture_log.events("cache_entry_undecodable")  # two rows, one line
    assert "key" not in logged  # cache keys are never logged
    assert (await client.complete("one", temperature=0.0))["cached"]  # the fresh answer took its place
    await persistent.stop(d)

    again = await persistent(**settings)  # the bad rows were replaced on disk too: no poison after a restart
    assert (await (await connect(again)).complete("two", temperature=0.0))["cached"]
    assert metric(again, "sidecard_cache_undecodable_total") == 0
