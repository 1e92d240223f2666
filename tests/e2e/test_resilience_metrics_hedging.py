"""Resilience behaviours the chaos tests in test_resilience.py leave open: 429 mixes, hedge accounting, the
retry budget running dry, per-feature static fallback, metric values, and cloud credentials kept out of logs."""

import pytest
import trio

from sidecard.daemon import SIM_API_KEY
from sidecard.sim import Fault, Simulator
from tests.e2e.test_resilience import FALLBACK, PRIMARY, two_targets
from tests.harness import connect, metric

ANTHROPIC = "anthropic"


async def test_thirty_percent_429_and_529_mix_with_retry_after(daemon_factory, sim, autojump_clock):
    d = await daemon_factory(routes=two_targets(max_attempts=3))
    client = await connect(d)
    results = []
    deadline_ms = 30_000
    start = trio.current_time()

    async def one(i):
        results.append(await client.complete(f"q{i}", cache="bypass", deadline_ms=deadline_ms))

    # One fault per model at a time: batches alternate 429 and 529, both with retry-after.
    for batch in range(10):
        status = 429 if batch % 2 == 0 else 529
        sim.set_fault(PRIMARY, Fault(status=status, rate=0.3, retry_after_s=0.5))
        async with trio.open_nursery() as nursery:
            for i in range(100):
                nursery.start_soon(one, batch * 100 + i)
    elapsed = trio.current_time() - start
    n = len(results)
    assert n == 1000
    assert all(r["ok"] for r in results), [r["error"] for r in results if not r["ok"]][:3]
    assert all(r["latency_ms"] <= deadline_ms for r in results)
    by_status = sim.stats_total()["by_status"]
    assert by_status.get(429, 0) > 0 and by_status.get(529, 0) > 0  # both kinds were really injected
    # Retries of the same target stay within the retry budget: 20% of volume plus its floor of 1/s over a
    # sliding 10 s window. A failover to the healthy fallback is not a retry, and costs exactly one call.
    retries = metric(d, "sidecard_retries_total", provider=ANTHROPIC, model=PRIMARY)
    fallbacks = metric(d, "sidecard_fallbacks_total", route="default", provider=ANTHROPIC, model=FALLBACK)
    assert 0 < retries <= n * 0.2 + 1.0 * (elapsed + 10)
    assert sim.calls_for(PRIMARY) <= n + retries
    assert sim.calls_for(FALLBACK) == fallbacks
    assert sim.stats_total()["requests"] <= n + retries + fallbacks


async def test_hedge_loser_is_cancelled_its_connection_released_and_counted(daemon_factory, sim, autojump_clock):
    d = await daemon_factory(routes=two_targets(hedge_after_ms=300, timeout_s=5))
    sim.set_fault(PRIMARY, Fault(hang=True))
    client = await connect(d)
    balance_before = d.engine.walker.budget.balance(trio.current_time())
    reply = await client.complete("hedge me", cache="bypass", deadline_ms=4000)
    assert reply["ok"] and reply["served_by"]["model"] == FALLBACK
    # The hanging primary's call was cancelled: nothing left in flight at the simulator, no connection in use.
    with trio.fail_after(1):
        while sim.stats_total()["in_flight"]:
            await trio.sleep(0.01)
    pool = d.pool.stats
    assert pool["open"] == pool["idle"] and pool["waiting"] == 0
    assert metric(d, "sidecard_hedges_total", provider=ANTHROPIC, model=FALLBACK, result="won") == 1
    assert metric(d, "sidecard_upstream_attempts_total", provider=ANTHROPIC, model=PRIMARY, outcome="cancelled") == 1
    # The hedge spent one token of the retry budget (the request itself deposited `ratio` of one).
    balance_after = d.engine.walker.budget.balance(trio.current_time())
    assert balance_after == pytest.approx(balance_before + d.config.retry.budget_ratio - 1)


async def test_a_hedge_that_loses_is_counted_lost(daemon_factory, sim, autojump_clock):
    d = await daemon_factory(routes=two_targets(hedge_after_ms=200))
    sim.set_fault(PRIMARY, Fault(latency_ms=400))
    sim.set_fault(FALLBACK, Fault(latency_ms=2000))
    reply = await (await connect(d)).complete("primary wins late", cache="bypass")
    assert reply["ok"] and reply["served_by"]["model"] == PRIMARY and not reply["fallback"]
    assert metric(d, "sidecard_hedges_total", provider=ANTHROPIC, model=FALLBACK, result="lost") == 1
    assert metric(d, "sidecard_hedges_total", provider=ANTHROPIC, model=FALLBACK, result="won") == 0
    assert metric(d, "sidecard_upstream_attempts_total", provider=ANTHROPIC, model=FALLBACK, outcome="cancelled") == 1
    pool = d.pool.stats  # the loser's connection is closed, not left in use
    assert pool["open"] == pool["idle"] and pool["waiting"] == 0


async def test_no_hedge_when_the_budget_is_spent(daemon_factory, sim, autojump_clock):
    # No share of volume and a floor of one token per 10 s window: exactly one hedge is affordable.
    d = await daemon_factory(
        routes=two_targets(hedge_after_ms=200, timeout_s=1, max_attempts=1),
        retry={"budget_ratio": 0.0, "budget_min_per_s": 0.1, "budget_window_s": 10},
    )
    sim.set_fault(PRIMARY, Fault(hang=True))
    client = await connect(d)
    start = trio.current_time()
    first = await client.complete("hedged", cache="bypass")
    assert first["ok"] and trio.current_time() - start < 0.5
    start = trio.current_time()
    second = await client.complete("not hedged", cache="bypass")
    # No hedge: the primary's whole per-attempt timeout is paid before failing over.
    assert second["ok"] and second["served_by"]["model"] == FALLBACK and trio.current_time() - start >= 1.0
    assert metric(d, "sidecard_retry_budget_refusals_total", provider=ANTHROPIC, model=FALLBACK) == 1
    assert metric(d, "sidecard_hedges_total", provider=ANTHROPIC, model=FALLBACK, result="won") == 1


async def test_spent_retry_budget_fails_over_instead_of_retrying(daemon_factory, sim, capture_log, autojump_clock):
    d = await daemon_factory(routes=two_targets(max_attempts=3), retry={"budget_ratio": 0.0, "budget_min_per_s": 0.0})
    sim.set_fault(PRIMARY, Fault(status=529))
    client = await connect(d)
    for i in range(3):
        reply = await client.complete(f"q{i}", cache="bypass")
        assert reply["ok"] and reply["served_by"]["model"] == FALLBACK and reply["attempts"] == 2
    assert sim.calls_for(PRIMARY) == 3  # one attempt each: no retries
    assert metric(d, "sidecard_retry_budget_refusals_total", provider=ANTHROPIC, model=PRIMARY) == 3
    assert metric(d, "sidecard_retries_total", provider=ANTHROPIC, model=PRIMARY) == 0
    attempts = capture_log.events("request")[-1]["attempts"]
    assert [(a["model"], a["outcome"]) for a in attempts] == [(PRIMARY, "529"), (FALLBACK, "ok")]


async def test_static_fallback_per_feature_wins_over_the_routes(daemon_factory, sim, autojump_clock):
    routes = two_targets()
    routes["default"]["static_fallback"] = "route text"
    d = await daemon_factory(routes=routes, features={"checkout": {"static_fallback": "checkout text"}})
    sim.set_fault("*", Fault(status=529))
    client = await connect(d)
    feature = await client.complete("help", cache="bypass", feature="checkout")
    assert feature["ok"] and feature["degraded"] and feature["text"] == "checkout text"
    assert feature["served_by"] == {"provider": "sidecard", "model": "static_fallback"}
    other = await client.complete("help", cache="bypass", feature="search")
    assert other["ok"] and other["degraded"] and other["text"] == "route text"
    assert metric(d, "sidecard_degraded_total", route="default", kind="static") == 2


async def test_static_fallback_per_feature_without_a_route_fallback(daemon_factory, sim, autojump_clock):
    d = await daemon_factory(routes=two_targets(), features={"checkout": {"static_fallback": "checkout text"}})
    sim.set_fault("*", Fault(status=503))
    client = await connect(d)
    start = trio.current_time()
    feature = await client.complete("help", cache="bypass", feature="checkout", deadline_ms=3000)
    assert feature["ok"] and feature["degraded"] and feature["text"] == "checkout text"
    assert trio.current_time() - start <= 3.0
    other = await client.complete("help", cache="bypass", feature="search", deadline_ms=3000)
    assert other["error"]["code"] == "upstream_unavailable"


async def test_resilience_metric_values_after_a_breaker_opens(daemon_factory, sim, autojump_clock):
    d = await daemon_factory(routes=two_targets(max_attempts=3), breaker={"consecutive_failures": 3, "cooldown_s": 60})
    sim.set_fault(PRIMARY, Fault(status=503))  # (a 529, the provider busy, does not count in the in-a-row rule)
    client = await connect(d)
    first = await client.complete("one", cache="bypass")
    assert first["ok"] and first["fallback"] and first["attempts"] == 4
    second = await client.complete("two", cache="bypass")
    assert second["ok"] and second["fallback"] and second["attempts"] == 1
    primary = {"provider": ANTHROPIC, "model": PRIMARY}
    assert metric(d, "sidecard_upstream_attempts_total", **primary, outcome="503") == 3
    assert metric(d, "sidecard_upstream_attempts_total", **primary, outcome="breaker_open") == 1
    assert metric(d, "sidecard_upstream_attempts_total", provider=ANTHROPIC, model=FALLBACK, outcome="ok") == 2
    assert metric(d, "sidecard_retries_total", **primary) == 2
    assert metric(d, "sidecard_fallbacks_total", route="default", provider=ANTHROPIC, model=FALLBACK) == 2
    assert metric(d, "sidecard_breaker_state", **primary) == 2  # open
    assert metric(d, "sidecard_breaker_state", provider=ANTHROPIC, model=FALLBACK) == 0
    assert metric(d, "sidecard_breaker_transitions_total", **primary, to="open") == 1
    # Healed and cooled down: a probe half-opens the breaker and its success closes it.
    sim.clear_faults()
    await trio.sleep(61)
    third = await client.complete("three", cache="bypass")
    assert third["ok"] and third["served_by"]["model"] == PRIMARY
    assert metric(d, "sidecard_breaker_transitions_total", **primary, to="half_open") == 1
    assert metric(d, "sidecard_breaker_transitions_total", **primary, to="closed") == 1
    assert metric(d, "sidecard_breaker_state", **primary) == 0


async def test_bedrock_and_vertex_credentials_never_reach_the_log(daemon_factory, capture_log, monkeypatch, autojump_clock):
    planted = {
        "AWS_ACCESS_KEY_ID": "AKIA" + "PLANTEDKEYID0001",  # built here: no key-shaped literal in the repository
        "AWS_SECRET_ACCESS_KEY": "planted-aws-secret-access-key-0001",
        "AWS_SESSION_TOKEN": "planted-aws-session-token-0001",
        "AWS_BEARER_TOKEN_BEDROCK": "planted-bedrock-bearer-0001",
    }
    for name, value in planted.items():
        monkeypatch.setenv(name, value)
    bedrock, vertex = "anthropic.claude-sonnet-4-6-v1:0", "claude-sonnet-4-6@20250929"
    routes = {
        "clouds": {
            "targets": [
                {"provider": "bedrock", "model": bedrock, "region": "us-east-1"},
                {"provider": "vertex", "model": vertex, "region": "us-east5", "project_id": "p"},
            ]
        },
        **two_targets(),
    }
    # Debug level: the SDK's and HTTP library's own log lines are routed into the daemon's log too.
    # The simulator insists on the credential, so a served answer proves it was really sent.
    strict = Simulator(seed=1, api_key=SIM_API_KEY)
    d = await daemon_factory(strict, routes=routes, log={"level": "debug"})
    client = await connect(d)
    assert (await client.complete("via bedrock", route="clouds", cache="bypass"))["served_by"]["provider"] == "bedrock"
    strict.set_fault(bedrock, Fault(status=401))  # an auth failure is logged with its context
    reply = await client.complete("via vertex", route="clouds", cache="bypass")
    assert reply["served_by"]["provider"] == "vertex"
    strict.set_fault(vertex, Fault(status=403))
    assert (await client.complete("nobody", route="clouds", cache="bypass"))["ok"] is False
    assert capture_log.events("request") and capture_log.events("breaker")
    text = capture_log.text
    for secret in (SIM_API_KEY, *planted.values()):
        assert secret not in text, secret
    assert all(SIM_API_KEY not in str(call.headers) for call in strict.calls)


async def test_rate_limits_never_open_the_breaker(daemon_factory, sim, autojump_clock):
    # A 429 asks for patience, not another model: throttling holds the target for its retry-after.
    d = await daemon_factory(routes=two_targets(max_attempts=2), breaker={"consecutive_failures": 2})
    sim.set_fault(PRIMARY, Fault(status=429, retry_after_s=0.2, count=6))
    client = await connect(d)
    for i in range(4):
        assert (await client.complete(f"q{i}", cache="bypass"))["ok"]
    assert metric(d, "sidecard_upstream_attempts_total", provider=ANTHROPIC, model=PRIMARY, outcome="429") >= 2
    assert metric(d, "sidecard_breaker_state", provider=ANTHROPIC, model=PRIMARY) == 0
    assert metric(d, "sidecard_breaker_transitions_total", provider=ANTHROPIC, model=PRIMARY, to="open") == 0
