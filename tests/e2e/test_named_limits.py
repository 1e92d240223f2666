"""Names a client chooses stay bounded in what the daemon keeps (hostile input audit).

A request's `feature`, and a model no route has, each become metric series, log fields, usage rows, quality,
feedback and rate-limit keys, and (a model) breakers and queues. A client choosing a new one on every request
once grew them without end: 60,000 features took the daemon from 43 to 325 MB and /metrics to 86 MB. Features
past `requests.max_named_features` are counted under `_other` (the request is served as ever); a model past
`requests.max_named_models` is refused, and a model the upstream does not know gives its slot back.
"""

from __future__ import annotations

import json
import os
import re

import msgspec

from sidecard.sim import Fault, Simulator
from sidecard.sim.batches import BatchTiming
from tests.e2e.test_hostile import http_exchange, post
from tests.e2e.test_jobs import JOBS
from tests.harness import admin, connect, http_get, start_from_file

METRICS = {"enabled": True, "address": "127.0.0.1:0"}


async def scrape(d) -> str:
    status, text = await http_get(*d.metrics_address, "/metrics")
    assert status == 200
    return text


def labels(text: str, name: str) -> set[str]:
    return set(re.findall(rf'\b{name}="([^"]*)"', text))


async def test_a_flood_of_feature_names_is_counted_under_other_on_both_faces(daemon_factory, capture_log):
    d = await daemon_factory(
        metrics=METRICS, requests={"max_named_features": 3}, features={"search": {}},
        rate_limits=[{"scope": "feature", "requests_per_minute": 10_000}],
    )
    client = await connect(d)
    for n in range(30):  # the first three take the slots; every request is answered as ever
        assert (await client.complete("c", feature=f"f{n}", max_tokens=2, cache="bypass"))["ok"]
    assert (await client.call({"op": "count_tokens", "feature": "f30", "messages": [{"role": "user", "content": "c"}]}))["ok"]
    before = await scrape(d)
    for n in range(31, 60):
        body = msgspec.json.encode({"model": "claude-sonnet-4-6", "max_tokens": 2, "messages": [{"role": "user", "content": "c"}]})
        status, _, _ = await http_exchange(d.config.http.socket, post(body, b"x-sidecard-feature: f%d" % n))
        assert status == 200
    assert (await client.complete("c", feature="search", max_tokens=2, cache="bypass"))["ok"]  # named in config: always its own
    after = await scrape(d)
    assert labels(after, "feature") == {"f0", "f1", "f2", "search", "_other"}
    # 29 more names, not one more series (the configured feature's own aside).
    assert len([l for l in after.splitlines() if "search" not in l]) == len(before.splitlines())
    logged = {e["feature"] for e in capture_log.events("request")}
    assert logged == {"f0", "f1", "f2", "search", "_other"}
    assert capture_log.events("feature_limit_reached")[0]["limit"] == 3
    limits = (await admin(d, {"op": "limits"}))["result"]
    assert limits["rate_limits"][0]["keys"] == 5  # the per-feature rate limit's buckets: the same five


async def test_a_model_the_upstream_does_not_know_gives_its_slot_back(daemon_factory, sim, autojump_clock):
    """64 garbage names once used up every slot for good: a real model named later was refused until a restart."""
    d = await daemon_factory(metrics=METRICS, requests={"max_named_models": 2})
    client = await connect(d)
    for n in range(6):
        sim.set_fault(f"claude-garbage-{n}", Fault(status=404))
        alone = await client.complete("x", model=f"claude-garbage-{n}", model_fallback=False, cache="bypass")
        assert alone["error"]["code"] == "model_not_found", alone
    sim.set_fault("claude-garbage-x", Fault(status=404))
    answered = await client.complete("x", model="claude-garbage-x", cache="bypass")  # the route's targets answer it
    assert answered["ok"] and answered["model"] != "claude-garbage-x"
    assert (await client.complete("x", model="claude-opus-4-1", cache="bypass"))["ok"]
    assert (await client.complete("x", model="claude-opus-4-0", cache="bypass"))["ok"]
    # The slots are taken by models that answer: one more is refused, and leaves nothing behind either.
    refused = await client.complete("x", model="claude-refused-1", cache="bypass")
    assert refused["error"]["code"] == "bad_request" and "requests.max_named_models" in refused["error"]["message"]
    text = await scrape(d)
    assert not [m for m in labels(text, "model") if "garbage" in m or "refused" in m], labels(text, "model")
    assert {"claude-opus-4-1", "claude-opus-4-0"} <= labels(text, "model")
    held = json.dumps((await admin(d, {"op": "limits"}))["result"]) + json.dumps((await admin(d, {"op": "status"}))["result"])
    assert "garbage" not in held and "claude-opus-4-1" in held


async def test_requests_that_never_call_a_named_model_hold_no_slot(daemon_factory, sim, autojump_clock):
    """A review found the slots still taken for good (until a reload) by requests that never reached the upstream:
    three garbage names asked with cache "only" (each a cache miss) refused a real model after them."""
    d = await daemon_factory(metrics=METRICS, requests={"max_named_models": 2})
    client = await connect(d)
    for n in range(3):
        missed = await client.complete("x", model=f"claude-garbage-{n}", cache="only", temperature=0.0)
        assert missed["error"]["code"] == "cache_miss", missed
    assert (await client.complete("x", model="claude-opus-4-1", cache="bypass"))["ok"]
    assert not [m for m in labels(await scrape(d), "model") if "garbage" in m]


async def test_a_reload_gives_back_the_slots_of_models_never_answered(nursery, sim, capture_log, short_tmp, autojump_clock):
    d, path = await start_from_file(nursery, sim, capture_log, short_tmp, "[requests]\nmax_named_models = 1\n")
    client = await connect(d)
    sim.set_fault("claude-never-1", Fault(status=400))  # refused, but not as unknown: the slot stays taken
    assert (await client.complete("x", model="claude-never-1", model_fallback=False))["error"]["code"] == "invalid_request"
    assert (await client.complete("x", model="claude-opus-4-1"))["error"]["code"] == "bad_request"
    assert (await admin(d, {"op": "reload"}))["result"]["named_models_released"] == 1
    assert (await client.complete("x", model="claude-opus-4-1", cache="bypass"))["ok"]
    # A model the upstream has answered keeps its slot (its breakers, queues and series) across a reload.
    assert (await admin(d, {"op": "reload"}))["result"]["named_models_released"] == 0
    assert (await client.complete("x", model="claude-never-1", model_fallback=False))["error"]["code"] == "bad_request"


async def test_what_looks_a_feature_up_sees_the_apps_own_name(daemon_factory, capture_log):
    """Past the limit a request is counted under `_other`, but an app allowed `support-*` is still served under
    `support-7`, and a kill switch or an experiment an operator sets on a feature both applies to it and counts it
    under its own name."""
    apps = {"support": {"uids": [os.getuid()], "features": ["support-*"]}}
    d = await daemon_factory(requests={"max_named_features": 0}, safety={"access": {"enabled": True, "apps": apps}})
    client = await connect(d)
    assert (await client.complete("c", feature="support-7", cache="bypass"))["ok"]
    assert (await client.complete("c", feature="other-1"))["error"]["code"] == "forbidden"
    assert [e["feature"] for e in capture_log.events("request")] == ["_other", "_other"]
    await admin(d, {"op": "kill", "scope": "feature:support-7", "mode": "static", "text": "paused"})
    killed = await client.complete("c", feature="support-7")
    assert killed["ok"] and killed["text"] == "paused"
    assert capture_log.events("request")[-1]["feature"] == "support-7"
    spec = {"name": "tenant", "feature": "support-9", "primary": "latency",
            "arms": [{"name": "a", "model": "claude-sonnet-4-6"}, {"name": "b", "model": "claude-haiku-4-5-20251001"}]}
    assert (await admin(d, {"op": "experiment.start", "experiment": spec}))["ok"]
    assert (await client.complete("c", feature="support-9", cache="bypass"))["ok"]
    assert capture_log.events("request")[-1]["feature"] == "support-9"  # an experiment's subject: its own name


async def test_async_jobs_are_counted_the_same_way(daemon_factory, capture_log, autojump_clock):
    sim = Simulator(seed=1, batch_timing=BatchTiming(processing_s=120))
    d = await daemon_factory(sim, options={"jobs_store_in_thread": False}, jobs=JOBS, requests={"max_named_features": 1})
    client = await connect(d)
    ids = []
    for n in range(3):
        frame = {"op": "submit", "messages": [{"role": "user", "content": f"ticket {n}"}], "by": "2h", "feature": f"job-{n}"}
        ids.append((await client.call(frame))["jobs"][0]["id"])
    for job_id in ids:
        assert (await client.call({"op": "wait", "job": job_id, "timeout_ms": 3_600_000}))["job"]["state"] == "succeeded"
    assert {e["feature"] for e in capture_log.events("request")} == {"job-0", "_other"}
    assert len(capture_log.events("request")) == 3
