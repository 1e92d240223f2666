"""Usage and unusual spend through the real daemon: records from real requests, reports through the admin socket
and sidecardctl, an alert on an injected runaway feature (virtual time)."""

from __future__ import annotations

import json

import pytest
import trio

from sidecard import ctl as sidecardctl
from sidecard.httpserver import serve_tcp_http
from sidecard.sim import Fault
from tests.harness import admin, connect

PRIMARY = "claude-sonnet-4-6"


async def test_usage_report_numbers_match_the_requests_made(daemon_factory, sim, capture_log, short_tmp, autojump_clock):
    d = await daemon_factory(usage={"enabled": True, "path": f"{short_tmp}/usage.sqlite3"},
                             routes={"default": {"targets": [{"model": PRIMARY, "max_attempts": 1}]}})
    client = await connect(d)
    replies = {
        "search": [await client.complete(f"s{i}", feature="search", user="alice@example.com", cache="bypass") for i in range(3)],
        "chat": [await client.complete("same", feature="chat", user="bob@example.com", temperature=0.0) for _ in range(2)],  # miss, hit
    }
    sim.set_fault(PRIMARY, Fault(status=529))
    failed = await client.complete("boom", feature="chat", user="bob@example.com", cache="bypass")
    assert not failed["ok"] and replies["chat"][1]["cached"]
    await d.usage_writer.flush()

    reply = await admin(d, {"op": "usage", "by": "feature", "window": "day"})
    assert reply["ok"]
    rows = {row["key"]: row for row in reply["result"]["rows"]}
    search, chat = rows["search"], rows["chat"]
    paid = replies["search"]
    assert search["requests"] == 3 and search["errors"] == 0
    assert search["input_tokens"] == sum(r["usage"]["input_tokens"] for r in paid)
    assert search["output_tokens"] == sum(r["usage"]["output_tokens"] for r in paid)
    assert search["cost_usd"] == pytest.approx(sum(r["cost_usd"] for r in paid))
    fresh = replies["chat"][0]
    assert chat["requests"] == 3 and chat["errors"] == 1  # the fresh answer, the cached one, the failure
    assert chat["cost_usd"] == pytest.approx(fresh["cost_usd"]) and chat["saved_usd"] == pytest.approx(fresh["cost_usd"])

    by_user = await admin(d, {"op": "usage", "by": "user", "window": "hour"})
    pseudonyms = {e["user"] for e in capture_log.events("request")}
    assert {row["key"] for row in by_user["result"]["rows"]} == pseudonyms and len(pseudonyms) == 2
    assert "alice" not in json.dumps(by_user) and "alice" not in (d.usage_store.path.read_bytes().decode("latin-1"))

    table = sidecardctl.render_usage(reply["result"])  # (the commands themselves: tests/usage/test_docs.py)
    assert "total by feature" in table and "search" in table
    header, *lines = sidecardctl.render_usage(by_user["result"], as_csv=True).splitlines()
    assert header.startswith("period,period_start,key,requests") and len(lines) == 2
    as_json = json.loads(sidecardctl.render_usage(reply["result"], as_json=True))
    assert as_json["by"] == "feature" and {row["key"] for row in as_json["rows"]} == {"search", "chat"}


async def test_usage_off_is_a_clear_refusal(daemon):
    reply = await admin(daemon, {"op": "usage"})
    assert reply["error"]["code"] == "bad_request" and "[usage] enabled = true" in reply["error"]["message"]
    reply = await admin(daemon, {"op": "anomalies"})
    assert "[anomaly] enabled = true" in reply["error"]["message"]


async def steady_minutes(client, minutes: int, *, loop_per_minute: int = 3) -> None:
    """Each minute: three requests of the steady feature and `loop_per_minute` of the loop feature."""
    for _ in range(minutes):
        for _ in range(3):
            await client.complete("steady", feature="steady", cache="bypass")
            for _loop in range(loop_per_minute // 3):
                await client.complete("loop", feature="loop", cache="bypass")
            await trio.sleep(20)


async def test_a_runaway_feature_is_alerted_within_minutes_and_a_steady_one_is_not(daemon_factory, sim, capture_log, nursery,
                                                                                  autojump_clock):
    delivered: list[dict] = []  # the alert webhook ([quality] webhook_url), as budget alerts use it

    async def webhook(request, responder):
        delivered.append(json.loads(request.body))
        await responder.send(200, [("content-type", "text/plain")], b"ok")

    host, port = await nursery.start(serve_tcp_http, webhook, "127.0.0.1", 0)
    anomaly = {"enabled": True, "warmup_s": 1200, "min_usd_per_hour": 0.01, "min_requests": 10}
    d = await daemon_factory(anomaly=anomaly, quality={"webhook_url": f"http://{host}:{port}/hooks"})
    client = await connect(d)
    await steady_minutes(client, 25)  # normal traffic, past the warm-up
    assert not capture_log.events("spend_anomaly")
    started, wall_started = trio.current_time(), d._wall()
    while not capture_log.events("spend_anomaly") and trio.current_time() - started < 600:
        await steady_minutes(client, 1, loop_per_minute=30)  # the loop feature's spend jumps tenfold
    [alert] = capture_log.events("spend_anomaly")
    assert alert["kind"] == "feature" and alert["scope"] == "loop"
    assert alert["since"] - wall_started <= 300  # within five minutes
    assert alert["rate_usd_per_hour"] > 4 * alert["expected_usd_per_hour"]  # [anomaly] factor
    assert d.metrics.spend_anomaly_firing("feature", "loop").value == 1
    firing = (await admin(d, {"op": "anomalies"}))["result"]
    assert [(a["kind"], a["scope"]) for a in firing["firing"]] == [("feature", "loop")]
    assert "feature:loop" in sidecardctl.render_anomalies(firing)
    assert "steady" not in json.dumps(firing)

    await steady_minutes(client, 8)  # back to normal: the alert resolves
    assert capture_log.events("spend_anomaly_resolved")
    assert not (await admin(d, {"op": "anomalies"}))["result"]["firing"]
    await trio.sleep(1)
    assert [(e["alert"], e["scope"]) for e in delivered] == [("spend_anomaly", "loop"), ("spend_anomaly_resolved", "loop")]


async def test_baselines_survive_a_restart_and_an_unusable_file_is_set_aside(persistent, sim, capture_log, short_tmp, autojump_clock):
    anomaly = {"enabled": True, "warmup_s": 1200, "min_usd_per_hour": 0.01, "min_requests": 10}
    first = await persistent(anomaly=anomaly)
    await steady_minutes(await connect(first), 25)
    await persistent.stop(first)
    await trio.sleep(600)  # down for ten minutes

    second = await persistent(anomaly=anomaly)
    [restored] = capture_log.events("anomaly_state_restored")
    assert restored["scopes"] == 2 and second.spend_watch.detector.expected_per_minute("feature:loop", second._wall()) > 0
    client = await connect(second)
    started = second._wall()
    while not capture_log.events("spend_anomaly") and second._wall() - started < 600:
        await steady_minutes(client, 1, loop_per_minute=30)  # no warm-up again: the loop is caught at once
    [alert] = capture_log.events("spend_anomaly")
    assert alert["scope"] == "loop" and alert["since"] - started <= 300
    await persistent.stop(second)

    path = f"{short_tmp}/anomaly.json"
    with open(path, "w") as f:
        f.write('{"format": 99}')
    third = await persistent(anomaly=anomaly)
    [unusable] = capture_log.events("anomaly_state_unusable")
    assert unusable["moved_to"].startswith(f"{path}.corrupt-") and len(third.spend_watch.detector) == 0
