"""Streams and the edges of accounting through the real daemon: output formats, charging broken and resumed
streams, the provider's rate-limit headers, kill switches on count_tokens, worst-case budget estimates, and the
judge kept apart from users' breakers and retry budget."""

import shutil
from pathlib import Path

import pytest
import trio
from prometheus_client import generate_latest

from sidecard.config import load
from sidecard.policies.breaker import State
from sidecard.pricing import PriceTable
from sidecard.protocol import Usage
from sidecard.sim import Fault
from tests.e2e.test_api import joined, stream
from tests.harness import admin, connect, metric, stream_frame

PRIMARY, FALLBACK = "claude-sonnet-4-6", "claude-haiku-4-5-20251001"
REPO_PROMPTS = Path(__file__).parents[2] / "prompts"
TRIAGE = {"op": "complete", "prompt": "ticket-triage", "vars": {"ticket": "card declined"}}
PRICES = PriceTable(load(None).prices)


@pytest.fixture
def prompt_dir(short_tmp):
    root = Path(short_tmp) / "prompts"
    shutil.copytree(REPO_PROMPTS, root)
    return root


def bad_format_checks(d) -> float:
    text = generate_latest(d.metrics.registry).decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("sidecard_quality_check_failures_total") and 'check="bad_format"' in line)


async def until(predicate, timeout=30.0):
    with trio.fail_after(timeout):
        while not predicate():
            await trio.sleep(0.05)


async def test_a_streamed_answer_in_the_wrong_format_is_bad_output_never_cached_and_counted(
    daemon_factory, sim, prompt_dir, autojump_clock
):
    d = await daemon_factory(prompts={"directory": str(prompt_dir)}, quality={"enabled": True, "sample_rate": 0.0})
    client = await connect(d)
    events, final = await stream_frame(client, TRIAGE)  # the simulator's plain words are not JSON
    assert final["ok"] is False and final["error"]["code"] == "bad_output" and final["partial"] is True
    assert final["text"] == joined(events) and sim.calls_for(PRIMARY) == 1  # no corrective retry after streaming
    await until(lambda: bad_format_checks(d) == 1)
    again = await client.call(TRIAGE)  # the same request, not streamed: never served the bad answer from the cache
    assert again["ok"] is False and again["error"]["code"] == "bad_output"
    assert sim.calls_for(PRIMARY) == 3


async def test_bad_output_after_the_corrective_retry_reaches_the_quality_checks(daemon_factory, sim, prompt_dir, autojump_clock):
    d = await daemon_factory(prompts={"directory": str(prompt_dir)}, quality={"enabled": True, "sample_rate": 0.0})
    reply = await (await connect(d)).call(TRIAGE)
    assert reply["error"]["code"] == "bad_output"
    await until(lambda: bad_format_checks(d) == 1)


async def test_count_tokens_is_refused_by_a_kill_switch(daemon, sim):
    await admin(daemon, {"op": "kill", "scope": "feature:chat", "reason": "incident 9"})
    client = await connect(daemon)
    frame = {"op": "count_tokens", "messages": [{"role": "user", "content": "How long?"}]}
    refused = await client.call({**frame, "feature": "chat"})
    assert refused["error"]["code"] == "ai_disabled" and "incident 9" in refused["error"]["message"]
    assert len(sim.count_tokens_calls) == 0
    assert (await client.call({**frame, "feature": "other"}))["ok"]  # only the killed scope


async def test_a_broken_stream_is_charged_to_budgets_and_logged(daemon_factory, sim, capture_log, autojump_clock):
    budgets = [{"scope": "global", "window": "day", "hard_usd": 100.0}]
    d = await daemon_factory(routes={"default": {"targets": [{"model": PRIMARY}]}}, budgets=budgets)
    sim.set_fault(PRIMARY, Fault(reset_after_events=8))
    events, final = await stream(await connect(d), "break me [[sim:long]]")
    assert final["partial"] is True and final["text"]
    line = capture_log.events("request")[-1]
    assert line["outcome"] == "upstream_error"
    assert line["input_tokens"] > 0 and line["output_tokens"] >= len(final["text"]) // 4
    assert line["cost_usd"] > 0
    spent = d.traffic.budget_status()[0]["spent_usd"]
    assert spent == pytest.approx(line["cost_usd"], abs=1e-6)


async def test_a_resumed_stream_prices_each_attempt_at_its_own_model(daemon_factory, sim, autojump_clock):
    targets = [{"model": PRIMARY, "timeout_s": 10}, {"model": FALLBACK, "timeout_s": 10}]
    d = await daemon_factory(routes={"default": {"resume": True, "targets": targets}})
    sim.set_fault(PRIMARY, Fault(reset_after_events=7))
    events, done = await stream(await connect(d), "a long answer please [[sim:long]]", max_tokens=60)
    assert done["ok"] and done["resumed"] and done["model"] == FALLBACK
    usage = Usage(**{k: v for k, v in done["usage"].items() if k.endswith("tokens")})
    # Sonnet for the broken attempt, Haiku for the rest: dearer than all Haiku, cheaper than all Sonnet.
    assert PRICES.cost(FALLBACK, usage) < done["cost_usd"] < PRICES.cost(PRIMARY, usage)
    # The metrics split the same way: each model's tokens and cost under its own name.
    per_model = {m: metric(d, "sidecard_cost_usd_total", feature="default", model=m) for m in (PRIMARY, FALLBACK)}
    assert per_model[PRIMARY] > 0 and per_model[FALLBACK] > 0
    assert sum(per_model.values()) == pytest.approx(done["cost_usd"])
    outputs = [metric(d, "sidecard_tokens_total", feature="default", model=m, kind="output") for m in (PRIMARY, FALLBACK)]
    assert all(outputs) and sum(outputs) == done["usage"]["output_tokens"]


async def test_streams_heed_the_providers_rate_limit_headers(daemon_factory, sim, autojump_clock):
    sim.set_limits(requests_per_minute=5)
    # A config that would rather wait for the window than answer `rate_limited` (by default no more than 8 s of it).
    d = await daemon_factory(routes={"default": {"targets": [{"model": PRIMARY, "max_attempts": 1}]}},
                             retry={"max_retry_after_ms": 60_000})
    client = await connect(d)
    finals = []

    async def one(i):
        finals.append((await stream(client, f"q{i}", deadline_ms=180_000, max_tokens=50, cache="bypass"))[1])

    async with trio.open_nursery() as n:
        for i in range(12):
            n.start_soon(one, i)
            await trio.sleep(1)
    assert all(f.get("event") == "done" for f in finals), [f for f in finals if f.get("event") != "done"]
    assert sim.stats_total()["throttled"] == 0  # sidecard waited for the window instead of drawing a 429
    assert d.metrics.throttled("anthropic", PRIMARY).value >= 1


async def test_budgets_are_checked_against_the_dearest_target_of_the_route(daemon_factory, sim):
    # Haiku leads, but an Opus 4.1 fallback may answer: 100 output tokens at $75/M is $0.0075.
    routes = {"default": {"targets": [{"model": FALLBACK}, {"model": "claude-opus-4-1"}]}}
    d = await daemon_factory(routes=routes, budgets=[{"scope": "global", "window": "day", "hard_usd": 0.005}])
    reply = await (await connect(d)).complete("hi", max_tokens=100, cache="bypass")
    assert reply["error"]["code"] == "budget_exceeded" and sim.calls_for(FALLBACK) == 0


async def test_budgets_count_a_hedge_as_a_second_call(daemon_factory, sim):
    # Sonnet alone costs at most $0.0015 for 100 output tokens; hedged to Haiku, $0.002.
    routes = {"default": {"targets": [{"model": PRIMARY, "hedge_after_ms": 500}, {"model": FALLBACK}]}}
    d = await daemon_factory(routes=routes, budgets=[{"scope": "global", "window": "day", "hard_usd": 0.0018}])
    reply = await (await connect(d)).complete("hi", max_tokens=100, cache="bypass")
    assert reply["error"]["code"] == "budget_exceeded"


async def test_judge_failures_never_open_the_users_breaker_nor_retry(daemon_factory, sim, autojump_clock):
    quality = {"enabled": True, "sample_rate": 1.0}
    targets = [{"model": PRIMARY}, {"model": FALLBACK}]
    d = await daemon_factory(quality=quality, routes={"default": {"targets": targets}})
    sim.set_fault(FALLBACK, Fault(status=500))  # the judge's model (the users' fallback) fails
    client = await connect(d)
    for i in range(4):
        assert (await client.complete(f"q{i}", cache="bypass"))["ok"]
        await until(lambda i=i: d.metrics.quality_judged("error").value == i + 1)
    assert sim.calls_for(FALLBACK) == 4  # one attempt per judge call: no retries, no retry budget spent
    assert d.engine.walker.breaker(d.config.routes["default"].targets[1])[0].state is State.CLOSED
    assert d.metrics.retries("anthropic", FALLBACK).value == 0
