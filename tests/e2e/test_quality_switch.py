"""A prompt's fallback route switch on a quality alert: held while its alerts fire, ended by its hold period (then
re-measured on the original model, and switched again if still bad) or by an operator."""

from pathlib import Path

import trio

from sidecard import ctl
from sidecard.sim import Fault
from tests.e2e.test_admin import run_ctl
from tests.e2e.test_quality import ECHO, MONITOR, PRIMARY, until
from tests.harness import admin, connect, metric

FALLBACK = "claude-opus-4-6"
HOLD_S = 600.0


async def sidecardctl(d, *args: str) -> tuple[dict, str]:
    """sidecardctl's parser, frame and rendering, in this process: a subprocess would let the mock clock run on."""
    reply = await admin(d, ctl._frame(ctl._parser().parse_args(list(args))))
    return reply, ctl.render(reply) if reply.get("ok") else ""


async def served_by(client, n: int, tag: str) -> list[str]:
    models = []
    for i in range(n):
        reply = await client.call({"op": "complete", "prompt": "echo", "vars": {"q": f"{tag} {i}"}, "cache": "bypass"})
        assert reply["ok"], reply
        models.append(reply["model"])
        await trio.sleep(0.2)  # let the judge's verdict in before the next answer
    return models


async def switch_on(d, client, tag: str) -> list[str]:
    models = []
    with trio.fail_after(60):
        while not d.control.remedies.switches.active():
            models += await served_by(client, 1, f"{tag} {len(models)}")
    return models


async def test_a_fallback_switch_holds_expires_re_measures_and_is_ended_by_an_operator(
    daemon_factory, sim, short_tmp, capture_log, autojump_clock
):
    prompts = Path(short_tmp) / "prompts"
    (prompts / "echo").mkdir(parents=True)
    (prompts / "echo" / "v1.toml").write_text(ECHO.format(n=1, prefix=""))
    (prompts / "echo" / "release.toml").write_text("stable = 1\n")
    d = await daemon_factory(
        quality={"enabled": True, "sample_rate": 1.0, "monitor": MONITOR,
                 "prompts": {"echo": {"fallback_route_on_alert": "safe", "fallback_hold_s": HOLD_S}}},
        routes={"default": {"targets": [{"model": PRIMARY}]}, "safe": {"targets": [{"model": FALLBACK}]}},
        prompts={"directory": str(prompts)},
    )
    client = await connect(d)
    sim.set_fault(PRIMARY, Fault(quality="offtopic"))

    # An alert on the primary model switches the prompt to its fallback route.
    assert set(await switch_on(d, client, "bad")) == {PRIMARY}
    assert set(await served_by(client, 3, "switched")) == {FALLBACK}
    audit = [e for e in capture_log.events("admin") if e["op"] == "quality.route_switch"]
    assert len(audit) == 1 and audit[0]["peer"] == "quality-monitor" and audit[0]["args"] == {"prompt": "echo", "route": "safe"}
    reply, text = await sidecardctl(d, "status")
    [switch] = reply["result"]["quality"]["switches"]
    assert switch["prompt"] == "echo" and switch["route"] == "safe" and switch["causes"] == [f"echo v1 {PRIMARY} score"]
    assert "quality: 1 alert firing; route switches: echo -> route safe" in text
    assert metric(d, "sidecard_quality_route_switched", prompt="echo") == 1
    _, text = await sidecardctl(d, "quality")
    assert "ROUTE SWITCHES" in text and "automatic: route_switched echo -> route safe" in text

    # The primary gets no samples now, so its alert cannot resolve: the hold ends the switch, traffic returns to
    # the primary and is re-measured there; still bad, the alert fires again and switches again.
    await trio.sleep(HOLD_S)
    assert not d.control.remedies.switches.active()
    ended = [e for e in capture_log.events("admin") if e["op"] == "quality.route_switch_end"]
    assert len(ended) == 1 and ended[0]["why"] == "expired"
    assert metric(d, "sidecard_quality_route_switched", prompt="echo") == 0
    models = await switch_on(d, client, "re-measured")
    assert set(models) == {PRIMARY} and len(models) >= MONITOR["min_samples"]
    again = [e for e in d.quality.monitor.recent() if e.state == "firing"]
    assert len(again) == 2 and "re-measured" in again[0].reason
    assert len([e for e in capture_log.events("admin") if e["op"] == "quality.route_switch"]) == 2

    # An operator ends it: back on the primary at once, and the primary (recovered) resolves the alert.
    sim.clear_faults()
    reply, text = await sidecardctl(d, "quality", "unswitch", "echo")
    assert reply["ok"] and reply["before"]["route"] == "safe" and "quality.unswitch: done" in text
    operator = [e for e in capture_log.events("admin") if e["op"] == "quality.unswitch"]
    assert operator and operator[-1]["result"] == "ok" and operator[-1]["level"] == "info"
    assert set(await served_by(client, 10, "recovered")) == {PRIMARY}
    await until(lambda: not d.quality.monitor.firing())
    assert not d.control.remedies.switches.active() and "route switches: none" in (await sidecardctl(d, "status"))[1]
    assert [a["why"] for a in d.control.remedies.actions if a["action"] == "route_switch_ended"] == ["operator", "expired"]

    refused = await run_ctl(d, "quality", "unswitch", "echo")
    assert refused.returncode == ctl.EXIT_REFUSED and "not switched" in refused.stderr


async def test_an_alert_handled_by_a_canary_rollback_does_not_switch_the_route(daemon_factory, sim, short_tmp, autojump_clock):
    prompts = Path(short_tmp) / "prompts"
    (prompts / "echo").mkdir(parents=True)
    (prompts / "echo" / "v1.toml").write_text(ECHO.format(n=1, prefix=""))
    (prompts / "echo" / "v2.toml").write_text(ECHO.format(n=2, prefix="[[sim:say:I'm sorry, but I can't help with that.]]"))
    (prompts / "echo" / "release.toml").write_text("stable = 1\ncanary = 2\ncanary_percent = 50\n")
    d = await daemon_factory(
        quality={"enabled": True, "sample_rate": 1.0, "canary_sample_rate": 1.0, "monitor": MONITOR,
                 "prompts": {"echo": {"fallback_route_on_alert": "safe"}}},
        routes={"default": {"targets": [{"model": PRIMARY}]}, "safe": {"targets": [{"model": FALLBACK}]}},
        prompts={"directory": str(prompts)},
    )
    client = await connect(d)
    with trio.fail_after(60):
        u = 0
        while not d.control.remedies.actions:
            await client.call({"op": "complete", "prompt": "echo", "vars": {"q": f"q{u}"}, "user": f"user-{u}"})
            u += 1
            await trio.sleep(0.2)
    assert [a["action"] for a in d.control.remedies.actions] == ["canary_rolled_back"]
    assert not d.control.remedies.switches.active() and d.control.remedies.route_for("echo") is None
