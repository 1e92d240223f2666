"""Streamed answers, sans-I/O: the API's stream events in, typed stream events and the assembled answer out.

`StreamState` follows one upstream stream: it assembles content blocks exactly as a non-streamed answer
would have them, knows when the first token arrived and whether the stream ended properly
(`message_stop`), and turns each event into the typed event the client is sent (`StreamStart`, `BlockStart`,
`Delta`, `StreamPing`, and `Ending`: the upstream's own fields of `message_delta`), which each face encodes its own
way. `Continuation` splices a second stream, resumed on another target after a failure, onto the first, so the
client sees one answer.
"""

from __future__ import annotations

from typing import Any, Final, Union

import msgspec

from .protocol import MESSAGE_FIELDS, ServedBy, Usage, own_fields

_decoder: Final = msgspec.json.Decoder()
_COUNTS: Final = ("input_tokens", "output_tokens", "cache_creation_input_tokens", "cache_read_input_tokens")

# delta type in the API -> (the client's `type`, the field that carries the piece); API_DELTAS is the way back.
_DELTAS: Final = {
    "text_delta": ("text", "text"),
    "input_json_delta": ("input_json", "partial_json"),
    "thinking_delta": ("thinking", "thinking"),
    "signature_delta": ("signature", "signature"),
    "citations_delta": ("citation", "citation"),
}
API_DELTAS: Final = {kind: api_type for api_type, (kind, _) in _DELTAS.items()}
OWN_FIELDS: Final = ""  # a Delta's `field` when its piece is a delta's own fields (the beta compaction_delta's, ...)
# The fields sidecard models of message_delta's delta, and of message_delta itself (of a message: MESSAGE_FIELDS); any
# other is the upstream's own (container, stop_details, context_management, ...), passed to the app as it came (but
# for those of NULL_IS_ABSENT sent null, as on every stream of the API's).
_DELTA_FIELDS: Final = frozenset({"stop_reason", "stop_sequence"})
_MESSAGE_DELTA_FIELDS: Final = frozenset({"type", "delta", "usage"})
# Where a message's own fields go when a whole answer (a cached one) is replayed as a stream: these in message_delta's
# delta, where the SDKs read them (they reset stop_details from it); the rest in message_start's message.
_ENDING_FIELDS: Final = ("container", "stop_details")


# ---------------------------------------------------------------- the events a stream is relayed as


class StreamStart(msgspec.Struct):
    """The answer begins: who serves it, and the usage known so far."""

    request_id: str
    model: str
    served_by: ServedBy
    usage: Usage
    upstream_request_id: Union[str, None]
    extra: Union[dict[str, Any], None] = None  # message_start's message: the fields sidecard does not model


class BlockStart(msgspec.Struct):
    """A content block begins (`block` as the API announces it: a tool call's name, a text block's empty text)."""

    index: int
    block: dict[str, Any]


class Delta(msgspec.Struct):
    """A piece of a block: `kind` is the client's name for it ("text", "input_json", ...), `field` the key the
    piece travels under; for a delta sidecard does not model (`OWN_FIELDS`), `kind` is the API's type and `piece`
    the delta's other fields, as they came."""

    index: int
    kind: str
    field: str
    piece: Any


class StreamPing(msgspec.Struct):
    """The API's keep-alive, relayed where the client wants it (the HTTP face)."""


class Ending(msgspec.Struct):
    """The fields of the upstream's `message_delta` sidecard does not model, so far: `delta`'s (container,
    stop_details) and those beside it (context_management), for a face that writes the API's `message_delta`
    itself at the end. The answer's `extra` has them too."""

    delta: dict[str, Any]
    extra: dict[str, Any]


StreamEvent = Union[StreamStart, BlockStart, Delta, StreamPing, Ending]
_PING: Final = StreamPing()
# Where each delta's piece goes in the assembled block (citations: appended to the block's list).
_ACCUMULATE: Final = {"text": "text", "input_json": "_json", "thinking": "thinking", "signature": "signature"}
_CHARS_PER_TOKEN: Final = 4


class StreamError(Exception):
    """The upstream's own `error` event in the middle of a stream."""

    def __init__(self, error_type: str, message: str) -> None:
        super().__init__(error_type)
        self.error_type = error_type
        self.message = message


class MalformedEvent(StreamError):
    """An event whose data is not a JSON object, or not in the API's shape (a field of another type, a block that
    was never started): the upstream broke the protocol, it did not report an error."""

    def __init__(self) -> None:
        super().__init__("malformed", "the upstream sent an event that does not parse")


_ERROR_STATUS: Final = {"overloaded_error": 529, "rate_limit_error": 429, "api_error": 500, "invalid_request_error": 400}


def error_status(error_type: str) -> int:
    return _ERROR_STATUS.get(error_type, 500)


class StreamState:
    def __init__(self, *, pings: bool = False) -> None:
        self.pings = pings  # relay the API's `ping` events as frames (the HTTP face passes them on)
        self.message: dict[str, Any] = {}
        self.blocks: list[dict[str, Any]] = []
        self.usage: dict[str, Any] = {}
        self.stop_reason: str | None = None
        self.stop_sequence: str | None = None
        self.first_token = False
        self.finished = False
        # The upstream's own fields: message_start's message's, and message_delta's (in its delta, and beside it).
        self.start_extra: dict[str, Any] = {}
        self.ending = Ending({}, {})

    def feed(self, event: str, data: bytes) -> list[StreamEvent]:
        """Apply one upstream event; returns the events the client is sent for it. Raises `MalformedEvent` for an
        event it cannot apply as the API defines it, before changing anything."""
        try:
            payload = _decoder.decode(data) if data else {}
        except msgspec.DecodeError:
            raise MalformedEvent from None
        if not isinstance(payload, dict):
            raise MalformedEvent
        kind = payload.get("type", event)
        if kind == "content_block_delta":
            return self._delta(payload)
        if kind == "content_block_start":
            block = _object(payload.get("content_block"))
            index = payload.get("index", len(self.blocks))
            # Blocks are numbered from 0 in order (the SDKs append each one whatever its index); an index further
            # on would have sidecard pad the answer up to it, a billion empty blocks for a corrupted digit.
            if type(index) is not int or not 0 <= index <= len(self.blocks) or not _pieces_are_text(block):
                raise MalformedEvent
            block = dict(block)
            if index == len(self.blocks):
                self.blocks.append(block)
            else:
                self.blocks[index] = block
            if block.get("type") in ("redacted_thinking", "tool_use", "server_tool_use"):
                self.first_token = True  # a block that arrives whole is itself the first output
            return [BlockStart(index, dict(block))]  # a copy: deltas grow `block`
        if kind == "message_start":
            message = _object(payload.get("message"))
            self.usage = dict(_object(message.get("usage")))
            self.message = dict(message)
            self.start_extra = own_fields(message, MESSAGE_FIELDS)
        elif kind == "message_delta":
            delta, usage = _object(payload.get("delta")), _object(payload.get("usage"))
            self.stop_reason = delta.get("stop_reason", self.stop_reason)
            self.stop_sequence = delta.get("stop_sequence", self.stop_sequence)
            # Counts are cumulative; a null (newer API versions send some) must not erase a count seen earlier.
            self.usage.update({k: v for k, v in usage.items() if v is not None})
            in_delta, beside = own_fields(delta, _DELTA_FIELDS), own_fields(payload, _MESSAGE_DELTA_FIELDS)
            if in_delta or beside:
                _merge(self.ending.delta, in_delta)
                _merge(self.ending.extra, beside)
                return [Ending(dict(self.ending.delta), dict(self.ending.extra))]
        elif kind == "message_stop":
            self.finished = True
            self.first_token = True  # an empty answer has no token but is complete
        elif kind == "error":
            error = _object(payload.get("error"))
            raise StreamError(str(error.get("type", "api_error")), str(error.get("message", ""))[:500])
        elif kind == "ping" and self.pings:
            return [_PING]
        return []  # content_block_stop and unknown future events produce no frame

    def _delta(self, payload: dict[str, Any]) -> list[StreamEvent]:
        index = payload.get("index", 0)
        delta = _object(payload.get("delta"))
        api_type = delta.get("type", "unknown")
        if type(index) is not int or not 0 <= index < len(self.blocks) or not isinstance(api_type, str):
            raise MalformedEvent  # a piece of a block never started: the SDKs would fail on it
        block = self.blocks[index]
        if api_type not in _DELTAS:
            # One sidecard does not model (the beta compaction_delta: content, encrypted_content): its fields reach
            # the client as they came and are set on the block, as the SDKs set compaction's.
            fields = {k: v for k, v in delta.items() if k != "type"}
            if not _pieces_are_text(fields):
                raise MalformedEvent
            block.update(fields)
            self.first_token = True
            return [Delta(index, api_type, OWN_FIELDS, fields)]
        kind, field = _DELTAS[api_type]
        piece = delta.get(field)
        if kind in _ACCUMULATE:
            if not isinstance(piece, str):
                raise MalformedEvent
            key = _ACCUMULATE[kind]
            block[key] = block.get(key, "") + piece
        elif kind == "citation" and piece is not None:
            block["citations"] = [*(block.get("citations") or []), piece]
        self.first_token = True
        return [Delta(index, kind, field, piece)]

    # -- the assembled answer

    def text(self) -> str:
        return "".join(b.get("text", "") for b in self.blocks if b.get("type") == "text")

    def extra(self) -> dict[str, Any] | None:
        """The message's fields sidecard does not model, as the whole answer has them (as the SDKs assemble a
        stream: message_start's, then message_delta's), or None."""
        if not (self.start_extra or self.ending.delta or self.ending.extra):
            return None
        merged = dict(self.start_extra)
        _merge(merged, self.ending.delta)
        _merge(merged, self.ending.extra)
        return merged

    def text_only(self) -> bool:
        return all(b.get("type") == "text" for b in self.blocks)

    def content(self) -> list[dict[str, Any]]:
        blocks = []
        for block in self.blocks:
            if not block:
                continue
            block = dict(block)
            partial = block.pop("_json", None)
            if block.get("type") in ("tool_use", "server_tool_use") and partial is not None:
                try:
                    block["input"] = _decoder.decode(partial) if partial.strip() else {}
                except msgspec.DecodeError:
                    block["input"] = {"_unparsed": partial}
            blocks.append(block)
        return blocks

    def usage_struct(self) -> Usage:
        usage = {k: v for k, v in self.usage.items() if v is not None}
        try:
            return msgspec.convert(usage, Usage)
        except msgspec.ValidationError:  # a field of a new shape: keep the token counts
            return Usage(**{k: v for k, v in usage.items() if k in _COUNTS and isinstance(v, int)})

    def billed_usage(self) -> Usage:
        """What the provider has billed so far. A broken stream never sends its final output count, so the
        output is at least what was streamed (about four characters a token)."""
        usage = self.usage_struct()
        if not self.finished:
            streamed = sum(len(b.get(k) or "") for b in self.blocks for k in ("text", "thinking", "_json"))
            usage.output_tokens = max(usage.output_tokens, -(-streamed // _CHARS_PER_TOKEN))
        return usage


def _object(value: Any) -> dict[str, Any]:
    """An event's object field, absent or null read as empty; any other type is malformed."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise MalformedEvent
    return value


def _merge(into: dict[str, Any], later: dict[str, Any]) -> None:
    """A later event's fields over earlier ones; a null does not erase a value given earlier (a container)."""
    into.update({k: v for k, v in later.items() if v is not None or k not in into})


def replayed(extra: dict[str, Any] | None) -> tuple[dict[str, Any] | None, Ending | None]:
    """A whole answer's `extra` as a stream carries it: message_start's part, and the `Ending` (or None)."""
    if not extra:
        return None, None
    start = {k: v for k, v in extra.items() if k not in _ENDING_FIELDS}
    ending = {k: extra[k] for k in _ENDING_FIELDS if k in extra}
    return start or None, Ending(ending, {}) if ending else None


def _pieces_are_text(block: dict[str, Any]) -> bool:
    """Whether the fields deltas extend (text, thinking, signature) are text, as the deltas will be."""
    return all(isinstance(block.get(key, ""), str) for key in _ACCUMULATE.values())


class Continuation:
    """Splices a stream resumed on another target onto the stream that failed.

    The failed stream's last text block continues: the new stream's first text block is not announced
    again, its deltas are renumbered onto that block, and a space the client already has is not repeated.
    """

    def __init__(self, original: StreamState) -> None:
        self.original = original
        self.target_index = max((i for i, b in enumerate(original.blocks) if b.get("type") == "text"), default=0)
        self.offset: int | None = None
        self.strip_leading = original.text().endswith((" ", "\n"))

    def prefill(self) -> str:
        # The API refuses an assistant prefill that ends in whitespace.
        return self.original.text().rstrip()

    def events(self, events: list[StreamEvent]) -> list[StreamEvent]:
        out: list[StreamEvent] = []
        for event in events:
            if not isinstance(event, (BlockStart, Delta)):  # a ping
                out.append(event)
                continue
            index = event.index
            if self.offset is None:
                self.offset = self.target_index - index
            if isinstance(event, BlockStart) and event.block.get("type") == "text" and index + self.offset == self.target_index:
                continue
            event = msgspec.structs.replace(event, index=index + self.offset)
            if isinstance(event, Delta) and event.kind == "text":
                if not event.piece:
                    continue
                if self.strip_leading:
                    event.piece = event.piece.lstrip(" ")
                    self.strip_leading = not event.piece
                    if not event.piece:
                        continue
                self.original.blocks[self.target_index]["text"] = self.original.blocks[self.target_index].get("text", "") + event.piece
            out.append(event)
        return out

    def finish(self, resumed: StreamState) -> None:
        """Carry over the resumed stream's ending (its usage stays its own: each attempt is priced at its model)."""
        original = self.original
        original.stop_reason = resumed.stop_reason
        original.stop_sequence = resumed.stop_sequence
        original.finished = resumed.finished
        original.ending = resumed.ending
