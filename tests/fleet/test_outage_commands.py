"""Operator commands taken while the fleet store is unreachable: journaled with the sidecar's state file, replayed
onto the fleet's state when the store is back (docs/fleet.md, "When the store is slow or down"). Real daemons on a
private real redis-server, stopped and started again (empty: it keeps nothing on disk, so the sidecars put the
fleet's state back, then replay onto it)."""

from __future__ import annotations

from typing import Any

from tests.fleet.test_daemons import back_up, eventually, fleet, frame  # noqa: F401  (a fixture)
from tests.harness import admin, capture_log, connect, daemon_factory, metric, persistent, sim  # noqa: F401  (fixtures)


async def _text(daemon: Any, feature: str) -> str | None:
    return (await (await connect(daemon)).call(frame("hi", feature=feature))).get("text")


async def _down(private_store: Any, daemons: list[Any]) -> None:
    private_store.stop()
    for d in daemons:  # a request finds the store gone
        await (await connect(d)).call(frame("probe", feature="probe"))
    await eventually(lambda: all(metric(d, "sidecard_fleet_up") == 0 for d in daemons))


async def _kill(daemon: Any, scope: str, text: str) -> dict[str, Any]:
    reply = await admin(daemon, {"op": "kill", "scope": scope, "mode": "static", "text": text})
    assert reply["ok"], reply
    return reply["result"]


async def test_kill_switches_taken_on_two_sidecars_during_an_outage_both_reach_the_fleet(
    fleet, private_store, mock_clock, capture_log  # noqa: F811
):
    d0, d1 = await fleet(2, url=private_store.url)
    await _kill(d0, "feature:chat", "before")  # the fleet's state before the outage
    await eventually(lambda: _answers_all([d0, d1], "chat", "before"))
    await _down(private_store, [d0, d1])
    assert (await _kill(d0, "feature:a", "a is off"))["kept"].startswith("local (the fleet store did not answer")
    assert (await _kill(d1, "feature:b", "b is off"))["kept"].startswith("local (the fleet store did not answer")
    assert (await admin(d0, {"op": "status"}))["result"]["fleet"]["state_local_ops_pending"] == 1

    private_store.start()
    await back_up(mock_clock, [d0, d1])
    # Each sidecar's command is replayed onto the fleet's state as it found it: neither is lost.
    for feature, text in (("a", "a is off"), ("b", "b is off"), ("chat", "before")):
        await eventually(lambda f=feature, t=text: _answers_all([d0, d1], f, t))
    # (a sidecar may hear of the other's write before the writer's task runs again and logs it)
    replayed = await eventually(lambda: len(events := capture_log.events("fleet_state_local_ops_replayed")) == 2 and events)
    assert sorted(op["kills_set"][0] for e in replayed for op in e["ops"]) == ["feature:a", "feature:b"]
    assert not capture_log.events("fleet_state_local_change_dropped")
    assert (await admin(d1, {"op": "status"}))["result"]["fleet"]["state_local_ops_pending"] == 0


async def test_an_unkill_during_an_outage_does_not_lift_a_kill_another_sidecar_set_meanwhile(
    fleet, private_store, mock_clock, capture_log  # noqa: F811
):
    d0, d1, d2 = await fleet(3, url=private_store.url)
    await _kill(d0, "feature:x", "first")
    await _kill(d0, "feature:y", "y")
    await eventually(lambda: _answers_all([d0, d1, d2], "y", "y"))
    await _down(private_store, [d0, d1, d2])
    mock_clock.jump(5)
    assert (await admin(d0, {"op": "unkill", "scope": "feature:x"}))["ok"]  # lifts "first", which d0 saw
    assert (await admin(d0, {"op": "unkill", "scope": "feature:y"}))["ok"]
    mock_clock.jump(5)
    await _kill(d1, "feature:x", "second")  # set elsewhere, which d0's operator never saw

    private_store.start()
    await back_up(mock_clock, [d0, d1, d2])
    # The kill wins whatever the order the sidecars replay in (`test_replay_order_does_not_matter`); the unkill
    # nobody contradicted is applied.
    await eventually(lambda: _answers_all([d0, d1, d2], "x", "second"))
    await eventually(lambda: _none_answers([d0, d1, d2], "y", "y"))


def test_replay_order_does_not_matter_and_a_kill_wins_over_an_unkill_that_never_saw_it() -> None:
    from sidecard.control.backend import State, StoredKill
    from sidecard.control.fleet import change_between, replayed

    first, second = StoredKill(scope="feature:x", mode="error", set_at=100.0), StoredKill(scope="feature:x", mode="error", set_at=110.0)
    fleet_before = State(kills=[first])
    unkill = change_between(fleet_before, State(), op="unkill", taken_at=105.0)
    kill = change_between(fleet_before, State(kills=[second]), op="kill", taken_at=110.0)
    assert unkill is not None and kill is not None
    one, kept_out = replayed(replayed(fleet_before, [unkill], wall_now=120.0)[0], [kill], wall_now=120.0)
    other, kept_out_too = replayed(replayed(fleet_before, [kill], wall_now=120.0)[0], [unkill], wall_now=120.0)
    assert one.kills == other.kills == [second]
    assert kept_out == [] and kept_out_too == ["unkill feature:x: another sidecar set a kill switch on it meanwhile; it stays "
                                               "(sidecardctl unkill feature:x again to lift it)"]
    # Replayed twice is replayed once (a write whose reply was lost is replayed again onto its own result).
    assert replayed(one, [unkill, kill], wall_now=120.0)[0].kills == [second]
    # A kill that lapsed meanwhile is not put back.
    lapsing = change_between(State(), State(kills=[StoredKill(scope="global", mode="error", set_at=1.0, expires_at=50.0)]),
                             op="kill", taken_at=1.0)
    assert lapsing is not None and replayed(State(), [lapsing], wall_now=60.0)[0].kills == []


async def test_a_command_taken_during_an_outage_survives_a_restart_of_its_sidecar(
    fleet, persistent, private_store, mock_clock, capture_log, namespace, nursery  # noqa: F811
):
    section = {"url": private_store.url, "namespace": namespace, "op_timeout_ms": 2000.0, "instance": "p"}
    p = await persistent(routes={"default": {"targets": [{"model": "claude-sonnet-4-6", "max_attempts": 1}]}}, fleet=section)
    (d1,) = await fleet(1, url=private_store.url)
    await _kill(d1, "feature:chat", "before")
    await eventually(lambda: _answers_all([p, d1], "chat", "before"))
    await _down(private_store, [p, d1])
    await _kill(p, "feature:a", "a is off")
    await _kill(d1, "feature:b", "b is off")  # the fleet's state changes meanwhile too

    await persistent.stop(p)
    restarted: list[Any] = []

    async def restart() -> None:
        restarted.append(await persistent(routes={"default": {"targets": [{"model": "claude-sonnet-4-6", "max_attempts": 1}]}},
                                          fleet=section))

    nursery.start_soon(restart)

    def started() -> bool:
        mock_clock.jump(0.5)  # the start waits for the store up to connect_timeout_ms
        return bool(restarted)

    await eventually(started)
    p = restarted[0]
    assert await _text(p, "a") == "a is off"  # honoured while the store is still down
    assert [op["kills_set"] for e in capture_log.events("fleet_state_local_ops_pending") for op in e["ops"]] == [["feature:a"]]
    private_store.start()
    await back_up(mock_clock, [p, d1])
    for feature, text in (("a", "a is off"), ("b", "b is off"), ("chat", "before")):
        await eventually(lambda f=feature, t=text: _answers_all([p, d1], f, t))


async def _none_answers(daemons: list[Any], feature: str, text: str) -> bool:
    return all([await _text(d, feature) != text for d in daemons])


async def _answers_all(daemons: list[Any], feature: str, text: str | None) -> bool:
    return all([await _text(d, feature) == text for d in daemons])
