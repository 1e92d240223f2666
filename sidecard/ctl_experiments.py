"""`sidecardctl experiment ...`, `sidecardctl prompt rollout` and `sidecardctl rollout ...`: their arguments, the
admin frames they send, and how their answers are shown (docs/experiments.md)."""

from __future__ import annotations

import argparse
from typing import Any


class BadUsage(Exception):
    """A value argparse could not check itself (a `--target`, an `--arm`): one line, and exit status 2."""


METRICS = ("judge_score", "feedback_score", "review_score", "pass_rate", "error_rate", "cost", "latency")


def add_parsers(sub: Any, prompt_actions: Any, route_actions: Any) -> None:
    """The experiment and rollout commands, on sidecardctl's subcommands and its `prompt` and `route` actions."""
    experiment = sub.add_parser("experiment", help="A/B tests: start, status with the verdict, stop, promote",
                                description="A/B tests between prompt versions, models or routes, decided by an "
                                            "always-valid sequential test.")
    esub = experiment.add_subparsers(dest="action", required=True, metavar="ACTION")
    start = esub.add_parser("start", help="start an experiment", description="Split a prompt's (or a feature's) users between arms.")
    start.add_argument("name")
    subject = start.add_mutually_exclusive_group(required=True)
    subject.add_argument("--prompt", help="arms are this prompt's versions: --arm NAME=VERSION")
    subject.add_argument("--feature", help="arms are models or routes: --arm NAME=model:MODEL or NAME=route:ROUTE")
    start.add_argument("--arm", action="append", required=True, metavar="NAME=VALUE[,weight=W]",
                       help="an arm (two or more; the first is the control)")
    start.add_argument("--primary", choices=METRICS, default="judge_score", help="the metric that decides (default judge_score)")
    start.add_argument("--guard", action="append", default=[], metavar="METRIC:MARGIN[%]",
                       help="a guardrail: not worse than the control by MARGIN (or MARGIN%% of its mean)")
    start.add_argument("--min-samples", type=int, default=100, help="per arm and metric, before a verdict (default 100)")
    start.add_argument("--max-samples", type=int, help="per arm: inconclusive past it")
    start.add_argument("--alpha", type=float, default=0.05, help="the chance of a false winner (default 0.05)")
    start.add_argument("--force", action="store_true", help="an arm's model the price table does not know (new, or a typo)")
    status = esub.add_parser("status", help="each arm's values, the verdict and its evidence",
                             description="Each experiment's arms, comparisons (effect, confidence interval, p-value, "
                                         "samples still needed) and verdict.")
    status.add_argument("name", nargs="?")
    stop = esub.add_parser("stop", help="stop an experiment now: the control serves everyone",
                           description="Stop an experiment without a winner; the control serves everyone.")
    stop.add_argument("name")
    promote = esub.add_parser("promote", help="make the winner the prompt's stable version and end the experiment",
                              description="Make the winning arm's version (or --arm's) stable; the experiment ends.")
    promote.add_argument("name")
    promote.add_argument("--arm", help="the arm to promote (default: the winner)")

    rollout = prompt_actions.add_parser("rollout", help="ramp VERSION up step by step, guarded by the sequential test",
                                        description="A canary of VERSION through the steps (default [rollout] steps), "
                                                    "promoted while its guards hold, rolled back when one breaks.")
    rollout.add_argument("prompt")
    rollout.add_argument("version", type=int)
    rollout.add_argument("--steps", help="canary shares in %%, e.g. 1,5,25,50,100")

    model = route_actions.add_parser("rollout", help="ramp a new lead MODEL up step by step, guarded by the sequential test",
                                     description="Give MODEL the lead on ROUTE for a growing share of users (sticky), "
                                                 "promoted while its guards hold, rolled back when one breaks; "
                                                 "completing it puts MODEL first on ROUTE.")
    model.add_argument("route")
    model.add_argument("model")
    model.add_argument("--steps", help="shares in %%, e.g. 1,5,25,50,100")
    model.add_argument("--force", action="store_true", help="a model the price table does not know (new, or a typo)")

    rollouts = sub.add_parser("rollout", help="progressive rollouts: status, pause, resume, abort",
                              description="Progressive rollouts started with `sidecardctl prompt rollout`.")
    rollouts.add_argument("action", nargs="?", choices=("status", "pause", "resume", "abort"), default="status")
    rollouts.add_argument("prompt", nargs="?", metavar="PROMPT|route:ROUTE")

    shadow = sub.add_parser("shadow", help="shadow traffic: how each candidate compares with the live answers",
                            description="Each [[shadows]] candidate: its budget, and per metric the paired comparison "
                                        "with the live answers (shadow minus real).")
    shadow.add_argument("action", nargs="?", choices=("status",), default="status")

    review = sub.add_parser("review", help="the human review queue: list, show, label",
                            description="Answers sampled for review (redacted), oldest first; a label is fed back as a score.")
    rsub = review.add_subparsers(dest="action", metavar="ACTION")
    listing = rsub.add_parser("list", help="a page of items", description="A page of items, oldest first.")
    listing.add_argument("--state", choices=("pending", "labelled", "all"), default="pending")
    listing.add_argument("--prompt")
    listing.add_argument("--after", type=int, default=0, help="the last id seen: the next page")
    listing.add_argument("--limit", type=int, default=20)
    show = rsub.add_parser("show", help="one item, its question and answer (redacted)", description="One item in full (redacted).")
    show.add_argument("item", type=int)
    label = rsub.add_parser("label", help="record a label (and a note) on an item", description="Record a reviewer's label.")
    label.add_argument("item", type=int)
    label.add_argument("label", help="one of [review] labels (default: good, bad, unsure)")
    label.add_argument("--note")


def frame(args: argparse.Namespace) -> dict[str, Any] | None:
    """The admin frame for an experiment or rollout command; None for any other command."""
    if args.command == "experiment":
        if args.action == "start":
            return {"op": "experiment.start", "experiment": _spec(args), **({"force": True} if args.force else {})}
        if args.action == "promote":
            return {"op": "experiment.promote", "name": args.name, "arm": args.arm}
        return {"op": f"experiment.{args.action}", "name": args.name}
    if args.command in ("prompt", "route") and args.action == "rollout":
        steps = [_number(float, step, f"--steps {args.steps!r}: shares in %") for step in args.steps.split(",")] if args.steps else None
        if args.command == "route":
            return {"op": "route.rollout", "route": args.route, "model": args.model, "steps": steps,
                    **({"force": True} if args.force else {})}
        return {"op": "prompt.rollout", "prompt": args.prompt, "version": args.version, "steps": steps}
    if args.command == "shadow":
        return {"op": "shadow.status"}
    if args.command == "review":
        if args.action == "show":
            return {"op": "review.show", "item": args.item}
        if args.action == "label":
            return {"op": "review.label", "item": args.item, "label": args.label, "note": args.note}
        if args.action is None:
            return {"op": "review.list"}
        return {"op": "review.list", "state": args.state, "prompt": args.prompt, "after": args.after, "limit": args.limit}
    if args.command == "rollout":
        if args.action == "status":
            return {"op": "rollout.status", "prompt": args.prompt}
        if args.prompt is None:
            raise BadUsage(f"rollout {args.action} needs the PROMPT")
        return {"op": "rollout.control", "prompt": args.prompt, "action": args.action}
    return None


def _spec(args: argparse.Namespace) -> dict[str, Any]:
    arms = []
    for text in args.arm:
        head, *options = text.split(",")
        name, sep, value = head.partition("=")
        if not sep or not value:
            raise BadUsage(f"--arm {text!r}: expected NAME=VALUE[,weight=W]")
        arm: dict[str, Any] = {"name": name}
        if args.prompt is not None:
            arm["version"] = _number(int, value, f"--arm {text!r}: a prompt's arm is a version number")
        else:
            kind, sep, target = value.partition(":")
            if kind not in ("model", "route") or not target:
                raise BadUsage(f"--arm {text!r}: a feature's arm is model:MODEL or route:ROUTE")
            arm[kind] = target
        for option in options:
            key, _, number = option.partition("=")
            if key != "weight":
                raise BadUsage(f"--arm {text!r}: unknown option {key!r}")
            arm["weight"] = _number(float, number, f"--arm {text!r}: weight is a number")
        arms.append(arm)
    guards = []
    for text in args.guard:
        metric, _, margin = text.partition(":")
        relative = margin.endswith("%")
        value = _number(float, margin.rstrip("%"), f"--guard {text!r}: expected METRIC:MARGIN[%]")
        guards.append({"metric": metric, "margin": value / 100 if relative else value, "relative": relative})
    spec = {"name": args.name, "arms": arms, "primary": args.primary, "guardrails": guards,
            "min_samples": args.min_samples, "alpha": args.alpha, "max_samples": args.max_samples}
    spec["prompt" if args.prompt is not None else "feature"] = args.prompt or args.feature
    return spec


def _number(kind: type, text: str, problem: str) -> Any:
    try:
        return kind(text)
    except ValueError:
        raise BadUsage(problem) from None


# ---------------------------------------------------------------- output


def _value(value: float | None) -> str:
    return "-" if value is None else f"{value:+.4g}" if abs(value) < 1e4 else f"{value:+.3e}"


def render_experiments(result: dict[str, Any], table: Any) -> str:
    experiments = result["experiments"]
    if not experiments:
        return "no experiments (start one with `sidecardctl experiment start`, or in [[experiments]])"
    out = []
    for e in experiments:
        out.append(f"experiment {e['name']}: {e['kind'].replace('_', ' ')}s of {e['subject']}, primary {e['primary']}, "
                   f"alpha {e['alpha']:g}: {e['state'].upper()}" + (f", winner {e['winner']}" if e["winner"] else ""))
        if e["reason"]:
            out.append(f"  {e['reason']}")
        rows = [[a["name"], a["value"], f"{a['weight']:g}",
                 *(f"{a['means'][m]:.4g} (n={a['samples'][m]})" if m in a["means"] else "-" for m in sorted(a["samples"]))]
                for a in e["arms"]]
        metrics = sorted(e["arms"][0]["samples"])
        out.append(_indent(table(rows, ["ARM", "SERVES", "WEIGHT", *(m.upper() for m in metrics)])))
        rows = [[c["kind"], f"{c['treatment']} vs {c['control']}", c["metric"] + (f" (margin {c['margin']})" if c["margin"] else ""),
                 c["decision"], _value(c["effect"]), f"[{_value(c['ci_low'])}, {_value(c['ci_high'])}]", f"{c['p_value']:.3g}",
                 "-" if c["samples_needed"] is None else str(c["samples_needed"])] for c in e["comparisons"]]
        out.append(_indent(table(rows, ["TEST", "ARMS", "METRIC", "DECISION", "EFFECT", "CONFIDENCE", "P", "MORE SAMPLES"])))
        out.append("")
    return "\n".join(out).rstrip()


def render_rollouts(result: dict[str, Any], table: Any) -> str:
    rollouts = result["rollouts"]
    if not rollouts:
        return "no rollouts (start one with `sidecardctl prompt rollout PROMPT VERSION`)"
    out = []
    for r in rollouts:
        steps = " -> ".join(f"[{s:g}%]" if i == r["step"] and r["state"] in ("running", "paused") else f"{s:g}%"
                            for i, s in enumerate(r["steps"]))
        v = "" if r["prompt"].startswith("route:") else "v"
        out.append(f"rollout of {r['prompt']}: {v}{r['candidate']} against {v}{r['stable']}: "
                   f"{r['state'].replace('_', ' ').upper()} at {r['percent']:g}%   {steps}")
        if r["reason"]:
            out.append(f"  {r['reason']}")
        rows = [[metric, g["decision"], _value(g["effect"]), f"[{_value(g['ci_low'])}, {_value(g['ci_high'])}]",
                 f"{g['samples'][0]}/{g['samples'][1]}"] for metric, g in r["guards"].items()]
        if rows:
            out.append(_indent(table(rows, ["GUARD", "DECISION", "EFFECT", "CONFIDENCE", "STABLE/CANDIDATE"])))
        out += [f"  {event['action']:8} {event['percent']:g}%  {event['reason']}" for event in r["history"][-5:]]
        out.append("")
    return "\n".join(out).rstrip()


def render_shadows(result: dict[str, Any], table: Any) -> str:
    shadows = result["shadows"]
    if not shadows:
        return "no shadows (declare them in [[shadows]])"
    out = []
    for s in shadows:
        budget = s["budget"]
        out.append(f"shadow {s['name']}: {s['candidate']} beside the live answers of {s['of']} ({s['share']:.0%} of them); "
                   f"spent ${budget['spent_usd']:.4f}, ${budget['remaining_usd']:.4f} left this window"
                   + (" (exhausted)" if budget["exhausted"] else ""))
        rows = [[metric, m["pairs"], _value(m["real"]), _value(m["shadow"]), m["decision"], _value(m["effect"]),
                 f"[{_value(m['ci_low'])}, {_value(m['ci_high'])}]"] for metric, m in s["metrics"].items()]
        out.append(_indent(table(rows, ["METRIC", "PAIRS", "REAL", "SHADOW", "SHADOW IS", "DIFFERENCE", "CONFIDENCE"])))
    return "\n".join(out)


def render_review_page(result: dict[str, Any], table: Any) -> str:
    counts = result["counts"]
    head = f"review queue: {counts['pending']} pending, {counts['labelled']} labelled"
    if not result["items"]:
        return head
    rows = [[i["id"], i["prompt"] or f"feature:{i['feature']}", "-" if i["version"] is None else f"v{i['version']}",
             i["model"], ",".join(i["reasons"]) or "sampled", i["label"] or "-", i["question"].replace("\n", " ")[:50]]
            for i in result["items"]]
    more = f"\nnext page: sidecardctl review list --after {result['next_after']}"
    return f"{head}\n{table(rows, ['ID', 'PROMPT', 'VERSION', 'MODEL', 'WHY', 'LABEL', 'QUESTION'])}{more}"


def render_review_item(item: dict[str, Any]) -> str:
    served = item["served"]
    what = served["prompt"] or f"feature:{served['feature']}"
    lines = [f"item {item['id']} (request {item['request_id']}): {what}"
             + ("" if served["version"] is None else f" v{served['version']}") + f" on {served['model']}"
             + (f", experiment {served['experiment']} arm {served['arm']}" if served["experiment"] else ""),
             f"why: {', '.join(item['reasons']) or 'sampled'}"
             + ("" if item["judge_score"] is None else f"; judge score {item['judge_score']:.2f}")
             + (f"; failed checks: {', '.join(item['failed_checks'])}" if item["failed_checks"] else ""),
             f"label: {item['label'] or '-'}" + (f" ({item['note']})" if item["note"] else ""),
             "", "QUESTION (redacted)", item["question"], "", "ANSWER (redacted)", item["answer"]]
    return "\n".join(lines)


def _indent(text: str) -> str:
    return "\n".join(f"  {line}" for line in text.splitlines())
