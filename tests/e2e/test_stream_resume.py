"""A stream resumed on the next target after a mid-stream cut, through the real daemon on both faces: the
continuation asks only for the `max_tokens` the client has left, so the answer stays within its limit, and the
usage, cost and log line are what both calls were paid (a fresh-clone trial: 383 output tokens for max_tokens=300)."""

import pytest

from sidecard.sim import Fault
from tests.e2e.test_api import joined, stream
from tests.e2e.test_httpface import async_client
from tests.harness import connect, metric

PRIMARY, FALLBACK = "claude-sonnet-4-6", "claude-haiku-4-5-20251001"
ROUTE = {"default": {"targets": [{"model": PRIMARY}, {"model": FALLBACK}]}}
LONG = "a long answer please [[sim:long]]"  # 1,500 words or more: any max_tokens here cuts it
CUT = 20  # events before the reset: message_start, the block's start, a ping and 17 deltas of 3 words
STREAMED = 17 * 3  # words the client has when the primary breaks (the simulator counts a word a token)


def billed_output(d, model: str) -> float:
    return metric(d, "sidecard_tokens_total", feature="default", model=model, kind="output")


def attempts_counted(d) -> dict[tuple[str, str], float]:
    """sidecard_upstream_attempts_total's non-zero series, by (model, outcome)."""
    return {(m, o): n for m in (PRIMARY, FALLBACK) for o in ("ok", "stream_broken:reset")
            if (n := metric(d, "sidecard_upstream_attempts_total", provider="anthropic", model=m, outcome=o))}


def check_paid(d, capture_log, output_tokens: int, cost_usd: float) -> None:
    """The reply's usage and cost are both calls', as the metrics and the log line count them."""
    assert output_tokens == billed_output(d, PRIMARY) + billed_output(d, FALLBACK)
    costs = [metric(d, "sidecard_cost_usd_total", feature="default", model=m) for m in (PRIMARY, FALLBACK)]
    assert cost_usd == pytest.approx(sum(costs)) and all(costs)
    line = capture_log.events("request")[-1]
    assert (line["output_tokens"], line["cost_usd"]) == (output_tokens, pytest.approx(cost_usd, abs=1e-6))
    # The broken attempt says what happened to it (it was `ok`: its first token had come).
    assert [(a["model"], a["outcome"]) for a in line["attempts"]] == [(PRIMARY, "stream_broken:reset"), (FALLBACK, "ok")]
    # And the attempts metric agrees with the log line (it counted the broken one `ok`, at its first token).
    assert attempts_counted(d) == {(PRIMARY, "stream_broken:reset"): 1, (FALLBACK, "ok"): 1}


@pytest.mark.parametrize("max_tokens", [300, 1000])
async def test_a_resumed_stream_on_the_socket_stays_within_max_tokens(daemon_factory, sim, capture_log, autojump_clock, max_tokens):
    d = await daemon_factory(routes=ROUTE)
    sim.set_fault(PRIMARY, Fault(reset_after_events=CUT))
    events, done = await stream(await connect(d), LONG, max_tokens=max_tokens, resume=True)
    assert done["event"] == "done" and done["resumed"] and done["stop_reason"] == "max_tokens"
    # The continuation asked for what was left after the broken attempt's output (as billed, at least the streamed
    # text at about 4 characters a token); before the fix it asked for all of max_tokens again.
    first = billed_output(d, PRIMARY)
    assert STREAMED <= first < max_tokens
    assert sim.calls_for(FALLBACK) == 1 and list(sim.calls)[-1].body["max_tokens"] == max_tokens - first
    assert done["usage"]["output_tokens"] == max_tokens  # was 376 for 300, 1076 for 1000
    words = joined(events).split()
    assert len(words) == STREAMED + max_tokens - first <= max_tokens
    assert done["text"] == joined(events)
    check_paid(d, capture_log, done["usage"]["output_tokens"], done["cost_usd"])


async def test_a_resumed_stream_through_the_sdk_stays_within_max_tokens(daemon_factory, sim, capture_log, autojump_clock):
    d = await daemon_factory(routes=ROUTE)
    sim.set_fault(PRIMARY, Fault(reset_after_events=CUT))
    async with async_client(d, **{"x-sidecard-resume": "true"}) as client:
        async with client.messages.stream(model=PRIMARY, max_tokens=300, messages=[{"role": "user", "content": LONG}]) as s:
            message = await s.get_final_message()
    assert message.stop_reason == "max_tokens" and sim.calls_for(FALLBACK) == 1
    assert message.usage.output_tokens == 300  # was 376
    first = billed_output(d, PRIMARY)
    words = message.content[0].text.split()
    assert len(message.content) == 1 and len(words) == STREAMED + 300 - first <= 300
    assert list(sim.calls)[-1].body["max_tokens"] == 300 - first
    line = capture_log.events("request")[-1]
    check_paid(d, capture_log, message.usage.output_tokens, line["cost_usd"])


async def test_a_stream_that_breaks_with_nothing_left_to_ask_for_ends_at_max_tokens(daemon_factory, sim, capture_log, autojump_clock):
    """The broken attempt already used the request's max_tokens (60: the 51 words streamed bill 76 tokens at
    4 characters each): no continuation is asked for, and the answer ends as the API would end it, `max_tokens`.
    Before the fix the fallback was asked for 60 more tokens. Such an answer is never cached."""
    d = await daemon_factory(routes=ROUTE)
    sim.set_fault(PRIMARY, Fault(reset_after_events=CUT))
    client = await connect(d)
    events, done = await stream(client, LONG, max_tokens=60, resume=True, temperature=0)
    assert done["event"] == "done" and done["stop_reason"] == "max_tokens" and done["stop_sequence"] is None
    assert not done["resumed"] and done["model"] == PRIMARY and sim.calls_for(FALLBACK) == 0
    assert len(joined(events).split()) == STREAMED and done["text"] == joined(events)
    assert done["usage"]["output_tokens"] == billed_output(d, PRIMARY) >= 60  # what the broken attempt was billed
    line = capture_log.events("request")[-1]
    assert line["outcome"] == "ok" and [a["outcome"] for a in line["attempts"]] == ["stream_broken:reset"]
    assert line["output_tokens"] == done["usage"]["output_tokens"]

    sim.set_fault(PRIMARY, Fault())
    _, again = await stream(client, LONG, max_tokens=60, resume=True, temperature=0)
    assert not again["cached"] and again["stop_reason"] == "max_tokens" and sim.calls_for(PRIMARY) == 2


async def test_a_broken_stream_without_resume_costs_what_it_did_and_names_its_attempt(daemon_factory, sim, capture_log, autojump_clock):
    d = await daemon_factory(routes=ROUTE)
    sim.set_fault(PRIMARY, Fault(reset_after_events=CUT))
    events, final = await stream(await connect(d), LONG, max_tokens=300)
    assert final["ok"] is False and final["partial"] and final["error"]["code"] == "upstream_error"
    assert sim.calls_for(FALLBACK) == 0 and final["text"] == joined(events)
    assert len(joined(events).split()) == STREAMED
    line = capture_log.events("request")[-1]
    assert [a["outcome"] for a in line["attempts"]] == ["stream_broken:reset"]
    assert attempts_counted(d) == {(PRIMARY, "stream_broken:reset"): 1}  # as the log line says (was `ok`)
    # Paid as before: the input the stream reported, and the streamed text at about 4 characters a token.
    streamed = len(joined(events))
    assert line["output_tokens"] == billed_output(d, PRIMARY) == -(-streamed // 4)
    assert metric(d, "sidecard_stream_failures_total", reason="reset") == 1
