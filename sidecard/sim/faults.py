"""Faults the simulated upstream injects, per model, chosen with a seeded random source.

A `Fault` applies to Messages calls and to count_tokens calls for its model (the latter take what a whole
answer can get: latency, hang, status, resets, malformed bodies). Streams can also be broken between events:
`stall_after_events` (0: the head, then silence), `error_after_events` (an `error` event), `reset_after_events`
(a TCP reset after N whole events) and `reset_after_bytes` (a reset mid-frame); SSE and Bedrock alike.

Message Batches: a request in a batch gets its model's fault as the batch processes it (a `status` makes it
`errored`, `quality` degrades it, `expire` leaves it unprocessed; the rest do not apply). The batch endpoints'
own calls take the fault under "batches:CALL" (create, retrieve, results, cancel, list), else under "batches";
never "*". `expire` there, on create, expires the whole batch.
"""

from __future__ import annotations

import random

import msgspec

from ..errors import describe_validation_error

QUALITIES = frozenset({"empty", "refusal", "offtopic"})


class Fault(msgspec.Struct, kw_only=True, forbid_unknown_fields=True, omit_defaults=True):
    """What goes wrong for a matching request. Fields combine: latency, then a hang or an answer shaped by the rest."""

    status: int | None = None  # answer with this HTTP status and the API's error body
    rate: float = 1.0  # share of matching requests that get the fault
    count: int | None = None  # only the next N matching requests, then the fault is spent
    retry_after_s: float | None = None  # sent as retry-after (and retry-after-ms) with the error
    should_retry: bool | None = None  # sent as x-should-retry with the error
    latency_ms: float = 0.0  # added before answering
    hang: bool = False  # never answer (until the client goes away)
    reset_after_bytes: int | None = None  # send this many bytes of the response (head included), then a TCP reset
    malformed: bool = False  # 200 with a body (or a stream event) that does not parse
    stall_after_events: int | None = None  # streaming: send N events, then nothing more
    error_after_events: int | None = None  # streaming: N events, then an `error` event for `status` (default 529)
    reset_after_events: int | None = None  # streaming: N whole events, then a TCP reset (not streamed: a reset at once)
    event_interval_ms: float = 0.0  # streaming: the wait between events (a long answer, extended thinking)
    not_streamed: bool = False  # streaming: answer with the whole message as JSON, as a proxy that drops `stream` does
    quality: str | None = None  # a degraded answer: "empty", "refusal" or "offtopic"
    expire: bool = False  # in a Message Batch: the request is never processed and comes back `expired`

    def __post_init__(self) -> None:
        # Runs on construction and on decoding, so a bad fault from the control endpoint is a 400.
        if self.status is not None and not 400 <= self.status <= 599:
            raise ValueError("status must be an HTTP error status (400-599)")
        if not 0.0 <= self.rate <= 1.0:
            raise ValueError("rate must be within [0, 1]")
        if self.count is not None and self.count < 1:
            raise ValueError("count must be at least 1")
        if self.quality is not None and self.quality not in QUALITIES:
            raise ValueError(f"quality must be one of {sorted(QUALITIES)}")
        for name in (
            "retry_after_s",
            "latency_ms",
            "reset_after_bytes",
            "stall_after_events",
            "error_after_events",
            "reset_after_events",
            "event_interval_ms",
        ):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ValueError(f"{name} must not be negative")

    def status_before_answer(self, stream: bool) -> int | None:
        """The error status to answer with in place of an answer, if any: an error due after some events comes
        inside a stream, and a request that is not streamed gets it at once."""
        if self.error_after_events is None:
            return self.status
        return None if stream else self.status or 529


class FaultTable:
    """Faults by model; an exact model wins over "*". Holds copies, so spending a counted fault leaves the
    caller's `Fault` alone."""

    def __init__(self, rng: random.Random) -> None:
        self._rng = rng
        self._faults: dict[str, Fault] = {}

    def set(self, model: str, fault: Fault) -> None:
        self._faults[model] = msgspec.structs.replace(fault)

    def clear(self, model: str | None = None) -> None:
        if model is None:
            self._faults.clear()
        else:
            self._faults.pop(model, None)

    def snapshot(self) -> dict[str, Fault]:
        """The active faults (a counted fault shows the uses it has left)."""
        return {model: msgspec.structs.replace(fault) for model, fault in self._faults.items()}

    def pick(self, model: str) -> Fault | None:
        """The fault this request gets, if any, spending one use of a counted fault."""
        return self.pick_first((model, "*"))

    def pick_first(self, keys: tuple[str, ...]) -> Fault | None:
        """The fault under the first of KEYS that has one, if this request gets it (its `rate`)."""
        if not self._faults:
            return None
        for key in keys:
            fault = self._faults.get(key)
            if fault is not None:
                break
        else:
            return None
        if fault.rate < 1.0 and self._rng.random() >= fault.rate:
            return None
        if fault.count is not None:
            fault.count -= 1
            if fault.count == 0:
                del self._faults[key]
        return fault


def fault_from_mapping(raw: object, *, strict: bool = True) -> tuple[str, Fault]:
    """`{"model": M, ...Fault fields}` (model "*" if absent) as (M, Fault): the body of POST /_sim/faults, and what
    `sidecard sim --fault` parses to. Raises `msgspec.ValidationError`."""
    if not isinstance(raw, dict) or not isinstance(model := raw.pop("model", "*"), str):
        raise msgspec.ValidationError('expected a JSON object with an optional string "model"')
    return model, msgspec.convert(raw, Fault, strict=strict)


def parse_fault_option(text: str) -> tuple[str, Fault]:
    """`sidecard sim --fault MODEL=SPEC`: SPEC is `KEY=VALUE,...` (`status=529,rate=0.5`) or the JSON object
    POST /_sim/faults takes. Raises `ValueError` with a message for the operator."""
    model, sep, spec = text.partition("=")
    if not sep or not model:
        raise ValueError(f"{text!r}: expected MODEL=SPEC, e.g. claude-sonnet-4-6=status=529,rate=0.5")
    spec = spec.strip()
    try:
        if spec.startswith("{"):
            raw = msgspec.json.decode(spec)
            strict = True
        else:
            raw, strict = {}, False  # values are text: let msgspec read "529" as an int, "true" as a bool
            for item in filter(None, (part.strip() for part in spec.split(","))):
                key, eq, value = item.partition("=")
                if not eq:
                    raise ValueError(f"{text!r}: {item!r} is not KEY=VALUE")
                raw[key.strip()] = value.strip()
        if isinstance(raw, dict):
            raw["model"] = model
        return fault_from_mapping(raw, strict=strict)
    except msgspec.MsgspecError as exc:
        raise ValueError(f"{text!r}: {fault_problem(exc)}") from None


def fault_problem(exc: msgspec.MsgspecError) -> str:
    """What is wrong with a fault, in sidecard's one wording of such errors (`status: expected int, got str`)."""
    return describe_validation_error(exc) if isinstance(exc, msgspec.ValidationError) else str(exc)
