"""The drop-in face: the Anthropic Messages HTTP API, served by sidecard.

An app keeps the official SDK and changes one setting (`base_url`, or a transport bound to the Unix
socket); every request then gets sidecard's deadlines, retries, fallback, cache, prompts, kill switches
and budgets. sidecard's own options travel as `x-sidecard-*` request headers, its reply details come back
as `x-sidecard-*` response headers, and errors use the API's error body with statuses the SDKs understand —
`x-should-retry: false` where sidecard has already retried, so the SDK does not retry on top. So do the HTTP
server's own refusals (`refusal`: malformed, too large, overloaded), and a bug met while answering is a logged
500 `internal` error, never a dropped connection or a traceback. A web page's request (a browser's `Origin`, or
on the TCP port a `Host` that is no loopback name: DNS rebinding) is refused unless the operator lists it.
"""

from __future__ import annotations

import functools
import ipaddress
import math
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Annotated, Any, Final, Literal, Union
from urllib.parse import unquote

import msgspec
import trio

from ..engine import STOPPED, PartialAnswer
from ..errors import Code, SidecardError, describe_validation_error
from ..httpserver import Headers, HttpRequest, Responder, SlowReader
from ..observe.log import JsonLog
from ..protocol import UNDECODABLE, BadFrame, BetaName, Complete, Completion, CountTokens, JobGet, JobWait, TokenCount, api_message, decode_body, decode_feedback_body, decode_submit, name_the_variable
from ..streaming import API_DELTAS, OWN_FIELDS, BlockStart, Delta, Ending, StreamEvent, StreamStart
from ..safety.access import ANYONE, AccessControl, Identity
from . import models
from .base import DRAINING, LAST_WORD_S, Answer, Face, named

if TYPE_CHECKING:
    from ..config import HttpConfig
    from ..engine import Engine
    from ..engine.jobs import JobDesk
    from ..engine.types import Trace
    from ..loop.feedback import FeedbackDesk

Label = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_.:-]{1,64}$")]
JSON: Final = (b"content-type", b"application/json")
MODELS_PATH: Final = "/v1/models"
_encoder: Final = msgspec.json.Encoder()
_decoder: Final = msgspec.json.Decoder()


class HeaderOptions(msgspec.Struct, forbid_unknown_fields=True):
    """sidecard's per-request options, from `x-sidecard-*` headers."""

    feature: Union[Label, None] = None
    user: Union[str, None] = None
    route: Union[Label, None] = None
    deadline_ms: Union[Annotated[int, msgspec.Meta(ge=1)], None] = None
    cache: Union[Literal["use", "bypass", "refresh", "only"], None] = None
    priority: Union[Literal["interactive", "batch"], None] = None
    prompt: Union[Label, None] = None
    version: Union[Annotated[int, msgspec.Meta(ge=1)], None] = None
    vars: Union[dict[str, Union[str, int, float, bool]], None] = None
    resume: Union[bool, None] = None
    model_fallback: Union[bool, None] = None
    betas: Union[list[BetaName], None] = None  # from the API's own `anthropic-beta` header


def _boolean(text: str) -> bool:
    return {"true": True, "false": False}[text.lower()]


# header -> (option, how its text becomes a value)
_OPTIONS: Final = {
    b"x-sidecard-feature": ("feature", str),
    b"x-sidecard-user": ("user", str),
    b"x-sidecard-route": ("route", str),
    b"x-sidecard-deadline-ms": ("deadline_ms", int),
    b"x-sidecard-cache": ("cache", str),
    b"x-sidecard-priority": ("priority", str),
    b"x-sidecard-prompt": ("prompt", str),
    b"x-sidecard-prompt-version": ("version", int),
    b"x-sidecard-vars": ("vars", _decoder.decode),
    b"x-sidecard-resume": ("resume", _boolean),
    b"x-sidecard-model-fallback": ("model_fallback", _boolean),
}

# The body is the Messages API's alone. sidecard's own fields there would be read as its options (`op` and `id`
# would even change the request) and never reach the API, so they are refused, naming the header to use.
_API_FIELDS: Final = frozenset({"messages", "system", "model", "max_tokens", "temperature", "stop_sequences", "metadata", "stream"})
_NOT_IN_BODY: Final = frozenset(["op", *(f.encode_name for f in msgspec.structs.fields(Complete))]) - _API_FIELDS
# The API's beta header: a comma-separated list (the SDKs' `betas=[...]`), possibly over several header lines.
# `anthropic-version` is not taken: sidecard reads every reply, so it speaks the version it understands.
BETA_HEADER: Final = b"anthropic-beta"
# The SDK's timeout: its read timeout is always sent; `x-stainless-timeout` only when set per request (a client-wide
# timeout sends "NOT_GIVEN" there), as anthropic 2.x does.
STATED_TIMEOUTS: Final = (b"x-stainless-read-timeout", b"x-stainless-timeout")
NO_TIMEOUT_S: Final = 1e9
STATED_TIMEOUT_MARGIN: Final = 0.05  # the share of the SDK's timeout left for sidecard's 504 to reach it first
TRACEPARENT: Final = b"traceparent"  # W3C trace context: the app's span, the parent of the request's
_HEADER_FOR: Final = {option: header.decode() for header, (option, _) in _OPTIONS.items()} | {"betas": BETA_HEADER.decode()}
_keys_decoder: Final = msgspec.json.Decoder(dict[str, msgspec.Raw])

# Browsers (docs/security.md): any web page can make a browser send the face a request (a text/plain POST needs
# no CORS preflight) and spend; a page whose DNS name was rebound to the loopback port can read the answers too.
# A browser marks a page's request (Origin; Sec-Fetch-Site), and sends the page's own name as Host; the official
# SDKs send neither mark (Node's fetch sends `sec-fetch-mode: cors`, which is not one), and only JSON bodies.
_SCREENED: Final = frozenset({b"host", b"origin", b"sec-fetch-site", b"content-type"})
_FIRST_PARTY: Final = frozenset({b"none", b"same-origin"})  # typed in the address bar; the face's own origin
_JSON_TYPE: Final = b"application/json"
_MAX_HOST: Final = 260  # a DNS name's 253 characters and a port: a longer Host is no loopback name, and is not cached
PREFLIGHT_MAX_AGE_S: Final = 600  # how long a browser may keep an allowed origin's preflight answer
_PREFLIGHT_METHOD: Final = "access-control-request-method"

# sidecard code -> (HTTP status, the API's error type, may the SDK retry?)
_STATUS: Final = {
    Code.BAD_FRAME: (400, "invalid_request_error", False),
    Code.FRAME_TOO_LARGE: (413, "request_too_large", False),
    Code.UNKNOWN_OP: (400, "invalid_request_error", False),
    Code.BAD_REQUEST: (400, "invalid_request_error", False),
    Code.PROMPT_NOT_FOUND: (404, "not_found_error", False),
    Code.INVALID_REQUEST: (400, "invalid_request_error", False),
    Code.REQUEST_TOO_LARGE: (413, "request_too_large", False),
    # sidecard's credentials, not the app's, but the same cure (an operator must act) and the same SDK exception.
    Code.UPSTREAM_AUTH: (401, "authentication_error", False),
    Code.UPSTREAM_FORBIDDEN: (403, "permission_error", False),
    Code.MODEL_NOT_FOUND: (404, "not_found_error", False),
    Code.RATE_LIMITED: (429, "rate_limit_error", False),
    Code.OVERLOADED: (529, "overloaded_error", False),
    Code.UPSTREAM_ERROR: (502, "api_error", False),
    Code.UPSTREAM_TIMEOUT: (504, "api_error", False),
    Code.UPSTREAM_UNAVAILABLE: (529, "overloaded_error", False),
    Code.DEADLINE_EXCEEDED: (504, "api_error", False),
    Code.BAD_OUTPUT: (502, "api_error", False),
    Code.OUTPUT_BLOCKED: (422, "invalid_request_error", False),
    Code.POLICY_REFUSED: (403, "permission_error", False),
    Code.FORBIDDEN: (403, "permission_error", False),
    Code.CACHE_MISS: (404, "not_found_error", False),
    Code.JOB_NOT_FOUND: (404, "not_found_error", False),
    Code.AI_DISABLED: (503, "api_error", False),
    Code.BUDGET_EXCEEDED: (429, "rate_limit_error", False),
    Code.SHUTTING_DOWN: (503, "api_error", True),  # the next connection reaches the replacement daemon
    Code.INTERNAL: (500, "api_error", False),
    Code.UNKNOWN_REQUEST: (404, "not_found_error", False),
    Code.EXPIRED_REQUEST: (410, "invalid_request_error", False),
    Code.DUPLICATE_FEEDBACK: (409, "invalid_request_error", False),
}
# A count's failures that the SDK may retry (x-should-retry: true): sidecard tried each target once and waited for none.
_COUNT_RETRYABLE: Final = frozenset(
    {Code.RATE_LIMITED, Code.OVERLOADED, Code.UPSTREAM_ERROR, Code.UPSTREAM_TIMEOUT, Code.UPSTREAM_UNAVAILABLE}
)
# The HTTP server's refusals (by the status it would send): what the SDK gets instead, in the API's shape.
_REFUSALS: Final = {
    400: (400, "invalid_request_error", Code.BAD_REQUEST, "malformed HTTP request", False),
    413: (413, "request_too_large", Code.FRAME_TOO_LARGE, "the request body is over sidecard's limit", False),
    431: (431, "request_too_large", Code.FRAME_TOO_LARGE, "the request head is over sidecard's limit of 64 KiB", False),
    501: (501, "invalid_request_error", Code.BAD_REQUEST, "a Transfer-Encoding other than chunked is not supported", False),
    # The shared budget for half-received requests is full: the request was not read, so a retry can help.
    503: (529, "overloaded_error", Code.OVERLOADED, "sidecard holds too much incomplete input right now", True),
}


class HttpFace(Face):
    pings = True  # the SDKs expect the API's keep-alive events
    name = "http"

    def __init__(
        self, engine: Engine, log: JsonLog, access: AccessControl | None = None, feedback: FeedbackDesk | None = None,
        jobs: JobDesk | None = None, config: HttpConfig | None = None,
    ) -> None:
        super().__init__(engine, access, feedback, jobs)
        self.log = log
        self.allowed_origins = frozenset(origin.encode() for origin in config.allowed_origins) if config else frozenset()
        self.allowed_hosts = frozenset(host.encode() for host in config.allowed_hosts) if config else frozenset()

    async def handle(self, request: HttpRequest, responder: Responder) -> None:
        """The HTTP server's handler: answers REQUEST; any bug becomes a logged `internal` error, and a request the
        drain stops gets `shutting_down` (`_last_word`)."""
        try:
            await self._handle(request, responder)
        except SlowReader as slow:  # its request and what it held (an upstream call, a target's slot) go with it
            self.engine.metrics.clients_cut("slow_reader").inc()
            self.log.warning("client_disconnected", reason="slow_reader", timeout_s=slow.timeout_s, face="http")
            raise
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            raise  # the client left: nothing to answer
        except trio.Cancelled:
            if self.engine.stopped:  # (not the client's leaving: that is a silent close)
                await _last_word(responder)
            raise
        except Exception as exc:
            request_id = f"http-{os.urandom(4).hex()}"  # none was given yet: one the log and the client share
            self.log.internal_error("http", exc, request_id)
            if responder.started:
                await responder.abort(reset=False)  # a cut stream, never one that looks complete
            else:
                internal = SidecardError(Code.INTERNAL, "internal error")
                internal.request_id = request_id
                await _error(responder, internal)

    def refusal(self, status: int, request: Sequence[tuple[bytes, bytes]]) -> tuple[int, Headers, bytes]:
        """The HTTP server's refusals as the API's error body (see `serve_http`), readable by a page whose origin
        `[http] allowed_origins` lists, as every other answer is, when the request's headers as far as they were
        read (a head refused part-way: those before the cut, each whole) carry it."""
        status, error_type, code, message, should_retry = _REFUSALS.get(
            status, (status, "invalid_request_error", Code.BAD_REQUEST, "malformed HTTP request", False)
        )
        retry_after_ms = 1000 if code == Code.OVERLOADED else None
        status, headers, body = _error_response(SidecardError(code, message, retry_after_ms=retry_after_ms), status, error_type, should_retry)
        origin = next((value for name, value in request if name == b"origin"), None)
        if origin is not None and origin in self.allowed_origins:
            headers += _cors(origin)
        return status, headers, body

    async def _handle(self, request: HttpRequest, responder: Responder) -> None:
        path = request.path
        if path == "/healthz" and request.method in ("GET", "HEAD"):  # open to anything: liveness probes
            await responder.send(200, [JSON], b'{"ok":true}')
            return
        host = origin = site = media = None
        for name, value in request.headers:  # (one pass, for who sent the request and what its body is)
            if name in _SCREENED:
                if name == b"host":
                    host = value
                elif name == b"content-type":
                    media = value
                elif name == b"origin":
                    origin = value
                else:
                    site = value
        browser = origin is not None or (site is not None and site not in _FIRST_PARTY)
        if browser and origin not in self.allowed_origins:
            await self._refuse_browser(responder, "origin", f"a request from a web page ({_page(origin, site)}) is refused: "
                                                            "[http] allowed_origins does not list its origin")
            return
        if request.tcp and host is not None and not (len(host) <= _MAX_HOST and _host_allowed(host, self.allowed_hosts)):
            await self._refuse_browser(responder, "host", f"host {_quoted(host)} is not a loopback name (a page that rebinds its "
                                                          "DNS name to this port sends its own): list the name in [http] allowed_hosts if it is yours")
            return
        if origin is not None:  # (an allowed one by now: the page may read what it is sent)
            responder.add_headers(_cors(origin))
            if request.method == "OPTIONS" and request.header(_PREFLIGHT_METHOD) is not None:
                await responder.send(204, _preflight(request), b"")
                return
        models = request.method == "GET" and (path == MODELS_PATH or path.startswith(MODELS_PATH + "/"))
        feedback = request.method == "POST" and path == "/v1/feedback"
        jobs = path == JOBS_PATH or path.startswith(JOBS_PATH + "/")
        served = models or feedback or (_job_route(request) if jobs else request.method == "POST" and path in ("/v1/messages", "/v1/messages/count_tokens"))
        if not served:
            hint = f"POST {JOBS_PATH} or GET {JOBS_PATH}/ID" if jobs else "POST /v1/messages"
            no_route = SidecardError(Code.BAD_REQUEST, f"no route {request.method} {path[:64]}: try {hint}")
            await _error(responder, no_route, 404, "not_found_error")
            return
        if media is not None and media != _JSON_TYPE and request.method == "POST" and not _is_json(media):
            not_json = SidecardError(Code.BAD_REQUEST, f"content-type {_quoted(media)} is not taken: send the body as {_JSON_TYPE.decode()}")
            await _error(responder, not_json, 415)
            return
        # Every route but /healthz is an app's: a caller no app claims is refused before anything else.
        caller = self.access.for_token(_token(request.headers)) if self.access.settings.enabled else ANYONE
        if (forbidden := self.refused(caller)) is not None:
            await _error(responder, forbidden)
            return
        assert isinstance(caller, Identity)
        if models:
            await self._models(request, responder)
            return
        if feedback:
            await self._feedback(request, responder)
            return
        if self.draining:
            await _error(responder, DRAINING)
            return
        if jobs:
            await self._jobs(request, responder, caller)
            return
        with self.busy:  # a drain waits for the answer (idle keep-alive connections do not count)
            try:
                parsed = _parse(request, counting=path.endswith("count_tokens"))
            except SidecardError as err:
                await _error(responder, err)
                return
            begun = self.begin(parsed, caller)
            if isinstance(begun, (Completion, SidecardError)):  # (a cache hit, a kill switch's answer: at once)
                answer: Answer = begun
            else:
                try:
                    if parsed.stream:
                        events = _Events(responder)
                        await events.end(await self.answer(parsed, events.send, caller, begun))
                        return
                    answer = await self.answer(parsed, _unused, caller, begun)
                except trio.Cancelled:
                    if self.engine.stopped:  # the drain's last word names the request (`handle`'s finds it said)
                        await _last_word(responder, begun)
                    raise
            if isinstance(answer, Completion):
                await responder.send(200, [JSON, *_details(answer)], _encoder.encode(api_message(answer)))
            elif isinstance(answer, SidecardError):
                sdk_retries = isinstance(parsed, CountTokens) and answer.code in _COUNT_RETRYABLE
                await responder.send(*_error_response(answer, should_retry=True if sdk_retries else None))
            else:
                counted = _beside({"input_tokens": answer.input_tokens}, answer.extra or None)
                await responder.send(200, _counted(answer), _encoder.encode(counted))

    async def _refuse_browser(self, responder: Responder, key: str, message: str) -> None:
        self.engine.metrics.access_denied(self.name, key).inc()
        await _error(responder, SidecardError(Code.FORBIDDEN, message))

    async def _jobs(self, request: HttpRequest, responder: Responder, caller: Identity) -> None:
        """`POST /v1/sidecard/jobs` (a submit's body: a request's fields with `by`, or `jobs`), `GET
        /v1/sidecard/jobs/ID` (`?wait_ms=N`: once it has finished, or after N ms)."""
        job_id = request.path[len(JOBS_PATH) + 1 :]
        with self.busy:
            try:
                if job_id:
                    op = _job_op(job_id, request.query)
                else:
                    # A job's options are its body's fields: a header the face reads on /v1/messages would be ignored.
                    header = next((name for name, _ in request.headers if name in _OPTIONS), None)
                    if header is not None:
                        field = _OPTIONS[header][0]
                        raise SidecardError(Code.BAD_REQUEST, f'header {header.decode()}: a job\'s options are body '
                                                              f'fields here: send "{field}" in the body')
                    if not request.body.strip().startswith(b"{"):
                        raise SidecardError(Code.BAD_REQUEST, _not_an_object(request))
                    try:
                        op = decode_submit(request.body)
                    except BadFrame as bad:
                        raise bad.error from None
            except SidecardError as err:
                await _error(responder, err)
                return
            answer = await self.job(op, caller)
            if isinstance(answer, SidecardError):
                await _error(responder, answer)
            elif isinstance(answer, list):
                await responder.send(202, [JSON], _encoder.encode({"jobs": answer}))
            else:
                await responder.send(200, [JSON], _encoder.encode(answer))

    async def _feedback(self, request: HttpRequest, responder: Responder) -> None:
        """`POST /v1/feedback`: a feedback frame's fields as the body; the request id as the reply headers gave it
        (`x-sidecard-request-id`) or as the message's id (`msg_...`)."""
        try:
            item = decode_feedback_body(request.body)
        except BadFrame as bad:
            await _error(responder, bad.error)
            return
        item.request_id = item.request_id.removeprefix("msg_")
        taken = self.take_feedback(item)
        if isinstance(taken, SidecardError):
            await _error(responder, taken)
            return
        reply = {"type": "feedback", "request_id": taken.request_id, "kind": taken.kind, "value": taken.value}
        await responder.send(200, [JSON], _encoder.encode(reply))


    async def _models(self, request: HttpRequest, responder: Responder) -> None:
        """`GET /v1/models` and `GET /v1/models/{id}`: the models the routes call, in the Models API's shape."""
        routed = self.engine.models()
        model_id = unquote(request.path[len(MODELS_PATH) + 1 :])
        try:
            answer = models.retrieve(routed, model_id) if model_id else models.page(routed, request.query)
        except SidecardError as err:
            await _error(responder, err)
            return
        await responder.send(200, [JSON], _encoder.encode(answer))


JOBS_PATH: Final = "/v1/sidecard/jobs"


def _job_route(request: HttpRequest) -> bool:
    """POST to the collection, or GET one job."""
    job_id = request.path[len(JOBS_PATH) + 1 :]
    return (request.method, bool(job_id)) in (("POST", False), ("GET", True)) and "/" not in job_id


def _job_op(job_id: str, query: str) -> JobGet | JobWait:
    """GET a job: as it is, or (`wait_ms`) once it has finished."""
    wait = [value for name, _, value in (part.partition("=") for part in query.split("&")) if name == "wait_ms"]
    if not wait:
        return JobGet(0, job_id)
    if not wait[0].isdigit() or not 1 <= int(wait[0]) <= 3_600_000:
        raise SidecardError(Code.BAD_REQUEST, "wait_ms: expected milliseconds within [1, 3600000]")
    return JobWait(0, job_id, int(wait[0]))


async def _unused(event: StreamEvent) -> None:  # pragma: no cover (only a stream emits)
    raise AssertionError("not a stream")


class _Events:
    """A streamed answer as the Messages API's server-sent events, ending in `message_stop` (or an `error` event)."""

    __slots__ = ("ending", "open_block", "responder")

    def __init__(self, responder: Responder) -> None:
        self.responder = responder
        self.open_block: int | None = None  # the index of the content block being streamed, if any
        self.ending: Ending | None = None  # the upstream's own fields for the message_delta written at the end

    async def send(self, event: StreamEvent) -> None:
        if isinstance(event, Delta):
            if event.field == OWN_FIELDS:  # a delta sidecard does not model, as the API sent it
                delta = {"type": event.kind, **event.piece}
            else:
                delta = {"type": API_DELTAS.get(event.kind, event.kind), event.field: event.piece}
            await self._write("content_block_delta", {"type": "content_block_delta", "index": event.index, "delta": delta})
        elif isinstance(event, BlockStart):
            await self._close_block()
            self.open_block = event.index
            await self._write("content_block_start", {"type": "content_block_start", "index": event.index, "content_block": event.block})
        elif isinstance(event, StreamStart):
            served = event.served_by
            headers = [
                (b"content-type", b"text/event-stream"),
                (b"cache-control", b"no-cache"),
                (b"x-sidecard-served-by", f"{served.provider}:{served.model}".encode()),
                *_ids(event.request_id, event.upstream_request_id),
            ]
            await self.responder.start(200, headers)
            message = {
                "id": f"msg_{event.request_id}", "type": "message", "role": "assistant", "model": event.model,
                "content": [], "stop_reason": None, "stop_sequence": None, "usage": event.usage,
            }
            await self._write("message_start", {"type": "message_start", "message": _beside(message, event.extra)})
        elif isinstance(event, Ending):
            self.ending = event
        else:
            await self._write("ping", {"type": "ping"})

    async def end(self, answer: Answer) -> None:
        """The stream's end: `message_delta` and `message_stop`, or the error (an error response before any event)."""
        if isinstance(answer, SidecardError):
            if not self.responder.started:
                await _error(self.responder, answer)
                return
            detail = f"{answer.message} (partial answer: {len(answer.text)} characters)" if isinstance(answer, PartialAnswer) else answer.message
            # No message_stop follows: the SDK reports the stream as failed, never as a complete answer. (The head
            # named the request: its `x-sidecard-request-id`, and `request-id` when the stream came from upstream.)
            await self._write("error", _error_body(answer, _error_object(answer, detail)))
            await self.responder.end()
            return
        assert isinstance(answer, Completion)
        await self._close_block()
        delta = {"stop_reason": answer.stop_reason, "stop_sequence": answer.stop_sequence}
        usage = msgspec.to_builtins(answer.usage)
        sidecard = {k.decode()[len("x-sidecard-") :]: v.decode() for k, v in _details(answer) if k.startswith(b"x-sidecard-")}
        ending = {"type": "message_delta", "delta": delta, "usage": usage, "sidecard": sidecard}
        if self.ending is not None:  # the upstream's own fields, where its message_delta had them
            _beside(delta, self.ending.delta)
            _beside(ending, self.ending.extra)
        await self._write("message_delta", ending)
        await self._write("message_stop", {"type": "message_stop"})
        await self.responder.end()

    async def _write(self, event: str, data: dict[str, Any]) -> None:
        await self.responder.write(b"event: " + event.encode() + b"\ndata: " + _encoder.encode(data) + b"\n\n")

    async def _close_block(self) -> None:
        if self.open_block is not None:
            index, self.open_block = self.open_block, None
            await self._write("content_block_stop", {"type": "content_block_stop", "index": index})


def _beside(fields: dict[str, Any], extra: dict[str, Any] | None) -> dict[str, Any]:
    """FIELDS with the upstream's own EXTRA fields after them, none in place of one of FIELDS."""
    if extra:
        for key, value in extra.items():
            fields.setdefault(key, value)
    return fields


def _parse(request: HttpRequest, *, counting: bool) -> Complete:
    """The HTTP request as a typed request: the body as the API's fields, the headers as sidecard's options."""
    body = request.body.strip()
    if not body.startswith(b"{"):
        raise SidecardError(Code.BAD_REQUEST, _not_an_object(request))
    fields: dict[str, msgspec.Raw] | None
    try:
        fields = _keys_decoder.decode(body)
    except UNDECODABLE:
        fields = None  # decode_body below says what is wrong with the body
    misplaced = sorted(_NOT_IN_BODY.intersection(fields or ()))
    if misplaced:
        header = _HEADER_FOR.get(misplaced[0])
        hint = f": sidecard's options travel as headers ({header})" if header else ""
        raise SidecardError(Code.BAD_REQUEST, f"body field {misplaced[0]!r} is not a Messages API field{hint}")
    try:
        parsed = decode_body(body, fields, counting=counting)
    except BadFrame as bad:
        raise bad.error from None
    options: dict[str, Any] = {}
    betas: list[str] = []
    stated: dict[bytes, bytes] = {}
    for name, value in request.headers:  # (one pass: most requests carry none of sidecard's headers)
        spec = _OPTIONS.get(name)
        if spec is None:
            if name in STATED_TIMEOUTS:
                stated[name] = value
            elif name == TRACEPARENT:  # two are invalid (Trace Context): "" is read as none, so a trace starts afresh
                parsed.traceparent = value.decode("latin-1") if parsed.traceparent is None else ""
            elif name == BETA_HEADER:
                betas.extend(beta.strip() for beta in value.decode("latin-1").split(","))
            continue
        option, parse = spec
        if option in options:  # (only a proxy or a hand-built request repeats one: which copy was meant is unknown)
            raise SidecardError(Code.BAD_REQUEST, f"header {name.decode()}: given more than once: send it once")
        try:
            options[option] = parse(_header_text(value))
        except (ValueError, KeyError, *UNDECODABLE):
            raise SidecardError(Code.BAD_REQUEST, f"header {name.decode()}: cannot read {_quoted(value)}") from None
    if any(betas):
        options["betas"] = [beta for beta in betas if beta]
    if options:  # (most requests carry none of sidecard's headers)
        try:
            given = msgspec.convert(options, HeaderOptions)
        except msgspec.ValidationError as exc:
            described = name_the_variable(describe_validation_error(exc), options.get("vars"))
            where, _, problem = described.partition(": ")
            option = where.split(".")[0].split("[")[0]
            if where.startswith("vars."):
                problem = described  # the variable named, as a prompt's own errors name it
            raise SidecardError(Code.BAD_REQUEST, f"header {_HEADER_FOR.get(option, option)}: {problem}") from None
        for option in options:
            setattr(parsed, option, getattr(given, option))
    if stated and (stated_ms := _stated_timeout_ms(stated)) is not None:
        # The SDK's timeout on a stream is a read timeout: the longest silence, before the first token and after.
        if parsed.deadline_ms is None:
            parsed.deadline_ms = stated_ms
        if parsed.stream:
            parsed.stream_idle_ms = stated_ms
    if parsed.prompt is not None:
        parsed.messages = []  # the SDK insists on `messages`; with a prompt, sidecard renders them
    return parsed


def _not_an_object(request: HttpRequest) -> str:
    """Why a body is no JSON object, for a client that compressed it (looked at only then: no cost to the others)."""
    coding = (request.header("content-encoding") or "").strip().lower()
    if coding not in ("", "identity"):
        return f"header content-encoding: {_quoted(coding.encode('latin-1'))} is not taken: send the body uncompressed"
    return "the request body must be a JSON object"


def _page(origin: bytes | None, site: bytes | None) -> str:
    return f"origin {_quoted(origin)}" if origin is not None else f"sec-fetch-site {_quoted(site or b'')}, no origin"


@functools.lru_cache(maxsize=64)
def _host_allowed(host: bytes, listed: frozenset[bytes]) -> bool:
    """Whether a request on the TCP port may carry HOST (with or without its port): a loopback name (localhost, a
    name under .localhost, 127.0.0.0/8, [::1]), or one LISTED. A page whose DNS name was rebound to 127.0.0.1 sends
    its own name, never one of these. (Cached: a client sends the same Host each time.)"""
    if host.startswith(b"["):
        end = host.find(b"]") + 1
        name, port = host[:end], host[end:]
        if not end or port[:1] not in (b"", b":"):
            return False
        port = port[1:]
    else:
        name, _, port = host.partition(b":")
    name = name.lower()
    if not name or not (port.isdigit() or not port):
        return False
    if name == b"localhost" or name.endswith(b".localhost") or name in listed:
        return True
    text = name.decode("latin-1")
    try:
        address = ipaddress.IPv6Address(text[1:-1]) if text[0] == "[" else ipaddress.IPv4Address(text)
    except ValueError:
        return False
    return address.is_loopback


def _is_json(media: bytes) -> bool:
    """Content-Type's media type (its parameters, such as charset, aside) is JSON's."""
    return media.partition(b";")[0].strip().lower() == _JSON_TYPE


def _preflight(request: HttpRequest) -> list[tuple[bytes, bytes]]:
    """An allowed origin's CORS preflight answer: the face's methods, and the headers the page asked for (the SDK's
    own: x-api-key, anthropic-version, x-stainless-*, sidecard's options), for PREFLIGHT_MAX_AGE_S."""
    headers = [(b"access-control-allow-methods", b"GET, POST"), (b"access-control-max-age", b"%d" % PREFLIGHT_MAX_AGE_S)]
    if (asked := request.header("access-control-request-headers")) is not None:
        headers.append((b"access-control-allow-headers", asked.encode("latin-1")))
    if request.header("access-control-request-private-network") == "true":  # Chrome: a public page calling loopback
        headers.append((b"access-control-allow-private-network", b"true"))
    return headers


def _token(headers: list[tuple[bytes, bytes]]) -> str | None:
    """The app's token: the SDK's api key (`x-api-key`), or `Authorization: Bearer`."""
    for name, value in headers:
        if name == b"x-api-key":
            return value.decode("latin-1")
        if name == b"authorization" and value[:7].lower() == b"bearer ":
            return value[7:].decode("latin-1").strip()
    return None


def _header_text(value: bytes) -> str:
    """A header's value as text: UTF-8 when it is (Python's SDK, curl), else Latin-1, as Node's fetch sends any
    character up to U+00FF ("José" from the Node SDK is the same user as from Python's)."""
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        return value.decode("latin-1")


def _quoted(value: bytes, limit: int = 80) -> str:
    """A header's value as an error message quotes it: its start, so a 64 KiB header is not echoed whole."""
    text = value.decode("latin-1")
    return f"{text!r}" if len(text) <= limit else f"{text[:limit]!r}... ({len(text)} characters)"


def _stated_timeout_ms(stated: dict[bytes, bytes]) -> int | None:
    """The SDK's own timeout (`STATED_TIMEOUTS`, seconds), which every official SDK sends: sidecard need not give up
    before the app would, but gives up just before it (`STATED_TIMEOUT_MARGIN`), so that the app gets the typed 504
    rather than its own timeout, which it would retry. Not sidecard's headers, so a value it cannot read is ignored,
    not refused."""
    seconds = next((s for s in map(_seconds, (stated.get(name) for name in STATED_TIMEOUTS)) if s is not None), None)
    if seconds is None:
        return None
    return max(1, math.ceil(seconds * 1000 * (1 - STATED_TIMEOUT_MARGIN)))


def _seconds(value: bytes | None) -> float | None:
    try:
        seconds = float(value) if value is not None else math.nan
    except ValueError:
        return None
    return seconds if 0 < seconds < NO_TIMEOUT_S else None  # (1e308 s is no timeout; in ms it overflowed)


def _details(completion: Completion) -> list[tuple[bytes, bytes]]:
    headers = [
        *_ids(completion.request_id, completion.upstream_request_id),
        (b"x-sidecard-served-by", f"{completion.served_by.provider}:{completion.served_by.model}".encode()),
        (b"x-sidecard-attempts", b"%d" % completion.attempts),
        (b"x-sidecard-fallback", b"true" if completion.fallback else b"false"),
        (b"x-sidecard-cached", b"true" if completion.cached else b"false"),
        (b"x-sidecard-stale", b"true" if completion.stale else b"false"),
        (b"x-sidecard-degraded", b"true" if completion.degraded else b"false"),
        (b"x-sidecard-cost-usd", f"{completion.cost_usd:.8f}".encode()),
        (b"x-sidecard-latency-ms", f"{completion.latency_ms:.3f}".encode()),
    ]
    if completion.guardrails:
        headers.append((b"x-sidecard-guardrails", ",".join(completion.guardrails).encode()))
    if completion.prompt is not None:
        headers.append((b"x-sidecard-prompt", completion.prompt.encode()))
        headers.append((b"x-sidecard-prompt-version", b"%d" % (completion.prompt_version or 0)))
    if completion.trace_id is not None:
        headers.append((b"x-sidecard-trace-id", completion.trace_id.encode()))
    return headers


def _counted(count: TokenCount) -> list[tuple[bytes, bytes]]:
    """A token count's headers: the model that counted, the request, and the provider's id of the count."""
    return [JSON, (b"x-sidecard-model", count.model.encode()), *_ids(count.request_id, count.upstream_request_id)]


def _cors(origin: bytes) -> list[tuple[bytes, bytes]]:
    """What lets a page of ORIGIN (an allowed one) read an answer, its headers too."""
    return [(b"access-control-allow-origin", origin), (b"access-control-expose-headers", b"*"), (b"vary", b"origin")]


def _ids(request_id: str | None, upstream_request_id: str | None) -> list[tuple[bytes, bytes]]:
    """A reply's ids: sidecard's request (`x-sidecard-request-id`), and the provider's answer (`request-id`, as the
    API sends it: the SDK's `request_id`) when an upstream gave one."""
    ids = [] if request_id is None else [(b"x-sidecard-request-id", request_id.encode())]
    if upstream_request_id:
        ids.append((b"request-id", upstream_request_id.encode()))
    return ids


async def _last_word(responder: Responder, begun: Trace | None = None) -> None:
    """The drain's grace period ran out on this request: its 503 (the connection then closes), or a stream's `error`
    event and end; briefly and best-effort, and nothing after a write that was cut, or once said (`Responder.open`).
    BEGUN: the request the engine began, which it names."""
    stopped = named(STOPPED, begun)
    with trio.CancelScope(shield=True), trio.move_on_after(LAST_WORD_S):
        try:
            if not responder.started:
                status, headers, body = _error_response(stopped)
                await responder.send(status, [*headers, (b"connection", b"close")], body)
            elif responder.open:
                await _Events(responder).end(stopped)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass


async def _error(responder: Responder, err: SidecardError, status: int | None = None, error_type: str | None = None) -> None:
    await responder.send(*_error_response(err, status, error_type))


def _error_response(
    err: SidecardError, status: int | None = None, error_type: str | None = None, should_retry: bool | None = None
) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    """ERR as the API's error: its status, headers and body (the code's own status and type unless given)."""
    default, default_type, default_retry = _STATUS.get(err.code, (500, "api_error", False))
    error_type = error_type or default_type
    should_retry = default_retry if should_retry is None else should_retry
    headers = [
        JSON,
        (b"x-sidecard-error-code", err.code.encode()),
        (b"x-should-retry", b"true" if should_retry else b"false"),
    ]
    if err.retry_after_ms is not None:
        headers.append((b"retry-after", b"%d" % math.ceil(err.retry_after_ms / 1000)))
        headers.append((b"retry-after-ms", b"%d" % err.retry_after_ms))
    headers += _ids(err.request_id, err.upstream_request_id)
    error = _error_object(err, err.message)
    if error_type is not None:
        error["type"] = error_type
    return status or default, headers, _encoder.encode(_error_body(err, error))


def _error_body(err: SidecardError, error: dict[str, Any]) -> dict[str, Any]:
    """The API's error body around ERROR, with the provider's `request_id` as the API's own carries it, when an
    upstream answered."""
    body = {"type": "error", "error": error}
    if err.upstream_request_id:
        body["request_id"] = err.upstream_request_id
    return body


def _error_object(err: SidecardError, message: str) -> dict[str, Any]:
    """The API's `error` object, with sidecard's code and whether the same request may succeed later."""
    _, error_type, _ = _STATUS.get(err.code, (500, "api_error", False))
    return {"type": error_type, "message": message, "sidecard_code": err.code, "retryable": err.retryable}
