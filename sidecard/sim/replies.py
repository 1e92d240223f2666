"""Deterministic answers in the Messages API's shapes: messages, SSE events, AWS event-stream frames, errors.

An answer is a function of the model and the request: a hash of the last user message picks words from a fixed
vocabulary (one word is one output token), and the request's features shape it as the API would:

- `tools`: a tool is called (a text block "I'll use NAME.", then a `tool_use` block; stop_reason "tool_use") when
  the last user text names a declared tool, or `tool_choice` is {"type": "tool", "name": X} (always X) or
  {"type": "any"} (the tool asked for, else the first); never with {"type": "none"}. Its `input` fills the
  required properties of the tool's `input_schema` deterministically (`example`). A last user message with a
  `tool_result` block is answered "The tool returned: <the result's first 60 characters>" (unless a
  `tool_choice` forces another call, as it would with the API).
- `thinking` ({"type": "enabled"} or "adaptive"): a `thinking` block with a `signature` comes first; its words
  count as output tokens, within `budget_tokens`.
- `cache_control`: `cache_breakpoints` gives the cacheable prefixes; the server splits the input tokens.

A `quality` fault replaces the whole answer (no thinking, no tool call) with an empty, refusing or off-topic one.

Directives in the user text, `[[sim:NAME]]` or `[[sim:NAME:ARG]]`, let tests choose the answer:

    [[sim:echo]]               the user text verbatim, less the directive
    [[sim:say:TEXT]]           exactly TEXT
    [[sim:long]]               1,500-2,000 words
    [[sim:tool:NAME]]          call tool NAME, declared or not (several: parallel calls; [[sim:tool]]: the first
                               declared tool)
    [[sim:redacted_thinking]]  add a `redacted_thinking` block (after the thinking block, if any)
    [[sim:judge]]              in the system or last user text: act as the quality judge (`judge`), replying
                               with a JSON object of scores only
    [[sim:judge_garbage]]      the same, but the judge replies with text that is not JSON

Add a directive that chooses the answer's words to `DIRECTIVES`.

Over 500 lines because each reply shape (message, SSE, AWS event-stream, errors) is short and they share the one
deterministic answer: split, they would only import each other.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import json
import math
import re
import struct
import zlib
from collections.abc import Callable
from typing import Any, Final, NamedTuple

import msgspec

_encoder: Final = msgspec.json.Encoder()

VOCABULARY: Final = (
    "the a system answer request model quickly reliable steady careful result latency cache route fallback "
    "primary clear simple helpful useful brief note check value signal prompt version deploy rollout canary "
    "stable metric trace budget window token stream event deadline retry policy breaker health status "
    "customer account billing support order invoice password reset settings profile security network "
    "server client socket daemon process thread memory storage record table index query report summary "
    "review update change release plan step first next then finally because therefore however also "
    "should could would will can may might must is are was were be been being have has had "
    "this that these those it its they them their we our you your one two three several many "
    "good better best new old small large fast slow safe open closed ready done pending"
).split()

ERROR_TYPES: Final = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    529: "overloaded_error",
}
ERROR_MESSAGES: Final = {
    401: "invalid x-api-key",
    403: "Your API key does not have permission to use the specified resource.",
    404: "The requested resource could not be found.",
    413: "Request exceeds the maximum allowed number of bytes.",
    429: "Number of requests has exceeded your rate limit.",
    500: "Internal server error",
    529: "Overloaded",
}
# Bedrock reports errors inside a stream as exception frames of its own types.
_BEDROCK_EXCEPTIONS: Final = {
    400: b"validationException",
    429: b"throttlingException",
    503: b"serviceUnavailableException",
    529: b"serviceUnavailableException",
}

REFUSAL: Final = "I'm sorry, but I can't help with that request."
OFF_TOPIC: Final = "Bananas are an excellent source of potassium and grow in tropical climates."
JUDGE_GARBAGE: Final = "Overall I would say the answer is decent, relevance high-ish {score: good"
_DIRECTIVE: Final = re.compile(r"\[\[sim:([a-z_]+)(?::(.*?))?\]\]", re.DOTALL)
_SIM: Final = "[[sim:"
_JUDGE: Final = "[[sim:judge"
_JUDGE_GARBAGE: Final = "[[sim:judge_garbage]]"
CACHE_TTL_S: Final = {"5m": 300.0, "1h": 3600.0}  # cache_control's "ttl"; 5 minutes when absent


class Answer(NamedTuple):
    content: list[dict[str, Any]]  # the content blocks, as the API returns them
    stop_reason: str
    stop_sequence: str | None
    output_tokens: int

    @property
    def text(self) -> str:
        return "".join(block["text"] for block in self.content if block["type"] == "text")


def error_type(status: int) -> str:
    return ERROR_TYPES.get(status, "api_error")


def error_body(status: int, message: str, request_id: str) -> bytes:
    error = {"type": error_type(status), "message": message}
    return _encoder.encode({"type": "error", "error": error, "request_id": request_id})


# ------------------------------------------------------------ reading the request


def tokens(chars: int) -> int:
    """The token estimate for CHARS characters of prompt: about four characters a token."""
    return (chars + 3) // 4


def _bare(block: Any) -> Any:
    """A block without its `cache_control`: marking a block for caching does not change its size."""
    if isinstance(block, dict) and "cache_control" in block:
        return {k: v for k, v in block.items() if k != "cache_control"}
    return block


def _block_chars(content: Any) -> int:
    if isinstance(content, str):
        return len(content)
    if not isinstance(content, list):
        return 0
    size = 0
    for block in content:
        text = block.get("text") if isinstance(block, dict) else None
        size += len(text) if isinstance(text, str) else len(_encoder.encode(_bare(block)))
    return size


def count(body: dict[str, Any]) -> dict[str, Any]:
    """A count_tokens answer (the wire shape)."""
    return {"input_tokens": input_tokens(body)}


def input_tokens(body: dict[str, Any]) -> int:
    """About a token per four characters of the tools, the system prompt and the messages."""
    size = _block_chars(body.get("system"))
    for message in body["messages"]:
        size += _block_chars(message.get("content"))
    tools = body.get("tools")
    if tools:
        size += _block_chars(tools)
    return max(1, tokens(size))


class Breakpoint(NamedTuple):
    key: bytes  # a digest of the model and the prompt up to and including the block with `cache_control`
    chars: int  # that prefix's size
    ttl_s: float


def cache_breakpoints(model: str, body: dict[str, Any]) -> tuple[int, list[Breakpoint]]:
    """The prompt's size (as `input_tokens` counts it) and its cache breakpoints, in the API's prefix order:
    tools, system, messages. Every block with `cache_control` ends a cacheable prefix."""
    digest = hashlib.blake2b(model.encode(), digest_size=16)
    size = 0
    points: list[Breakpoint] = []
    sections: list[tuple[Any, Any]] = [("tools", body.get("tools")), ("system", body.get("system"))]
    sections += ((m.get("role"), m.get("content")) for m in body["messages"])
    for tag, content in sections:
        digest.update(b"\0%b\0" % str(tag).encode())
        if isinstance(content, str):
            size += len(content)
            digest.update(content.encode())
        elif isinstance(content, list):
            for block in content:
                text = block.get("text") if isinstance(block, dict) else None
                raw = text.encode() if isinstance(text, str) else _encoder.encode(_bare(block))
                size += len(text) if isinstance(text, str) else len(raw)
                digest.update(b"\1%b" % raw)
                control = block.get("cache_control") if isinstance(block, dict) else None
                if isinstance(control, dict):
                    ttl_s = CACHE_TTL_S.get(str(control.get("ttl", "5m")), 300.0)
                    points.append(Breakpoint(digest.copy().digest(), size, ttl_s))
    return size, points


def _last_user(body: dict[str, Any]) -> Any:
    for message in reversed(body["messages"]):
        if message.get("role") == "user":
            return message.get("content")
    return None


def _text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        return ""
    return "".join(b["text"] for b in content if isinstance(b, dict) and isinstance(b.get("text"), str))


def user_text(body: dict[str, Any]) -> str:
    """The last user message's text, its text blocks concatenated."""
    return _text_of(_last_user(body))


def _system_text(body: dict[str, Any]) -> str:
    return _text_of(body.get("system"))


# ------------------------------------------------------------ composing the answer


def _hashed(model: str, text: str, long: bool) -> list[str]:
    digest = hashlib.shake_128(f"{model}\0{text}".encode()).digest(2056 if long else 42)
    count = 1500 + (digest[0] << 8 | digest[1]) % 501 if long else 8 + digest[0] % 33
    n = len(VOCABULARY)
    words = [VOCABULARY[b % n] for b in digest[2 : 2 + count]]
    words[0] = words[0].capitalize()
    words[-1] += "."
    return words


def _echo(model: str, text: str, match: re.Match[str]) -> list[str]:
    return (text[: match.start()] + text[match.end() :]).split(" ")


def _say(model: str, text: str, match: re.Match[str]) -> list[str]:
    return (match.group(2) or "").split(" ")


def _long(model: str, text: str, match: re.Match[str]) -> list[str]:
    return _hashed(model, text, long=True)


# name -> the answer's words, from (model, user text, the directive's match; group 2 is its argument)
DIRECTIVES: Final[dict[str, Callable[[str, str, re.Match[str]], list[str]]]] = {
    "echo": _echo,  # the user text verbatim, less the directive
    "say": _say,  # [[sim:say:TEXT]]: exactly TEXT
    "long": _long,  # 1,500-2,000 words
}
_QUALITY: Final = {"empty": [], "refusal": REFUSAL.split(" "), "offtopic": OFF_TOPIC.split(" ")}


def _words(model: str, body: dict[str, Any], content: Any, text: str, marked: bool) -> list[str]:
    """The answer's words; MARKED: the user text has a directive."""
    system = _system_text(body) if "system" in body else ""
    if (marked and _JUDGE in text) or _JUDGE in system:
        garbage = _JUDGE_GARBAGE in text or _JUDGE_GARBAGE in system
        return (JUDGE_GARBAGE if garbage else judge(text)).split(" ")
    if marked:
        for match in _DIRECTIVE.finditer(text):
            directive = DIRECTIVES.get(match.group(1))
            if directive is not None:
                return directive(model, text, match)
    if isinstance(content, list):
        for block in content:
            if isinstance(block, dict) and block.get("type") == "tool_result":
                return f"The tool returned: {_text_of(block.get('content'))[:60]}".rstrip().split(" ")
    return _hashed(model, text, long=False)


def _block_tokens(block: dict[str, Any]) -> int:
    kind = block["type"]
    if kind == "thinking":
        return len(block["thinking"].split(" "))
    if kind == "redacted_thinking":
        return len(block["data"]) // 4
    if kind == "tool_use":
        return tokens(len(_encoder.encode(block["input"])))
    return len(block["text"].split(" ")) if block.get("text") else 0


def _lead(model: str, body: dict[str, Any], text: str) -> list[dict[str, Any]]:
    """The blocks that come before the answer: thinking, redacted thinking."""
    blocks: list[dict[str, Any]] = []
    config = body.get("thinking")
    if isinstance(config, dict) and config.get("type") in ("enabled", "adaptive"):
        words = ["Let", "me", "think", "this", "through."] + [w.lower() for w in _hashed(model, f"\0{text}", False)]
        budget = config.get("budget_tokens")
        if isinstance(budget, int) and 0 < budget < len(words):
            words = words[:budget]
        thinking = " ".join(words)
        signature = hashlib.blake2b(f"{model}\0{thinking}".encode(), digest_size=24).hexdigest()
        blocks.append({"type": "thinking", "thinking": thinking, "signature": f"sig_sim_{signature}"})
    if "[[sim:redacted_thinking]]" in text:
        data = base64.b64encode(hashlib.shake_128(f"redacted\0{model}\0{text}".encode()).digest(48)).decode()
        blocks.append({"type": "redacted_thinking", "data": data})
    return blocks


def _tool_names(body: dict[str, Any], content: Any, text: str, declared: list[str]) -> list[str]:
    """The tools this answer calls, in order."""
    choice = body.get("tool_choice")
    choice = choice if isinstance(choice, dict) else {}
    kind = choice.get("type")
    if kind == "none":
        return []
    if kind == "tool" and isinstance(choice.get("name"), str):
        return [choice["name"]]
    names = []
    if "[[sim:tool" in text:
        for match in _DIRECTIVE.finditer(text):
            if match.group(1) == "tool" and (match.group(2) or declared):
                names.append(match.group(2) or declared[0])
    if not names and not (
        isinstance(content, list) and any(isinstance(b, dict) and b.get("type") == "tool_result" for b in content)
    ):
        names = [name for name in declared if _mentions(name).search(text)][:1]
    if not names and kind == "any" and declared:
        names = declared[:1]
    return names[:1] if choice.get("disable_parallel_tool_use") else names


@functools.lru_cache(maxsize=1024)
def _mentions(name: str) -> re.Pattern[str]:
    return re.compile(rf"(?<![\w-]){re.escape(name)}(?![\w-])", re.IGNORECASE)


def example(schema: Any, seed: str, root: Any = None, depth: int = 0) -> Any:
    """A small value valid against SCHEMA (the JSON Schema subset tools use, local `$ref`s included), the same for
    the same seed: objects hold their required properties, arrays their `minItems`, enums and consts their first
    value."""
    if not isinstance(schema, dict) or depth > 16:  # (a schema that requires itself has no finite example)
        schema = {}
    root = schema if root is None else root
    ref = schema.get("$ref")
    if isinstance(ref, str) and ref.startswith("#"):
        target = root
        for part in ref[1:].split("/")[1:]:
            target = target.get(part.replace("~1", "/").replace("~0", "~")) if isinstance(target, dict) else None
        return example(target, seed, root, depth + 1)
    if "const" in schema:
        return schema["const"]
    enum = schema.get("enum")
    if isinstance(enum, list) and enum:
        return enum[0]
    for key in ("anyOf", "oneOf", "allOf"):
        options = schema.get(key)
        if isinstance(options, list) and options:
            return example(options[0], seed, root, depth + 1)
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "null")
    if kind is None:
        kind = "object" if "properties" in schema else "array" if "items" in schema else "string"
    h = int.from_bytes(hashlib.blake2b(seed.encode(), digest_size=4).digest())
    if kind == "object":
        properties = schema.get("properties")
        properties = properties if isinstance(properties, dict) else {}
        required = schema.get("required")
        required = required if isinstance(required, list) else []
        return {
            name: example(properties.get(name), f"{seed}.{name}", root, depth + 1)
            for name in required
            if isinstance(name, str)
        }
    if kind == "array":
        count = schema.get("minItems")
        count = min(count, 16) if isinstance(count, int) else 0
        return [example(schema.get("items"), f"{seed}[{i}]", root, depth + 1) for i in range(count)]
    if kind == "boolean":
        return True
    if kind == "null":
        return None
    if kind in ("integer", "number"):
        return _number(schema, h, integer=kind == "integer")
    word = VOCABULARY[h % len(VOCABULARY)]
    min_length, max_length = schema.get("minLength"), schema.get("maxLength")
    if isinstance(min_length, int):
        word = word.ljust(min_length, "x")
    return word[:max_length] if isinstance(max_length, int) else word


def _number(schema: dict[str, Any], h: int, *, integer: bool) -> int | float:
    def bound(key: str) -> float | None:
        value = schema.get(key)
        return value if isinstance(value, (int, float)) and not isinstance(value, bool) else None

    low, high = bound("minimum"), bound("maximum")
    exclusive_low, exclusive_high = bound("exclusiveMinimum"), bound("exclusiveMaximum")
    step = 1 if integer else 0.5
    if low is None and exclusive_low is not None:
        low = exclusive_low + step
    if high is None and exclusive_high is not None:
        high = exclusive_high - step
    if integer:
        low = None if low is None else math.ceil(low)
        high = None if high is None else math.floor(high)
    if low is not None and high is not None and high >= low:
        value = low + (h % (int(high - low) + 1) if integer else (high - low) * (h % 101) / 100)
    elif low is not None:
        value = low + h % 100
    elif high is not None:
        value = high - h % 100
    else:
        value = h % 100 if integer else h % 1000 / 10
    return int(value) if integer else float(value)


def _tool_calls(model: str, body: dict[str, Any], content: Any, text: str) -> list[dict[str, Any]]:
    tools = body.get("tools")
    schemas = {
        t["name"]: t.get("input_schema")
        for t in (tools if isinstance(tools, list) else [])
        if isinstance(t, dict) and isinstance(t.get("name"), str)
    }
    calls = []
    for i, name in enumerate(_tool_names(body, content, text, list(schemas))):
        value = example(schemas.get(name), f"{model}\0{name}")
        tool_id = hashlib.shake_128(f"{model}\0{name}\0{i}\0{len(body['messages'])}\0{text}".encode()).hexdigest(12)
        calls.append(
            {
                "type": "tool_use",
                "id": f"toolu_sim_{tool_id}",
                "name": name,
                "input": value if isinstance(value, dict) else {},
            }
        )
    return calls


def compose(model: str, body: dict[str, Any], quality: str | None = None) -> Answer:
    """The answer to a (validated) request, cut at `max_tokens` or at the first stop sequence that occurs."""
    if quality is not None:
        return _text_answer(list(_QUALITY[quality]), body, [], 0)
    content = _last_user(body)
    text = content if isinstance(content, str) else _text_of(content)
    marked = _SIM in text
    lead = _lead(model, body, text) if marked or "thinking" in body else []
    spent = sum(map(_block_tokens, lead)) if lead else 0
    if "tools" in body or "tool_choice" in body or (marked and "[[sim:tool" in text):
        calls = _tool_calls(model, body, content, text)
        if calls:
            opening = f"I'll use {' and '.join(call['name'] for call in calls)}.".split(" ")
            cost = spent + len(opening) + sum(_block_tokens(call) for call in calls)
            if cost <= body["max_tokens"]:
                return Answer([*lead, {"type": "text", "text": " ".join(opening)}, *calls], "tool_use", None, cost)
            opening = opening[: max(0, body["max_tokens"] - spent)]  # no room left for the call itself
            text_block = [{"type": "text", "text": " ".join(opening)}] if opening else []
            return Answer([*lead, *text_block], "max_tokens", None, spent + len(opening))
    return _text_answer(_words(model, body, content, text, marked), body, lead, spent)


def _text_answer(words: list[str], body: dict[str, Any], lead: list[dict[str, Any]], spent: int) -> Answer:
    stop_reason, stop_sequence = "end_turn", None
    room = body["max_tokens"] - spent
    if len(words) > room:
        words, stop_reason = words[: max(0, room)], "max_tokens"
    text = " ".join(words)
    output_tokens = len(words) if text else 0
    sequences = body.get("stop_sequences")
    if sequences:
        cut = min(((text.find(s), s) for s in sequences if s and s in text), default=None)
        if cut is not None:
            text, stop_reason, stop_sequence = text[: cut[0]], "stop_sequence", cut[1]
            output_tokens = len(text.split())
    content = [{"type": "text", "text": text}] if text else []
    if lead:
        content = lead + content
    return Answer(content, stop_reason, stop_sequence, spent + output_tokens)


# ------------------------------------------------------------ the quality judge

_TAG: Final = re.compile(r"<(question|answer)>(.*?)</\1>", re.DOTALL)
_LETTERS: Final = re.compile(r"[A-Za-z]+")
_KNOWN_WORDS: Final = frozenset(VOCABULARY)


def judge(text: str) -> str:
    """The judge's verdict, as JSON text, on the <answer>...</answer> to the <question>...</question> in TEXT.

    Empty: all 0.0. The sim's refusal: relevance and overall 0.1. The sim's off-topic text: relevance 0.0,
    overall 0.2. Sharing no word of four letters or more with the question, and not made of the sim's own
    vocabulary: relevance 0.3. Anything else is a good answer: every score 0.85-0.95, from a hash.
    """
    tagged = dict(_TAG.findall(text))
    question, answer = tagged.get("question", ""), tagged.get("answer", "").strip()
    if not answer:
        scores, reason = (0.0, 0.0, 0.0, 0.0), "The answer is empty."
    elif answer.startswith(REFUSAL):
        scores, reason = (0.1, 0.1, 0.6, 0.1), "The answer refuses the question."
    elif answer.startswith(OFF_TOPIC):
        scores, reason = (0.0, 0.3, 0.8, 0.2), "The answer is off-topic."
    else:
        words = {w.lower() for w in _LETTERS.findall(answer)}
        asked = {w.lower() for w in _LETTERS.findall(question) if len(w) >= 4}
        if not words & asked and not words <= _KNOWN_WORDS:
            scores, reason = (0.3, 0.5, 0.7, 0.4), "The answer does not address the question."
        else:
            digest = hashlib.blake2b(f"{question}\0{answer}".encode(), digest_size=3).digest()
            relevance, accuracy, form = (0.85 + b % 11 / 100 for b in digest)
            scores = (relevance, accuracy, form, (relevance + accuracy + form) / 3)
            reason = "The answer addresses the question clearly."
    verdict: dict[str, Any] = dict(
        zip(("relevance", "accuracy", "format", "overall"), (round(s, 2) for s in scores), strict=True)
    )
    verdict["reason"] = reason
    return json.dumps(verdict)


# ------------------------------------------------------------ wire shapes


def message(message_id: str, model: str, answer: Answer, usage: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": message_id,
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": answer.content,
        "stop_reason": answer.stop_reason,
        "stop_sequence": answer.stop_sequence,
        "usage": usage,
    }


WORDS_PER_DELTA: Final = 3
JSON_PER_DELTA: Final = 16  # characters of a tool call's input JSON per input_json_delta


def _pieces(text: str) -> list[str]:
    words = text.split(" ")
    pieces = [" ".join(words[i : i + WORDS_PER_DELTA]) + " " for i in range(0, len(words), WORDS_PER_DELTA)]
    pieces[-1] = pieces[-1][:-1]
    return pieces


def _delta(index: int, delta: dict[str, Any]) -> dict[str, Any]:
    return {"type": "content_block_delta", "index": index, "delta": delta}


def stream_events(message_id: str, model: str, answer: Answer, usage: dict[str, Any]) -> list[dict[str, Any]]:
    """A streamed answer's events, in the API's order: a text block as text deltas, a thinking block as thinking
    deltas and a signature delta, a tool call as `input: {}` and its input JSON in pieces, redacted thinking whole."""
    start: dict[str, Any] = {
        "id": message_id,
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": [],
        "stop_reason": None,
        "stop_sequence": None,
        "usage": {**usage, "output_tokens": 1},
    }
    events: list[dict[str, Any]] = [{"type": "message_start", "message": start}]
    for index, block in enumerate(answer.content):
        kind = block["type"]
        first: dict[str, Any]
        if kind == "text":
            first = {"type": "text", "text": ""}
            deltas = [
                {"type": "content_block_delta", "index": index, "delta": {"type": "text_delta", "text": piece}}
                for piece in _pieces(block["text"])
            ]
        elif kind == "thinking":
            first = {"type": "thinking", "thinking": "", "signature": ""}
            deltas = [_delta(index, {"type": "thinking_delta", "thinking": p}) for p in _pieces(block["thinking"])]
            deltas.append(_delta(index, {"type": "signature_delta", "signature": block["signature"]}))
        elif kind == "tool_use":
            first = {**block, "input": {}}
            raw = _encoder.encode(block["input"]).decode()
            deltas = [
                _delta(index, {"type": "input_json_delta", "partial_json": raw[i : i + JSON_PER_DELTA]})
                for i in range(0, len(raw), JSON_PER_DELTA)
            ]
        else:  # redacted_thinking comes whole
            first, deltas = block, []
        events.append({"type": "content_block_start", "index": index, "content_block": first})
        if index == 0:
            events.append({"type": "ping"})
        events += deltas
        events.append({"type": "content_block_stop", "index": index})
    if not answer.content:
        events.append({"type": "ping"})
    delta = {"stop_reason": answer.stop_reason, "stop_sequence": answer.stop_sequence}
    events += (
        {"type": "message_delta", "delta": delta, "usage": {"output_tokens": answer.output_tokens}},
        {"type": "message_stop"},
    )
    return events


def sse(event: dict[str, Any]) -> bytes:
    return b"event: %b\ndata: %b\n\n" % (event["type"].encode(), _encoder.encode(event))


def sse_error(status: int, message: str, request_id: str) -> bytes:
    return b"event: error\ndata: %b\n\n" % error_body(status, message, request_id)


SSE_MALFORMED: Final = (
    b'event: content_block_delta\ndata: {"type": "content_block_delta", "index": 0, "delta": {"te\n\n'
)


def _eventstream(headers: bytes, payload: bytes) -> bytes:
    """One AWS event-stream message: prelude (total length, headers length, CRC), headers, payload, CRC."""
    prelude = struct.pack(">II", 16 + len(headers) + len(payload), len(headers))
    prelude += struct.pack(">I", zlib.crc32(prelude))
    message = prelude + headers + payload
    return message + struct.pack(">I", zlib.crc32(message))


def _string_headers(*pairs: tuple[bytes, bytes]) -> bytes:
    return b"".join(bytes([len(k)]) + k + b"\x07" + struct.pack(">H", len(v)) + v for k, v in pairs)


_CHUNK_HEADERS: Final = _string_headers(
    (b":event-type", b"chunk"), (b":content-type", b"application/json"), (b":message-type", b"event")
)


def eventstream_chunk(event: dict[str, Any]) -> bytes:
    """A streamed event as Bedrock's invoke-with-response-stream carries it: base64 JSON in a `chunk` frame."""
    return _eventstream(_CHUNK_HEADERS, b'{"bytes":"%b"}' % base64.b64encode(_encoder.encode(event)))


def eventstream_error(status: int, message: str) -> bytes:
    exception = _BEDROCK_EXCEPTIONS.get(status, b"internalServerException")
    headers = _string_headers(
        (b":exception-type", exception), (b":content-type", b"application/json"), (b":message-type", b"exception")
    )
    return _eventstream(headers, _encoder.encode({"message": message}))


def eventstream_malformed(event: dict[str, Any]) -> bytes:
    """A chunk frame whose checksum is wrong."""
    frame = eventstream_chunk(event)
    return frame[:-4] + struct.pack(">I", (zlib.crc32(frame[:-4]) + 1) & 0xFFFFFFFF)
