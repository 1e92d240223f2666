"""Calls to the Messages API: a lean first-party fast path and the SDK path, behind one interface.

Both send the same bytes over the same Trio-native pool. The fast path pre-builds the direct API's headers
and encodes the body with msgspec; the SDK path (`sdk.py`) serves Bedrock and Vertex (signing, URL rewriting)
and first-party calls when the fast path is off. The SDK path is imported only when a target needs it: the
anthropic SDK takes about a second to import. Either way a failure leaves as an `UpstreamError`.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any, Final
from urllib.parse import urlsplit

import msgspec
import trio

from .. import __version__
from ..config import Target
from ..protocol import MESSAGE_FIELDS, UNDECODABLE, Usage, own_fields
from . import errors
from .errors import UpstreamError
from .pool import ConnectionPool, Origin, PoolResponse, PreparedRequest, TransportError, TransportTimeout
from .sse import SSEDecoder

if TYPE_CHECKING:
    from .sdk import SdkPath

DEFAULT_BASE_URL: Final = "https://api.anthropic.com"
BASE_URL_VARIABLE: Final = "ANTHROPIC_BASE_URL"  # honoured by the SDK too
# The Messages API version the fast path speaks: the installed SDK's (a test checks they agree).
ANTHROPIC_VERSION: Final = "2026-10-21"
MESSAGES_PATH: Final = "/v1/messages"
COUNT_TOKENS_PATH: Final = "/v1/messages/count_tokens"


class ApiMessage(msgspec.Struct):
    id: str = ""
    model: str = ""
    # Passed to the client byte for byte: blocks sidecard does not know survive untouched.
    content: msgspec.Raw = msgspec.Raw(b"[]")
    stop_reason: str | None = None
    stop_sequence: str | None = None
    usage: Usage = msgspec.field(default_factory=Usage)


class _KnownMessage(ApiMessage, forbid_unknown_fields=True):
    """The common reply: no field beside those sidecard models (MESSAGE_FIELDS), or the API's optional ones left
    null (NULL_IS_ABSENT). A reply with another top-level field (a `container`, `stop_details`, a field the API adds
    later) fails this decode and is read again for its extras, so the common reply is decoded once, as fast as before."""

    type: str = ""
    role: str = ""
    container: None = None
    stop_details: None = None
    context_management: None = None
    diagnostics: None = None


class _Block(msgspec.Struct):
    type: str = ""
    text: str = ""


class _TokenCount(msgspec.Struct, forbid_unknown_fields=True):
    """The common count: the number alone. A count with more (the beta's `context_management`) is read again for
    it, as a message with fields sidecard does not model is."""

    input_tokens: int


_known_decoder: Final = msgspec.json.Decoder(_KnownMessage)
_message_decoder: Final = msgspec.json.Decoder(ApiMessage)
_fields_decoder: Final = msgspec.json.Decoder(dict[str, Any])
_count_decoder: Final = msgspec.json.Decoder(_TokenCount)
_COUNT_FIELDS: Final = frozenset({"input_tokens"})
_blocks_decoder: Final = msgspec.json.Decoder(list[_Block])
_encoder: Final = msgspec.json.Encoder()


class UpstreamReply(msgspec.Struct):
    message: ApiMessage
    text: str
    request_id: str | None
    rate_limits: dict[str, str] | None = None  # the provider's THROTTLE_HEADERS, for traffic control
    extra: dict[str, Any] | None = None  # the message's top-level fields sidecard does not model (MESSAGE_FIELDS)


class CountReply(msgspec.Struct):
    """A count-tokens answer: the count, and the provider's id of it."""

    input_tokens: int
    request_id: str | None
    extra: dict[str, Any] | None = None  # the count's other fields (the beta's context_management), as they came


class UpstreamStream:
    """An open streamed answer: `next_event()` until it returns None (the connection ended)."""

    def __init__(
        self,
        events: AsyncIterator[tuple[str, bytes]],
        close: Callable[[], Awaitable[None]],
        request_id: str | None,
        rate_limits: dict[str, str] | None = None,
    ) -> None:
        self._events = events
        self._close = close
        self.request_id = request_id
        self.rate_limits = rate_limits  # the response's THROTTLE_HEADERS, for traffic control

    async def next_event(self) -> tuple[str, bytes] | None:
        try:
            return await self._events.__anext__()
        except StopAsyncIteration:
            return None
        except TransportError as exc:  # the fast path's pool; the SDK path maps its own failures
            raise _transport_failure(exc, self.request_id) from None

    async def aclose(self) -> None:
        close_events = getattr(self._events, "aclose", None)
        if close_events is not None:
            await close_events()  # an async generator must be closed explicitly under Trio
        await self._close()


async def _sse_events(chunks: AsyncIterator[bytes]) -> AsyncIterator[tuple[str, bytes]]:
    decoder = SSEDecoder()
    async for chunk in chunks:
        for event in decoder.feed(chunk):
            yield event


def _transport_failure(exc: TransportError, request_id: str | None = None) -> UpstreamError:
    kind = errors.TIMEOUT if isinstance(exc, TransportTimeout) else errors.CONNECT
    return UpstreamError(kind, request_id=request_id)


def message_extra(body: bytes) -> dict[str, Any] | None:
    """A message's top-level fields sidecard does not model (MESSAGE_FIELDS), as they came (a null optional one left
    out), or None. Raises what decoding raises (UNDECODABLE)."""
    return own_fields(_fields_decoder.decode(body), MESSAGE_FIELDS) or None


def decode_count(body: bytes, request_id: str | None) -> CountReply:
    """A count-tokens answer; raises `UpstreamError` (malformed) for one without a count."""
    try:
        try:
            return CountReply(_count_decoder.decode(body).input_tokens, request_id)
        except msgspec.ValidationError:  # a field beside the count (or no count: decoded again, and refused)
            fields = _fields_decoder.decode(body)
            count = fields.get("input_tokens")
            if type(count) is not int:
                raise UpstreamError(errors.MALFORMED, request_id=request_id) from None
            return CountReply(count, request_id, own_fields(fields, _COUNT_FIELDS) or None)
    except UNDECODABLE:
        raise UpstreamError(errors.MALFORMED, request_id=request_id) from None


def decode_reply(body: bytes, request_id: str | None) -> UpstreamReply:
    extra = None
    try:
        try:
            message: ApiMessage = _known_decoder.decode(body)
        except msgspec.ValidationError:  # a field sidecard does not model (or a malformed reply: decoded again)
            message = _message_decoder.decode(body)
            extra = message_extra(body)
        blocks = _blocks_decoder.decode(message.content)
    except UNDECODABLE:
        raise UpstreamError(errors.MALFORMED, request_id=request_id) from None
    text = "".join(b.text for b in blocks if b.type == "text")
    return UpstreamReply(message, text, request_id, extra=extra)


class Upstream:
    """The fast path, and the SDK path when a target needs it; both share one pool."""

    def __init__(
        self,
        pool: ConnectionPool,
        *,
        api_key: str | None,
        base_url: str | None = None,
        anthropic_version: str | None = None,
        fast_path: bool = True,
        provider_credentials: Mapping[str, str] | None = None,
        redirect_to: str | None = None,
    ) -> None:
        """`base_url` None: `$ANTHROPIC_BASE_URL`, else api.anthropic.com, as the SDK decides."""
        self._pool = pool
        self._api_key = api_key
        self._base_url = (base_url or os.environ.get(BASE_URL_VARIABLE) or DEFAULT_BASE_URL).rstrip("/")
        self._anthropic_version = anthropic_version or ANTHROPIC_VERSION
        self._fast_path = fast_path and api_key is not None
        # Simulated runs hand Bedrock and Vertex stand-in credentials so no cloud SDK is needed, and send
        # every target, whatever its provider and base_url, to the simulated upstream.
        self._provider_credentials = dict(provider_credentials or {})
        self._redirect_to = redirect_to.rstrip("/") if redirect_to else None
        self._sdk: SdkPath | None = None
        self._fast_routes: dict[str, _FastRoute] = {}

    def needs_sdk(self, target: Target) -> bool:
        return target.provider != "anthropic" or not self._fast_path

    async def prepare(self, targets: Iterable[Target]) -> None:
        """Import the SDK path now (in a worker thread) if any of `targets` needs it, so no request waits for
        the import. Call it at start-up and before a reload takes effect."""
        if self._sdk is None and any(self.needs_sdk(t) for t in targets):
            await trio.to_thread.run_sync(importlib.import_module, f"{__package__}.sdk")
            self._sdk_path()

    def _sdk_path(self) -> SdkPath:
        if self._sdk is None:
            from .sdk import SdkPath  # imported already by prepare(), unless a caller skipped it

            self._sdk = SdkPath(self._pool, api_key=self._api_key, provider_credentials=self._provider_credentials)
        return self._sdk

    # ------------------------------------------------------------ calls

    async def create(
        self, target: Target, body: dict[str, Any], *, timeout_s: float, headers: Mapping[str, str] | None = None,
        bounded: bool = False,
    ) -> UpstreamReply:
        """One attempt at a Messages API call; `body` lacks `model`, which comes from the target. `headers` are the
        request's own `anthropic-*` headers (`anthropic-beta`), sent on every path. `bounded`: the caller's own
        cancel scope ends the call within `timeout_s` (the walker's attempt), so the fast path's reads need no
        timer of their own."""
        if self.needs_sdk(target):
            return await self._sdk_path().create(target, self._base_for(target), body, timeout_s, headers)
        prepared = self._fast_head(target, 0, headers)
        payload = _encoder.encode({"model": target.model, **body})
        response, data = await self._fast_call(prepared, payload, None if bounded else timeout_s)
        reply = decode_reply(data, _str(response.header(b"request-id")))
        reply.rate_limits = _rate_limit_headers(response.headers)
        return reply

    async def open_stream(
        self, target: Target, body: dict[str, Any], *, timeout_s: float, headers: Mapping[str, str] | None = None
    ) -> UpstreamStream:
        """Start a streamed call; HTTP errors raise `UpstreamError` here, before any event. `timeout_s`: how long
        the caller waits for its first token."""
        if self.needs_sdk(target):
            return await self._sdk_path().open_stream(target, self._base_for(target), body, timeout_s, headers)
        prepared = self._fast_head(target, 0, headers)
        payload = _encoder.encode({"model": target.model, **body, "stream": True})
        try:
            response = await self._pool.send(prepared, payload)
        except TransportError as exc:
            raise _transport_failure(exc) from None
        request_id = _str(response.header(b"request-id"))
        if response.status != 200:
            try:
                data = await response.read()
            except TransportError:
                data = b""
            raise errors.from_response(response.status, _header_map(response.headers), data)
        return UpstreamStream(
            _sse_events(response.aiter_bytes()), response.aclose, request_id, _rate_limit_headers(response.headers)
        )

    async def count_tokens(
        self, target: Target, body: dict[str, Any], *, timeout_s: float, headers: Mapping[str, str] | None = None
    ) -> CountReply:
        if self.needs_sdk(target):
            return await self._sdk_path().count_tokens(target, self._base_for(target), body, timeout_s, headers)
        prepared = self._fast_head(target, 1, headers)
        payload = _encoder.encode({"model": target.model, **body})
        response, data = await self._fast_call(prepared, payload, timeout_s)
        return decode_count(data, _str(response.header(b"request-id")))

    async def _fast_call(
        self, prepared: PreparedRequest, payload: bytes, timeout_s: float | None
    ) -> tuple[PoolResponse, bytes]:
        """POST and read the whole answer; a status other than 200 raises its `UpstreamError`."""
        try:
            response = await self._pool.send(prepared, payload, read_timeout=timeout_s)
            data = await response.read()
        except TransportError as exc:
            raise _transport_failure(exc) from None
        if response.status != 200:
            raise errors.from_response(response.status, _header_map(response.headers), data)
        return response, data

    def _fast_head(self, target: Target, which: int, headers: Mapping[str, str] | None) -> PreparedRequest:
        """The head of a Messages (0) or count_tokens (1) request to `target`; a header no request may carry is
        an `UpstreamError`, as the pool's other refusals are."""
        try:
            return self._fast_route(self._base_for(target)).head(self._pool, which, headers)
        except TransportError as exc:
            raise _transport_failure(exc) from None

    def _fast_route(self, base_url: str) -> _FastRoute:
        """The Messages and count_tokens requests' heads for a first-party base URL, rendered once."""
        route = self._fast_routes.get(base_url)
        if route is None:
            assert self._api_key is not None
            headers = [
                (b"x-api-key", self._api_key.encode()),
                (b"anthropic-version", self._anthropic_version.encode()),
                (b"content-type", b"application/json"),
                (b"accept", b"application/json"),
                (b"user-agent", f"sidecard/{__version__}".encode()),
            ]
            route = self._fast_routes[base_url] = _FastRoute(self._pool, base_url, headers)
        return route

    def batch_base(self, target: Target) -> str | None:
        """The base URL of TARGET's Message Batches API (the fast path's), or None: it has none (another provider,
        the SDK path)."""
        return None if self.needs_sdk(target) else self._base_for(target)

    def _base_for(self, target: Target) -> str:
        if self._redirect_to is not None:
            return f"{self._redirect_to}/v1" if target.provider == "vertex" else self._redirect_to
        return target.base_url or (self._base_url if target.provider == "anthropic" else "")

    async def aclose(self) -> None:
        if self._sdk is not None:
            await self._sdk.aclose()


# The provider's rate-limit headers that traffic control reads (of the dozen it sends): the requests window, and
# the tokens window.
THROTTLE_HEADERS: Final = frozenset({
    "anthropic-ratelimit-requests-limit", "anthropic-ratelimit-requests-remaining", "anthropic-ratelimit-requests-reset",
    "anthropic-ratelimit-tokens-remaining", "anthropic-ratelimit-tokens-reset",
})
_THROTTLE_HEADERS_BYTES: Final = frozenset(name.encode() for name in THROTTLE_HEADERS)


class _FastRoute:
    """A first-party base URL's two requests (Messages, count_tokens), their heads prepared once; a request's own
    headers (`anthropic-beta`) make a head of their own."""

    __slots__ = ("origin", "headers", "paths", "heads")

    def __init__(self, pool: ConnectionPool, base_url: str, headers: list[tuple[bytes, bytes]]) -> None:
        prefix = urlsplit(base_url).path.rstrip("/")
        self.origin = Origin.from_url(base_url)
        self.headers = headers
        self.paths = ((prefix + MESSAGES_PATH).encode(), (prefix + COUNT_TOKENS_PATH).encode())
        self.heads = tuple(pool.prepare(self.origin, b"POST", path, headers) for path in self.paths)

    def head(self, pool: ConnectionPool, which: int, extra: Mapping[str, str] | None) -> PreparedRequest:
        if not extra:
            return self.heads[which]
        headers = [*self.headers, *((k.encode(), v.encode("latin-1")) for k, v in extra.items())]
        return pool.prepare(self.origin, b"POST", self.paths[which], headers)


def _rate_limit_headers(headers: list[tuple[bytes, bytes]]) -> dict[str, str] | None:
    found = {k.decode(): v.decode("latin-1") for k, v in headers if k in _THROTTLE_HEADERS_BYTES}
    return found or None


def plain(body: dict[str, Any]) -> dict[str, Any]:
    """The body as plain Python values for the SDK (which cannot take msgspec Structs or raw JSON)."""
    return msgspec.json.decode(_encoder.encode(body))


def _str(value: bytes | None) -> str | None:
    return None if value is None else value.decode("latin-1")


def _header_map(headers: list[tuple[bytes, bytes]]) -> dict[str, str]:
    return {name.decode("latin-1"): value.decode("latin-1") for name, value in headers}
