"""The model as judge: the rubric's variables for an answer, and reading the judge's verdict.

The rubric is the versioned prompt `quality-judge`: built in (`judge_rubric.toml`, its v1), and replaced by an
operator's own `prompts/quality-judge/`, which is reviewed, canaried and rolled back like any other prompt.
Its answer is parsed leniently (models wrap JSON in fences and chatter, or score out of 10), but a
verdict that cannot be read is a judge error, never a score.
"""

from __future__ import annotations

import json
import math
import re
from importlib import resources
from typing import Any, Final

import msgspec

from .checks import Sample

JUDGE_PROMPT: Final = "quality-judge"
# v1 of the judge prompt, served while the prompt directory has no `quality-judge` of its own; copy the file to
# prompts/quality-judge/v1.toml to start an operator's own rubric.
BUILTIN_RUBRIC: Final = (resources.files(__package__) / "judge_rubric.toml").read_text(encoding="utf-8")
SCORE_NAMES: Final = ("relevance", "accuracy", "format", "overall")
MAX_REASON_CHARS: Final = 500
MAX_OBJECT_TRIES: Final = 32  # `{` positions tried before giving up on a text


class Scores(msgspec.Struct):
    relevance: float
    accuracy: float
    format: float
    overall: float
    reason: str = ""


# ---------------------------------------------------------------- the rubric's variables

# An answer that contains `</answer>` must not close its own tag and talk to the judge from outside it.
_TAG: Final = re.compile(r"<(/?\s*(?:question|answer|context)\s*>)", re.IGNORECASE)


def trim(text: str, limit: int) -> str:
    """TEXT cut to about LIMIT characters: its first two thirds and last third, the cut marked; the ask is often
    at the end of a question, and an answer's conclusion at its end."""
    if len(text) <= limit:
        return text
    head = limit * 2 // 3
    tail = limit - head
    return f"{text[:head]}\n[... {len(text) - limit} characters omitted ...]\n{text[len(text) - tail:]}"


def _quoted(text: str, limit: int) -> str:
    return _TAG.sub(r"&lt;\1", trim(text, limit))


def rubric_vars(question: str, answer: str, context: str = "", *, max_chars: int = 8000) -> dict[str, str]:
    """The rubric's variables: question and answer trimmed to `max_chars` each, context to half that, and any
    rubric tag inside them escaped."""
    return {
        "question": _quoted(question, max_chars),
        "answer": _quoted(answer, max_chars),
        "context": _quoted(context, max_chars // 2),
    }


def judge_vars(sample: Sample, *, max_chars: int = 8000) -> dict[str, str]:
    """The rubric's variables for a live answer; the system prompt is the context it was meant to follow."""
    return rubric_vars(sample.question, sample.answer, sample.system or "", max_chars=max_chars)


def judged(sample: Sample) -> dict[str, str | int]:
    """What a judge call judged, for its `request` log line (which names the judge's own prompt and version)."""
    about: dict[str, str | int] = {"judged_feature": sample.feature, "judged_model": sample.model}
    if sample.prompt is not None:
        about["judged_prompt"] = sample.prompt
    if sample.version is not None:
        about["judged_version"] = sample.version
    return about


def judge_request(variables: dict[str, str]) -> dict[str, Any]:
    """A `complete` frame asking the judge (its stable version) for a verdict; never served from the cache, and
    labelled as its own feature so its cost is counted apart and the monitor can leave it out."""
    return {"op": "complete", "prompt": JUDGE_PROMPT, "vars": variables, "cache": "bypass", "feature": JUDGE_PROMPT}


# ---------------------------------------------------------------- reading the verdict

_decoder: Final = json.JSONDecoder()


def _first_object(text: str) -> dict[str, Any] | None:
    start = text.find("{")
    for _ in range(MAX_OBJECT_TRIES):
        if start < 0:
            return None
        try:
            value, _end = _decoder.raw_decode(text, start)
        except ValueError:
            value = None
        if isinstance(value, dict):
            return value
        start = text.find("{", start + 1)
    return None


def _number(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            return None
    if isinstance(value, (int, float)) and math.isfinite(value):
        return float(value)
    return None


def parse_scores(text: str) -> Scores | None:
    """The scores in the first JSON object of TEXT, or None when there are none to read.

    Fenced or not, with chatter around it; keys in any case, also nested under "scores"; numbers or numeric
    strings. relevance, accuracy and format are required; a missing overall is their mean. Scores on a 0-10
    scale (any above 1, none above 10) are divided by 10; a score above 10 is of no known scale, so the
    verdict is unreadable. Negative scores count as 0.
    """
    found = _first_object(text)
    if found is None:
        return None
    fields = {k.lower(): v for k, v in found.items() if isinstance(k, str)}
    nested = fields.get("scores")
    if isinstance(nested, dict):
        fields = {**fields, **{k.lower(): v for k, v in nested.items() if isinstance(k, str)}}
    names = SCORE_NAMES if "overall" in fields else SCORE_NAMES[:3]
    values = [v for v in (_number(fields.get(name)) for name in names) if v is not None]
    if len(values) < len(names) or max(values) > 10:
        return None
    scale = 10.0 if max(values) > 1 else 1.0
    scores = [min(1.0, max(0.0, v / scale)) for v in values]
    relevance, accuracy, form = scores[:3]
    overall = scores[3] if len(scores) == 4 else (relevance + accuracy + form) / 3
    reason = fields.get("reason")
    return Scores(relevance, accuracy, form, overall, reason[:MAX_REASON_CHARS] if isinstance(reason, str) else "")


def first_score(text: str, keys: tuple[str, ...]) -> float | None:
    """The first of `keys` (any case) that holds a number in the first JSON object of TEXT, on a 0-1 scale (a
    score above 1 and at most 10 is divided by 10); None when there is none, or it is of no known scale. For
    judges asked for one score (the guardrails' policy judge)."""
    found = _first_object(text)
    if found is None:
        return None
    fields = {k.lower(): v for k, v in found.items() if isinstance(k, str)}
    value = next((v for v in (_number(fields.get(key)) for key in keys) if v is not None), None)
    if value is None or value > 10:
        return None
    return min(1.0, max(0.0, value / 10 if value > 1 else value))
