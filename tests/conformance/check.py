"""Load the conformance cases and check an observed reply against a case's `expect` (see README.md).

Python runners (tests/e2e/test_conformance.py) use this; clients/node/test/conformance.mjs is the same logic in
JavaScript. Keep the two in step with README.md.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Iterable

CASES_DIR = Path(__file__).parent / "cases"
STREAM_EVENTS = ("start", "block", "delta")  # frames before a stream's terminal frame

_TYPES = {
    "string": lambda v: isinstance(v, str),
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    "boolean": lambda v: isinstance(v, bool),
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list),
    "null": lambda v: v is None,
}
_MISSING = object()


def load_cases(directory: Path = CASES_DIR) -> list[dict[str, Any]]:
    cases = []
    for path in sorted(directory.glob("*.json")):
        case = json.loads(path.read_text())
        if case.get("name") != path.stem:
            raise ValueError(f"{path}: `name` must be the file's name without .json")
        cases.append(case)
    return cases


def steps(case: dict[str, Any]) -> list[dict[str, Any]]:
    """A case's steps: `steps`, or the case itself as its one step."""
    return case["steps"] if "steps" in case else [case]


def expand(value: Any) -> Any:
    """A request with every `{"$repeat": S, "times": N}` replaced by S repeated N times."""
    if isinstance(value, dict):
        if "$repeat" in value:
            return value["$repeat"] * value["times"]
        return {k: expand(v) for k, v in value.items()}
    if isinstance(value, list):
        return [expand(v) for v in value]
    return value


def raw_bytes(step: dict[str, Any]) -> bytes:
    return step["raw"].encode()


def lookup(frame: Any, path: str) -> Any:
    """`served_by.model`, `content.1.type`: object keys and array indices, dot-separated."""
    value = frame
    for part in path.split("."):
        if isinstance(value, dict) and part in value:
            value = value[part]
        elif isinstance(value, list) and part.isdigit() and int(part) < len(value):
            value = value[int(part)]
        else:
            return _MISSING
    return value


def events_match(pattern: list[str], kinds: list[str]) -> bool:
    """`["start", "block", "delta+", "done"]`: `+` one or more, `*` zero or more."""
    regex = ""
    for item in pattern:
        name, quantifier = (item[:-1], item[-1]) if item[-1] in "+*" else (item, "")
        regex += f"(?:{re.escape(name)},){quantifier}"
    return re.fullmatch(regex, "".join(f"{k}," for k in kinds)) is not None


def joined_text(events: Iterable[dict[str, Any]]) -> str:
    return "".join(e.get("text", "") for e in events if e.get("event") == "delta" and e.get("type") == "text")


def check(
    expect: dict[str, Any],
    frame: dict[str, Any],
    *,
    events: list[dict[str, Any]] | None = None,
    sent_id: Any = _MISSING,
    client_error: str | None = None,
    client: bool = False,
) -> None:
    """Assert that `frame` (the reply, a stream's terminal frame, or for a client the error it raised, as
    `{"ok": false, "error": {...}, "partial"?, "text"?}`) meets `expect`.

    `events`: a stream's frames before the terminal one. `sent_id`: socket runners pass the id they sent (every
    reply and event must carry it, unless `expect.id` says otherwise). `client_error`: a client runner passes
    the name of the exception class the client raised (None when it raised nothing).
    """
    problems: list[str] = []
    if frame.get("ok") is not expect["ok"]:
        problems.append(f"ok: expected {expect['ok']}, got {frame.get('ok')!r}")
    if not client:
        want_id = expect["id"] if "id" in expect else sent_id
        if want_id is not _MISSING:
            for f in [*(events or []), frame]:
                if f.get("id", _MISSING) != want_id or type(f.get("id")) is not type(want_id):
                    problems.append(f"id: expected {want_id!r}, got {f.get('id', '<missing>')!r} in {_short(f)}")
                    break
    if "error" in expect:
        error = frame.get("error")
        if not isinstance(error, dict):
            problems.append(f"error: expected an error object, got {error!r}")
        else:
            for key in ("code", "retryable", "retry_after_ms"):
                if key in expect["error"] and error.get(key, _MISSING) != expect["error"][key]:
                    problems.append(f"error.{key}: expected {expect['error'][key]!r}, got {error.get(key, '<missing>')!r}")
            if not isinstance(error.get("message"), str):
                problems.append(f"error.message: expected a string, got {error.get('message')!r}")
            elif expect["error"].get("message_contains", "") not in error["message"]:
                problems.append(f"error.message: {error['message']!r} does not contain {expect['error']['message_contains']!r}")
    elif expect["ok"] is False:
        problems.append("a case with ok false must say which error")
    for path, kinds in expect.get("types", {}).items():
        value = lookup(frame, path)
        if value is _MISSING:
            problems.append(f"{path}: missing (expected {kinds})")
        elif not any(_TYPES[k](value) for k in kinds.split("|")):
            problems.append(f"{path}: expected {kinds}, got {value!r}")
    for path, want in expect.get("values", {}).items():
        value = lookup(frame, path)
        if value is _MISSING or not _same(value, want):
            problems.append(f"{path}: expected {want!r}, got {'<missing>' if value is _MISSING else repr(value)}")
    stream = expect.get("stream")
    if stream is not None:
        seen = list(events or [])
        kinds = [e.get("event") for e in seen]
        if frame.get("event") is not None:
            kinds.append(frame["event"])
        if not events_match(stream["events"], kinds):
            problems.append(f"stream events: expected {stream['events']}, got {kinds}")
        if stream.get("joined") and joined_text(seen) != frame.get("text"):
            problems.append(f"stream text: deltas join to {joined_text(seen)!r}, the terminal frame says {frame.get('text')!r}")
    if client and "client_error" in expect and client_error != expect["client_error"]:
        problems.append(f"client error: expected {expect['client_error']}, got {client_error}")
    if client and expect["ok"] and client_error is not None:
        problems.append(f"client raised {client_error} for a successful reply")
    assert not problems, "\n".join(problems) + f"\nframe: {_short(frame)}"


def _same(a: Any, b: Any) -> bool:
    """JSON equality (true is not 1)."""
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return type(a) in (int, float) and type(b) in (int, float) and a == b or a == b and type(a) is type(b)


def _short(frame: Any) -> str:
    text = json.dumps(frame)
    return text if len(text) < 600 else text[:600] + "..."
