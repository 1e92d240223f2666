"""The eval-set gate: `sidecard eval PROMPT --version N --set FILE.jsonl`.

An eval set is JSON Lines, one case a line (blank lines are skipped):

    {"name": "reset-password", "vars": {"question": "..."}, "user": "eval-1",
     "expect": [{"contains": "Settings"}, {"not_contains": "sorry"}, {"regex": "(?i)reset"},
                {"json_shape": {"type": "object", "required": ["category"]}}, {"judge_min": 0.7}]}

`contains`/`not_contains` are exact, case-sensitive substrings; `regex` is searched for anywhere (Python
syntax; `(?i)` for case-insensitive); `json_shape` is the prompt-file output schema (docs/prompts.md), the answer
parsed as JSON (a ```json fence is tolerated); `judge_min` asks the `quality-judge` prompt to score the answer
and needs an overall score of at least that. A case passes when every expectation holds.

The candidate version and a baseline (the prompt's current stable version unless given) both run through the
daemon, cache bypassed, labelled feature "eval" (the judge's calls "quality-judge") so that live quality
monitoring and cost reports can tell them apart. The candidate regresses when its pass rate is lower than the baseline's by more than the
tolerance, when a case that passed on the baseline fails on it, or when its mean judge score is lower by more
than the tolerance. Exit status: 0 no regression, 1 regression, 2 bad usage (also a prompt or version the daemon
does not have, found on its first reply) or a bad eval set, 3 a daemon that cannot be reached (as for `sidecard call`
and `sidecardctl`).
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Awaitable, Callable
from typing import Annotated, Any, Final

import msgspec
import trio
from sidecard_client import AdminClient, ConnectionLost, SidecardError, Timeout, default_socket_path
from sidecard_client.aio import AsyncClient

from .closedpipe import EXIT_UNREACHABLE, EXIT_USAGE
from .errors import describe_validation_error
from .prompts.files import OutputSpec
from .prompts.output import output_problem
from .prompts.shape import check_schema
from .quality.judge import Scores, judge_request, parse_scores, rubric_vars

EXIT_OK: Final = 0
EXIT_REGRESSED: Final = 1
EXCERPT_CHARS: Final = 120
EVAL_FEATURE: Final = "eval"  # eval traffic is labelled apart, so live quality monitoring can leave it out
REPLY_TIMEOUT_S: Final = 300.0  # client side, beyond the daemon's own deadline: a daemon that never answers

Complete = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]


class EvalSetError(ValueError):
    """An eval set that cannot be used; the message names the file and line."""


class Unreachable(Exception):
    """The daemon cannot be reached (no socket, a broken connection, no answer): exit 3, not bad usage."""


class NoSuchVersion(LookupError):
    """The daemon has no such prompt or version: a usage error, found on the first reply, not after every case."""


class Expect(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    """One expectation: exactly one of the fields is set."""

    contains: str | None = None
    not_contains: str | None = None
    regex: str | None = None
    json_shape: dict[str, Any] | None = None
    judge_min: Annotated[float, msgspec.Meta(ge=0.0, le=1.0)] | None = None


class Case(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    name: Annotated[str, msgspec.Meta(min_length=1)]
    vars: dict[str, str | int | float | bool] = {}
    expect: list[Expect] = []
    user: str | None = None  # sticky key, as an app would send it


class CaseResult(msgspec.Struct):
    name: str
    passed: bool
    failures: list[str]
    answer_excerpt: str
    judge: Scores | None


class Report(msgspec.Struct):
    prompt: str
    version: int
    results: list[CaseResult]
    pass_rate: float
    mean_judge: float | None


# ---------------------------------------------------------------- the eval set

_case_decoder: Final = msgspec.json.Decoder(Case)


def _check_case(case: Case) -> None:
    for i, expect in enumerate(case.expect):
        where = f"expect[{i}]"
        kinds = [field for field in Expect.__struct_fields__ if getattr(expect, field) is not None]
        if len(kinds) != 1:
            raise ValueError(f"{where}: needs exactly one of {', '.join(Expect.__struct_fields__)}")
        if expect.regex is not None:
            try:
                re.compile(expect.regex)
            except re.error as exc:
                raise ValueError(f"{where}.regex: {exc}") from None
        if expect.json_shape is not None:
            check_schema(expect.json_shape, f"{where}.json_shape")


def load_cases(path: str) -> list[Case]:
    """The cases in a JSONL file; EvalSetError names the line of the first problem."""
    try:
        with open(path, "rb") as file:
            lines = file.read().split(b"\n")
    except OSError as exc:
        raise EvalSetError(f"{path}: {exc.strerror or exc}") from None
    cases: list[Case] = []
    seen: set[str] = set()
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            case = _case_decoder.decode(line)
            _check_case(case)
        except msgspec.ValidationError as exc:
            raise EvalSetError(f"{path}:{number}: {describe_validation_error(exc)}") from None
        except msgspec.DecodeError as exc:
            raise EvalSetError(f"{path}:{number}: not a JSON object: {exc}") from None
        except ValueError as exc:
            raise EvalSetError(f"{path}:{number}: {exc}") from None
        if case.name in seen:
            raise EvalSetError(f"{path}:{number}: a second case named {case.name!r}")
        seen.add(case.name)
        cases.append(case)
    if not cases:
        raise EvalSetError(f"{path}: no cases")
    return cases


# ---------------------------------------------------------------- running it


def _problem(expect: Expect, answer: str) -> str | None:
    """How ANSWER breaks EXPECT, or None; a `judge_min` is checked against the judge's verdict instead."""
    if expect.contains is not None:
        return None if expect.contains in answer else f"does not contain {expect.contains!r}"
    if expect.not_contains is not None:
        return f"contains {expect.not_contains!r}" if expect.not_contains in answer else None
    if expect.regex is not None:
        return None if re.search(expect.regex, answer) else f"does not match /{expect.regex}/"
    if expect.json_shape is not None:
        problem = output_problem(answer, OutputSpec(format="json", schema=expect.json_shape))
        return None if problem is None else f"json_shape: {problem}"
    return None


def _error(reply: dict[str, Any]) -> str:
    error = reply.get("error") or {}
    return f"{error.get('code', 'error')}: {error.get('message', '')}"


async def _judge(complete: Complete, case: Case, answer: str) -> tuple[Scores | None, str]:
    """The judge's scores for a case's answer, or None and why. The question is the case's `question` variable,
    else all its variables as `name: value` lines."""
    question = case.vars.get("question")
    asked = str(question) if question is not None else "\n".join(f"{k}: {v}" for k, v in case.vars.items())
    reply = await complete(judge_request(rubric_vars(asked, answer)))
    if not reply.get("ok"):
        return None, f"judge failed: {_error(reply)}"
    scores = parse_scores(str(reply.get("text") or ""))
    return scores, "" if scores is not None else "judge verdict could not be read"


async def _run_case(complete: Complete, prompt: str, version: int, case: Case) -> CaseResult:
    frame: dict[str, Any] = {"op": "complete", "prompt": prompt, "version": version, "vars": dict(case.vars),
                             "cache": "bypass", "feature": EVAL_FEATURE}  # fmt: skip
    if case.user is not None:
        frame["user"] = case.user
    reply = await complete(frame)
    if not reply.get("ok"):
        if (reply.get("error") or {}).get("code") == "prompt_not_found":
            raise NoSuchVersion(_error(reply))
        return CaseResult(case.name, False, [_error(reply)], "", None)
    answer = str(reply.get("text") or "")
    failures = [problem for expect in case.expect if (problem := _problem(expect, answer)) is not None]
    minimums = [expect.judge_min for expect in case.expect if expect.judge_min is not None]
    scores = None
    if minimums:
        scores, why = await _judge(complete, case, answer)
        if scores is None:
            failures.append(why)
        elif scores.overall < max(minimums):
            failures.append(f"judge overall {scores.overall:.2f} < {max(minimums):g}")
    return CaseResult(case.name, not failures, failures, " ".join(answer.split())[:EXCERPT_CHARS], scores)


async def run_eval(complete: Complete, prompt: str, version: int, cases: list[Case], *, concurrency: int = 4) -> Report:
    """Run every case against PROMPT vVERSION through `complete` (sends a frame, returns the reply frame)."""
    results: list[CaseResult | None] = [None] * len(cases)
    limiter = trio.CapacityLimiter(concurrency)

    async def run(index: int, case: Case) -> None:
        async with limiter:
            results[index] = await _run_case(complete, prompt, version, case)

    try:
        async with trio.open_nursery() as nursery:
            for index, case in enumerate(cases):
                nursery.start_soon(run, index, case)
    except* NoSuchVersion as group:
        raise group.exceptions[0] from None  # the other cases are cancelled: one is enough to know
    done = [result for result in results if result is not None]
    judged = [result.judge.overall for result in done if result.judge is not None]
    return Report(
        prompt=prompt,
        version=version,
        results=done,
        pass_rate=sum(result.passed for result in done) / len(done) if done else 0.0,
        mean_judge=sum(judged) / len(judged) if judged else None,
    )


def compare(candidate: Report, baseline: Report, *, tolerance: float = 0.0) -> tuple[bool, list[str]]:
    """(regressed?, the reasons) for a candidate report against the baseline's."""
    reasons = []
    if candidate.pass_rate < baseline.pass_rate - tolerance:
        reasons.append(f"pass rate {candidate.pass_rate:.0%} is below the baseline's {baseline.pass_rate:.0%}")
    before = {result.name: result for result in baseline.results}
    for result in candidate.results:
        old = before.get(result.name)
        if old is not None and old.passed and not result.passed:
            reasons.append(f"case {result.name} passed on v{baseline.version} but fails on v{candidate.version}")
    judged, judged_before = candidate.mean_judge, baseline.mean_judge
    if judged is not None and judged_before is not None and judged < judged_before - tolerance:
        reasons.append(f"mean judge score {judged:.2f} is below the baseline's {judged_before:.2f}")
    return bool(reasons), reasons


# ---------------------------------------------------------------- the command


class _Daemon:
    """The daemon's app socket, through `sidecard_client`. A broken or silent daemon never raises into the eval:
    the request gets an error reply and `lost` says why, so the command can exit 3."""

    def __init__(self, client: AsyncClient) -> None:
        self._client = client
        self.lost: str | None = None

    async def request(self, frame: dict[str, Any]) -> dict[str, Any]:
        if self.lost is None:
            try:
                return await self._client.request(frame, timeout=REPLY_TIMEOUT_S)
            except Timeout:
                self.lost = f"the daemon did not answer within {REPLY_TIMEOUT_S:g} s"
            except ConnectionLost as exc:
                self.lost = exc.message
            except SidecardError as err:
                return err.frame or {"ok": False, "error": {"code": err.code, "message": err.message}}
        return {"ok": False, "error": {"code": "connection_lost", "message": self.lost}}


async def _evaluate(
    socket_path: str, prompt: str, versions: list[int], cases: list[Case], concurrency: int
) -> tuple[list[Report], Unreachable | NoSuchVersion | None]:
    """A report per version, and why the daemon could not be used or the version run (None if it could)."""
    async with AsyncClient(socket_path) as client:
        daemon = _Daemon(client)
        try:
            reports = [await run_eval(daemon.request, prompt, v, cases, concurrency=concurrency) for v in versions]
        except NoSuchVersion as missing:
            return [], missing
    return reports, None if daemon.lost is None else Unreachable(daemon.lost)


def stable_version(admin_socket: str, prompt: str) -> int:
    """The prompt's current stable version, from the daemon's status (runtime overrides included)."""
    try:
        reply = AdminClient(admin_socket).call("status")
    except SidecardError as exc:
        if exc.frame is None:  # no reply at all
            raise Unreachable(exc.message) from None
        raise ConnectionError(f"the daemon refused status: {_error(exc.frame)}") from None
    entry = (reply.get("result") or {}).get("prompts", {}).get(prompt)
    if entry is None:
        raise LookupError(f"the daemon has no prompt {prompt!r}")
    stable = entry.get("stable") if isinstance(entry, dict) else None
    if not isinstance(stable, int):
        raise LookupError(f"the daemon has no stable version of prompt {prompt!r} (give --baseline-version)")
    return stable


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sidecard eval",
        description="Run an eval set against a prompt version and compare it with a baseline version.",
    )
    parser.add_argument("prompt")
    parser.add_argument("--version", type=int, required=True, help="the candidate version")
    parser.add_argument("--set", required=True, metavar="FILE", help="the eval set (JSON Lines)")
    parser.add_argument("--baseline-version", type=int, metavar="M",
                        help="compare with this version (default: the prompt's current stable version)")
    parser.add_argument("--socket", metavar="PATH", help="app socket (default: $SIDECARD_SOCKET or the default)")
    parser.add_argument("--admin-socket", metavar="PATH",
                        help="admin socket, asked for the stable version (default: $SIDECARD_ADMIN_SOCKET, "
                        "else admin.sock beside the app socket)")
    parser.add_argument("--tolerance", type=float, default=0.0, help="allowed drop in pass rate and mean judge score")
    parser.add_argument("--concurrency", type=int, default=4, help="cases in flight at once")
    parser.add_argument("--json", action="store_true", help="print the reports as JSON")
    return parser


def _cell(result: CaseResult | None) -> tuple[str, str]:
    if result is None:
        return "-", "-"
    return ("pass" if result.passed else "FAIL"), (f"{result.judge.overall:.2f}" if result.judge else "-")


def _mean(report: Report) -> str:
    return f"{report.mean_judge:.2f}" if report.mean_judge is not None else "-"


def render(candidate: Report, baseline: Report, regressed: bool, reasons: list[str]) -> str:
    c, b = f"v{candidate.version}", f"v{baseline.version}"
    rows = [["case", c, b, f"judge {c}", f"judge {b}"]]
    before = {result.name: result for result in baseline.results}
    for result in candidate.results:
        (now, judged), (then, judged_then) = _cell(result), _cell(before.get(result.name))
        rows.append([result.name, now, then, judged, judged_then])
    rates = [f"{candidate.pass_rate:.0%}", f"{baseline.pass_rate:.0%}"]
    rows.append(["pass rate / mean judge", *rates, _mean(candidate), _mean(baseline)])
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [f"{candidate.prompt}: {c} (candidate) against {b} (baseline)"]
    lines += ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows]
    for result in candidate.results:
        if result.failures:
            lines.append(f"{result.name} ({c}): " + "; ".join(result.failures))
    lines.append("REGRESSED" if regressed else "no regression")
    lines += [f"  - {reason}" for reason in reasons]
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    try:
        args = _parser().parse_args(argv)
    except SystemExit as exc:  # argparse has printed the usage or the help
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE

    def fail(message: str, status: int = EXIT_USAGE) -> int:
        print(f"sidecard eval: {message}", file=sys.stderr)
        return status

    if args.concurrency < 1 or args.tolerance < 0:
        return fail("--concurrency must be at least 1 and --tolerance not negative")
    try:
        cases = load_cases(args.set)
    except EvalSetError as exc:
        return fail(str(exc))
    socket_path = args.socket or default_socket_path()
    baseline_version = args.baseline_version
    if baseline_version is None:
        admin = args.admin_socket or os.environ.get("SIDECARD_ADMIN_SOCKET") or os.path.join(
            os.path.dirname(socket_path), "admin.sock"
        )
        try:
            baseline_version = stable_version(admin, args.prompt)
        except Unreachable as exc:
            return fail(str(exc), EXIT_UNREACHABLE)
        except (LookupError, ConnectionError) as exc:
            return fail(str(exc))
    versions = [args.version] if baseline_version == args.version else [args.version, baseline_version]
    reports, problem = trio.run(_evaluate, socket_path, args.prompt, versions, cases, args.concurrency)
    if problem is not None:
        return fail(str(problem), EXIT_UNREACHABLE if isinstance(problem, Unreachable) else EXIT_USAGE)
    candidate, baseline = reports[0], reports[-1]
    regressed, reasons = compare(candidate, baseline, tolerance=args.tolerance)
    if args.json:
        document = {"candidate": candidate, "baseline": baseline, "regressed": regressed, "reasons": reasons}
        print(msgspec.json.encode(document).decode())
    else:
        print(render(candidate, baseline, regressed, reasons))
    return EXIT_REGRESSED if regressed else EXIT_OK
