"""The simulated Anthropic upstream: the Messages API over real HTTP, with faults on command.

Speaks what the official SDK expects on the direct API's paths and on Bedrock's and Vertex's, answers
deterministically from the request, and takes faults per model from Python (tests) or from its control
endpoint `/_sim/...` (a separate `sidecard sim` process, benchmarks, curious operators).

Every provider gets the first-party API's error bodies and headers (`request-id`, rate-limit headers): the SDK
maps errors by status alone, and one shape keeps the daemon's parsing honest.

Traffic control, as the API does it: `Limits` (a concurrency cap, requests and tokens per minute) answer 429 with
retry-after, and the `anthropic-ratelimit-*` headers count down exactly. The per-minute limits are per model, as
the API's are: each model is counted in its own window, under the limits set for every model or its own. Prompt
caching is accounted per model: a prefix ending at a `cache_control` block is written the first time and read
within its TTL (trio time).
count_tokens calls are recorded apart (`count_tokens_calls`, the `count_tokens` stat), never as Messages calls.

The Message Batches API (`/v1/messages/batches`: create, list, retrieve, results as JSONL, cancel) runs on trio's
clock with `BatchTiming`; see `batches`.

Control endpoint (JSON): GET /_sim/stats; POST /_sim/faults {"model": "*", ...Fault}; DELETE /_sim/faults[?model=M];
GET /_sim/limits; POST /_sim/limits {"model": M (optional), ...Limits, only the keys to change; null lifts a limit};
GET /_sim/batches;
POST /_sim/batches {...BatchTiming, only the keys to change}; POST /_sim/reset.

Over 500 lines because it is one API surface (three providers' paths, faults, limits, batches, the control
endpoint) that tests read as one; the answers themselves are in replies.py and the accounting in accounting.py.
"""

from __future__ import annotations

import functools
import itertools
import os
import random
import re
import urllib.parse
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final

import msgspec
import trio

from ..httpserver import Headers, HttpRequest, Responder, render_head, serve_tcp_http
from . import batches, replies
from .accounting import Limits, PromptCache, RateWindow
from .batches import Batch, BatchTiming
from .faults import Fault, FaultTable, fault_from_mapping, fault_problem
from .replies import Breakpoint

_encoder: Final = msgspec.json.Encoder()
_decoder: Final = msgspec.json.Decoder()

JSON: Final = b"application/json"
JSONL: Final = b"application/binary"  # the results file, as the API serves it
SSE: Final = b"text/event-stream; charset=utf-8"
EVENTSTREAM: Final = b"application/vnd.amazon.eventstream"
# Per minute, for the rate-limit headers when no `Limits` apply: then the simulator never throttles by itself.
REQUESTS_LIMIT: Final = 4000
TOKENS_LIMIT: Final = 2_000_000
INPUT_TOKENS_LIMIT: Final = 2_000_000
OUTPUT_TOKENS_LIMIT: Final = 400_000
CALLS_KEPT: Final = 1000
MESSAGES_MAX_BYTES: Final = 32 * 1024 * 1024  # the Messages API's request limit (a batch's is larger)
RESULTS_CHUNK_BYTES: Final = 65536
BATCHES_PATH: Final = "/v1/messages/batches"
BATCH_CALLS: Final = ("create", "retrieve", "results", "cancel", "list")
ERRORS_KEPT: Final = 100
_SECRET_HEADERS: Final = frozenset({b"x-api-key", b"authorization", b"x-goog-api-key", b"x-amz-security-token"})
_BEDROCK_ACTIONS: Final = {"invoke": False, "invoke-with-response-stream": True}
# The Vertex SDK's base URL usually ends in /v1; accept the paths with or without it.
_VERTEX_PATH: Final = re.compile(
    r"(?:/v1)?/projects/[^/]+/locations/[^/]+/publishers/anthropic/models/([^/:]+):(rawPredict|streamRawPredict)"
)
_ANTHROPIC, _BEDROCK, _VERTEX = "anthropic", "bedrock", "vertex"
_NO_LIMITS: Final = Limits()


@dataclass(slots=True, frozen=True)
class Call:
    """A Messages call as the simulator received it (credentials left out of `headers`)."""

    path: str
    model: str
    body: dict[str, Any]
    headers: dict[str, str]
    stream: bool


class ModelStats(msgspec.Struct):
    requests: int = 0  # Messages calls
    streamed: int = 0
    faulted: int = 0  # requests that got a fault
    throttled: int = 0  # requests refused with a 429 by the simulator's `Limits`
    by_status: dict[int, int] = {}  # status lines sent to Messages calls (a hang sends none)
    count_tokens: int = 0  # count_tokens calls: counted here alone
    batched: int = 0  # requests processed in Message Batches: counted here alone


class Simulator:
    """The simulated upstream's state and its HTTP handler (`handle`); serve it with `serve_sim`."""

    def __init__(
        self,
        *,
        seed: int = 0,
        latency_ms: float = 0.0,
        api_key: str | None = None,
        concurrency_limit: int | None = None,
        requests_per_minute: int | None = None,
        tokens_per_minute: int | None = None,
        input_tokens_per_minute: int | None = None,
        output_tokens_per_minute: int | None = None,
        faults: dict[str, Fault] | None = None,
        batch_timing: BatchTiming | None = None,
        batch_max_requests: int = batches.MAX_REQUESTS,
        batch_max_bytes: int = batches.MAX_BYTES,
    ) -> None:
        self.seed = seed
        self.latency_ms = latency_ms  # added to every Messages call
        self.api_key = api_key  # when set, calls must bear it (x-api-key or Authorization: Bearer)
        self.limits = Limits(
            concurrency_limit=concurrency_limit,
            requests_per_minute=requests_per_minute,
            tokens_per_minute=tokens_per_minute,
            input_tokens_per_minute=input_tokens_per_minute,
            output_tokens_per_minute=output_tokens_per_minute,
        )
        self._initial_limits = msgspec.structs.replace(self.limits)
        self._rng = random.Random(seed)
        self._faults = FaultTable(self._rng)
        self._initial_faults = dict(faults or {})  # `sidecard sim --fault`: installed now and again on `reset`
        for model, fault in self._initial_faults.items():
            self._faults.set(model, fault)
        self.calls: deque[Call] = deque(maxlen=CALLS_KEPT)
        self.count_tokens_calls: deque[Call] = deque(maxlen=CALLS_KEPT)
        self.stats: dict[str, ModelStats] = {}
        self.errors: deque[Exception] = deque(maxlen=ERRORS_KEPT)  # the handler's own failures (bugs), if any
        self.in_flight = 0  # Messages calls being answered now (those about to be refused included)
        self.max_in_flight = 0  # the most at once since the last `reset`
        self._total = 0
        self._waiters: list[tuple[int, trio.Event]] = []
        self._ids = itertools.count(1)
        self._id_prefix = os.urandom(4).hex()  # ids stay unique across simulators and restarts
        self._windows: dict[str, RateWindow] = {}  # per model
        self._model_changes: dict[str, dict[str, Any]] = {}  # a model's own limits, over `limits`
        self._model_limits: dict[str, Limits] = {}  # (what they make)
        self._prompt_cache = PromptCache()
        self.batch_timing = batch_timing or BatchTiming()  # for batches created from now on
        self._initial_batch_timing = self.batch_timing
        self.batch_max_requests = batch_max_requests
        self.batch_max_bytes = batch_max_bytes
        self.batches: dict[str, Batch] = {}  # the newest last; the oldest forgotten beyond `batches.BATCHES_KEPT`
        self.batch_calls = dict.fromkeys(BATCH_CALLS, 0)
        self._wall_base: float | None = None

    # ------------------------------------------------------------ the Python API

    def set_fault(self, model: str, fault: Fault) -> None:
        """Inject FAULT into calls for MODEL ("*" for every model; an exact model wins over "*")."""
        self._faults.set(model, fault)

    def clear_faults(self, model: str | None = None) -> None:
        self._faults.clear(model)

    def active_faults(self) -> dict[str, Fault]:
        return self._faults.snapshot()

    def set_batch_timing(self, **changes: float) -> BatchTiming:
        """Change some of the `BatchTiming` for batches created from now on; the others stay."""
        self.batch_timing = msgspec.convert({**msgspec.structs.asdict(self.batch_timing), **changes}, BatchTiming)
        return self.batch_timing

    def set_limits(self, model: str | None = None, **changes: float | None) -> Limits:
        """Change some of the traffic `Limits` (None lifts one); the others stay. With MODEL, that model's own
        per-minute limits (and window), over those of every model; the concurrency cap counts every model's calls."""
        if model is None:
            self.limits = msgspec.convert({**msgspec.structs.asdict(self.limits), **changes}, Limits)
            own = self._model_changes
        else:
            if not isinstance(model, str) or not model:
                raise msgspec.ValidationError("model: expected a model id")
            if "concurrency_limit" in changes:
                raise msgspec.ValidationError("concurrency_limit counts every model's calls: set it without a model")
            own = {**self._model_changes, model: {**self._model_changes.get(model, {}), **changes}}
        limits = {m: msgspec.convert({**msgspec.structs.asdict(self.limits), **c}, Limits) for m, c in own.items()}
        self._model_changes, self._model_limits = own, limits  # (only once every model's limits are valid)
        return self.limits if model is None else limits[model]

    def limits_for(self, model: str) -> Limits:
        """The traffic limits MODEL's calls are held to."""
        return self._model_limits.get(model, self.limits)

    def calls_for(self, model: str) -> int:
        """Messages calls for MODEL (count_tokens calls are not among them)."""
        stats = self.stats.get(model)
        return stats.requests if stats else 0

    def stats_total(self) -> dict[str, Any]:
        """{"requests", "streamed", "faulted", "throttled", "by_status", "count_tokens", "batched", "in_flight",
        "max_in_flight"} over every model."""
        total = ModelStats()
        for stats in self.stats.values():
            total.requests += stats.requests
            total.streamed += stats.streamed
            total.faulted += stats.faulted
            total.throttled += stats.throttled
            total.count_tokens += stats.count_tokens
            total.batched += stats.batched
            for status, n in stats.by_status.items():
                total.by_status[status] = total.by_status.get(status, 0) + n
        return {**msgspec.structs.asdict(total), "in_flight": self.in_flight, "max_in_flight": self.max_in_flight}

    async def wait_for_calls(self, n: int) -> None:
        """Return once N Messages calls have arrived (since the last `reset`)."""
        if self._total >= n:
            return
        event = trio.Event()
        self._waiters.append((n, event))
        await event.wait()

    def reset(self) -> None:
        """Forget calls, stats, faults, cached prompts, batches, the rate windows and models' own limits, restore the
        limits, faults and batch timing the simulator was made with, and rewind the random source."""
        self._faults.clear()
        for model, fault in self._initial_faults.items():
            self._faults.set(model, fault)
        self.calls.clear()
        self.count_tokens_calls.clear()
        self.stats.clear()
        self.errors.clear()
        self._total = 0
        self.max_in_flight = self.in_flight
        self._rng.seed(self.seed)
        self.limits = msgspec.structs.replace(self._initial_limits)
        self._windows.clear()
        self._model_changes.clear()
        self._model_limits.clear()
        self._prompt_cache.clear()
        self.batches.clear()
        self.batch_calls = dict.fromkeys(BATCH_CALLS, 0)
        self.batch_timing = self._initial_batch_timing

    # ------------------------------------------------------------ HTTP

    async def handle(self, request: HttpRequest, responder: Responder) -> None:
        path = request.path
        if path.startswith("/_sim/"):
            await self._control(request, responder)
            return
        if path.startswith(BATCHES_PATH) and path[len(BATCHES_PATH) : len(BATCHES_PATH) + 1] in ("", "/"):
            await self._batches(request, responder, path[len(BATCHES_PATH) + 1 :])
            return
        if len(request.body) > MESSAGES_MAX_BYTES:
            await self._error(responder, 413)
            return
        if request.method == "POST":
            if path == "/v1/messages":
                await self._messages(request, responder, _ANTHROPIC, None, None)
                return
            if path == "/v1/messages/count_tokens":
                await self._count_tokens(request, responder, _ANTHROPIC)
                return
            if path.startswith("/model/"):  # Bedrock: /model/{model}/invoke[-with-response-stream]
                model, _, action = path[len("/model/") :].rpartition("/")
                if model and action in _BEDROCK_ACTIONS:
                    await self._messages(
                        request, responder, _BEDROCK, urllib.parse.unquote(model), _BEDROCK_ACTIONS[action]
                    )
                    return
            elif match := _VERTEX_PATH.fullmatch(path):  # Vertex: .../models/{model}:(stream)rawPredict
                model, specifier = urllib.parse.unquote(match[1]), match[2]
                if model == "count-tokens":
                    if specifier == "rawPredict":
                        await self._count_tokens(request, responder, _VERTEX)
                        return
                else:
                    await self._messages(request, responder, _VERTEX, model, specifier == "streamRawPredict")
                    return
        await self._error(responder, 404, f"Not found: {request.method} {path}")

    async def _messages(
        self,
        request: HttpRequest,
        responder: Responder,
        provider: str,
        path_model: str | None,
        path_stream: bool | None,
    ) -> None:
        body = _decode(request.body)
        model = path_model if path_model is not None else body.get("model") if body is not None else None
        stream = path_stream if path_stream is not None else body is not None and body.get("stream") is True
        stats = self._record(request, model if isinstance(model, str) else "", body, stream)
        self.in_flight += 1
        if self.in_flight > self.max_in_flight:
            self.max_in_flight = self.in_flight
        counted = True
        try:
            problem = self._refusal(request, provider, body, model, messages_call=True)
            if problem is not None:
                await self._error(responder, *problem, stats=stats)
                return
            assert body is not None and isinstance(model, str)
            caching = b"cache_control" in request.body  # cheaper than walking every block of every request
            prompt_tokens, cached = _prompt(model, body, caching)
            now = trio.current_time()
            over = self._admit(model, prompt_tokens, now)
            if over is not None:
                stats.throttled += 1
                await self._error(responder, 429, over[0], stats=stats, retry_after=over[1], model=model)
                return
            if self.latency_ms:
                await trio.sleep(self.latency_ms / 1000)
            fault = self._faults.pick(model)
            if fault is not None:
                stats.faulted += 1
                if await self._preempt(responder, fault, stream, stats, model):
                    return
            answer = replies.compose(model, body, fault.quality if fault is not None else None)
            if self.latency_ms or fault is not None:
                now = trio.current_time()
            usage = self._usage(prompt_tokens, cached, answer, now)
            window = self._window(model)
            window.roll(now, self.limits_for(model).window_s)  # (a window may have ended since `_admit`)
            window.output_tokens += answer.output_tokens
            n = next(self._ids)
            message_id, request_id = f"msg_sim_{self._id_prefix}{n:08x}", f"req_sim_{self._id_prefix}{n:08x}"
            stats.by_status[200] = stats.by_status.get(200, 0) + 1
            if stream and not (fault is not None and fault.not_streamed):
                headers = self._headers(EVENTSTREAM if provider == _BEDROCK else SSE, request_id, now, model)
                events = replies.stream_events(message_id, model, answer, usage)
                await _stream(responder, headers, events, fault, request_id, bedrock=provider == _BEDROCK)
                return
            headers = self._headers(JSON, request_id, now, model)
            if fault is not None and fault.malformed:
                payload = b'{"id": "%b", "type": "message", "content": [{"type": "te' % message_id.encode()
            else:
                payload = _encoder.encode(replies.message(message_id, model, answer, usage))
            # The call is over once its answer leaves: a client that sends its next call the moment it reads
            # this one must not find it still counted (a real concurrency limit frees the slot by then too).
            self.in_flight -= 1
            counted = False
            await _send(responder, 200, headers, payload, fault)
        finally:
            if counted:
                self.in_flight -= 1

    async def _preempt(self, responder: Responder, fault: Fault, stream: bool, stats: ModelStats | None, model: str = "") -> bool:
        """Apply what FAULT does before (or instead of) an answer; True when nothing more is to be sent. MODEL: whose
        rate-limit headers an error carries."""
        if fault.latency_ms:
            await trio.sleep(fault.latency_ms / 1000)
        if fault.hang:
            await _hold(responder)
            return True
        status = fault.status_before_answer(stream)
        if status is not None:
            await self._error(responder, status, stats=stats, fault=fault, model=model)
            return True
        if fault.reset_after_events is not None and not stream:
            await responder.abort(reset=True)  # a whole answer has no events to send first
            return True
        return False

    def _admit(self, model: str, prompt_tokens: int, now: float) -> tuple[str, int] | None:
        """Count a Messages call for MODEL in, or say why the `Limits` refuse it: (message, retry-after seconds)."""
        limits = self.limits_for(model)
        window = self._window(model)
        window.roll(now, limits.window_s)
        if limits != _NO_LIMITS:
            if limits.concurrency_limit is not None and self.in_flight > limits.concurrency_limit:
                return f"Number of concurrent requests has exceeded your rate limit of {limits.concurrency_limit}.", 1
            for limit, used, what in (
                (limits.requests_per_minute, window.requests + 1, "requests"),
                (limits.input_tokens_per_minute, window.input_tokens + prompt_tokens, "input tokens"),
                (limits.tokens_per_minute, window.input_tokens + window.output_tokens + prompt_tokens, "tokens"),
                (limits.output_tokens_per_minute, window.output_tokens + 1, "output tokens"),
            ):
                if limit is not None and used > limit:
                    message = f"This request would exceed your rate limit of {limit} {what} per minute."
                    return message, window.seconds_left(now)
        window.requests += 1
        window.input_tokens += prompt_tokens
        return None

    def _window(self, model: str) -> RateWindow:
        window = self._windows.get(model)
        if window is None:
            window = self._windows[model] = RateWindow()
        return window

    async def _count_tokens(self, request: HttpRequest, responder: Responder, provider: str) -> None:
        body = _decode(request.body)
        model = body.get("model") if body is not None else None
        self._record_count(request, model if isinstance(model, str) else "", body)
        problem = self._refusal(request, provider, body, model, messages_call=False)
        if problem is not None:
            await self._error(responder, *problem)
            return
        assert body is not None and isinstance(model, str)
        fault = self._faults.pick(model)  # the same table as Messages calls: a counted fault is spent here too
        if fault is not None and await self._preempt(responder, fault, False, None, model):
            return
        if fault is not None and fault.malformed:
            payload = b'{"input_tok'
        else:
            payload = _encoder.encode(replies.count(body))
        await _send(responder, 200, self._headers(JSON, self._request_id(), None, model), payload, fault)

    def _usage(
        self, prompt_tokens: int, cached: tuple[int, list[Breakpoint]] | None, answer: replies.Answer, now: float
    ) -> dict[str, Any]:
        """The answer's `usage`: the prompt cache read and written for a prompt with cache breakpoints."""
        if cached is not None and cached[1]:
            usage = self._prompt_cache.usage(*cached, now)
            return {"input_tokens": usage.pop("input_tokens"), "output_tokens": answer.output_tokens, **usage}
        return {
            "input_tokens": prompt_tokens,
            "output_tokens": answer.output_tokens,
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": 0,
        }

    def _refusal(
        self, request: HttpRequest, provider: str, body: dict[str, Any] | None, model: Any, *, messages_call: bool
    ) -> tuple[int, str] | None:
        """The (status, message) the API would refuse this request with, if any."""
        problem = self._gate(request, provider)
        if problem is not None:
            return problem
        if body is None:
            return 400, "The request body is not a valid JSON object"
        if provider != _ANTHROPIC and "anthropic_version" not in body:
            return 400, "anthropic_version: Field required"
        problem = _invalid(body, model, needs_max_tokens=messages_call)
        return None if problem is None else (400, problem)

    def _gate(self, request: HttpRequest, provider: str) -> tuple[int, str] | None:
        """The credentials and the version header, which every call of the direct API needs."""
        if self.api_key is not None and not self._authorised(request):
            return 401, replies.ERROR_MESSAGES[401]
        if provider == _ANTHROPIC and request.header("anthropic-version") is None:
            return 400, "anthropic-version: header is required"
        return None

    def _authorised(self, request: HttpRequest) -> bool:
        if request.header("x-api-key") == self.api_key:
            return True
        return request.header("authorization") == f"Bearer {self.api_key}"

    async def _error(
        self,
        responder: Responder,
        status: int,
        message: str | None = None,
        *,
        stats: ModelStats | None = None,
        fault: Fault | None = None,
        retry_after: int | None = None,
        model: str = "",
    ) -> None:
        request_id = self._request_id()
        headers = self._headers(JSON, request_id, None, model)
        if retry_after is not None:
            headers.append((b"retry-after", b"%d" % retry_after))
        if fault is not None:
            if fault.retry_after_s is not None:
                headers.append((b"retry-after", b"%g" % fault.retry_after_s))
                headers.append((b"retry-after-ms", b"%d" % round(fault.retry_after_s * 1000)))
            if fault.should_retry is not None:
                headers.append((b"x-should-retry", b"true" if fault.should_retry else b"false"))
        if stats is not None:
            stats.by_status[status] = stats.by_status.get(status, 0) + 1
        text = message or replies.ERROR_MESSAGES.get(status, f"Simulated error {status}")
        await _send(responder, status, headers, replies.error_body(status, text, request_id), fault)

    def _request_id(self) -> str:
        return f"req_sim_{self._id_prefix}{next(self._ids):08x}"

    def _record(self, request: HttpRequest, model: str, body: dict[str, Any] | None, stream: bool) -> ModelStats:
        self.calls.append(Call(request.path, model, body if body is not None else {}, _public(request), stream))
        stats = self._model_stats(model)
        stats.requests += 1
        if stream:
            stats.streamed += 1
        self._total += 1
        if self._waiters:
            waiting = []
            for n, event in self._waiters:
                if n <= self._total:
                    event.set()
                else:
                    waiting.append((n, event))
            self._waiters = waiting
        return stats

    def _record_count(self, request: HttpRequest, model: str, body: dict[str, Any] | None) -> None:
        call = Call(request.path, model, body if body is not None else {}, _public(request), False)
        self.count_tokens_calls.append(call)
        self._model_stats(model).count_tokens += 1

    def _headers(
        self, content_type: bytes, request_id: str, now: float | None = None, model: str = ""
    ) -> list[tuple[bytes, bytes]]:
        """The reply's headers, with MODEL's rate limits and what is left of them in its current minute (the input-
        and output-token ones only when a token limit is set: every header costs the plain path). No model (a
        batch's call): every model's limits, and a window nothing is counted in."""
        limits = self.limits_for(model)
        window = self._window(model)
        window.roll(trio.current_time() if now is None else now, limits.window_s)
        requests = limits.requests_per_minute or REQUESTS_LIMIT
        tokens = limits.tokens_per_minute or TOKENS_LIMIT
        used_input, used_output, reset = window.input_tokens, window.output_tokens, window.reset_at
        headers = [
            (b"content-type", content_type),
            (b"request-id", request_id.encode()),
            (b"anthropic-ratelimit-requests-limit", b"%d" % requests),
            (b"anthropic-ratelimit-requests-remaining", b"%d" % max(0, requests - window.requests)),
            (b"anthropic-ratelimit-requests-reset", reset),
            (b"anthropic-ratelimit-tokens-limit", b"%d" % tokens),
            (b"anthropic-ratelimit-tokens-remaining", b"%d" % max(0, tokens - used_input - used_output)),
            (b"anthropic-ratelimit-tokens-reset", reset),
        ]
        if limits.tokens_per_minute or limits.input_tokens_per_minute or limits.output_tokens_per_minute:
            input_tokens = limits.input_tokens_per_minute or INPUT_TOKENS_LIMIT
            output_tokens = limits.output_tokens_per_minute or OUTPUT_TOKENS_LIMIT
            headers += (
                (b"anthropic-ratelimit-input-tokens-limit", b"%d" % input_tokens),
                (b"anthropic-ratelimit-input-tokens-remaining", b"%d" % max(0, input_tokens - used_input)),
                (b"anthropic-ratelimit-input-tokens-reset", reset),
                (b"anthropic-ratelimit-output-tokens-limit", b"%d" % output_tokens),
                (b"anthropic-ratelimit-output-tokens-remaining", b"%d" % max(0, output_tokens - used_output)),
                (b"anthropic-ratelimit-output-tokens-reset", reset),
            )
        return headers

    # ------------------------------------------------------------ Message Batches

    async def _batches(self, request: HttpRequest, responder: Responder, rest: str) -> None:
        """/v1/messages/batches[/ID[/results|/cancel]]: REST is what follows the collection's path."""
        batch_id, _, action = rest.partition("/")
        if not rest:
            call = {"POST": "create", "GET": "list"}.get(request.method)
        else:
            call = {("GET", ""): "retrieve", ("GET", "results"): "results", ("POST", "cancel"): "cancel"}.get(
                (request.method, action)
            )
        if call is None:
            await self._error(responder, 404, f"Not found: {request.method} {request.path}")
            return
        self.batch_calls[call] += 1
        problem = self._gate(request, _ANTHROPIC)
        if problem is not None:
            await self._error(responder, *problem)
            return
        fault = self._faults.pick_first((f"batches:{call}", "batches"))
        if fault is not None and await self._preempt(responder, fault, False, None):
            return
        now = trio.current_time()
        if call == "create":
            await self._create_batch(request, responder, now, fault)
            return
        if call == "list":
            await self._list_batches(request, responder, now, fault)
            return
        batch = self.batches.get(batch_id)
        if batch is None:
            await self._error(responder, 404, f"No batch with id {batch_id!r}", fault=fault)
            return
        if call == "cancel":
            batch.cancel(now)
        if call != "results":
            await self._send_json(responder, self._batch_view(batch, request, now), fault)
        elif batch.status(now) != "ended":
            await self._error(responder, 400, f"Batch {batch_id} has not ended: its results come once it has", fault=fault)
        else:
            await _send_lines(responder, self._headers(JSONL, self._request_id(), now), batch.result_lines(), fault)

    async def _create_batch(self, request: HttpRequest, responder: Responder, now: float, fault: Fault | None) -> None:
        if len(request.body) > self.batch_max_bytes:
            await self._error(responder, 413, fault=fault)
            return
        body = _decode(request.body)
        requests = body.get("requests") if body is not None else None
        problem = "The request body is not a valid JSON object" if body is None else None
        problem = problem or batches.request_problem(requests, self.batch_max_requests)
        if problem is not None:
            await self._error(responder, 400, problem, fault=fault)
            return
        assert isinstance(requests, list)
        caching = b"cache_control" in request.body
        expire_all = fault is not None and fault.expire
        items = [self._batch_item(r["custom_id"], r["params"], caching, expire_all, now) for r in requests]
        batch = Batch(f"msgbatch_sim_{self._id_prefix}{next(self._ids):08x}", items, now, self.batch_timing)
        self.batches[batch.id] = batch
        if len(self.batches) > batches.BATCHES_KEPT:
            del self.batches[next(iter(self.batches))]
        await self._send_json(responder, self._batch_view(batch, request, now), fault)

    def _batch_item(self, custom_id: str, params: dict[str, Any], caching: bool, expire: bool, now: float) -> batches.Item:
        """One request of a batch, answered now as a Messages call would be (the batch reveals it later)."""
        encoded_id = _encoder.encode(custom_id)
        model = params.get("model")
        problem = _invalid(params, model, needs_max_tokens=True)
        if problem is None and params.get("stream"):
            problem = "stream: requests in a batch cannot be streamed"
        if problem is not None:
            return batches.Item(encoded_id, "errored", batches.errored(replies.error_body(400, problem, self._request_id())))
        assert isinstance(model, str)
        stats = self._model_stats(model)
        stats.batched += 1
        fault = self._faults.pick(model)
        if fault is not None:
            stats.faulted += 1
        if expire or (fault is not None and fault.expire):
            return batches.Item(encoded_id, "expired", b"")
        status = None if fault is None else fault.status_before_answer(False)
        if status is not None:
            message = replies.ERROR_MESSAGES.get(status, f"Simulated error {status}")
            return batches.Item(encoded_id, "errored", batches.errored(replies.error_body(status, message, self._request_id())))
        answer = replies.compose(model, params, fault.quality if fault is not None else None)
        usage = self._usage(*_prompt(model, params, caching), answer, now)
        usage["service_tier"] = "batch"
        message = replies.message(f"msg_sim_{self._id_prefix}{next(self._ids):08x}", model, answer, usage)
        return batches.Item(encoded_id, "succeeded", batches.succeeded(message))

    async def _list_batches(self, request: HttpRequest, responder: Responder, now: float, fault: Fault | None) -> None:
        """Newest first; `after_id` pages towards older batches, `before_id` towards newer ones."""
        query = urllib.parse.parse_qs(request.query)
        try:
            limit = int(query.get("limit", ["20"])[0])
        except ValueError:
            limit = 0
        if not 1 <= limit <= 1000:
            await self._error(responder, 400, "limit: Input should be between 1 and 1000", fault=fault)
            return
        ids = list(reversed(self.batches))
        after, before = query.get("after_id", [None])[0], query.get("before_id", [None])[0]
        if after is not None:
            ids = ids[ids.index(after) + 1 :] if after in ids else []
            page = ids[:limit]
        elif before is not None:
            ids = ids[: ids.index(before)] if before in ids else []
            page = ids[-limit:]
        else:
            page = ids[:limit]
        reply = {
            "data": [self._batch_view(self.batches[i], request, now) for i in page],
            "has_more": len(page) < len(ids),
            "first_id": page[0] if page else None,
            "last_id": page[-1] if page else None,
        }
        await self._send_json(responder, reply, fault)

    def _batch_view(self, batch: Batch, request: HttpRequest, now: float) -> dict[str, Any]:
        if self._wall_base is None:
            self._wall_base = datetime.now(UTC).timestamp() - now
        return batch.view(now, f"http://{request.header('host') or '127.0.0.1'}", self._wall_base)

    async def _send_json(self, responder: Responder, reply: dict[str, Any], fault: Fault | None) -> None:
        payload = _encoder.encode(reply)
        if fault is not None and fault.malformed:
            payload = payload[: len(payload) // 2]
        await _send(responder, 200, self._headers(JSON, self._request_id()), payload, fault)

    def _model_stats(self, model: str) -> ModelStats:
        stats = self.stats.get(model)
        if stats is None:
            stats = self.stats[model] = ModelStats()
        return stats

    # ------------------------------------------------------------ control endpoint

    async def _control(self, request: HttpRequest, responder: Responder) -> None:
        """The control endpoint's routes: see the module's docstring."""
        route = (request.method, request.path)
        status: int = 200
        reply: dict[str, Any] = {"ok": True}
        if route == ("GET", "/_sim/stats"):
            reply = {
                "total": self.stats_total(),
                "models": self.stats,
                "faults": self.active_faults(),
                "limits": self.limits,
                "model_limits": self._model_limits,
                "errors": len(self.errors),
            }
        elif route == ("GET", "/_sim/limits"):
            reply = {"limits": self.limits, "model_limits": self._model_limits}
        elif route == ("POST", "/_sim/limits"):
            status, reply = _changed("limits", request.body, self.set_limits)
        elif route == ("POST", "/_sim/faults"):
            try:
                model, fault = fault_from_mapping(_decoder.decode(request.body))
            except msgspec.MsgspecError as exc:
                status, reply = 400, {"error": fault_problem(exc)}
            else:
                self.set_fault(model, fault)
                reply = {"model": model, "fault": fault}
        elif route == ("DELETE", "/_sim/faults"):
            self.clear_faults(urllib.parse.parse_qs(request.query).get("model", [None])[0])
        elif route == ("GET", "/_sim/batches"):
            reply = {"timing": self.batch_timing, "batches": len(self.batches), "calls": self.batch_calls}
        elif route == ("POST", "/_sim/batches"):
            status, reply = _changed("timing", request.body, self.set_batch_timing)
        elif route == ("POST", "/_sim/reset"):
            self.reset()
        else:
            status, reply = 404, {"error": f"no control endpoint {request.method} {request.path}"}
        await responder.send(status, [(b"content-type", JSON)], _encoder.encode(reply))


def _changed(name: str, body: bytes, change: Callable[..., Any]) -> tuple[int, dict[str, Any]]:
    """A control call that changes some settings: (200, {NAME: what they are now}) or (400, {"error": why})."""
    try:
        raw = _decoder.decode(body)
        if not isinstance(raw, dict):
            raise msgspec.ValidationError(f"expected a JSON object of {name}")
        return 200, {name: change(**raw)}
    except (msgspec.MsgspecError, TypeError) as exc:
        return 400, {"error": str(exc)}


def _api_refusal(status: int, request: Sequence[tuple[bytes, bytes]]) -> tuple[int, Headers, bytes]:
    """The HTTP server's own refusals (a body or head over its limits) in the API's error body."""
    message = replies.ERROR_MESSAGES.get(status, f"Simulated error {status}")
    return status, [(b"content-type", JSON)], replies.error_body(status, message, "req_sim_refused")


def _public(request: HttpRequest) -> dict[str, str]:
    """The request's headers, less credentials."""
    return {k.decode("latin-1"): v.decode("latin-1") for k, v in request.headers if k not in _SECRET_HEADERS}


def _prompt(model: str, body: dict[str, Any], caching: bool) -> tuple[int, tuple[int, list[Breakpoint]] | None]:
    """The prompt's input tokens, and with CACHING (the request names `cache_control`) its size and breakpoints."""
    if not caching:
        return replies.input_tokens(body), None
    size, breakpoints = replies.cache_breakpoints(model, body)
    return max(1, replies.tokens(size)), (size, breakpoints)


def _decode(body: bytes) -> dict[str, Any] | None:
    try:
        value = _decoder.decode(body)
    except msgspec.DecodeError:
        return None
    return value if isinstance(value, dict) else None


def _invalid(body: dict[str, Any], model: Any, *, needs_max_tokens: bool) -> str | None:
    """What the API would say is wrong with the request body, if anything (its wording, roughly)."""
    if model is None:
        return "model: Field required"
    if not isinstance(model, str) or not model:
        return "model: Input should be a non-empty string"
    if needs_max_tokens:
        max_tokens = body.get("max_tokens")
        if max_tokens is None:
            return "max_tokens: Field required"
        if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
            return "max_tokens: Input should be an integer greater than or equal to 1"
    messages = body.get("messages")
    if messages is None:
        return "messages: Field required"
    if not isinstance(messages, list) or not messages:
        return "messages: Input should be a non-empty list"
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ("user", "assistant"):
            return f"messages.{i}.role: Input should be 'user' or 'assistant'"
        content = message.get("content")
        if not isinstance(content, str) and not (
            isinstance(content, list) and all(isinstance(b, dict) for b in content)
        ):
            return f"messages.{i}.content: Input should be a string or a list of content blocks"
    system = body.get("system")
    if system is not None and not isinstance(system, (str, list)):
        return "system: Input should be a string or a list of content blocks"
    sequences = body.get("stop_sequences")
    if sequences is not None and not (isinstance(sequences, list) and all(isinstance(s, str) for s in sequences)):
        return "stop_sequences: Input should be a list of strings"
    return None


async def _send(responder: Responder, status: int, headers: Headers, payload: bytes, fault: Fault | None) -> None:
    if fault is not None and fault.reset_after_bytes is not None:
        head = render_head(status, [*headers, (b"content-length", b"%d" % len(payload))])
        await _cut(responder, head + payload, fault.reset_after_bytes)
    else:
        await responder.send(status, headers, payload)


async def _send_lines(responder: Responder, headers: Headers, lines: Iterator[bytes], fault: Fault | None) -> None:
    """A results file, streamed in chunks; a fault that cuts or spoils it gets it whole first."""
    if fault is not None and (fault.malformed or fault.reset_after_bytes is not None):
        payload = b"".join(lines)
        if fault.malformed:
            payload = payload[: len(payload) // 2]  # ends inside a line
        await _send(responder, 200, headers, payload, fault)
        return
    await responder.start(200, headers)
    chunk: list[bytes] = []
    size = 0
    for line in lines:
        chunk.append(line)
        size += len(line)
        if size >= RESULTS_CHUNK_BYTES:
            await responder.write(b"".join(chunk))
            chunk, size = [], 0
    if chunk:
        await responder.write(b"".join(chunk))
    await responder.end()


async def _stream(
    responder: Responder,
    headers: list[tuple[bytes, bytes]],
    events: list[dict[str, Any]],
    fault: Fault | None,
    request_id: str,
    *,
    bedrock: bool,
) -> None:
    frame = replies.eventstream_chunk if bedrock else replies.sse
    frames = [frame(event) for event in events]
    stall = reset = False
    if fault is not None:
        if fault.malformed:
            frames[1:] = [replies.eventstream_malformed(events[-1]) if bedrock else replies.SSE_MALFORMED]
        elif fault.error_after_events is not None:
            status = fault.status or 529
            message = replies.ERROR_MESSAGES.get(status, f"Simulated error {status}")
            error = (
                replies.eventstream_error(status, message)
                if bedrock
                else replies.sse_error(status, message, request_id)
            )
            frames[fault.error_after_events :] = [error]
        elif fault.stall_after_events is not None:
            del frames[fault.stall_after_events :]
            stall = True
        elif fault.reset_after_events is not None:
            del frames[fault.reset_after_events :]
            reset = True
        if fault.reset_after_bytes is not None or reset:
            chunks = b"".join(b"%x\r\n%b\r\n" % (len(f), f) for f in frames)
            head = render_head(200, [*headers, (b"transfer-encoding", b"chunked")])
            response = head + chunks + (b"" if stall or reset else b"0\r\n\r\n")
            limit = fault.reset_after_bytes
            await _cut(responder, response, len(response) if limit is None else limit)
            return
    await responder.start(200, headers)
    if fault is not None and fault.event_interval_ms:
        for index, chunk in enumerate(frames):
            if index:
                await trio.sleep(fault.event_interval_ms / 1000)
            await responder.write(chunk)
    else:
        await responder.write(b"".join(frames))  # nothing to wait for between events: one write is cheapest
    if stall:
        await _hold(responder)
    else:
        await responder.end()


async def _cut(responder: Responder, response: bytes, limit: int) -> None:
    """Send the first LIMIT bytes of a serialized response, then reset the connection."""
    await responder.stream.send_all(response[:limit])
    await responder.abort(reset=True)


async def _hold(responder: Responder) -> None:
    """Answer nothing until the client goes away, as a stuck upstream would (reading, not polling)."""
    try:
        while await responder.stream.receive_some(65536):
            pass
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    await responder.abort(reset=False)


async def serve_sim(
    sim: Simulator,
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve SIM on HOST:PORT (0: any free port) until cancelled; `task_status.started` gets the base URL."""
    async with trio.open_nursery() as nursery:
        bound_host, bound_port = await nursery.start(
            functools.partial(
                serve_tcp_http,
                sim.handle,
                host,
                port,
                on_error=sim.errors.append,
                max_body_bytes=max(MESSAGES_MAX_BYTES, sim.batch_max_bytes),
                refusal=_api_refusal,
            )
        )
        task_status.started(f"http://{f'[{bound_host}]' if ':' in bound_host else bound_host}:{bound_port}")
