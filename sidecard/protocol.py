"""The app-facing wire protocol: newline-delimited JSON frames, as msgspec Structs.

`decode_request` turns one frame (split out of the byte stream by `framing.FrameDecoder`) into a typed request
or a `SidecardError`. Schema evolution: new fields are appended with defaults, so old
clients keep working; unknown fields from newer clients are ignored.
"""

from __future__ import annotations

import re

from typing import Annotated, Any, Final, Literal, Union, get_args

import msgspec

from .errors import Code, SidecardError, describe_validation_error

RequestId = Union[str, int]
Label = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_.:-]{1,64}$")]
PositiveInt = Annotated[int, msgspec.Meta(ge=1)]
BetaName = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9._-]{1,128}$")]
# A model id as the API, Bedrock (`anthropic.claude-...-v2:0`, inference profile ARNs) and Vertex (`...@20241022`)
# spell them: bounded, because a named model becomes a metric label, a log field and a usage row.
ModelName = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9._:@/+-]{1,256}$")]
# The most output a request may ask for: the largest context window of any Claude model (1M tokens), which the output
# shares with the input, so no model takes more. Each model's own cap (64k, 128k, 300k in a batch with the
# output-300k beta) is the API's to enforce; this one keeps an absurd value from the upstream and from a budget's
# worst case (max_tokens at the output price: $75 at most, where 10**15 read $7.5e10). Config and prompt files too.
MAX_TOKENS_CEILING: Final = 1_000_000
MaxTokens = Annotated[int, msgspec.Meta(ge=1, le=MAX_TOKENS_CEILING)]


# ---------------------------------------------------------------- requests


class Message(msgspec.Struct, frozen=True):
    role: Literal["user", "assistant"]
    # A plain string or a list of Messages API content blocks, passed upstream unchanged.
    content: Union[str, list[dict[str, Any]]]


class Ping(msgspec.Struct, tag_field="op", tag="ping"):
    id: RequestId


class Hello(msgspec.Struct, tag_field="op", tag="hello"):
    """Per-connection settings; today only a larger frame limit (for images and documents)."""

    id: RequestId
    max_frame_bytes: Union[Annotated[int, msgspec.Meta(ge=1024)], None] = None


class Cancel(msgspec.Struct, tag_field="op", tag="cancel"):
    """Stop the request in flight on this connection with this `id` (and its upstream call). No reply of its own:
    the request ends with a `cancelled` error frame, unless its answer was already on its way."""

    id: RequestId


VarValue = Union[str, int, float, bool]  # a prompt variable's value, made text


class Complete(msgspec.Struct, tag_field="op", tag="complete"):
    id: RequestId
    messages: list[Message] = []
    system: Union[str, list[dict[str, Any]], None] = None
    model: Union[ModelName, None] = None
    max_tokens: Union[MaxTokens, None] = None
    temperature: Union[Annotated[float, msgspec.Meta(ge=0.0, le=1.0)], None] = None
    stop_sequences: Union[list[str], None] = None
    metadata: Union[dict[str, Any], None] = None
    # sidecard's own fields
    feature: Label = "default"
    user: Union[str, None] = None
    deadline_ms: Union[PositiveInt, None] = None
    route: Union[Label, None] = None
    # a versioned prompt instead of raw messages
    prompt: Union[Label, None] = None
    vars: dict[str, VarValue] = {}
    version: Union[PositiveInt, None] = None
    cache: Literal["use", "bypass", "refresh", "only"] = "use"
    priority: Literal["interactive", "batch"] = "interactive"
    stream: bool = False
    resume: Union[bool, None] = None  # streams: continue on the next target after a mid-stream failure
    model_fallback: Union[bool, None] = None  # with `model`: may another model answer? None: the route's setting
    betas: Union[list[BetaName], None] = None  # API beta features, sent as the `anthropic-beta` header
    # Messages API fields sidecard does not interpret (tools, thinking, top_p, ... and future ones), kept as
    # raw JSON and sent upstream byte for byte. Filled by `decode_request`, never read from the wire as-is.
    passthrough: dict[str, msgspec.Raw] = msgspec.field(default_factory=dict, name="sidecard.passthrough")
    # W3C trace context of the app's span (the HTTP face takes it from the `traceparent` header).
    traceparent: Union[str, None] = None  # (one that cannot be read is ignored: the request starts a trace)
    # Streams: the longest silence the client accepts (its read timeout); caps `requests.stream_idle_timeout_s`.
    stream_idle_ms: Union[PositiveInt, None] = None


class CountTokens(Complete, tag="count_tokens"):
    """Counts a request's input tokens through the API; takes what `complete` takes."""


class Feedback(msgspec.Struct, tag_field="op", tag="feedback", kw_only=True):
    """Feedback on an answer sidecard gave: one of `score`, `thumbs` or an implicit `signal` (docs/experiments.md)."""

    id: RequestId
    request_id: str  # the answer's `request_id`
    score: Union[float, None] = None
    thumbs: Union[Literal["up", "down"], None] = None
    signal: Union[Literal["retry", "abandoned"], None] = None
    label: Union[str, None] = None
    comment: Union[str, None] = None



class Submit(Complete, tag="submit"):
    """An async job (docs/jobs.md): a request to answer by `by` (seconds, a duration such as "6h", or an RFC 3339
    time), its result polled (`job`), waited for (`wait`) or POSTed to `webhook`. `jobs`: several requests at
    once, each with `complete`'s fields (the frame's own request fields are then not used); `by` and `webhook`
    apply to every one."""

    by: Union[float, str, None] = None
    webhook: Union[str, None] = None
    jobs: Union[list[msgspec.Raw], None] = None


class JobGet(msgspec.Struct, tag_field="op", tag="job"):
    """A job as it is now."""

    id: RequestId
    job: str


class JobWait(msgspec.Struct, tag_field="op", tag="wait"):
    """A job once it has finished, or as it is after `timeout_ms`."""

    id: RequestId
    job: str
    timeout_ms: Annotated[int, msgspec.Meta(ge=1, le=3_600_000)] = 30_000


JobOp = Union[Submit, JobGet, JobWait]
Request = Union[Ping, Hello, Cancel, Complete, CountTokens, Feedback, Submit, JobGet, JobWait]


class ApiComplete(Complete, tag="complete"):
    """A Messages API request body taken as a `Complete` (the HTTP face): it has no `op` and no `id`."""

    id: RequestId = 0


class ApiCountTokens(CountTokens, tag="count_tokens"):
    id: RequestId = 0


class ApiSubmit(Submit, tag="submit"):
    """A submit's body on the HTTP face (`POST /v1/sidecard/jobs`)."""

    id: RequestId = 0


# ---------------------------------------------------------------- replies


class CacheCreation(msgspec.Struct):
    """Prompt-cache writes split by TTL (1-hour writes cost more than 5-minute ones)."""

    ephemeral_5m_input_tokens: int = 0
    ephemeral_1h_input_tokens: int = 0


class Usage(msgspec.Struct):
    """The API's usage object; the parts the API leaves out stay None (and null in replies)."""

    input_tokens: int = 0
    output_tokens: int = 0
    cache_creation_input_tokens: int = 0
    cache_read_input_tokens: int = 0
    cache_creation: Union[CacheCreation, None] = None
    server_tool_use: Union[dict[str, int], None] = None  # e.g. web_search_requests: counts, summed like tokens
    service_tier: Union[str, None] = None

    def add(self, other: Usage) -> None:
        """Add another call's usage to this total (a request may pay for several calls)."""
        self.input_tokens += other.input_tokens
        self.output_tokens += other.output_tokens
        self.cache_creation_input_tokens += other.cache_creation_input_tokens
        self.cache_read_input_tokens += other.cache_read_input_tokens
        if other.cache_creation is not None:
            mine = self.cache_creation or CacheCreation()
            # A new object: a reply built from an earlier total may share the old one.
            self.cache_creation = CacheCreation(
                mine.ephemeral_5m_input_tokens + other.cache_creation.ephemeral_5m_input_tokens,
                mine.ephemeral_1h_input_tokens + other.cache_creation.ephemeral_1h_input_tokens,
            )
        if other.server_tool_use:
            total = dict(self.server_tool_use or {})
            for key, count in other.server_tool_use.items():
                total[key] = total.get(key, 0) + count
            self.server_tool_use = total
        if other.service_tier is not None:
            self.service_tier = other.service_tier


class ServedBy(msgspec.Struct):
    provider: str
    model: str


class Attempt(msgspec.Struct):
    """One upstream attempt, as listed in the log line."""

    provider: str
    model: str
    outcome: str
    latency_ms: float


class Completion(msgspec.Struct):
    """A successful `complete` reply."""

    id: RequestId
    text: str
    content: msgspec.Raw
    model: str
    usage: Usage
    stop_reason: Union[str, None]
    latency_ms: float
    cost_usd: float
    upstream_request_id: Union[str, None]
    request_id: str
    served_by: ServedBy
    attempts: int = 1
    fallback: bool = False
    degraded: bool = False
    cached: bool = False
    stale: bool = False
    stop_sequence: Union[str, None] = None
    prompt: Union[str, None] = None
    prompt_version: Union[int, None] = None
    ttft_ms: Union[float, None] = None  # streams: time to the first token
    resumed: bool = False  # streams: continued on another target after a mid-stream failure
    ok: bool = True
    guardrails: Union[list[str], None] = None  # "check:action" for each guardrail that acted (a redacted answer says so)
    trace_id: Union[str, None] = None  # the request's trace (tracing on, or the app's traceparent)
    # The upstream message's top-level fields sidecard does not model (container, stop_details, context_management,
    # fields the API adds later), as they came: one field of its own, so none can collide with a frame's; left out
    # of the frame when there are none.
    extra: Union[dict[str, Any], msgspec.UnsetType] = msgspec.UNSET


# The message's top-level fields sidecard models (`api_message` writes them); any other is the upstream's own, kept as
# the answer's `extra`.
MESSAGE_FIELDS: Final = frozenset({"id", "type", "role", "model", "content", "stop_reason", "stop_sequence", "usage"})
# The API's optional fields it sends as null where they do not apply (a stream's message_start has stop_details, its
# message_delta container and stop_details; the SDK's `diagnostics` is "null when not requested"): a null one is as if
# left out, so an answer without them has no `extra` (upstream.client._KnownMessage takes each null, in one decode).
NULL_IS_ABSENT: Final = frozenset({"container", "stop_details", "context_management", "diagnostics"})


def own_fields(fields: dict[str, Any], known: frozenset[str]) -> dict[str, Any]:
    """The upstream's own entries of FIELDS: those not in KNOWN, as they came, but for a null one of NULL_IS_ABSENT."""
    return {k: v for k, v in fields.items() if k not in known and (v is not None or k not in NULL_IS_ABSENT)}


def api_message(completion: Completion) -> dict[str, Any]:
    """A whole answer as the Messages API's message object (the HTTP face's reply, a job's outcome): the upstream's
    own fields (`extra`) beside sidecard's, never in place of one."""
    message: dict[str, Any] = {
        "id": f"msg_{completion.request_id}",
        "type": "message",
        "role": "assistant",
        "model": completion.model,
        "content": completion.content,
        "stop_reason": completion.stop_reason,
        "stop_sequence": completion.stop_sequence,
        "usage": completion.usage,
    }
    if completion.extra:
        for key, value in completion.extra.items():
            message.setdefault(key, value)
    return message


class Pong(msgspec.Struct):
    id: RequestId
    version: str
    ok: bool = True


class HelloReply(msgspec.Struct):
    id: RequestId
    version: str
    max_frame_bytes: int
    ok: bool = True


class JobsReply(msgspec.Struct):
    """A submit's answer: the jobs accepted, in order."""

    id: RequestId
    jobs: list[Any]
    ok: bool = True


class JobReply(msgspec.Struct):
    """A `job` or `wait` answer: the job as it is (`jobs.store.JobView`)."""

    id: RequestId
    job: Any
    ok: bool = True


class TokenCount(msgspec.Struct):
    id: RequestId
    input_tokens: int
    model: str
    ok: bool = True
    request_id: Union[str, None] = None  # sidecard's id for the request, as in its log line
    upstream_request_id: Union[str, None] = None  # the provider's id of the count
    # The count's other fields (the beta's context_management), as they came; left out of the frame when none.
    extra: Union[dict[str, Any], msgspec.UnsetType] = msgspec.UNSET


class FeedbackReply(msgspec.Struct):
    """Feedback accepted: its kind and its value on the 0-1 scale it is counted on."""

    id: RequestId
    request_id: str
    kind: str
    value: float
    ok: bool = True


class ErrorBody(msgspec.Struct, omit_defaults=True):
    code: str
    message: str
    retryable: bool
    retry_after_ms: Union[int, None] = None


class PartialErrorFrame(msgspec.Struct):
    """A stream that failed after its first token: what the client has is not the whole answer."""

    id: RequestId
    error: ErrorBody
    text: str
    partial: bool = True
    ok: bool = False
    request_id: Union[str, msgspec.UnsetType] = msgspec.UNSET  # as in `ErrorFrame`
    upstream_request_id: Union[str, msgspec.UnsetType] = msgspec.UNSET


class ErrorFrame(msgspec.Struct):
    id: Union[RequestId, None]
    error: ErrorBody
    ok: bool = False
    # A request the engine began: sidecard's id for it (its log line's), and the provider's id of the last answer an
    # upstream gave it, if one did. Left out for a refusal before that (a malformed frame, a draining daemon).
    request_id: Union[str, msgspec.UnsetType] = msgspec.UNSET
    upstream_request_id: Union[str, msgspec.UnsetType] = msgspec.UNSET


def error_frame(frame_id: RequestId | None, err: SidecardError) -> ErrorFrame:
    body = ErrorBody(err.code, err.message, err.retryable, err.retry_after_ms)
    return ErrorFrame(frame_id, body, request_id=_given(err.request_id), upstream_request_id=_given(err.upstream_request_id))


def partial_error_frame(frame_id: RequestId, err: SidecardError, text: str) -> PartialErrorFrame:
    """A stream's error after its first token: TEXT is what it sent."""
    whole = error_frame(frame_id, err)
    return PartialErrorFrame(frame_id, whole.error, text, request_id=whole.request_id, upstream_request_id=whole.upstream_request_id)


def _given(value: str | None) -> str | msgspec.UnsetType:
    return value or msgspec.UNSET  # (an id there is none of is left out, not null)


# ---------------------------------------------------------------- encoding

_encoder: Final = msgspec.json.Encoder()


def encode_frame(frame: msgspec.Struct) -> bytes:
    return _encoder.encode(frame) + b"\n"


# ---------------------------------------------------------------- decoding

# What decoding untrusted JSON can raise: msgspec's errors, and RecursionError for input nested deeper than
# the interpreter's stack allows (msgspec has no depth limit of its own).
UNDECODABLE: Final = (msgspec.MsgspecError, RecursionError)
_request_decoder: Final = msgspec.json.Decoder(Request)
_body_decoder: Final = msgspec.json.Decoder(ApiComplete)
_count_body_decoder: Final = msgspec.json.Decoder(ApiCountTokens)


class ApiFeedback(Feedback, tag="feedback", kw_only=True):
    """A `POST /v1/feedback` body: a feedback frame without `op` and `id`."""

    id: RequestId = 0


_feedback_body_decoder: Final = msgspec.json.Decoder(ApiFeedback)
_fields_decoder: Final = msgspec.json.Decoder(dict[str, msgspec.Raw])
_submit_body_decoder: Final = msgspec.json.Decoder(ApiSubmit)
_COMPLETE_FIELDS: Final = frozenset(
    ["op", *(f.encode_name for f in msgspec.structs.fields(Complete))]
)
_SUBMIT_FIELDS: Final = _COMPLETE_FIELDS | {"by", "webhook", "jobs"}


class _IdOnly(msgspec.Struct):
    id: Union[RequestId, None] = None


_id_decoder: Final = msgspec.json.Decoder(_IdOnly)


def decode_request(frame: bytes) -> Request:
    """Decode one frame, or raise `BadFrame` carrying the id (if one could be read) and the error."""
    return _decode(_request_decoder, frame)  # type: ignore[no-any-return]


def decode_body(body: bytes, fields: dict[str, msgspec.Raw] | None = None, *, counting: bool = False) -> Complete:
    """Decode a Messages API request body (the HTTP face) as a `Complete` (or `CountTokens`): the same fields,
    checks and errors as a frame's, without `op` and `id`. `fields`: the body's top-level fields, if the caller
    has them already. Raises `BadFrame`."""
    return _decode(_count_body_decoder if counting else _body_decoder, body, fields)  # type: ignore[no-any-return]


def decode_feedback_body(body: bytes) -> Feedback:
    """Decode a `POST /v1/feedback` body; raises `BadFrame`."""
    return _decode(_feedback_body_decoder, body)  # type: ignore[no-any-return]


def decode_submit(body: bytes) -> Submit:
    """Decode a submit's JSON body (the HTTP face): a submit frame without `op` and `id`. Raises `BadFrame`."""
    return _decode(_submit_body_decoder, body)  # type: ignore[no-any-return]


def _decode(decoder: msgspec.json.Decoder[Any], frame: bytes, fields: dict[str, msgspec.Raw] | None = None) -> Any:
    """Unknown fields of a `Complete` are kept as raw JSON, to be sent upstream unchanged (`passthrough`)."""
    try:
        request = decoder.decode(frame)
        if isinstance(request, Complete):
            if fields is None:
                fields = _fields_decoder.decode(frame)
            known = _SUBMIT_FIELDS if isinstance(request, Submit) else _COMPLETE_FIELDS
            if fields.keys() - known:
                request.passthrough = {k: v for k, v in fields.items() if k not in known}
        return request
    except msgspec.ValidationError as exc:
        raise BadFrame(salvage_id(frame), _validation_error(exc, decoder, frame)) from None
    except msgspec.DecodeError as exc:
        raise BadFrame(salvage_id(frame), SidecardError(Code.BAD_FRAME, _malformed(exc))) from None
    except RecursionError:
        raise BadFrame(salvage_id(frame), SidecardError(Code.BAD_FRAME, "frame is nested too deeply")) from None


class BadFrame(Exception):
    def __init__(self, request_id: RequestId | None, error: SidecardError) -> None:
        super().__init__(error.message)
        self.request_id = request_id
        self.error = error


# An integer ends where the number does: `1.5` or `7e3` is no id (answered unaddressed, never as id 1 or 7).
_ID_VALUE: Final = re.compile(rb'\s*:\s*("(?:[^"\\]|\\.)*"|-?\d+(?![.eE\d]))')


def salvage_head_id(head: bytes) -> RequestId | None:
    """The top-level `id` of a frame known only by its first bytes (one too large to read), if it is there."""
    depth, i, n = 0, 0, len(head)
    while i < n:
        byte = head[i]
        if byte == 0x22:  # a string: a key, or a value
            end = i + 1
            while end < n and head[end] != 0x22:
                end += 2 if head[end] == 0x5C else 1
            if end >= n:
                return None
            if depth == 1 and head[i + 1 : end] == b"id" and (value := _ID_VALUE.match(head, end + 1)) is not None:
                try:
                    found = msgspec.json.decode(value.group(1))
                except msgspec.DecodeError:
                    return None
                return found if isinstance(found, (str, int)) else None
            i = end + 1
            continue
        if byte in b"{[":
            depth += 1
        elif byte in b"}]":
            depth -= 1
        i += 1
    return None


def salvage_id(frame: bytes) -> RequestId | None:
    """The frame's `id`, if one can be read from it (to address an error reply): a client waits on that id, so even a
    frame that is not JSON (a NaN, a lone surrogate) is answered by its id if it has a readable one."""
    try:
        return _id_decoder.decode(frame).id
    except UNDECODABLE:
        return salvage_head_id(frame)


def _malformed(exc: msgspec.DecodeError) -> str:
    if str(exc) == "Input data was truncated":  # (a line is whole: it is unbalanced, or has a bad \u escape)
        return "frame is not valid JSON: it ends inside a value, or a string holds a lone surrogate (\\ud800-\\udfff)"
    return f"frame is not valid JSON: {exc}"


def _validation_error(exc: msgspec.ValidationError, decoder: msgspec.json.Decoder[Any], frame: bytes) -> SidecardError:
    text = str(exc)
    if text.startswith("Invalid value") and text.endswith("- at `$.op`"):
        op = text.split(" - ")[0][len("Invalid value ") :]
        # An op this decoder takes is refused only as a second `op`, once the first chose the type: no second parse.
        if op in {repr(kind.__struct_config__.tag) for kind in get_args(decoder.type) or (decoder.type,)}:
            return SidecardError(Code.BAD_REQUEST, "frame has the key `op` more than once: give each key once")
        return SidecardError(Code.UNKNOWN_OP, f"unknown op: {op}")
    if text == "Object missing required field `op`":
        return SidecardError(Code.UNKNOWN_OP, "frame has no `op` field")
    if text.startswith("Expected `object`") and "$." not in text:
        return SidecardError(Code.BAD_FRAME, "a frame must be a JSON object")
    described = describe_validation_error(exc)
    if described.startswith(UNNAMED_VAR):
        try:
            described = name_the_variable(described, _vars_decoder.decode(frame).vars)
        except UNDECODABLE:  # (too deep to read again, say): unnamed
            pass
    return SidecardError(Code.BAD_REQUEST, described)


class _Vars(msgspec.Struct):
    vars: dict[str, msgspec.Raw] = {}


UNNAMED_VAR: Final = "vars[...]"  # msgspec's path to a dict's value does not name its key
_vars_decoder: Final = msgspec.json.Decoder(_Vars)
_var_decoder: Final = msgspec.json.Decoder(VarValue)


def name_the_variable(described: str, given: Any) -> str:
    """A described error in `vars` naming the variable, as a prompt's own errors do: `vars[...]: expected ...`
    becomes `vars.question: expected ...`. GIVEN: the vars as sent (raw JSON values, or decoded); the one msgspec
    stopped at is the first that does not decode alone. Only on the way to an error: a good request's decoding
    is untouched."""
    if not described.startswith(UNNAMED_VAR) or not isinstance(given, dict):
        return described
    for key, value in given.items():
        try:
            _var_decoder.decode(value) if isinstance(value, msgspec.Raw) else msgspec.convert(value, VarValue)
        except UNDECODABLE:
            return f"vars.{key}{described.removeprefix(UNNAMED_VAR)}"
    return described
