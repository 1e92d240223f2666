"""The walk's patience with a provider's retry-after: a fallback that cannot take the request is no reason to skip a short wait."""

from __future__ import annotations

import trio

from tests.engine.test_walk import SONNET, TWO, ScriptedLeg, Walk, failed


async def test_a_fallback_half_open_with_its_probe_out_is_no_reason_to_skip_a_short_wait(autojump_clock):
    """The fallback's breaker is half-open and its one probe is out (another request is probing it): `allow` will
    refuse this request there, so it cannot answer. A 2 s retry-after on the primary should be waited out (as
    with an open breaker), not failed over to a target that refuses it."""
    w = Walk(TWO)
    haiku = w.config.routes["default"].targets[1]
    breaker = w.walker.health(haiku).breaker
    breaker.force_open(trio.current_time())
    await trio.sleep(breaker.settings.cooldown_s + 1)
    assert breaker.allow(trio.current_time())[0]  # another request's probe, still out
    leg = ScriptedLeg(claude_sonnet_4_6=[failed(429, retry_after_s=2.0), "answer"])
    won = await w.walk(w.trace(), leg)
    assert won.value == "answer" and won.served.target.model == SONNET
