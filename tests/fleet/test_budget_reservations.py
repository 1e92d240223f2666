"""A fleet budget held by reservations: the refusal says what is spent and what requests in flight reserved, and a
sidecar restarted under the same instance name gives back what its previous run reserved for requests that ended
with it (an async job's reservation stays: the job outlives the restart). Real daemons on the real store."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from sidecard.fleet.scripts import Admit
from tests.fleet.test_daemons import ROUTES, back_up, eventually, fleet, frame  # noqa: F401  (a fixture)
from tests.harness import admin, capture_log, connect, daemon_factory, metric, persistent, sim  # noqa: F401  (fixtures)

BUDGETS = [{"scope": "global", "window": "day", "hard_usd": 0.01}]


async def _reserve(daemon: Any, reservation_id: str, usd: float) -> None:
    """What a request (or a job) of DAEMON's would reserve, the way its gate does."""
    gate = daemon.fleet_gate
    checks = gate._budgets("chat", "default", None, gate.wall(), None)
    await gate.path.admit(Admit(gate.wall(), budgets=checks, estimate_usd=usd, reservation_id=reservation_id,
                                reservation_ttl_s=3600))


async def test_a_refusal_names_spend_and_reservations_and_a_restart_gives_back_its_previous_runs(
    fleet, persistent, store_server, namespace, mock_clock, capture_log  # noqa: F811
):
    section = {"url": store_server.url, "namespace": namespace, "op_timeout_ms": 2000.0, "instance": "web-1"}
    web1 = await persistent(routes=ROUTES, budgets=BUDGETS, fleet=section)
    (other,) = await fleet(1, budgets=BUDGETS)
    # A request in flight on web-1 that holds most of the budget, and a queued async job's worst case.
    await _reserve(web1, f"web-1/{web1.fleet_gate.run_token}/in-flight", 0.0089)
    await _reserve(web1, "web-1/job/queued", 0.001)
    refused = await (await connect(other)).call(frame("hi", feature="chat"))
    message = refused["error"]["message"]
    assert refused["error"]["code"] == "budget_exceeded"
    assert "$0 spent, $0.0099 reserved by requests in flight on the fleet" in message, message

    await persistent.stop(web1)  # it dies with its request in flight (nothing settles the reservation)
    web1 = await persistent(routes=ROUTES, budgets=BUDGETS, fleet=section)
    # The restarted web-1 gives its previous run's request reservation back at once; the job's stays held.
    await eventually(lambda: capture_log.events("fleet_reservations_released"))
    assert [e["released"] for e in capture_log.events("fleet_reservations_released")] == [1]
    assert (await (await connect(other)).call(frame("hi", feature="chat")))["ok"]
    budget = (await admin(other, {"op": "budget"}))["result"]["budgets"][0]
    assert budget["reserved_usd"] == 0.001


async def test_spend_while_the_store_is_down_is_added_to_the_fleets_budget_when_it_is_back(
    fleet, private_store, mock_clock, capture_log  # noqa: F811
):
    daemons = await fleet(2, url=private_store.url, budgets=[{"scope": "global", "window": "day", "hard_usd": 10.0}],
                          fleet={"expected_instances": 2})
    clients = [await connect(d) for d in daemons]
    private_store.stop()
    spent = 0.0
    for i in range(6):  # admitted on each sidecar's local share, and spent
        reply = await clients[i % 2].call(frame(f"q{i}"))
        assert reply["ok"], reply
        spent += reply["cost_usd"]
    assert all(metric(d, "sidecard_fleet_up") == 0 for d in daemons)
    private_store.start()  # (empty: it kept nothing, so the fleet's spend of the day is what the outage spent)

    await back_up(mock_clock, daemons)

    async def fleet_spend() -> float | None:
        budget = (await admin(daemons[0], {"op": "budget"}))["result"]["budgets"][0]
        return budget["spent_usd"] if abs(budget["spent_usd"] - spent) < 1e-6 else None

    await eventually(fleet_spend)
    settled = await eventually(lambda: len(events := capture_log.events("fleet_outage_spend_settled")) == 2 and events)
    assert len(settled) == 2 and abs(sum(e["usd"] for e in settled) - spent) < 1e-6


async def test_spend_the_store_did_not_count_survives_a_restart_during_the_outage(
    persistent, private_store, autojump_clock, capture_log  # noqa: F811
):
    """A sidecar restarted while the store is down keeps what it spent of its local share (it may not spend the
    share again), and carries that spend into the fleet's budgets once the store answers."""
    section = {"url": private_store.url, "namespace": "outage", "op_timeout_ms": 2000.0, "instance": "web-1",
               "expected_instances": 2}
    budgets = [{"scope": "global", "window": "day", "hard_usd": 10.0}]
    web1 = await persistent(routes=ROUTES, budgets=budgets, fleet=section)
    private_store.stop()
    spent = 0.0
    client = await connect(web1)
    for i in range(3):  # admitted on the local share, and spent
        reply = await client.call(frame(f"q{i}"))
        assert reply["ok"], reply
        spent += reply["cost_usd"]
    await persistent.stop(web1)

    web1 = await persistent(routes=ROUTES, budgets=budgets, fleet=section)
    (kept,) = capture_log.events("fleet_outage_spend_kept")
    assert abs(kept["usd"] - spent) < 1e-6
    share = web1.fleet_gate.fallback.ledger
    assert abs(sum(used for _, _, used in share.usage(web1.fleet_gate.wall())) - spent) < 1e-6
    private_store.start()  # (empty: the fleet's spend of the day is what the outage spent)

    async def fleet_spend() -> float | None:
        autojump_clock.jump(1.0)  # the reconnection's backoff
        reply = await admin(web1, {"op": "budget"})
        if not reply["ok"]:
            return None
        budget = reply["result"]["budgets"][0]
        return budget["spent_usd"] if abs(budget["spent_usd"] - spent) < 1e-6 else None

    await eventually(fleet_spend)
    (settled,) = await eventually(lambda: capture_log.events("fleet_outage_spend_settled"))
    assert abs(settled["usd"] - spent) < 1e-6
    await persistent.stop(web1)
    web1 = await persistent(routes=ROUTES, budgets=budgets, fleet=section)  # carried in: nothing is kept to carry again
    assert len(capture_log.events("fleet_outage_spend_kept")) == 1


@pytest.mark.parametrize("now, cost_usd", [
    pytest.param(1e20, 1.0, id="beyond-any-window"),
    pytest.param(253_400_000_000.0, 1.0, id="december-9999"),  # (its month ends in a year the calendar lacks)
    pytest.param(1_796_000_000.0, -1.0, id="negative-amount"),
])
async def test_an_outage_record_with_an_implausible_time_is_set_aside_not_a_crash(
    persistent, private_store, short_tmp, capture_log, now, cost_usd  # noqa: F811
):
    """A record whose JSON parses but whose spend is dated where no window can hold it (a bit flipped, an edit) is
    moved aside and reported, as a corrupt spend file is: the sidecar starts with nothing kept to carry in, and
    none of it applied (its local share's spend included)."""
    path = Path(short_tmp) / "outage.json"
    owed = {"now": now, "reservation_id": "", "cost_usd": cost_usd,
            "budgets": [{"scope_key": "global", "window": "month", "hard_usd": 10.0, "soft_usd": None}]}
    local_spend = {"format": 1, "spend": [{"window": "month", "key": "global", "start": 1_795_000_000.0, "usd": 2.0}],
                   "raises": []}
    path.write_bytes(json.dumps({"local_spend": local_spend, "owed": [owed], "carrying": []}).encode())
    section = {"url": private_store.url, "namespace": "outage", "instance": "web-1", "expected_instances": 2}
    web1 = await persistent(routes=ROUTES, budgets=[{"scope": "global", "window": "month", "hard_usd": 10.0}],
                            fleet=section, spend={"fleet_outage_path": str(path)})
    (corrupt,) = capture_log.events("spend_store_corrupt")
    assert "implausible time" in corrupt["reason"] or "out of range" in corrupt["reason"]
    assert not path.exists() and not capture_log.events("fleet_outage_spend_kept")
    assert not web1.fleet_gate.fallback.ledger.usage(web1.fleet_gate.wall())[0][2]  # (the share's spend: none)
    await persistent.stop(web1)
