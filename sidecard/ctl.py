"""`sidecardctl`: the operator's command line for the admin socket (through `sidecard_client.AdminClient`).

Human-readable output by default, `--json` for scripts. Exit status: 0 done, 1 the daemon refused or
failed the operation, 2 bad usage, 3 the daemon could not be reached.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from typing import Any, Final

from sidecard_client import AdminClient, ConnectionLost, SidecardError, Timeout

from . import ctl_experiments
from .ctl_experiments import BadUsage
from .closedpipe import EXIT_UNREACHABLE, EXIT_USAGE, quiet_on_closed_pipe
from .durations import duration_seconds

EXIT_REFUSED = 1


_KEEP: Final = object()  # `budget raise` without --soft or --hard: that limit stays as it is


def _limit(text: str) -> float | None:
    """A budget limit in USD, or "none" for no limit."""
    return None if text.lower() == "none" else float(text)


def parse_duration(text: str) -> float:
    """`90s`, `15m`, `2h`, `1d`, or plain seconds; more than zero."""
    seconds = duration_seconds(text)
    if seconds is None:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration like 90s, 15m, 2h or 1d")
    if seconds <= 0:
        raise argparse.ArgumentTypeError(f"duration must be positive, not {text.strip()!r}")
    return seconds


# The options that take a DURATION: argparse reads a value like `-5m` after one as an option of its own ("expected
# one argument"), so such a value is handed to its option, for parse_duration to say what is wrong with it.
_DURATION_OPTIONS: Final = frozenset({"--for", "--last"})


def _durations_attached(argv: list[str]) -> list[str]:
    words: list[str] = []
    rest = iter(argv)
    for word in rest:
        if word == "--":  # what follows is positional
            return [*words, word, *rest]
        if words and words[-1] in _DURATION_OPTIONS and re.match(r"-\.?\d", word):
            words[-1] = f"{words[-1]}={word}"
        else:
            words.append(word)
    return words


class Unreachable(Exception):
    pass


def call(admin: AdminClient, frame: dict[str, Any]) -> dict[str, Any]:
    """One op's reply frame, an error reply included; raises `Unreachable` if the daemon cannot be reached."""
    try:
        return admin.call(**frame)
    except (ConnectionLost, Timeout) as exc:  # a broken connection is the daemon's failure, never a closed stdout
        raise Unreachable(f"cannot reach the admin socket: {exc.message}") from None
    except SidecardError as err:
        return err.frame or {"ok": False, "error": {"code": err.code, "message": err.message}}


# ---------------------------------------------------------------- arguments


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sidecardctl", description="Operate a running sidecard daemon.")
    p.add_argument("--socket", default=None, help="admin socket (default: $SIDECARD_ADMIN_SOCKET or beside the app socket)")
    p.add_argument("--json", action="store_true", help="print the daemon's JSON reply")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    sub.add_parser("status", help="routes, breakers, prompts, kill switches, cache", description="The operator's first look.")

    kill = sub.add_parser("kill", help="switch AI off (or degrade it) for a scope",
                          description="Switch AI off for a scope. No new request in the scope reaches the upstream once this returns.")
    kill.add_argument("scope", nargs="?", default="global", help="global (default), feature:NAME or prompt:NAME")
    kill.add_argument("--mode", choices=["error", "static", "cached"], default="error",
                      help="error: answer ai_disabled; static: answer --text; cached: a cached answer, else --text")
    kill.add_argument("--text", help="the answer for static mode (and cached mode with nothing cached)")
    kill.add_argument("--reason", help="why (shown in status and in ai_disabled errors)")
    kill.add_argument("--for", dest="expires_in_s", type=parse_duration, metavar="DURATION", help="expire after e.g. 30m")
    unkill = sub.add_parser("unkill", help="remove a kill switch", description="Remove the kill switch on a scope.")
    unkill.add_argument("scope", nargs="?", default="global")

    route = sub.add_parser("route", help="switch a route's model or targets, or roll back",
                           description="Change a route at runtime. Changes persist across restarts until rolled back.")
    rsub = route.add_subparsers(dest="action", required=True, metavar="ACTION")
    sp = rsub.add_parser("set-primary", help="put a model first on a route", description="Put MODEL first on ROUTE; the other targets stay behind it.")
    sp.add_argument("route")
    sp.add_argument("model")
    sp.add_argument("--provider", choices=["anthropic", "bedrock", "vertex"])
    sp.add_argument("--force", action="store_true", help="a model the price table does not know (new, or a typo)")
    ov = rsub.add_parser("override", help="replace a route's targets", description="Replace ROUTE's targets (in order).")
    ov.add_argument("route")
    ov.add_argument("--target", action="append", required=True, metavar=TARGET_SYNTAX,
                    help="repeat for each target, first is primary; e.g. bedrock:us.anthropic.claude-sonnet-4-6-v1:0,region=us-east-1,timeout=30s")
    ov.add_argument("--force", action="store_true", help="models the price table does not know (new, or a typo)")
    rb = rsub.add_parser("rollback", help="undo the last change to a route", description="Restore ROUTE's previous targets.")
    rb.add_argument("route")

    prompt = sub.add_parser("prompt", help="switch, roll back or canary a prompt version",
                            description="Choose which prompt version answers. Overrides win over release.toml until cleared.")
    psub = prompt.add_subparsers(dest="action", required=True, metavar="ACTION")
    use = psub.add_parser("use", help="pin VERSION: the stable version, no canary",
                          description="Make VERSION the stable version for everyone now; stops any canary.")
    use.add_argument("prompt")
    use.add_argument("version", type=int)
    prb = psub.add_parser("rollback", help="back to the previous stable version, canary stopped",
                          description="Back to the previous stable version; stops any canary. On a first version, stops its canary.")
    prb.add_argument("prompt")
    can = psub.add_parser("canary", help="start or change a canary (0 stops it)",
                          description="Send PERCENT of users (sticky by user key) to a canary version; 0 stops the canary.")
    can.add_argument("prompt")
    can.add_argument("percent", type=float)
    can.add_argument("--version", type=int, help="the canary version (default: the current canary)")
    pro = psub.add_parser("promote", help="the canary becomes stable", description="Make the canary the stable version for everyone.")
    pro.add_argument("prompt")
    clr = psub.add_parser("clear", help="drop runtime overrides",
                          description="Drop runtime overrides: release.toml decides again (a canary whose quality alert "
                                      "is firing stays stopped).")
    clr.add_argument("prompt")
    for command in (use, prb, can, pro, clr):
        command.add_argument("--force", action="store_true",
                             help="also give traffic to a version whose quality alert is firing (the alert is re-measured)")

    ctl_experiments.add_parsers(sub, psub, rsub)

    cache = sub.add_parser("cache", help="cache operations", description="Cache operations.")
    csub = cache.add_subparsers(dest="action", required=True, metavar="ACTION")
    fl = csub.add_parser("flush", help="drop cached answers", description="Drop all cached answers, or one feature's or prompt's.")
    fl.add_argument("--feature")
    fl.add_argument("--prompt")

    budget = sub.add_parser("budget", help="spend and limits per budget; raise or reset one",
                            description="Show spend per budget, or raise or reset one (audited).")
    bsub = budget.add_subparsers(dest="action", metavar="ACTION")
    br = bsub.add_parser("raise", help="change a scope's limits at runtime", description="Change the soft and/or hard limit of one scope key.")
    br.add_argument("scope", help='a scope key: global, feature:NAME, route:NAME, user:<pseudonym>')
    br.add_argument("--window", choices=["hour", "day", "month"], default="day")
    br.add_argument("--soft", type=_limit, dest="soft_usd", default=_KEEP, help="soft limit in USD, or 'none' (unset: it stays)")
    br.add_argument("--hard", type=_limit, dest="hard_usd", default=_KEEP, help="hard limit in USD, or 'none' (unset: it stays)")
    bz = bsub.add_parser("reset", help="zero a scope's spend in the current window", description="Zero the spend of one scope key.")
    bz.add_argument("scope")
    bz.add_argument("--window", choices=["hour", "day", "month"], default="day")
    sub.add_parser("limits", help="rate limits, queues and concurrency limits per target",
                   description="Rate limits, queue depth, concurrency limit and pauses per upstream target.")

    quality = sub.add_parser("quality", help="answer quality per prompt, version and model, with trends and alerts",
                             description="Judge scores and heuristic check rates per prompt, version and model; "
                                         "a sparkline of the trend; firing and recent alerts; automatic rollbacks.")
    quality.add_argument("--png", metavar="FILE", help="also plot the score trends to FILE (needs matplotlib)")
    qsub = quality.add_subparsers(dest="action", metavar="ACTION")
    unswitch = qsub.add_parser("unswitch", help="end a prompt's fallback route switch now",
                               description="Send PROMPT back to its own route now; its alerts are re-measured there.")
    unswitch.add_argument("prompt")

    sub.add_parser("apps", help="app identities, what each may use, and its requests",
                   description="The app identities of [safety.access]: peer uids and gids, whether a token is set, the "
                               "features, routes, prompts and models each may use, and its requests by outcome.")
    jobs = sub.add_parser("jobs", help="async jobs: counts by state, batches in flight, savings; cancel one",
                          description="Async jobs (docs/jobs.md): counts by state, the oldest pending, jobs at risk of "
                                      "missing their deadline, Message Batches in flight and the savings so far.")
    jsub = jobs.add_subparsers(dest="action", metavar="ACTION")
    jsub.add_parser("cancel", help="cancel a job", description="Cancel JOB: it ends `cancelled`; a result that comes later is dropped.").add_argument("job")
    jsub.add_parser("cancel-batch", help="cancel a Message Batch in flight",
                    description="Cancel BATCH (sidecard's id, as `sidecardctl jobs` lists it): the requests it has not "
                                "processed come back cancelled and their jobs run through the engine.").add_argument("batch")

    sub.add_parser("fleet", help="the sidecars of this fleet, what each runs, the store's health",
                   description="Fleet mode: live sidecars of the namespace (heartbeats) with their version, config hash, "
                               "operator state version and prompt releases, flagging those that disagree; the store's health.")
    usage = sub.add_parser("usage", help="requests, tokens, cost and cache savings by feature, user, prompt, model or route",
                           description="Usage from the daemon's hourly rollups ([usage] enabled = true): per period, "
                                       "then totals per key, the costliest first. Users appear by pseudonym only.")
    usage.add_argument("--by", choices=["feature", "user", "prompt", "model", "route"], default="feature")
    usage.add_argument("--window", choices=["hour", "day", "month"], default="day", help="the period of each row")
    usage.add_argument("--last", dest="last_s", type=parse_duration, metavar="DURATION",
                       help="how far back, e.g. 12h or 30d (default: a day of hours, a week of days, a year of months)")
    usage.add_argument("--json", dest="usage_json", action="store_true", help="the report as JSON")
    usage.add_argument("--csv", action="store_true", help="the report as CSV")
    usage.add_argument("--png", metavar="FILE", help="also plot cost per period, stacked by key, to FILE (needs matplotlib)")
    sub.add_parser("anomalies", help="unusual spend: features and users spending far above their normal rate",
                   description="The unusual-spend alerts firing now ([anomaly] enabled = true), the highest rate first.")

    sub.add_parser("reload", help="re-read config and prompts (like SIGHUP)", description="Re-read config and prompts; a bad config is refused and the running one stays.")
    sub.add_parser("drain", help="stop accepting, finish in-flight requests, exit", description="Stop accepting, finish in-flight requests, then exit.")
    return p


def _frame(args: argparse.Namespace) -> dict[str, Any]:
    c = args.command
    if (trial := ctl_experiments.frame(args)) is not None:
        return trial
    if c == "quality" and args.action == "unswitch":
        return {"op": "quality.unswitch", "prompt": args.prompt}
    if c in ("status", "reload", "drain", "limits", "quality", "apps", "fleet", "anomalies"):
        return {"op": c}
    if c == "jobs":
        if args.action == "cancel":
            return {"op": "jobs.cancel", "job": args.job}
        if args.action == "cancel-batch":
            return {"op": "jobs.cancel_batch", "batch": args.batch}
        return {"op": "jobs"}
    if c == "usage":
        return {"op": "usage", "by": args.by, "window": args.window, "last_s": args.last_s}
    if c == "budget":
        if args.action == "raise":
            given = {key: getattr(args, key) for key in ("soft_usd", "hard_usd") if getattr(args, key) is not _KEEP}
            return {"op": "budget.raise", "scope": args.scope, "window": args.window, **given}
        if args.action == "reset":
            return {"op": "budget.reset", "scope": args.scope, "window": args.window}
        return {"op": "budget"}
    if c == "kill":
        return {"op": "kill", "scope": args.scope, "mode": args.mode, "text": args.text, "reason": args.reason, "expires_in_s": args.expires_in_s}
    if c == "unkill":
        return {"op": "unkill", "scope": args.scope}
    if c == "route":
        if args.action == "set-primary":
            return {"op": "route.set_primary", "route": args.route, "model": args.model, "provider": args.provider,
                    **({"force": True} if args.force else {})}
        if args.action == "override":
            return {"op": "route.override", "route": args.route, "targets": [_target(t) for t in args.target],
                    **({"force": True} if args.force else {})}
        return {"op": "route.rollback", "route": args.route}
    if c == "prompt":
        frame = {"op": f"prompt.{args.action}", "prompt": args.prompt, **({"force": True} if args.force else {})}
        if args.action == "use":
            frame["version"] = args.version
        if args.action == "canary":
            frame.update(percent=args.percent, version=args.version)
        return frame
    return {"op": "cache.flush", "feature": args.feature, "prompt": args.prompt}


TARGET_SYNTAX = "PROVIDER:MODEL[,timeout=DURATION][,region=REGION][,project=PROJECT]"
_TARGET_FIELDS = {"region": "region", "project": "project_id"}


def _target(text: str) -> dict[str, Any]:
    """`bedrock:us.anthropic.claude-sonnet-4-6-v1:0,region=us-east-1,timeout=10s`. Bedrock model ids and ARNs
    contain colons, so a timeout is its own `,timeout=` field; the older trailing `:SECONDS` is still read for
    anthropic and vertex, whose model ids never contain a colon."""
    spec, *fields = text.split(",")
    provider, sep, model = spec.partition(":")
    if not sep or not model or provider not in ("anthropic", "bedrock", "vertex"):
        raise BadUsage(f"--target {text!r}: expected {TARGET_SYNTAX}")
    target: dict[str, Any] = {"provider": provider, "model": model}
    legacy = re.fullmatch(r"(.+):(\d+(?:\.\d+)?)", model)
    if legacy and provider != "bedrock":
        target["model"], target["timeout_s"] = legacy.group(1), float(legacy.group(2))
    for field in fields:
        name, _, value = (part.strip() for part in field.partition("="))
        if name in _TARGET_FIELDS and value:
            target[_TARGET_FIELDS[name]] = value
            continue
        if name != "timeout":
            problem = f"{name} needs a value" if name in _TARGET_FIELDS else f"unknown field {name!r}"
            raise BadUsage(f"--target {text!r}: {problem} (expected {TARGET_SYNTAX})")
        try:
            target["timeout_s"] = parse_duration(value)
        except argparse.ArgumentTypeError as exc:
            raise BadUsage(f"--target {text!r}: {exc} (expected {TARGET_SYNTAX})") from None
    return target


# ---------------------------------------------------------------- output


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "never"
    s = max(0, int(seconds))
    if s >= 86400:
        return f"{s // 86400}d{(s % 86400) // 3600}h"
    if s >= 3600:
        return f"{s // 3600}h{(s % 3600) // 60}m"
    if s >= 60:
        return f"{s // 60}m{s % 60}s"
    return f"{s}s"


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(header, widths)).rstrip()]
    lines += ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    return "\n".join(lines)


def _probe(retry_in_s: float) -> str:
    """When an open breaker lets a probe through: its cooldown over, the next call is the probe."""
    return f" (probe in {_age(retry_in_s)})" if retry_in_s > 0 else " (cooldown over: the next call probes it)"


def render_status(s: dict[str, Any]) -> str:
    out = [
        f"sidecard {s['version']}  pid {s['pid']}  up {_age(s['uptime_s'])}  "
        f"{'SIMULATED upstream  ' if s.get('simulate') else ''}config {s.get('config') or '(defaults)'}",
        f"in flight {s['in_flight']}  connections {s['connections']}{'  DRAINING' if s.get('draining') else ''}",
        "",
    ]
    rows = []
    for name, route in s["routes"].items():
        for i, t in enumerate(route["targets"]):
            breaker = t["breaker"] + (_probe(t["retry_in_s"]) if t["breaker"] == "open" else "")
            label = (name + (" *overridden*" if route["overridden"] else "")) if i == 0 else ""
            rows.append([label, f"{t['provider']}:{t['model']}", breaker])
    out += [_table(rows, ["ROUTE", "TARGET", "BREAKER"]), ""]
    if s["prompts"]:
        rows = []
        for name, p in s["prompts"].items():
            canary = f"v{p['canary']} @ {p['canary_percent']:g}%" if p.get("canary") else "-"
            stable = f"v{p['stable']}" if p.get("stable") else p.get("error", "-")
            rows.append([name, stable, canary, ",".join(map(str, p["versions"])), "yes" if p.get("overridden") else ""])
        out += [_table(rows, ["PROMPT", "STABLE", "CANARY", "VERSIONS", "OVERRIDDEN"]), ""]
    for e in s.get("prompt_errors", []):
        out.append(f"prompt file refused: {e['file']}: {e['reason']}")
    if s["kills"]:
        rows = [
            [k["scope"], k["mode"], k.get("reason") or "", "until unkilled" if k["expires_in_s"] is None else f"expires in {_age(k['expires_in_s'])}"]
            for k in s["kills"]
        ]
        out += ["", _table(rows, ["KILLED SCOPE", "MODE", "REASON", "EXPIRY"])]
    else:
        out.append("kill switches: none")
    cache = s.get("cache")
    if cache:
        out.append(
            f"cache: {cache['entries']} entries, {cache['bytes'] / 1048576:.1f} MiB of {cache['max_bytes'] / 1048576:.0f} MiB ({cache['store']})"
        )
    else:
        out.append("cache: off")
    out.append(_quality_line(s.get("quality")))
    if s.get("fleet"):
        out.append(_fleet_line(s["fleet"]))
    if s.get("state_error"):
        out.append(f"WARNING state file was unreadable and set aside: {s['state_error']}")
    return "\n".join(out)


def _fleet_line(f: dict[str, Any]) -> str:
    if f["up"]:
        return f"fleet: {f['instance']} in namespace {f['namespace']} on {f['store']}, state version {f['state_version']} (sidecardctl fleet)"
    return (f"fleet: STORE DOWN ({f['down_reason']}): local limits, local cache and the last-known operator state "
            f"(version {f['state_version']}) meanwhile")


def _quality_line(q: dict[str, Any] | None) -> str:
    if q is None:
        return "quality: off"
    line = f"quality: {q['firing']} alert{'' if q['firing'] == 1 else 's'} firing"
    switches = q.get("switches") or []
    line += "; route switches: " + (", ".join(_switch(w) for w in switches) if switches else "none")
    if q["actions"]:
        line += f"; last automatic action: {_action(q['actions'][0])}"
    return line


def _switch(w: dict[str, Any]) -> str:
    return f"{w['prompt']} -> route {w['route']} (for {_age(w['for_s'])}, ends in {_age(w['expires_in_s'])})"


def _action(a: dict[str, Any]) -> str:
    if a["action"] == "route_switched":
        return f"route_switched {a['prompt']} -> route {a['route']} ({a['signal']} = {a['value']} on {a['model']})"
    if a["action"] == "route_switch_ended":
        return f"route_switch_ended {a['prompt']} back from route {a['route']} ({a['why']})"
    return f"{a['action']} {a['prompt']} v{a['version']} ({a['signal']} = {a['value']})"


def _usd(value: float | None) -> str:
    """Dollars and cents; under a cent, its own digits (a few small calls are not "$0.00")."""
    if value is None:
        return "-"
    if 0 < abs(value) < 0.01:
        return f"${value:.6f}".rstrip("0") if abs(value) >= 1e-6 else "<$0.000001"
    return f"${value:,.2f}"


def render_budget(result: dict[str, Any]) -> str:
    if not result["budgets"]:
        return "no budgets configured"
    rows = [
        [b["budget"], b["window"], b["key"] or "-", _usd(b["spent_usd"]), _usd(b["soft_usd"]), _usd(b["hard_usd"]),
         _usd(b["remaining_usd"]), time.strftime("%Y-%m-%d %H:%M", time.localtime(b["resets_at"])) if b.get("resets_at") else "-"]
        for b in result["budgets"]
    ]
    out = _table(rows, ["BUDGET", "WINDOW", "MOST SPENT", "SPENT", "SOFT", "HARD", "LEFT", "RESETS"])
    if result.get("fleet"):
        out += "\nthe fleet's spend (a per-user or per-feature budget's MOST SPENT: of the keys this sidecar has served)"
    if result.get("spend_error"):
        out += f"\nWARNING {result['spend_error']}"
    return out


def render_limits(result: dict[str, Any]) -> str:
    out = []
    if result["rate_limits"]:
        rows = [[r["scope"], r["requests_per_minute"] or "-", r["tokens_per_minute"] or "-", r["keys"]] for r in result["rate_limits"]]
        out += [_table(rows, ["RATE LIMIT", "REQ/MIN", "TOKENS/MIN", "KEYS"]), ""]
    rows = [
        [target, q["in_flight"], q["limit"], q["queued"], q["shed"], q["refused"], f"{q['paused_for_s']:.1f}s" if q["paused_for_s"] else "-"]
        for target, q in result["targets"].items()
    ]
    out.append(_table(rows, ["TARGET", "IN FLIGHT", "LIMIT", "QUEUED", "SHED", "REFUSED", "PAUSED"]) if rows else "no upstream traffic yet")
    return "\n".join(out)


def render_apps(result: dict[str, Any]) -> str:
    if not result["enabled"]:
        return "access control is off ([safety.access] enabled = false): every peer may use everything"
    rows = []
    for a in result["apps"]:
        peers = ",".join([*(f"uid {u}" for u in a["uids"]), *(f"gid {g}" for g in a["gids"])]) or "-"
        used = a["requests"]
        refused = sum(n for outcome, n in used.items() if outcome not in ("ok", "degraded"))
        rows.append([a["app"], peers, "yes" if a["token"] else "no", ",".join(a["features"]), ",".join(a["routes"]),
                     ",".join(a["models"]), a["max_tokens"] or "-", sum(used.values()), refused])
    return _table(rows, ["APP", "PEERS", "TOKEN", "FEATURES", "ROUTES", "MODELS", "MAX TOKENS", "REQUESTS", "ERRORS"])


def render_quality(result: dict[str, Any] | None) -> str:
    if result is None:
        return "quality monitoring is off ([quality] enabled = false)"
    rows = []
    for m in result["monitored"]:
        checks = ", ".join(f"{name} {rate:.0%}" for name, rate in m["check_rates"].items() if rate > 0) or "-"
        rows.append([
            f"{m['prompt']} v{m['version']}" if m["version"] != "-" else m["prompt"], m["model"],
            "-" if m["mean"] is None else f"{m['mean']:.2f}", "-" if m["baseline"] is None else f"{m['baseline']:.2f}",
            m["scores"], m["sparkline"] or "-", checks, ",".join(m["firing"]) or "-",
        ])
    out = [_table(rows, ["PROMPT", "MODEL", "SCORE", "BASELINE", "JUDGED", "TREND", "CHECKS FAILING", "FIRING"]) if rows
           else "no answers monitored yet"]
    if result["firing"]:
        out += ["", "FIRING ALERTS"] + [f"  {a['key']}: {a['signal']} = {a['value']:.2f} (floor {a['threshold']:.2f}) {a['reason']}" for a in result["firing"]]
    if result["recent"]:
        out += ["", "RECENT ALERT EVENTS"] + [f"  {a['state']:8} {a['key']}: {a['signal']} = {a['value']:.2f}" for a in result["recent"][:10]]
    if result.get("switches"):
        out += ["", "ROUTE SWITCHES"] + [f"  {_switch(w)}; causes: {', '.join(w['causes'])}" for w in result["switches"]]
    for action in result["actions"]:
        out.append(f"automatic: {_action(action)}")
    out.append(f"judge spend today: ${result['judge_spent_today_usd']:.4f}")
    return "\n".join(out)


def render_jobs(result: dict[str, Any]) -> str:
    jobs = result["jobs"]
    out = [_table([[state, str(count)] for state, count in jobs.items()], ["STATE", "JOBS"]), ""]
    oldest = result["oldest_pending_s"]
    out.append(f"oldest pending: {'-' if oldest is None else f'{oldest:.0f}s'}; at risk of missing the deadline: {result['at_risk']}")
    out.append(f"batches in flight: {result['batches_in_flight']} ({result['jobs_in_batches']} jobs); "
               f"batch cost {_usd(result['batch_cost_usd'])}, saved {_usd(result['savings_usd'])} against interactive")
    if result.get("batches"):
        rows = [[b["id"], b["upstream"] or "-", str(b["jobs"]), str(b["polls"])] for b in result["batches"]]
        out += ["", _table(rows, ["BATCH", "UPSTREAM", "JOBS", "POLLS"])]
    return "\n".join(out)


def render_fleet(result: dict[str, Any] | None) -> str:
    if result is None:
        return "fleet mode is off (no [fleet] section): this sidecar's state and limits are its own"
    health = "up" if result["up"] else f"DOWN ({result['down_reason']}): running on local state"
    synced = result["state_synced_s_ago"]
    lines = [
        f"store: {result['store']} namespace {result['namespace']}: {health}",
        f"this sidecar: {result['instance']}, operator state version {result['state_version']}"
        + (f", last full read {synced:g}s ago" if synced is not None else ", no full read yet")
        + (f"; {n} command(s) taken during an outage wait to be replayed onto the fleet's state"
           if (n := result.get("state_local_ops_pending")) else
           "; a change made during an outage waits to be written" if result["state_local_change_pending"] else ""),
    ]
    if result["members"] is None:
        lines.append(f"members: unknown ({result.get('members_error', 'the store did not answer')})")
        return "\n".join(lines)
    disagreeing = result["disagreeing"]
    rows = [
        [m["instance"], m["version"], m["config_hash"], str(m["state_version"]),
         " ".join(f"{name}:{_release(r)}" for name, r in sorted(m["prompts"].items())) or "-",
         ",".join(disagreeing.get(m["instance"], [])) or "-"]
        for m in result["members"]
    ]
    lines.append(f"members: {len(rows)} live" + (f", {len(disagreeing)} disagreeing" if disagreeing else ", all agree"))
    lines.append(_table(rows, ["instance", "version", "config", "state", "prompt overrides", "differs in"]))
    return "\n".join(lines)


def _release(release: dict[str, Any]) -> str:
    text = f"v{release['stable']}" if release.get("stable") is not None else "release.toml"
    if release.get("canary") is not None:
        text += f"+canary v{release['canary']}@{release.get('canary_percent') or 0:g}%"
    return text


def usage_rows(result: dict[str, Any]) -> list[Any]:
    from .usage.store import UsageRow

    return [UsageRow(**row) for row in result["rows"]]


def render_usage(result: dict[str, Any], *, as_json: bool = False, as_csv: bool = False) -> str:
    from .usage import report

    rows = usage_rows(result)
    if as_json:
        return report.to_json(rows, result["by"], result["window"]).decode()
    if as_csv:
        return report.to_csv(rows, result["window"]).rstrip("\n")
    return report.table(rows, result["by"], result["window"])


def render_anomalies(result: dict[str, Any]) -> str:
    firing = result["firing"]
    if not firing:
        return f"no unusual spend ({result['scopes']} scopes watched)"
    rows = [[f"{a['kind']}:{a['scope']}", f"${a['rate_usd_per_hour']:,.2f}/h", f"${a['expected_usd_per_hour']:,.2f}/h",
             _age(time.time() - a["since"])] for a in firing]
    return _table(rows, ["scope", "spending", "normally", "since"])


def render(reply: dict[str, Any]) -> str:
    op = reply.get("op")
    if op == "jobs":
        return render_jobs(reply["result"])
    if op == "usage":
        return render_usage(reply["result"])
    if op == "anomalies":
        return render_anomalies(reply["result"])
    if op == "quality":
        return render_quality(reply["result"])
    if op == "status":
        return render_status(reply["result"])
    if op == "budget":
        return render_budget(reply["result"])
    if op == "limits":
        return render_limits(reply["result"])
    if op == "apps":
        return render_apps(reply["result"])
    if op == "experiment.status":
        return ctl_experiments.render_experiments(reply["result"], _table)
    if op == "rollout.status":
        return ctl_experiments.render_rollouts(reply["result"], _table)
    if op == "shadow.status":
        return ctl_experiments.render_shadows(reply["result"], _table)
    if op == "review.list":
        return ctl_experiments.render_review_page(reply["result"], _table)
    if op == "review.show":
        return ctl_experiments.render_review_item(reply["result"])
    if op == "fleet":
        return render_fleet(reply["result"])
    before, after, result = reply.get("before"), reply.get("after"), reply.get("result")
    lines = [f"{op}: done"]
    if before is not None or after is not None:
        lines += _changes(before, after)
    if isinstance(result, dict) and "kept" in result:  # fleet mode
        result = dict(result)
        kept = result.pop("kept")
        lines.append("  fleet-wide: every sidecar of the namespace applies it" if kept == "fleet" else f"  {kept}")
        result = result or None
    if isinstance(result, dict):
        lines += [f"  {key}: {value if isinstance(value, str) else json.dumps(value)}" for key, value in result.items()]
    elif result is not None:
        lines.append(f"  {json.dumps(result)}")
    return "\n".join(lines)


def _changes(before: Any, after: Any) -> list[str]:
    """What an op changed, a line each: of two objects (a rollout's, an experiment's state), the keys whose values
    differ, the rest left out (the whole of both was one line of a kilobyte); else both, whole (`--json`: all)."""
    if isinstance(before, dict) and isinstance(after, dict):
        keys = [*before, *(key for key in after if key not in before)]
        changed = [f"  {key}: {json.dumps(before.get(key))} -> {json.dumps(after.get(key))}"
                   for key in keys if before.get(key) != after.get(key)]
        return changed or ["  (nothing changed)"]
    return [f"  before: {json.dumps(before)}", f"  after:  {json.dumps(after)}"]


@quiet_on_closed_pipe
def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(_durations_attached(sys.argv[1:] if argv is None else argv))
    try:
        frame = _frame(args)
    except BadUsage as exc:
        print(f"sidecardctl: {exc}", file=sys.stderr)
        sys.exit(EXIT_USAGE)
    try:
        reply = call(AdminClient(args.socket), frame)
    except Unreachable as exc:
        print(f"sidecardctl: {exc}", file=sys.stderr)
        sys.exit(EXIT_UNREACHABLE)
    if args.json:
        print(json.dumps(reply, indent=2))
    if not reply.get("ok"):
        error = reply.get("error") or {}
        if not args.json:
            print(f"sidecardctl: {error.get('code', 'error')}: {error.get('message', '')}", file=sys.stderr)
        sys.exit(EXIT_REFUSED)
    if args.command == "usage":
        _usage_output(args, reply["result"])
        return
    if not args.json:
        print(render(reply))
    if getattr(args, "png", None) and reply.get("result"):
        from .quality.trend import plot_png

        try:
            plot_png(quality_panels(reply["result"]), args.png, title="sidecard answer quality (judge score)")
        except RuntimeError as exc:
            print(f"sidecardctl: {exc}", file=sys.stderr)
            sys.exit(EXIT_USAGE)
        print(f"plot written to {args.png}")


def _usage_output(args: argparse.Namespace, result: dict[str, Any]) -> None:
    if not args.json:
        print(render_usage(result, as_json=args.usage_json, as_csv=args.csv))
    if args.png:
        from .usage.report import plot_png

        try:
            plot_png(usage_rows(result), args.png, result["by"], result["window"])
        except RuntimeError as exc:
            print(f"sidecardctl: {exc}", file=sys.stderr)
            sys.exit(EXIT_USAGE)
        print(f"plot written to {args.png}", file=sys.stderr if args.usage_json or args.csv else sys.stdout)


def quality_panels(result: dict[str, Any]) -> dict[str, list[Any]]:
    """The quality status as chart panels: one per prompt (or feature), a line per version and model."""
    from .quality.trend import Line

    spans: dict[str, list[tuple[float, float | None, str]]] = {}
    opened: dict[tuple[str, str], float] = {}
    events = {(e["key"], e["signal"], e["at"], e["state"]) for e in [*result["recent"], *result["firing"]]}
    for key, signal, at, state in sorted(events, key=lambda e: e[2]):
        if state == "firing":
            opened.setdefault((key, signal), at)  # a re-measured alert firing again continues its span
        elif (key, signal) in opened:
            spans.setdefault(key, []).append((opened.pop((key, signal)), at, signal))
    for (key, signal), since in opened.items():
        spans.setdefault(key, []).append((since, None, signal))
    panels: dict[str, list[Any]] = {}
    for m in result["monitored"]:
        name = m["model"] if m["version"] == "-" else f"v{m['version']} · {m['model']}"
        line = Line(name, [(t, v) for t, v in m["trend"]], m.get("floor"), tuple(spans.get(m.get("key", ""), ())))
        panels.setdefault(m["prompt"], []).append(line)
    return panels


if __name__ == "__main__":
    main()
