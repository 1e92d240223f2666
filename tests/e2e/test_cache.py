"""The response cache through the real daemon."""

import trio

from sidecard.sim import Fault
from tests.harness import connect, make_config, new_daemon

PRIMARY = "claude-sonnet-4-6"


async def test_a_repeat_is_served_from_cache(daemon, sim):
    client = await connect(daemon)
    first = await client.complete("cache me", temperature=0.0)
    second = await client.complete("cache me", temperature=0.0)
    assert first["cached"] is False and second["cached"] is True
    assert second["text"] == first["text"] and second["cost_usd"] == 0.0
    assert sim.calls_for(PRIMARY) == 1


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
    for change in [{"max_tokens": 101}, {"system": "be brief"}, {"stop_sequences": ["x"]}, {"model": "claude-opus-4-6"}]:
        assert (await client.complete("q", **{**base, **change}))["cached"] is False
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

    with open(f"{short_tmp}/cache.db", "wb") as f:
        f.write(b"this is not a database" * 100)
    config = make_config(short_tmp, cache={"store": "sqlite", "path": f"{short_tmp}/cache.db"})
    d = new_daemon(config, sim, capture_log)
    await nursery.start(d.run)
    assert capture_log.events("cache_store_corrupt")
    assert (await (await connect(d)).complete("works", temperature=0.0))["ok"]
