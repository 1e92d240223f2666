"""The request path's scripts on a real server: each one's semantics exactly, time passed in (never the server's).

The local parts are the reference: GCRA decisions and waits equal `policies/bucket.py`'s, budget windows and
reset times equal `limits/spend.py`'s.
"""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sidecard.fleet import scripts
from sidecard.fleet.errors import StoreDataError
from sidecard.fleet.keys import Keys
from sidecard.fleet.scripts import (
    Admit, Admitted, BudgetCheck, BudgetRefused, CacheHit, CacheMiss, RateCheck, RateRefused, RequestPath, Settle,
)
from sidecard.limits.spend import Budget, SpendLedger
from sidecard.policies.bucket import BucketSet

T0 = datetime(2026, 3, 14, 9, 26, 53, tzinfo=UTC).timestamp()


@pytest.fixture
async def path(connect, keys):
    return RequestPath(await connect(), keys, max_entry_bytes=1024)


def per_minute(n: int, burst: float = 1.0, scope: str = "global", kind: str = "requests", amount: float = 1.0) -> RateCheck:
    return RateCheck(scope, kind, n / 60, burst, amount)


# ---------------------------------------------------------------------------------------------- rate limits


async def test_a_rate_limit_admits_exactly_its_rate_per_window(path):
    limit = per_minute(60)
    admitted = 0
    for i in range(240):  # an attempt every 0.25 s for a minute
        result = await path.admit(Admit(T0 + i * 0.25, rates=[limit]))
        if isinstance(result, Admitted):
            admitted += 1
        else:
            assert isinstance(result, RateRefused) and result.index == 0
            assert result.wait_s == 1.0 - (i % 4) * 0.25  # until the next whole second: exactly the local bucket's wait
    assert admitted == 60


async def test_a_refusal_names_the_worst_limit_and_takes_from_none(path, store_server, keys):
    user = per_minute(60, burst=2, scope="user:ab12")
    tokens = RateCheck("global", "tokens", 100.0, 1000.0, amount=800.0)
    assert isinstance(await path.admit(Admit(T0, rates=[user, tokens])), Admitted)
    refused = await path.admit(Admit(T0, rates=[user, tokens]))
    assert refused == RateRefused(wait_s=6.0, index=1)  # tokens: 600 more needed at 100/s; the user limit would allow
    assert isinstance(await path.admit(Admit(T0, rates=[user])), Admitted)  # so the user's bucket was not taken from
    assert store_server.command("EXISTS", keys.rate("requests", "user:ab12")) == 1


ACTIONS = st.lists(st.tuples(st.integers(0, 16), st.integers(0, 40), st.integers(-8, 8)), max_size=30)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rate=st.sampled_from([0.5, 1.0, 2.0, 4.0]), burst=st.sampled_from([1.0, 2.0, 3.5, 8.0]), actions=ACTIONS)
def test_fleet_buckets_decide_as_the_local_ones(store_server, rate, burst, actions):
    """Two buckets (requests, tokens) through admit and settle: every verdict and wait is the local BucketSet's."""
    store_server.command("SCRIPT", "LOAD", scripts.REQUEST.source)
    store_server.command("SCRIPT", "LOAD", scripts.SETTLE.source)
    keys = Keys(f"model-{rate}-{burst}-{hash(tuple(actions))}")
    store_server.command("DEL", keys.rate("requests", "global"), keys.rate("tokens", "global"))
    requests, tokens = BucketSet(rate, 2.0), BucketSet(rate * 4, burst * 4)
    now = T0
    for step, (eighths, quarters, correction) in enumerate(actions):
        now += eighths / 8
        amount = quarters / 4
        checks = [RateCheck("global", "requests", rate, 2.0), RateCheck("global", "tokens", rate * 4, burst * 4, amount)]
        op = Admit(now, rates=checks)
        result = scripts.admit_result(op, run(store_server, scripts.REQUEST, *scripts.admit_call(keys, op)))
        waits = [requests.delay("global", now), tokens.delay("global", now, amount)]
        if max(waits) > 0:
            assert result == RateRefused(max(waits), waits.index(max(waits)))
            continue
        assert isinstance(result, Admitted)
        requests.try_take("global", now)
        tokens.try_take("global", now, amount)
        if correction and step % 2:  # the real token count differs from the estimate
            settle = Settle(now, "", 0.0, token_adjustments=[(checks[1], correction / 4)])
            run(store_server, scripts.SETTLE, *scripts.settle_call(keys, settle))
            tokens.adjust("global", now, correction / 4)


def run(store, script, key_list, args):
    reply = store.command("EVALSHA", script.sha, len(key_list), *key_list, *args)
    assert not isinstance(reply, Exception), reply
    return reply


# ---------------------------------------------------------------------------------------------- budgets


def day(hard: float | None, soft: float | None = None, scope: str = "global") -> BudgetCheck:
    return BudgetCheck(scope, "day", hard, soft)


async def test_in_flight_reservations_count_against_the_hard_limit(path):
    budget = day(1.0)
    for i in range(3):
        assert isinstance(await path.admit(Admit(T0, budgets=[budget], estimate_usd=0.3, reservation_id=f"r{i}", reservation_ttl_s=60)), Admitted)
    refused = await path.admit(Admit(T0, budgets=[budget], estimate_usd=0.3, reservation_id="r3", reservation_ttl_s=60))
    midnight = datetime(2026, 3, 15, tzinfo=UTC).timestamp()
    assert refused == BudgetRefused(0, midnight, [scripts.Usage(0.0, pytest.approx(0.9))])
    settled = await path.settle(Settle(T0 + 1, "r0", 0.1, budgets=[budget]))
    assert settled.spent_usd == [pytest.approx(0.1)]
    admitted = await path.admit(Admit(T0 + 1, budgets=[budget], estimate_usd=0.3, reservation_id="r3", reservation_ttl_s=60))
    assert admitted == Admitted("none", 0, [scripts.Usage(pytest.approx(0.1), pytest.approx(0.6))])


async def test_spend_carried_in_after_an_outage_counts_once_and_only_in_its_own_window(path):
    budget = day(1.0)
    carry = Settle(T0, "", 0.25, budgets=[budget], once="web-1/ab/1", sent_at=T0 + 600)
    assert (await path.settle(carry)).spent_usd == [pytest.approx(0.25)]
    assert (await path.settle(carry)).spent_usd == [pytest.approx(0.25)]  # sent again, its reply lost: counted once
    assert (await path.settle(Settle(T0, "", 0.1, budgets=[budget], once="web-1/ab/2", sent_at=T0 + 600))).spent_usd == [pytest.approx(0.35)]
    # Spent yesterday, carried in today: not counted against today's budget.
    await path.settle(Settle(T0 + 86_400, "", 0.05, budgets=[budget]))
    late = Settle(T0, "", 0.5, budgets=[budget], once="web-1/ab/3", sent_at=T0 + 86_400)
    assert (await path.settle(late)).spent_usd == [pytest.approx(0.05)]  # today's, unchanged
    assert (await path.admit(Admit(T0 + 86_400, budgets=[budget]))).usage == [scripts.Usage(pytest.approx(0.05), 0.0)]


async def test_a_reservation_never_settled_lapses_after_its_ttl(path):
    budget = day(1.0)
    assert isinstance(await path.admit(Admit(T0, budgets=[budget], estimate_usd=1.0, reservation_id="dead", reservation_ttl_s=30)), Admitted)
    assert isinstance(await path.admit(Admit(T0 + 29, budgets=[budget], estimate_usd=0.5)), BudgetRefused)
    after = await path.admit(Admit(T0 + 30, budgets=[budget], estimate_usd=0.5))  # the dead sidecar's reservation is gone
    assert after == Admitted("none", 0, [scripts.Usage(0.0, 0.0)])
    # Its settle, if it ever comes, records the cost and gives back nothing twice.
    assert (await path.settle(Settle(T0 + 31, "dead", 0.2, budgets=[budget]))).spent_usd == [pytest.approx(0.2)]
    assert (await path.admit(Admit(T0 + 31, budgets=[budget]))).usage == [scripts.Usage(pytest.approx(0.2), 0.0)]


@pytest.mark.parametrize("window", ["hour", "day", "month"])
async def test_budget_windows_and_reset_times_are_the_ledgers(path, window):
    """Spend recorded at scattered times, then checks at scattered times: refusals and reset times equal the
    local ledger's (no reservations in flight, so the two see the same spend)."""
    budget = Budget(scope="global", window=window, hard_usd=1.0)
    ledger = SpendLedger([budget])
    check = BudgetCheck("global", window, 1.0)
    step = {"hour": 7 * 60 + 13, "day": 3 * 3600 + 17, "month": 4 * 86400 + 321}[window]
    refusals = 0
    for i in range(40):
        now = T0 + i * step
        cost = 0.05 * (i % 7)
        op = Admit(now, budgets=[check], estimate_usd=0.2)
        verdict = ledger.check([(budget, "global")], 0.2, now)
        result = await path.admit(op)
        if verdict.allowed:
            assert isinstance(result, Admitted), (i, result)
            assert result.usage[0].spent_usd == pytest.approx(ledger.spent(budget, "global", now))
        else:
            assert isinstance(result, BudgetRefused), (i, result)
            assert result.reset_at == verdict.reset_at
            refusals += 1
        if cost:
            await path.settle(Settle(now, "", cost, budgets=[check]))
            ledger.add([(budget, "global")], cost, now)
    assert 0 < refusals < 40  # both verdicts were compared


async def test_a_soft_limit_crossing_is_reported_by_exactly_one_settle(path):
    budget = day(None, soft=0.25)
    crossings = []
    for i in range(6):
        settled = await path.settle(Settle(T0 + i, "", 0.1, budgets=[budget]))
        crossings.append(settled.soft_crossed)
    assert crossings == [[], [], [0], [], [], []]
    # An admission at or over it says so (for the soft route), without refusing.
    admitted = await path.admit(Admit(T0 + 9, budgets=[budget], estimate_usd=0.01))
    assert isinstance(admitted, Admitted) and admitted.soft_crossed == [0]


async def test_a_sidecar_whose_clock_is_behind_counts_against_the_newer_window(path):
    budget = day(1.0)
    tomorrow = T0 + 86400
    await path.settle(Settle(tomorrow, "", 0.9, budgets=[budget]))
    late = await path.admit(Admit(T0, budgets=[budget], estimate_usd=0.2))  # its clock still says yesterday
    assert isinstance(late, BudgetRefused)
    await path.settle(Settle(T0, "", 0.05, budgets=[budget]))  # and does not reset tomorrow's spend
    assert (await path.admit(Admit(tomorrow, budgets=[budget]))).usage[0].spent_usd == pytest.approx(0.95)


# ---------------------------------------------------------------------------------------------- the shared cache


async def test_a_fresh_shared_answer_ends_the_request_before_any_limit(path, store_server, keys):
    await path.cache_put("k1", b"answer", now=T0, stored_at=T0, expires_at=T0 + 300, stale_until=T0 + 3600)
    limit = per_minute(1, scope="user:u")
    for _ in range(3):
        hit = await path.admit(Admit(T0 + 10, rates=[limit], budgets=[day(0.0)], estimate_usd=1.0, cache_key="k1", cache_mode="lead"))
        assert hit == CacheHit(b"answer", T0, T0 + 300)
    assert store_server.command("EXISTS", keys.rate("requests", "user:u"), keys.lease("k1")) == 0


async def test_a_stale_answer_is_a_miss_on_the_request_path_and_there_for_errors(path):
    await path.cache_put("k1", b"answer", now=T0, stored_at=T0, expires_at=T0 + 300, stale_until=T0 + 3600)
    assert await path.admit(Admit(T0 + 300, cache_key="k1", cache_mode="lookup")) == CacheMiss()
    assert await path.cache_get("k1", T0 + 300) is None
    assert await path.cache_get("k1", T0 + 300, allow_stale=True) == CacheHit(b"answer", T0, T0 + 300)
    assert await path.cache_get("k1", T0 + 3600, allow_stale=True) is None


async def test_an_answer_over_the_byte_limit_is_not_shared_but_frees_the_lease(path, store_server, keys):
    lead = await path.admit(Admit(T0, cache_key="big", cache_mode="lead", lease_token="a:1"))
    assert lead.lease == "leader"
    stored = await path.cache_put("big", b"x" * 1025, now=T0, stored_at=T0, expires_at=T0 + 300, stale_until=T0 + 600, lease_token="a:1")
    assert not stored
    assert store_server.command("EXISTS", keys.cache("big"), keys.lease("big")) == 0
    assert await path.cache_put("small", b"x" * 1024, now=T0, stored_at=T0, expires_at=T0 + 300, stale_until=T0 + 600)


async def test_the_entry_expires_in_the_store_when_it_is_no_longer_even_stale(path, store_server, keys):
    await path.cache_put("k1", b"answer", now=T0, stored_at=T0, expires_at=T0 + 300, stale_until=T0 + 3600)
    assert 3_599_000 < store_server.command("PTTL", keys.cache("k1")) <= 3_600_000


# ---------------------------------------------------------------------------------------------- bad data


async def test_another_schema_version_is_refused_whole(path, store_server, keys):
    store_server.command("SET", keys.schema, "sidecard-fleet/2")
    with pytest.raises(StoreDataError, match='sidecard-fleet/2.*this sidecard speaks "sidecard-fleet/1"'):
        await path.admit(Admit(T0, rates=[per_minute(60)]))
    assert store_server.command("EXISTS", keys.rate("requests", "global")) == 0


@pytest.mark.parametrize("garbage", [
    ("budget", "HSET", "spent", "lots"),
    ("budget", "HSET", "surprise", "1"),
    ("budget", "SET", "a string"),
    ("rate", "SET", "soon"),
    ("rate", "LPUSH", "a list"),
    ("cache", "HSET", "p", "answer", "e", "later"),
    ("lease", "SET", "no separator"),
])
async def test_garbage_under_the_namespace_is_a_data_error_with_nothing_changed(path, store_server, keys, garbage):
    where, command, *values = garbage
    key = {"budget": keys.budget("day", "global"), "rate": keys.rate("tokens", "global"), "cache": keys.cache("k1"),
           "lease": keys.lease("k1")}[where]
    store_server.command(command, key, *values)
    untouched = keys.rate("requests", "user:u")
    op = Admit(T0, rates=[per_minute(60, scope="user:u"), RateCheck("global", "tokens", 1.0, 10.0)],
               budgets=[day(1.0)], estimate_usd=0.1, reservation_id="r1", reservation_ttl_s=60, cache_key="k1", cache_mode="lead")
    with pytest.raises(StoreDataError, match="SIDECARD_DATA|WRONGTYPE"):
        await path.admit(op)
    assert store_server.command("EXISTS", untouched, keys.reservations, keys.reservation_specs) == 0


async def test_a_reaper_meeting_garbage_still_lapses_the_reservation(path, store_server, keys):
    budget = day(1.0)
    await path.admit(Admit(T0, budgets=[budget], estimate_usd=0.4, reservation_id="r1", reservation_ttl_s=10))
    store_server.command("HSET", keys.reservation_specs, "r1", "junk\tnot-a-key")
    assert isinstance(await path.admit(Admit(T0 + 20, budgets=[day(1.0, scope="feature:x")])), Admitted)
    assert store_server.command("ZCARD", keys.reservations) == 0


def test_an_unreadable_reply_is_a_data_error():
    op = Admit(T0, budgets=[day(1.0)])
    for reply in (b"OK", [], [b"ok", b"leader"], [b"budget", 7, b"1"], [b"rate", b"x", 1], [b"hit", b"p", b"soon", b"1"]):
        with pytest.raises(StoreDataError):
            scripts.admit_result(op, reply)
