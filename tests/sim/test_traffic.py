"""The simulated upstream's traffic control: a concurrency cap and per-minute limits, with the API's headers."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import anthropic
import httpx2
import pytest
import trio
import trio.testing

from sidecard.sim import Fault, Limits, Simulator, serve_sim

MODEL = "claude-sonnet-4-6"
ASK: dict[str, Any] = {"model": MODEL, "max_tokens": 50, "messages": [{"role": "user", "content": "Hello there"}]}
PROMPT_TOKENS = 3  # "Hello there": 11 characters


async def start(nursery: trio.Nursery, sim: Simulator) -> anthropic.AsyncAnthropic:
    url = await nursery.start(serve_sim, sim)
    # a connection per request: a jump of the clock outlasts the server's keep-alive
    http_client = httpx2.AsyncClient(limits=httpx2.Limits(max_keepalive_connections=0))
    return anthropic.AsyncAnthropic(api_key="k", base_url=url, max_retries=0, http_client=http_client)


async def headers_of(client: anthropic.AsyncAnthropic, **overrides: Any) -> httpx2.Headers:
    raw = await client.messages.with_raw_response.create(**{**ASK, **overrides})
    return raw.headers


async def test_no_limits_by_default(nursery):
    sim = Simulator()
    client = await start(nursery, sim)
    try:
        for _ in range(3):
            headers = await headers_of(client)
        assert headers["anthropic-ratelimit-requests-limit"] == "4000"
        assert headers["anthropic-ratelimit-requests-remaining"] == "3997"
        assert "anthropic-ratelimit-input-tokens-limit" not in headers  # (only with a token limit: they cost)
        assert sim.stats_total()["throttled"] == 0 and sim.stats_total()["max_in_flight"] == 1
    finally:
        await client.close()


async def test_concurrency_cap(nursery):
    sim = Simulator(concurrency_limit=2)
    client = await start(nursery, sim)
    sim.set_fault("claude-slow", Fault(hang=True))
    try:
        async with trio.open_nursery() as holders:
            for _ in range(2):
                holders.start_soon(lambda: client.messages.create(**{**ASK, "model": "claude-slow"}))
            await sim.wait_for_calls(2)
            assert sim.in_flight == 2
            with pytest.raises(anthropic.RateLimitError) as caught:
                await client.messages.create(**ASK)
            assert caught.value.response.headers["retry-after"] == "1"
            assert caught.value.body["error"]["type"] == "rate_limit_error"
            sim.set_limits(concurrency_limit=3)
            assert await client.messages.create(**ASK)
            holders.cancel_scope.cancel()
        for _ in range(100):  # until the simulator sees the holders leave
            await trio.testing.wait_all_tasks_blocked()
            if sim.in_flight == 0:
                break
        total = sim.stats_total()
        assert (total["in_flight"], total["max_in_flight"], total["throttled"]) == (0, 3, 1)
        assert sim.stats[MODEL].by_status == {429: 1, 200: 1}
    finally:
        await client.close()


async def test_requests_per_minute(nursery, mock_clock):
    mock_clock.jump(5)  # 5 s into the first minute
    sim = Simulator(requests_per_minute=3)
    client = await start(nursery, sim)
    try:
        for remaining in (2, 1, 0):
            headers = await headers_of(client)
            assert headers["anthropic-ratelimit-requests-limit"] == "3"
            assert headers["anthropic-ratelimit-requests-remaining"] == str(remaining)
        reset = datetime.strptime(headers["anthropic-ratelimit-requests-reset"], "%Y-%m-%dT%H:%M:%SZ")
        assert 53 <= (reset.replace(tzinfo=UTC) - datetime.now(UTC)).total_seconds() <= 56
        mock_clock.jump(20.5)
        with pytest.raises(anthropic.RateLimitError) as caught:
            await client.messages.create(**ASK)
        assert caught.value.response.headers["retry-after"] == "35"  # 34.5 s to the next minute, rounded up
        assert caught.value.response.headers["anthropic-ratelimit-requests-remaining"] == "0"
        assert sim.stats_total()["throttled"] == 1
        mock_clock.jump(35)
        assert (await headers_of(client))["anthropic-ratelimit-requests-remaining"] == "2"
    finally:
        await client.close()


async def test_a_shorter_rate_window(nursery, mock_clock):
    mock_clock.jump(1)  # 1 s into the first window
    sim = Simulator(requests_per_minute=2)
    sim.set_limits(window_s=4)
    client = await start(nursery, sim)
    try:
        await headers_of(client)
        headers = await headers_of(client)
        reset = datetime.strptime(headers["anthropic-ratelimit-requests-reset"], "%Y-%m-%dT%H:%M:%SZ")
        assert 1 <= (reset.replace(tzinfo=UTC) - datetime.now(UTC)).total_seconds() <= 3  # the window ends at 4 s
        with pytest.raises(anthropic.RateLimitError) as caught:
            await client.messages.create(**ASK)
        assert caught.value.response.headers["retry-after"] == "3"
        mock_clock.jump(3)
        assert (await headers_of(client))["anthropic-ratelimit-requests-remaining"] == "1"
    finally:
        await client.close()


async def test_token_limits(nursery, mock_clock):
    sim = Simulator(input_tokens_per_minute=4 * PROMPT_TOKENS, output_tokens_per_minute=1000)
    client = await start(nursery, sim)
    try:
        message = await client.messages.with_raw_response.create(**ASK)
        output = (await message.parse()).usage.output_tokens
        headers = message.headers
        assert headers["anthropic-ratelimit-input-tokens-limit"] == str(4 * PROMPT_TOKENS)
        assert headers["anthropic-ratelimit-input-tokens-remaining"] == str(3 * PROMPT_TOKENS)
        assert headers["anthropic-ratelimit-output-tokens-remaining"] == str(1000 - output)
        assert headers["anthropic-ratelimit-tokens-remaining"] == str(2_000_000 - PROMPT_TOKENS - output)
        for _ in range(3):
            await client.messages.create(**ASK)
        with pytest.raises(anthropic.RateLimitError) as caught:
            await client.messages.create(**ASK)
        assert caught.value.response.headers["retry-after"] == "60"
        assert "input tokens per minute" in caught.value.message
        # output tokens: refused once none are left
        sim.set_limits(input_tokens_per_minute=None, output_tokens_per_minute=output)
        mock_clock.jump(60)
        await client.messages.create(**ASK)
        with pytest.raises(anthropic.RateLimitError):
            await client.messages.create(**ASK)
        # input and output together
        sim.set_limits(output_tokens_per_minute=None, tokens_per_minute=PROMPT_TOKENS + output + PROMPT_TOKENS - 1)
        mock_clock.jump(60)
        headers = await headers_of(client)
        assert headers["anthropic-ratelimit-tokens-remaining"] == str(PROMPT_TOKENS - 1)
        with pytest.raises(anthropic.RateLimitError):
            await client.messages.create(**ASK)
    finally:
        await client.close()


async def test_limits_through_the_control_endpoint(nursery):
    sim = Simulator(requests_per_minute=100)
    url = await nursery.start(serve_sim, sim)
    async with httpx2.AsyncClient(base_url=url) as http:
        assert (await http.get("/_sim/limits")).json()["limits"]["requests_per_minute"] == 100
        response = await http.post("/_sim/limits", json={"concurrency_limit": 4, "requests_per_minute": None})
        assert response.status_code == 200
        assert response.json()["limits"] == {
            "concurrency_limit": 4, "requests_per_minute": None, "tokens_per_minute": None,
            "input_tokens_per_minute": None, "output_tokens_per_minute": None, "window_s": 60.0,
        }  # fmt: skip
        assert sim.limits == Limits(concurrency_limit=4)
        for bad in [
            {"concurrency_limit": 0},
            {"requests_per_minute": "many"},
            {"burst": 3},
            [1],
            {"tokens_per_minute": True},
            {"window_s": 0},
        ]:
            response = await http.post("/_sim/limits", json=bad)
            assert response.status_code == 400 and response.json()["error"]
        assert sim.limits == Limits(concurrency_limit=4)
        stats = (await http.get("/_sim/stats")).json()
        assert stats["limits"]["concurrency_limit"] == 4 and stats["total"]["max_in_flight"] == 0
        await http.post("/_sim/reset")  # back to the limits the simulator was made with
        assert sim.limits == Limits(requests_per_minute=100)
    with pytest.raises(ValueError):
        Simulator(concurrency_limit=0)


async def test_each_model_is_counted_in_its_own_window_as_the_apis_limits_are_per_model(nursery, mock_clock):
    """Before, one window counted every model: a fallback model found its window spent by the primary's calls."""
    sim = Simulator(requests_per_minute=2)
    client = await start(nursery, sim)
    other = "claude-haiku-4-5"
    try:
        for _ in range(2):
            await client.messages.create(**ASK)
        with pytest.raises(anthropic.RateLimitError):
            await client.messages.create(**ASK)
        headers = await headers_of(client, model=other)  # its own window: untouched by the other model's calls
        assert (headers["anthropic-ratelimit-requests-limit"], headers["anthropic-ratelimit-requests-remaining"]) == ("2", "1")
        assert sim.stats[MODEL].throttled == 1
    finally:
        await client.close()


async def test_a_models_own_limits_and_window(nursery, mock_clock):
    sim = Simulator(requests_per_minute=100)
    url = await nursery.start(serve_sim, sim)
    other = "claude-haiku-4-5"
    async with httpx2.AsyncClient(base_url=url) as http:
        response = await http.post("/_sim/limits", json={"model": MODEL, "requests_per_minute": 1, "window_s": 5})
        assert response.status_code == 200 and response.json()["limits"]["requests_per_minute"] == 1
        assert response.json()["limits"]["window_s"] == 5
        limits = (await http.get("/_sim/limits")).json()
        assert limits["limits"]["requests_per_minute"] == 100 and limits["model_limits"][MODEL]["window_s"] == 5
        for bad in [{"model": MODEL, "concurrency_limit": 2}, {"model": 5, "requests_per_minute": 1},
                    {"model": MODEL, "window_s": 0}]:
            response = await http.post("/_sim/limits", json=bad)
            assert response.status_code == 400 and response.json()["error"]
        # Limits set for every model reach a model's own too, under its own changes.
        await http.post("/_sim/limits", json={"tokens_per_minute": 9000})
        assert sim.limits_for(MODEL) == Limits(requests_per_minute=1, tokens_per_minute=9000, window_s=5)
        assert sim.limits_for(other) == Limits(requests_per_minute=100, tokens_per_minute=9000)
    client = await start(nursery, sim)
    try:
        mock_clock.jump(1)
        await client.messages.create(**ASK)
        with pytest.raises(anthropic.RateLimitError) as caught:
            await client.messages.create(**ASK)
        assert caught.value.response.headers["retry-after"] == "4"  # its own 5 s window
        assert (await headers_of(client, model=other))["anthropic-ratelimit-requests-remaining"] == "99"
        mock_clock.jump(4)
        assert (await headers_of(client))["anthropic-ratelimit-requests-remaining"] == "0"
        sim.reset()
        assert sim.limits_for(MODEL) == Limits(requests_per_minute=100)
    finally:
        await client.close()
