"""The judge: the rubric prompt file, its variables, and reading verdicts leniently but never guessing."""

import pytest

from sidecard.prompts.files import parse_version
from sidecard.prompts.output import output_problem
from sidecard.quality.checks import Sample
from sidecard.quality.judge import BUILTIN_RUBRIC, JUDGE_PROMPT, Scores, judge_request, judge_vars, parse_scores, rubric_vars, trim
from sidecard.sim.replies import judge as sim_judge


def test_the_rubric_is_a_valid_versioned_prompt_the_simulator_judges():
    version = parse_version(JUDGE_PROMPT, 1, BUILTIN_RUBRIC.encode())
    assert version.temperature == 0 and version.max_tokens == 300 and version.output.format == "json"
    system, messages = version.render({"question": "How do I reset my password?", "answer": "Open Settings."})
    assert system is not None and "[[sim:judge]]" in system and "ONLY a JSON object" in system
    assert '{"relevance": 0.9' in system  # literal braces survived the template
    [message] = messages
    assert message.role == "user" and "<context>\n\n</context>" in message.content  # context defaults to ""
    verdict = sim_judge(message.content)
    assert output_problem(verdict, version.output) is None  # the simulator's verdict fits the schema
    assert parse_scores(verdict) is not None
    assert output_problem('{"relevance": 1, "accuracy": 1, "format": "good", "overall": 1}', version.output)


def test_judge_vars_trim_and_escape():
    sample = Sample(feature="f", model="m", prompt=None, version=None, canary=False, question="Q? </question> x",
                    system=None, answer="A " * 10_000, stop_reason="end_turn", output_problem=None)  # fmt: skip
    variables = judge_vars(sample, max_chars=300)
    assert variables["question"] == "Q? &lt;/question> x" and variables["context"] == ""
    # two thirds from the head, one third from the tail
    assert variables["answer"] == "A " * 100 + "\n[... 19700 characters omitted ...]\n" + "A " * 50
    assert trim("abcdef", 6) == "abcdef"
    assert trim("abcdefghij", 6) == "abcd\n[... 4 characters omitted ...]\nij"
    assert rubric_vars("q", "a", "ctx <answer>")["context"] == "ctx &lt;answer>"
    assert judge_request({"question": "q"}) == {
        "op": "complete", "prompt": "quality-judge", "vars": {"question": "q"}, "cache": "bypass",
        "feature": "quality-judge",
    }  # fmt: skip


def test_parse_plain_fenced_and_chatty():
    plain = '{"relevance": 0.9, "accuracy": 0.8, "format": 1, "overall": 0.85, "reason": "fine"}'
    assert parse_scores(plain) == Scores(0.9, 0.8, 1.0, 0.85, "fine")
    assert parse_scores(f"```json\n{plain}\n```") == Scores(0.9, 0.8, 1.0, 0.85, "fine")
    chatty = f"Sure! Here is my verdict {{not json}} then:\n{plain}\nHope that helps {{}}."
    assert parse_scores(chatty) == Scores(0.9, 0.8, 1.0, 0.85, "fine")
    nested = '{"scores": {"Relevance": "0.5", "Accuracy": " 1 ", "Format": 0}, "reason": 7}'
    assert parse_scores(nested) == Scores(0.5, 1.0, 0.0, 0.5, "")


def test_scales_missing_overall_and_clamping():
    assert parse_scores('{"relevance": 8, "accuracy": 6, "format": 10, "overall": 7}') == Scores(0.8, 0.6, 1.0, 0.7)
    assert parse_scores('{"relevance": 1, "accuracy": 0.5, "format": 9}') == Scores(0.1, 0.05, 0.9, pytest.approx(0.35))
    assert parse_scores('{"relevance": 0.3, "accuracy": 0.6, "format": 0.9}').overall == pytest.approx(0.6)
    assert parse_scores('{"relevance": -0.2, "accuracy": 1, "format": 1, "overall": 1}') == Scores(0.0, 1.0, 1.0, 1.0)
    assert parse_scores('{"relevance": 90, "accuracy": 80, "format": 100, "overall": 85}') is None  # unknown scale
    long = parse_scores('{"relevance": 1, "accuracy": 1, "format": 1, "reason": "' + "x" * 900 + '"}')
    assert long is not None and len(long.reason) == 500


@pytest.mark.parametrize("text", [
    "",
    "The answer is good. 9/10.",
    "Overall I would say the answer is decent, relevance high-ish {score: good",  # the sim's garbage verdict
    "[0.9, 0.8, 1.0]",
    '{"relevance": 0.9, "accuracy": 0.8}',  # format missing
    '{"relevance": "high", "accuracy": 0.8, "format": 1}',
    '{"relevance": true, "accuracy": 0.8, "format": 1}',
    '{"relevance": NaN, "accuracy": 0.8, "format": 1}',
    '{"relevance": 0.9, "accuracy": 0.8, "format": 1, "overall": null}',
    "{" * 10_000,
])  # fmt: skip
def test_unreadable_verdicts_are_none(text):
    assert parse_scores(text) is None
