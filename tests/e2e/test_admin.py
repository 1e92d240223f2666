"""The admin socket and sidecardctl through the real sockets."""

import json
import os
import subprocess
import sys

import pytest
import trio

from sidecard import ctl as sidecardctl
from sidecard.admin import Peer, authorised
from sidecard.daemon import Daemon
from sidecard.sim import Fault
from tests.harness import admin, connect, make_config, new_daemon, start_from_file

PRIMARY, FALLBACK = "claude-sonnet-4-6", "claude-haiku-4-5-20251001"


def ctl(d: Daemon, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "sidecard.ctl", "--socket", d.admin_socket_path, *args],
        capture_output=True, text=True, timeout=30,
    )


async def run_ctl(d: Daemon, *args: str) -> subprocess.CompletedProcess:
    return await trio.to_thread.run_sync(lambda: ctl(d, *args))


async def test_kill_is_effective_on_the_next_request(daemon, sim, capture_log):
    client = await connect(daemon)
    assert (await client.complete("before"))["ok"]
    calls = sim.stats_total()["requests"]
    reply = await admin(daemon, {"op": "kill", "scope": "feature:chat", "reason": "incident 7"})
    assert reply["ok"] and reply["before"] is None and reply["after"]["scope"] == "feature:chat"
    killed = await client.complete("during", feature="chat")
    assert killed["error"]["code"] == "ai_disabled" and "incident 7" in killed["error"]["message"]
    assert (await client.complete("other feature", feature="search"))["ok"]
    assert sim.stats_total()["requests"] == calls + 1  # only the other feature reached the upstream
    audit = [e for e in capture_log.events("admin") if e["op"] == "kill"][-1]
    assert audit["peer_uid"] == os.getuid() and audit["result"] == "ok" and audit["after"]["scope"] == "feature:chat"


async def test_kill_modes_static_and_cached(daemon, sim):
    client = await connect(daemon)
    first = await client.complete("cache this", temperature=0.0)
    await admin(daemon, {"op": "kill", "scope": "global", "mode": "cached", "text": "paused"})
    cached = await client.complete("cache this", temperature=0.0)
    assert cached["ok"] and cached["cached"] and cached["degraded"] and cached["text"] == first["text"]
    static = await client.complete("never seen", temperature=0.0)
    assert static["ok"] and static["degraded"] and static["text"] == "paused"
    await admin(daemon, {"op": "unkill", "scope": "global"})
    assert (await client.complete("never seen"))["degraded"] is False


async def test_kill_survives_a_restart_and_expires(persistent, sim, mock_clock):
    first = await persistent()
    await admin(first, {"op": "kill", "scope": "global", "expires_in_s": 600, "reason": "maintenance"})
    first.shutdown()
    await trio.testing.wait_all_tasks_blocked()
    second = await persistent()
    client = await connect(second)
    assert (await client.complete("x"))["error"]["code"] == "ai_disabled"
    assert second.status()["kills"][0]["scope"] == "global"
    mock_clock.jump(601)
    assert (await client.complete("x"))["ok"]


async def test_a_kill_switch_for_longer_than_a_year_is_refused_as_a_mistake(daemon):
    """`expires_in_s: 1e308` was taken (a fresh-clone trial): a kill for good has no expiry (null)."""
    reply = await admin(daemon, {"op": "kill", "scope": "global", "expires_in_s": 1e308})
    assert reply["error"]["code"] == "bad_request" and "expires_in_s" in reply["error"]["message"], reply
    assert not daemon.status()["kills"]
    assert (await admin(daemon, {"op": "kill", "scope": "global", "expires_in_s": 366 * 86_400}))["ok"]


async def test_route_set_primary_and_rollback(persistent, sim):
    d = await persistent()
    client = await connect(d)
    reply = await admin(d, {"op": "route.set_primary", "route": "default", "model": FALLBACK})
    assert reply["before"] == [f"anthropic:{PRIMARY}", f"anthropic:{FALLBACK}"]
    assert reply["after"] == [f"anthropic:{FALLBACK}", f"anthropic:{PRIMARY}"]
    assert (await client.complete("safer", cache="bypass"))["served_by"]["model"] == FALLBACK
    reply = await admin(d, {"op": "route.rollback", "route": "default"})
    assert reply["after"][0] == f"anthropic:{PRIMARY}"
    assert (await client.complete("back", cache="bypass"))["served_by"]["model"] == PRIMARY



async def test_a_model_the_price_table_does_not_know_needs_force(daemon, sim):
    """A typo during an incident (`set-primary default no-such-model`) was taken, kept across restarts, and left
    only the fallbacks answering (found trying the product from a fresh clone); its calls would cost $0 against
    budgets too."""
    refused = await run_ctl(daemon, "route", "set-primary", "default", "claude-sonet-4-6")
    assert refused.returncode == 1 and "not in the price table" in refused.stderr and "--force" in refused.stderr
    # A digit short of the dated id: its family is priced, but no model has that id (a second trial).
    assert (await run_ctl(daemon, "route", "set-primary", "default", "claude-haiku-4-5-2025100")).returncode == 1
    overridden = await run_ctl(daemon, "route", "override", "default", "--target", "anthropic:no-such-model")
    assert overridden.returncode == 1 and "'no-such-model'" in overridden.stderr
    assert daemon.status()["routes"]["default"]["targets"][0]["model"] == PRIMARY  # nothing changed
    forced = await run_ctl(daemon, "route", "set-primary", "default", "claude-sonet-4-6", "--force")
    assert forced.returncode == 0, forced.stderr
    assert (await run_ctl(daemon, "route", "set-primary", "default", "claude-opus-4-6")).returncode == 0  # priced

async def test_an_experiment_or_a_route_rollout_of_an_unpriced_model_needs_force(daemon, sim):
    """`experiment start --arm b=model:TYPO` and `route rollout default TYPO` were taken (a trial): the typo's
    share of users failed, or a new model's calls cost $0 against budgets (and looked cheaper to the cost guard),
    and a completed rollout put it first on the route, past set-primary's check."""
    arms = ("--arm", f"a=model:{PRIMARY}", "--arm", "b=model:claude-sonet-4-6")
    refused = await run_ctl(daemon, "experiment", "start", "tone", "--feature", "chat", *arms)
    assert refused.returncode == 1 and "'claude-sonet-4-6' is not in the price table" in refused.stderr, refused.stderr
    refused = await run_ctl(daemon, "route", "rollout", "default", "claude-sonet-4-6")
    assert refused.returncode == 1 and "not in the price table" in refused.stderr and "--force" in refused.stderr
    assert (await admin(daemon, {"op": "experiment.status"}))["result"]["experiments"] == []
    assert (await admin(daemon, {"op": "rollout.status"}))["result"]["rollouts"] == []
    nowhere = await run_ctl(daemon, "route", "rollout", "nope", "claude-sonet-4-6")  # the route's typo first
    assert nowhere.returncode == 1 and "no route named 'nope'" in nowhere.stderr, nowhere.stderr
    forced = await run_ctl(daemon, "experiment", "start", "tone", "--feature", "chat", *arms, "--force")
    assert forced.returncode == 0, forced.stderr
    forced = await run_ctl(daemon, "route", "rollout", "default", "claude-sonet-4-6", "--force")
    assert forced.returncode == 0, forced.stderr
    assert (await run_ctl(daemon, "route", "rollout", "judge", "claude-opus-4-6")).returncode == 0  # priced


async def test_a_configured_model_the_price_table_does_not_know_is_warned_of_at_start_and_reload(nursery, sim, capture_log, short_tmp):
    """A config's route on a typo (or a model newer than the table) started in silence, and its calls counted $0
    against budgets: one `unpriced_model` warning at start and at each reload until it is priced; it still starts."""
    route = '[routes.fast]\ntargets = [{model = "claude-sonet-4-6"}, {model = "claude-haiku-4-5"}]\n'
    d, path = await start_from_file(nursery, sim, capture_log, short_tmp, route)
    fact = {"level": "warning", "where": "route fast", "model": "claude-sonet-4-6"}
    warned = capture_log.events("unpriced_model")
    assert [{key: each[key] for key in fact} for each in warned] == [fact]
    assert '[prices."claude-sonet-4-6"]' in warned[0]["reason"] and "$0 against budgets" in warned[0]["reason"]
    assert (await admin(d, {"op": "reload"}))["ok"]
    assert len(capture_log.events("unpriced_model")) == 2
    with open(path, "a") as f:
        f.write('[prices."claude-sonet-4-6"]\ninput = 3.0\noutput = 15.0\n')
    assert (await admin(d, {"op": "reload"}))["ok"]
    assert len(capture_log.events("unpriced_model")) == 2  # priced now: no more


async def test_a_route_that_does_not_exist_is_named_before_its_models(daemon, sim):
    """`sidecardctl route override NOPE --target ...` answered that the target's model was not in the price table
    (a fresh-clone trial): the route is looked up first, and the routes there are listed."""
    known = ", ".join(sorted(daemon.status()["routes"]))
    assert "default" in known
    for args in (("override", "nope", "--target", "anthropic:no-such-model"), ("set-primary", "nope", "no-such-model"),
                 ("override", "nope", "--target", f"anthropic:{FALLBACK}"), ("rollback", "nope"), ("rollout", "nope", FALLBACK)):
        refused = await run_ctl(daemon, "route", *args)
        assert refused.returncode == 1 and f"no route named 'nope' (routes: {known})" in refused.stderr, (args, refused.stderr)
        assert "price table" not in refused.stderr
    assert daemon.status()["routes"]["default"]["targets"][0]["model"] == PRIMARY


async def test_route_override_survives_restart(persistent, sim):
    d = await persistent()
    await admin(d, {"op": "route.set_primary", "route": "default", "model": FALLBACK})
    d.shutdown()
    await trio.testing.wait_all_tasks_blocked()
    again = await persistent()
    assert (await (await connect(again)).complete("x", cache="bypass"))["served_by"]["model"] == FALLBACK


async def test_a_change_the_disk_refuses_is_an_error_frame_and_the_daemon_serves_on(persistent, short_tmp, capture_log):
    d = await persistent()
    os.unlink(f"{short_tmp}/state.json")
    os.mkdir(f"{short_tmp}/state.json")  # the atomic rename onto it fails, as a full or read-only disk would
    reply = await admin(d, {"id": "k", "op": "kill", "scope": "feature:chat", "reason": "incident 9"})
    assert reply["ok"] is False and reply["id"] == "k" and reply["error"]["code"] == "internal"
    assert "could not be saved" in reply["error"]["message"]
    assert capture_log.events("state_save_failed")
    assert (await admin(d, {"op": "status"}))["ok"]  # the admin socket still answers
    assert (await (await connect(d)).complete("still serving", feature="search"))["ok"]
    assert not [n for n in os.listdir(short_tmp) if n.endswith(".tmp")]  # no temp file left behind


def test_peers_outside_the_allowlist_are_refused():
    me = os.getuid()
    assert authorised(Peer(1, me, 1000), allow_uids=set(), allow_gids=set())
    assert authorised(Peer(1, 0, 0), allow_uids=set(), allow_gids=set())
    assert not authorised(Peer(1, 4242, 4242), allow_uids=set(), allow_gids=set())
    assert authorised(Peer(1, 4242, 4242), allow_uids={4242}, allow_gids=set())
    assert authorised(Peer(1, 4242, 77), allow_uids=set(), allow_gids={77})


async def test_a_refused_peer_gets_forbidden_and_an_audit_line(nursery, sim, capture_log, short_tmp):
    d = new_daemon(make_config(short_tmp), sim, capture_log, admin_peer_check=lambda sock: Peer(999, 4242, 4242))
    await nursery.start(d.run)
    reply = await admin(d, {"op": "kill", "scope": "global"})
    assert reply["error"]["code"] == "forbidden"
    assert capture_log.events("admin")[-1]["result"] == "forbidden"
    assert capture_log.events("admin")[-1]["op"] == "kill"
    # A refused peer learns nothing from parse errors: garbage and unknown ops are refused the same way.
    for frame in ({"op": "no.such.op", "id": 3}, {"op": "kill", "scope": 5, "id": 4}):
        refused = await admin(d, frame)
        assert refused["error"]["code"] == "forbidden" and refused["id"] == frame["id"]
    assert capture_log.events("admin")[-2]["op"] == "unknown"
    assert (await (await connect(d)).complete("still on"))["ok"]


async def test_prompt_ops_cache_flush_reload_through_the_socket(daemon, sim):
    assert (await admin(daemon, {"op": "prompt.use", "prompt": "support-reply", "version": 2}))["after"]["stable"] == 2
    assert (await admin(daemon, {"op": "prompt.rollback", "prompt": "support-reply"}))["after"]["stable"] == 1
    canary = await admin(daemon, {"op": "prompt.canary", "prompt": "support-reply", "version": 2, "percent": 25})
    assert canary["after"]["canary_percent"] == 25
    assert (await admin(daemon, {"op": "prompt.promote", "prompt": "support-reply"}))["after"]["stable"] == 2
    client = await connect(daemon)
    await client.complete("flush me", temperature=0.0)
    assert (await admin(daemon, {"op": "cache.flush"}))["result"]["flushed"] == 1
    assert (await admin(daemon, {"op": "reload"}))["ok"]
    bad = await admin(daemon, {"op": "prompt.use", "prompt": "nope", "version": 1})
    assert bad["error"]["code"] == "prompt_not_found"
    unknown = await admin(daemon, {"op": "explode"})
    assert unknown["error"]["code"] == "bad_request"


async def test_reload_refuses_a_bad_config_and_keeps_the_running_one(nursery, sim, capture_log, short_tmp):
    d, path = await start_from_file(nursery, sim, capture_log, short_tmp)
    with open(path, "a") as f:
        f.write("[retry]\nbudget_ratio = 7\n")
    reply = await admin(d, {"op": "reload"})
    assert reply["error"]["code"] == "bad_request" and "budget_ratio" in reply["error"]["message"]
    assert (await (await connect(d)).complete("still serving"))["ok"]


async def test_reload_refuses_a_failover_wait_longer_than_the_last_targets(nursery, sim, capture_log, short_tmp):
    """Cross-field checks hold at reload as at start: the daemon keeps running its old retry settings."""
    d, path = await start_from_file(nursery, sim, capture_log, short_tmp, "[retry]\nfailover_retry_after_ms = 2000\n")
    with open(path) as f:
        text = f.read()
    with open(path, "w") as f:
        f.write(text.replace("failover_retry_after_ms = 2000", "failover_retry_after_ms = 9000"))
    reply = await admin(d, {"op": "reload"})
    assert reply["error"]["code"] == "bad_request" and reply["error"]["message"].startswith("config refused, the running one stays")
    assert "retry.failover_retry_after_ms is larger than retry.max_retry_after_ms" in reply["error"]["message"]
    assert d.config.retry.failover_retry_after_ms == 2000 and d.engine.walker.failover_retry_after_s == 2.0
    assert (await (await connect(d)).complete("still serving"))["ok"]


async def test_sidecardctl_output_and_exit_codes(daemon):
    status = await run_ctl(daemon, "status")
    assert status.returncode == 0
    assert "ROUTE" in status.stdout and "anthropic:claude-sonnet-4-6" in status.stdout and "support-reply" in status.stdout
    as_json = await run_ctl(daemon, "--json", "status")
    assert json.loads(as_json.stdout)["result"]["routes"]["default"]
    killed = await run_ctl(daemon, "kill", "feature:x", "--mode", "static", "--text", "off", "--for", "30m")
    assert killed.returncode == 0 and "kill: done" in killed.stdout
    assert "feature:x" in (await run_ctl(daemon, "status")).stdout
    refused = await run_ctl(daemon, "unkill", "feature:nothing")
    assert refused.returncode == 1 and "bad_request" in refused.stderr
    usage = await run_ctl(daemon, "kill", "--mode", "sideways")
    assert usage.returncode == 2
    for sub in ("status", "kill", "route", "prompt", "cache", "reload", "drain"):
        assert (await run_ctl(daemon, sub, "--help")).returncode == 0
    assert "quality: off" in status.stdout  # the test daemon runs without quality monitoring


@pytest.mark.parametrize(
    ("text", "target"),
    [
        # Bedrock model ids end in a version ":0": never read as a timeout.
        ("bedrock:us.anthropic.claude-sonnet-4-6-v1:0", {"provider": "bedrock", "model": "us.anthropic.claude-sonnet-4-6-v1:0"}),
        ("bedrock:us.anthropic.claude-sonnet-4-6-v1:0,timeout=30s",
         {"provider": "bedrock", "model": "us.anthropic.claude-sonnet-4-6-v1:0", "timeout_s": 30.0}),
        ("bedrock:arn:aws:bedrock:us-east-1:1:inference-profile/p,timeout=2m",
         {"provider": "bedrock", "model": "arn:aws:bedrock:us-east-1:1:inference-profile/p", "timeout_s": 120.0}),
        ("vertex:claude-sonnet-4-5@20250929,timeout=45", {"provider": "vertex", "model": "claude-sonnet-4-5@20250929", "timeout_s": 45.0}),
        ("bedrock:us.anthropic.claude-sonnet-4-6-v1:0,region=eu-west-1,timeout=30s",
         {"provider": "bedrock", "model": "us.anthropic.claude-sonnet-4-6-v1:0", "region": "eu-west-1", "timeout_s": 30.0}),
        ("vertex:claude-sonnet-4-5@20250929,region=europe-west1,project=acme-ai",
         {"provider": "vertex", "model": "claude-sonnet-4-5@20250929", "region": "europe-west1", "project_id": "acme-ai"}),
        ("anthropic:claude-haiku-4-5-20251001", {"provider": "anthropic", "model": "claude-haiku-4-5-20251001"}),
        # The older trailing seconds, where a model id cannot end that way.
        ("anthropic:claude-haiku-4-5-20251001:30", {"provider": "anthropic", "model": "claude-haiku-4-5-20251001", "timeout_s": 30.0}),
        ("vertex:claude-sonnet-4-5@20250929:12.5", {"provider": "vertex", "model": "claude-sonnet-4-5@20250929", "timeout_s": 12.5}),
    ],
)
def test_route_override_targets_parse_unambiguously(text, target):
    assert sidecardctl._target(text) == target


@pytest.mark.parametrize("text", ["claude-sonnet-4-6", "openai:gpt", "anthropic:", "anthropic:m,timeout=soon", "anthropic:m,retries=3", "bedrock:m,region="])
def test_bad_route_override_targets_are_usage_errors(text):
    with pytest.raises(sidecardctl.BadUsage, match="PROVIDER:MODEL"):
        sidecardctl._target(text)


@pytest.mark.parametrize(
    "argv, problem",
    [
        # Before: argparse took `-5m` for an option ("argument --for: expected one argument").
        (["kill", "feature:x", "--for", "-5m"], "sidecardctl kill: error: argument --for: duration must be positive, not '-5m'"),
        (["kill", "--for=-5m"], "argument --for: duration must be positive, not '-5m'"),
        (["kill", "--for", "0s"], "argument --for: duration must be positive, not '0s'"),
        (["usage", "--last", "-1d"], "sidecardctl usage: error: argument --last: duration must be positive, not '-1d'"),
        (["usage", "--last", "-.5h"], "argument --last: '-.5h' is not a duration like 90s, 15m, 2h or 1d"),
        # Values argparse cannot check itself: exit status 2 (bad usage) as well, where it was 1 ("refused").
        (["route", "override", "default", "--target", "anthropic:m,timeout=-5s"],
         "sidecardctl: --target 'anthropic:m,timeout=-5s': duration must be positive, not '-5s'"),
        (["experiment", "start", "x", "--feature", "f", "--arm", "bad"], "sidecardctl: --arm 'bad': expected NAME=VALUE[,weight=W]"),
        (["rollout", "pause"], "sidecardctl: rollout pause needs the PROMPT"),
    ],
)
def test_bad_durations_and_values_are_one_line_usage_errors(argv, problem, capsys):
    with pytest.raises(SystemExit) as exited:
        sidecardctl.main(["--socket", "/nonexistent/admin.sock", *argv])
    err = capsys.readouterr().err
    assert exited.value.code == sidecardctl.EXIT_USAGE and problem in err.splitlines()[-1], err
    assert "Traceback" not in err


def test_the_status_quality_line():
    assert sidecardctl._quality_line(None) == "quality: off"
    assert sidecardctl._quality_line({"firing": 0, "actions": [], "switches": []}) == "quality: 0 alerts firing; route switches: none"
    line = sidecardctl._quality_line({
        "firing": 2,
        "switches": [{"prompt": "support-reply", "route": "safe", "for_s": 90.0, "expires_in_s": 1710.0, "causes": []}],
        "actions": [{"action": "canary_rolled_back", "prompt": "echo", "version": 2, "signal": "score", "value": 0.41}],
    })
    assert line == ("quality: 2 alerts firing; route switches: support-reply -> route safe (for 1m30s, ends in 28m30s); "
                    "last automatic action: canary_rolled_back echo v2 (score = 0.41)")


def test_sidecardctl_unreachable(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "sidecard.ctl", "--socket", str(tmp_path / "none.sock"), "status"],
        capture_output=True, text=True, timeout=30,
    )
    assert result.returncode == 3 and "cannot reach" in result.stderr


def _into_a_closed_pipe(*argv: str) -> subprocess.CompletedProcess:
    """Run a command whose stdout is a pipe nobody reads any more, as `... | head` leaves it."""
    read, write = os.pipe()
    os.close(read)
    try:
        return subprocess.run([sys.executable, "-m", *argv], stdout=write, stderr=subprocess.PIPE, text=True, timeout=60)
    finally:
        os.close(write)


async def test_every_command_exits_quietly_on_a_closed_pipe(daemon):
    admin_socket = ["--socket", daemon.admin_socket_path]
    commands = {  # argv: the exit status (141 = 128 + SIGPIPE, as a Unix tool stopped by the pipe reports)
        ("sidecard.ctl", "--json", *admin_socket, "limits"): 141,
        ("sidecard.ctl", *admin_socket, "status"): 141,
        ("sidecard.ctl", *admin_socket, "reload"): 141,
        ("sidecard", "check-config", "deploy/sidecard.toml"): 141,
        ("sidecard", "--version"): 0,  # argparse drops output it cannot write, quietly
        ("sidecard.ctl", "--help"): 0,
        ("sidecard", "eval", "--help"): 0,
    }
    for argv, status in commands.items():
        result = await trio.to_thread.run_sync(lambda argv=argv: _into_a_closed_pipe(*argv))
        assert (result.returncode, result.stderr) == (status, ""), argv
    refused = await trio.to_thread.run_sync(lambda: _into_a_closed_pipe("sidecard.ctl", *admin_socket, "unkill", "feature:none"))
    assert refused.returncode == 1 and "no kill switch on feature:none" in refused.stderr  # the error still shows


async def test_status_says_when_an_open_breakers_cooldown_is_over(daemon_factory, sim, mock_clock):
    """`open (probe in 0s)` read as stuck open: once the cooldown is over, the next call is the probe."""
    d = await daemon_factory(routes={"default": {"targets": [{"model": PRIMARY, "max_attempts": 1}]}},
                             breaker={"consecutive_failures": 1, "cooldown_s": 10})
    sim.set_fault(PRIMARY, Fault(status=500))
    assert not (await (await connect(d)).complete("fail once", cache="bypass"))["ok"]
    assert "open (probe in 10s)" in (await run_ctl(d, "status")).stdout
    mock_clock.jump(11)
    assert "open (cooldown over: the next call probes it)" in (await run_ctl(d, "status")).stdout
