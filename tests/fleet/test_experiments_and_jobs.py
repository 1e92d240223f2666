"""Experiments and jobs in fleet mode, on real daemons and the session's redis-server: each sidecar's experiments
and tallies stay in its own state file, out of the fleet's shared operator state; a job's budget reservation is
the fleet's (docs/fleet.md)."""

from __future__ import annotations

from typing import Any

from sidecard.control.backend import LocalFileBackend, State
from tests.fleet.test_daemons import eventually, fleet, frame  # noqa: F401  (a fixture)
from tests.harness import admin, capture_log, connect, daemon_factory, sim  # noqa: F401  (fixtures)

HAIKU = "claude-haiku-4-5-20251001"
SPLIT = {"name": "models", "feature": "chat", "primary": "error_rate",
         "arms": [{"name": "sonnet", "model": "claude-sonnet-4-6"}, {"name": "haiku", "model": HAIKU}]}


def local_state(d: Any) -> State:
    return LocalFileBackend(d.config.state.path).load()


def answers(state: State) -> int:
    (stored,) = state.experiments
    return sum(stored.tally.get(arm, "error_rate").n for arm in ("sonnet", "haiku"))


async def test_each_sidecar_keeps_its_own_tallies_out_of_the_fleets_state(fleet, mock_clock):  # noqa: F811
    d0, d1 = await fleet(2, experiments=[SPLIT])
    for d, n in ((d0, 3), (d1, 1)):
        client = await connect(d)
        for i in range(n):
            assert (await client.call(frame(f"q{i}", feature="chat", user=f"u{i}")))["ok"]
    store = d0.control.fleet[1].backend.store
    version, _ = await store.load()
    for d in (d0, d1):
        await d.control._save_quietly()  # what the periodic tally save runs
    # A save of tallies alone writes the sidecar's own file, and nothing to the fleet (no version, no message).
    assert [answers(local_state(d)) for d in (d0, d1)] == [3, 1]
    after, document = await store.load()
    assert after == version and (document is None or not document.experiments)

    # A shared change is shared (and written to every local file) without the tallies of whoever made it.
    assert (await admin(d1, {"op": "kill", "scope": "feature:reports"}))["result"] == {"kept": "fleet"}
    _, document = await store.load()
    assert [k.scope for k in document.kills] == ["feature:reports"] and not document.experiments
    await eventually(lambda: [k.scope for k in local_state(d0).kills] == ["feature:reports"])
    assert answers(local_state(d0)) == 3  # d0 keeps its own tally


JOBS = {"enabled": True, "batch_max_age_s": 10, "expected_turnaround_s": 600, "min_slack_s": 300, "synchronous": "normal"}


async def test_a_jobs_budget_reservation_holds_across_the_fleet(fleet, mock_clock):  # noqa: F811
    d0, d1 = await fleet(2, jobs=JOBS, budgets=[{"scope": "global", "window": "day", "hard_usd": 0.01}])
    jobs, refused = await connect(d0), None
    for i in range(40):  # jobs held on d0 until the fleet's budget is reserved
        reply = await jobs.call({**frame(f"ticket {i}"), "op": "submit", "by": "2h", "max_tokens": 100})
        if not reply["ok"]:
            refused = reply["error"]
            break
    assert refused is not None and refused["code"] == "budget_exceeded" and "fleet" in refused["message"], refused
    # No answer has landed yet: what d0's jobs reserved is the fleet's, so d1 refuses too.
    reply = await (await connect(d1)).call(frame("an interactive request", max_tokens=100))
    assert reply["error"]["code"] == "budget_exceeded" and "fleet" in reply["error"]["message"]


async def test_an_apps_own_rate_limit_is_the_fleets(fleet, mock_clock):  # noqa: F811
    import os

    apps = {"chat": {"uids": [os.getuid()], "rate_limit": {"requests_per_minute": 60, "burst_s": 1.0}}}
    d0, d1 = await fleet(2, safety={"access": {"enabled": True, "apps": apps}})
    assert (await (await connect(d0)).call(frame("one")))["ok"]
    limited = await (await connect(d1)).call(frame("two"))  # the same app, on another sidecar: its one request is spent
    assert limited["error"]["code"] == "rate_limited" and "app:chat" in limited["error"]["message"], limited


async def test_a_job_run_on_the_engine_takes_the_fleets_rate_limits_once(fleet, mock_clock):  # noqa: F811
    d0, d1 = await fleet(2, jobs=JOBS, rate_limits=[{"scope": "feature", "requests_per_minute": 1, "burst_s": 120}])
    client = await connect(d0)  # 2 requests at once, fleet-wide
    reply = await client.call({**frame("ticket 1"), "op": "submit", "by": 120, "max_tokens": 100})
    job = (await client.call({"op": "wait", "job": reply["jobs"][0]["id"], "timeout_ms": 60_000}))["job"]
    assert job["state"] == "succeeded" and job["outcome"]["served"] == "engine", job
    assert (await (await connect(d1)).call(frame("the fleet's second request")))["ok"]
    refused = await client.call(frame("a third"))
    assert refused["error"]["code"] == "rate_limited" and "fleet" in refused["error"]["message"], refused
