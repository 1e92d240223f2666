"""The eval-set gate without a daemon: loading, each expectation, the judge, compare(), the command's errors."""

import pytest
import trio

from sidecard.evaltool import (
    Case,
    CaseResult,
    EvalSetError,
    Expect,
    Report,
    compare,
    load_cases,
    main,
    run_eval,
)  # fmt: skip
from sidecard.quality.judge import Scores

VERDICT = '{"relevance": 0.9, "accuracy": 0.8, "format": 1.0, "overall": 0.9, "reason": "good"}'


def write(tmp_path, *lines):
    path = tmp_path / "set.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def test_load_cases(tmp_path):
    path = write(tmp_path,
        '{"name": "a", "vars": {"question": "q", "n": 3}, "expect": [{"contains": "x"}, {"judge_min": 0.5}]}',
        "",
        '{"name": "b", "user": "u-1", "expect": [{"json_shape": {"type": "object", "required": ["k"]}}]}',
    )  # fmt: skip
    a, b = load_cases(path)
    assert a == Case("a", {"question": "q", "n": 3}, [Expect(contains="x"), Expect(judge_min=0.5)])
    assert b.user == "u-1" and b.vars == {} and b.expect[0].json_shape == {"type": "object", "required": ["k"]}


@pytest.mark.parametrize("line, error", [
    ('{"name": "a", "expect": [{"contains": "x"}', ":2: not a JSON object"),
    ('["a"]', ":2: expected object, got array"),
    ('{"expect": []}', ":2: name: required key is missing"),
    ('{"name": ""}', ":2: name: expected str of length >= 1"),
    ('{"name": "b", "colour": "red"}', ":2: colour: unknown key"),
    ('{"name": "b", "expect": [{"contains": "x", "regex": "y"}]}', ":2: expect[0]: needs exactly one of contains,"),
    ('{"name": "b", "expect": [{}]}', ":2: expect[0]: needs exactly one of"),
    ('{"name": "b", "expect": [{"contain": "x"}]}', ":2: expect[0].contain: unknown key"),
    ('{"name": "b", "expect": [{"regex": "(unclosed"}]}', ":2: expect[0].regex: missing ), unterminated subpattern"),
    ('{"name": "b", "expect": [{"json_shape": {"type": "thing"}}]}', ":2: expect[0].json_shape.type: unknown type"),
    ('{"name": "b", "expect": [{"judge_min": 7}]}', ":2: expect[0].judge_min: expected float <= 1.0"),
    ('{"name": "b", "vars": {"q": [1]}}', ":2: vars[...]: expected bool | int | float | str, got array"),
    ('{"name": "a"}', ":2: a second case named 'a'"),
])  # fmt: skip
def test_load_errors_name_the_line(tmp_path, line, error):
    path = write(tmp_path, '{"name": "a"}', line)
    with pytest.raises(EvalSetError) as caught:
        load_cases(path)
    assert str(caught.value).startswith(path) and error in str(caught.value)


def test_load_errors_for_the_file(tmp_path):
    with pytest.raises(EvalSetError, match="no cases"):
        load_cases(write(tmp_path, "", "  "))
    with pytest.raises(EvalSetError, match="No such file"):
        load_cases(str(tmp_path / "missing.jsonl"))


class FakeDaemon:
    """Answers `complete` frames: the prompt's answer from `answers[(version, question)]`, the judge's verdict
    from `verdict`; records the frames and the most requests in flight at once."""

    def __init__(self, answers, verdict=VERDICT):
        self.answers = answers
        self.verdict = verdict
        self.frames = []
        self.in_flight = self.most_in_flight = 0

    async def complete(self, frame):
        self.frames.append(frame)
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        await trio.sleep(1)
        self.in_flight -= 1
        if frame["prompt"] == "quality-judge":
            if isinstance(self.verdict, dict):
                return self.verdict
            return {"ok": True, "text": self.verdict}
        answer = self.answers[(frame["version"], frame["vars"].get("question"))]
        if isinstance(answer, dict):
            return answer
        return {"ok": True, "text": answer, "prompt": frame["prompt"], "prompt_version": frame["version"]}


def case(name, question, *expect, **fields):
    return Case(name, {"question": question, **fields.pop("vars", {})}, [Expect(**e) for e in expect], **fields)


async def test_each_expectation_kind(autojump_clock):
    daemon = FakeDaemon({
        (1, "plain"): "Open Settings, then choose Reset password.",
        (1, "json"): '```json\n{"category": "billing", "urgency": "low"}\n```',
        (1, "bad json"): '{"category": 7}',
    })  # fmt: skip
    shape = {"type": "object", "required": ["category"], "properties": {"category": {"type": "string"}}}
    cases = [
        case("contains", "plain", {"contains": "Settings"}, {"not_contains": "sorry"}, {"regex": r"(?i)reset\s+pass"}),
        case("misses", "plain", {"contains": "settings"}, {"not_contains": "Open"}, {"regex": "^Close"}),
        case("shape", "json", {"json_shape": shape}),
        case("bad shape", "bad json", {"json_shape": shape}),
        case("not json", "plain", {"json_shape": shape}),
    ]  # fmt: skip
    report = await run_eval(daemon.complete, "p", 1, cases)
    assert [(r.name, r.passed) for r in report.results] == [
        ("contains", True), ("misses", False), ("shape", True), ("bad shape", False), ("not json", False)
    ]  # fmt: skip
    assert report.results[1].failures == [
        "does not contain 'settings'", "contains 'Open'", "does not match /^Close/"
    ]  # fmt: skip
    assert report.results[3].failures == ["json_shape: $.category: expected string"]
    assert report.results[4].failures == ["json_shape: the answer is not valid JSON"]
    first = report.results[0]
    assert first.answer_excerpt == "Open Settings, then choose Reset password." and first.judge is None
    assert report.pass_rate == 0.4 and report.mean_judge is None
    sent = {"op": "complete", "prompt": "p", "version": 1, "vars": {"question": "plain"}, "cache": "bypass",
            "feature": "eval"}  # fmt: skip
    assert sent in daemon.frames


async def test_judge_expectations(autojump_clock):
    daemon = FakeDaemon({(2, "q"): "An answer.", (2, "other"): "Another.", (2, None): "Third."})
    cases = [
        case("judged", "q", {"judge_min": 0.5}, {"judge_min": 0.85}, user="u-9"),  # the judge is asked once
        case("too strict", "other", {"judge_min": 0.95}),
        Case("no question", {"topic": "billing", "tone": "warm"}, [Expect(judge_min=0.1)]),
    ]
    report = await run_eval(daemon.complete, "p", 2, cases)
    judged, strict, other = report.results
    assert judged.passed and judged.judge == Scores(0.9, 0.8, 1.0, 0.9, "good")
    assert strict.failures == ["judge overall 0.90 < 0.95"] and other.passed
    assert report.mean_judge == pytest.approx(0.9) and report.pass_rate == pytest.approx(2 / 3)
    judge_frames = [f for f in daemon.frames if f["prompt"] == "quality-judge"]
    assert len(judge_frames) == 3
    assert all(f["cache"] == "bypass" and f["feature"] == "quality-judge" and "version" not in f for f in judge_frames)
    first = next(f for f in judge_frames if f["vars"]["answer"] == "An answer.")
    assert first["vars"] == {"question": "q", "answer": "An answer.", "context": ""}
    third = next(f for f in judge_frames if f["vars"]["answer"] == "Third.")
    assert third["vars"]["question"] == "topic: billing\ntone: warm"
    assert next(f for f in daemon.frames if f["prompt"] == "p" and f["vars"].get("question") == "q")["user"] == "u-9"


async def test_judge_and_answer_errors_fail_the_case(autojump_clock):
    error = {"ok": False, "error": {"code": "upstream_unavailable", "message": "every target failed"}}
    cases = [case("judged", "q", {"judge_min": 0.5}), case("broken", "down", {"contains": "x"})]
    for verdict, why in ((error, "judge failed: upstream_unavailable: every target failed"),
                         ("Quite good, 8/10", "judge verdict could not be read")):  # fmt: skip
        daemon = FakeDaemon({(1, "q"): "An answer.", (1, "down"): error}, verdict=verdict)
        report = await run_eval(daemon.complete, "p", 1, cases)
        assert report.results[0].failures == [why] and report.results[0].judge is None
        assert report.results[1] == CaseResult("broken", False, ["upstream_unavailable: every target failed"], "", None)
        assert report.pass_rate == 0.0 and report.mean_judge is None


async def test_concurrency_is_bounded_and_order_kept(autojump_clock):
    daemon = FakeDaemon({(1, str(i)): f"answer {i}" for i in range(10)})
    cases = [case(f"c{i}", str(i), {"contains": "answer"}) for i in range(10)]
    start = trio.current_time()
    report = await run_eval(daemon.complete, "p", 1, cases, concurrency=3)
    assert daemon.most_in_flight == 3 and trio.current_time() - start == pytest.approx(4.0)  # ceil(10 / 3) rounds
    assert [r.name for r in report.results] == [f"c{i}" for i in range(10)] and report.pass_rate == 1.0


def result(name, passed):
    return CaseResult(name, passed, [] if passed else ["does not contain 'x'"], "", None)


def report(version, outcomes, mean_judge=None):
    results = [result(name, ok) for name, ok in outcomes.items()]
    return Report("p", version, results, sum(outcomes.values()) / len(outcomes), mean_judge)


def test_compare():
    base = report(1, {"a": True, "b": True, "c": False, "d": True}, 0.9)
    assert compare(base, base) == (False, [])
    better = report(2, {"a": True, "b": True, "c": True, "d": True}, 0.92)
    assert compare(better, base) == (False, [])
    worse = report(2, {"a": True, "b": False, "c": True, "d": True}, 0.9)  # same pass rate, but b broke
    assert compare(worse, base) == (True, ["case b passed on v1 but fails on v2"])
    lower = report(2, {"a": True, "b": True, "c": False, "d": True}, 0.84)
    assert compare(lower, base) == (True, ["mean judge score 0.84 is below the baseline's 0.90"])
    assert compare(lower, base, tolerance=0.1) == (False, [])
    dropped = report(2, {"a": False, "b": True, "c": False, "d": True}, 0.9)
    regressed, reasons = compare(dropped, base, tolerance=0.1)
    assert regressed and reasons == [
        "pass rate 50% is below the baseline's 75%", "case a passed on v1 but fails on v2"
    ]  # fmt: skip
    unjudged = report(2, {"a": True, "b": True, "c": False, "d": True})
    assert compare(unjudged, base) == (False, [])


def test_main_usage_and_connection_errors(tmp_path, capsys):
    path = write(tmp_path, '{"name": "a", "expect": [{"contains": "x"}]}')
    assert main(["support-reply", "--set", path]) == 2  # --version missing
    assert main(["--help"]) == 0
    assert main(["support-reply", "--version", "2", "--set", str(tmp_path / "nope.jsonl")]) == 2
    assert "nope.jsonl" in capsys.readouterr().err
    assert main(["support-reply", "--version", "2", "--set", path, "--concurrency", "0"]) == 2
    # No daemon: 3, as `sidecard call` and `sidecardctl` say it (it was 2, bad usage, which a script cannot tell apart).
    no_daemon = ["support-reply", "--version", "2", "--set", path, "--socket", str(tmp_path / "app.sock")]
    assert main(no_daemon) == 3
    assert "admin.sock" in capsys.readouterr().err  # asked beside the app socket for the stable version
    assert main([*no_daemon, "--baseline-version", "1"]) == 3
    assert "cannot connect to" in capsys.readouterr().err
