"""Coalescing across sidecars: one leader among identical concurrent requests in the whole fleet; followers get
the leader's answer, or lead themselves when the leader dies (its lease runs out) or gives up."""

from __future__ import annotations

import pytest
import trio
from trio.testing import MockClock

from sidecard.fleet.coalesce import Landings, follow, keep_lease
from sidecard.fleet.pubsub import Subscriber
from sidecard.fleet.scripts import Admit, Admitted, CacheHit, RateCheck, RequestPath
from sidecard.fleet.settings import parse_url

T0 = 1_773_480_000.0
LEASE_MS = 3000
PATIENT = 1e6  # no operation's deadline for the jumping clock to land on: only leases and waits


@pytest.fixture
def clock():
    return MockClock(autojump_threshold=0.25)


def wall() -> float:
    return T0 + trio.current_time()


@pytest.fixture
def sidecars(nursery, connect, keys, store_server):
    """Two sidecars: each a connection and a subscriber feeding its followers."""

    async def start():
        made = []
        for name in ("a", "b"):
            landings = Landings(keys.cache_channel)
            subscriber = Subscriber(parse_url(store_server.url), name=f"sub-{name}", connect_timeout_s=PATIENT)
            landings.attach(subscriber)
            await nursery.start(subscriber.run)
            made.append((RequestPath(await connect(op_timeout_s=PATIENT, connect_timeout_s=PATIENT), keys), landings))
        return made

    return start


def lead(key: str, token: str, now: float = T0) -> Admit:
    return Admit(now, rates=[RateCheck("global", "requests", 100.0, 100.0)], cache_key=key, cache_mode="lead",
                 lease_token=token, lease_ms=LEASE_MS)


async def test_one_leader_among_concurrent_requests_on_two_sidecars(sidecars):
    (a, _), (b, _) = await sidecars()
    results = []

    async def request(path, token):
        results.append(await path.admit(lead("k1", token)))

    async with trio.open_nursery() as nursery:
        for i in range(16):
            nursery.start_soon(request, a if i % 2 else b, f"t{i}")
    assert sorted(r.lease for r in results) == ["follower"] * 15 + ["leader"]
    assert all(isinstance(r, Admitted) and r.lease_ttl_ms == LEASE_MS for r in results)


async def test_followers_get_the_leaders_answer_when_it_lands(sidecars, clock):
    (a, _), (b, landings) = await sidecars()
    assert (await a.admit(lead("k1", "leader", wall()))).lease == "leader"
    got = []

    async def follower(token):
        assert (await b.admit(lead("k1", token, wall()))).lease == "follower"
        got.append(await follow(b, landings, "k1", lease_token=token, lease_ms=LEASE_MS, wall=wall))

    async with trio.open_nursery() as nursery:
        for i in range(3):
            nursery.start_soon(follower, f"f{i}")
        await trio.sleep(1.0)  # the leader's upstream call
        landed = wall()
        assert await a.cache_put("k1", b"the answer", now=landed, stored_at=landed, expires_at=landed + 300,
                                 stale_until=landed + 600, lease_token="leader")
    assert got == [CacheHit(b"the answer", landed, landed + 300)] * 3
    assert wall() - landed < 0.1  # woken by the landing, not by the lease's end


async def test_a_follower_leads_when_the_leaders_lease_runs_out(sidecars, clock):
    (a, _), (b, landings) = await sidecars()
    assert (await a.admit(lead("k1", "dead-leader", wall()))).lease == "leader"  # then its sidecar dies
    assert (await b.admit(lead("k1", "f1", wall()))).lease == "follower"
    assert await follow(b, landings, "k1", lease_token="f1", lease_ms=LEASE_MS, wall=wall) is None  # it leads now
    assert trio.current_time() == pytest.approx(LEASE_MS / 1000)


async def test_a_renewed_lease_keeps_its_leader(sidecars):
    (a, _), (b, _) = await sidecars()
    assert (await a.admit(lead("k1", "slow-leader"))).lease == "leader"
    assert await a.renew_lease("k1", "slow-leader", lease_ms=LEASE_MS, now=T0 + 2.5)
    follower = await b.admit(lead("k1", "f1", T0 + 4.0))  # past the first lease, within the renewed one
    assert (follower.lease, follower.lease_ttl_ms) == ("follower", 1500)
    taken_over = await b.admit(lead("k1", "f1", T0 + 5.5))
    assert taken_over.lease == "leader"
    assert not await a.renew_lease("k1", "slow-leader", lease_ms=LEASE_MS, now=T0 + 5.6)  # too late: it knows


async def test_a_leader_that_gives_up_hands_over_at_once(sidecars, clock):
    (a, _), (b, landings) = await sidecars()
    assert (await a.admit(lead("k1", "leader", wall()))).lease == "leader"
    assert (await b.admit(lead("k1", "f1", wall()))).lease == "follower"
    async with trio.open_nursery() as nursery:

        async def follower():
            assert await follow(b, landings, "k1", lease_token="f1", lease_ms=LEASE_MS, wall=wall) is None

        nursery.start_soon(follower)
        await trio.sleep(0.5)
        assert await a.release_lease("k1", "leader")  # its upstream call failed
    assert trio.current_time() == pytest.approx(0.5, abs=0.05)


async def test_a_slow_leader_that_keeps_its_lease_is_waited_for(sidecars, clock):
    (a, _), (b, landings) = await sidecars()
    assert (await a.admit(lead("k1", "slow", wall()))).lease == "leader"
    assert (await b.admit(lead("k1", "f1", wall()))).lease == "follower"
    got = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(lambda: keep_lease(a, "k1", lease_token="slow", lease_ms=LEASE_MS, wall=wall))

        async def follower():
            got.append(await follow(b, landings, "k1", lease_token="f1", lease_ms=LEASE_MS, wall=wall))

        nursery.start_soon(follower)
        await trio.sleep(4.5)  # past the first lease: renewed all along
        landed = wall()
        await a.cache_put("k1", b"late but sure", now=landed, stored_at=landed, expires_at=landed + 300,
                          stale_until=landed + 600, lease_token="slow")
        while not got:
            await trio.sleep(0.01)
        nursery.cancel_scope.cancel()
    assert got == [CacheHit(b"late but sure", landed, landed + 300)]


async def test_a_landing_is_announced_only_when_someone_follows(connect, keys, store_server):
    """Every sidecar subscribes to the cache channel: a message per stored answer would wake the whole fleet for
    each cache write. Only a lease that has a follower is announced (stored, or given up)."""
    path = RequestPath(await connect(op_timeout_s=PATIENT), keys)

    def published() -> int:
        stats = store_server.command("INFO", "commandstats").decode()
        line = next((l for l in stats.splitlines() if l.startswith("cmdstat_publish:")), "calls=0,")
        return int(line.split("calls=")[1].split(",")[0])

    before = published()
    assert (await path.admit(lead("alone", "t1"))).lease == "leader"
    assert await path.cache_put("alone", b"answer", now=T0, stored_at=T0, expires_at=T0 + 60, stale_until=T0 + 60, lease_token="t1")
    assert (await path.admit(lead("alone-2", "t2"))).lease == "leader"
    assert await path.release_lease("alone-2", "t2")
    assert published() == before  # nobody followed: nobody told
    assert (await path.admit(lead("shared", "t3"))).lease == "leader"
    assert (await path.admit(lead("shared", "t4"))).lease == "follower"
    assert (await path.admit(lead("shared", "t5"))).lease == "follower"
    assert await path.cache_put("shared", b"answer", now=T0, stored_at=T0, expires_at=T0 + 60, stale_until=T0 + 60, lease_token="t3")
    assert published() == before + 1
