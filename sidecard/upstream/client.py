"""Calls to the Messages API: a lean first-party fast path and the SDK path, behind one interface.

Both send the same bytes over the same Trio-native pool. The fast path pre-builds the direct API's headers
and encodes the body with msgspec; the SDK path serves Bedrock and Vertex (signing, URL rewriting) and
token or profile auth. Either way a failure leaves as an `UpstreamError`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any, Final
from urllib.parse import urlsplit

import anthropic
import httpx2
import msgspec

from .. import __version__
from ..config import Target
from ..protocol import Usage
from . import errors
from .errors import UpstreamError
from .pool import ConnectionPool, Origin
from .sse import SSEDecoder
from .transport import TrioTransport

DEFAULT_BASE_URL: Final = "https://api.anthropic.com"
RAW_RESPONSE_HEADER: Final = "X-Stainless-Raw-Response"
try:
    from anthropic._constants import ANTHROPIC_API_VERSION as SDK_API_VERSION
except ImportError:  # pragma: no cover (an SDK that moved it)
    SDK_API_VERSION = "2023-06-01"
MESSAGES_PATH: Final = "/v1/messages"


class ApiMessage(msgspec.Struct):
    id: str = ""
    model: str = ""
    # Passed to the client byte for byte: blocks sidecard does not know survive untouched.
    content: msgspec.Raw = msgspec.Raw(b"[]")
    stop_reason: str | None = None
    stop_sequence: str | None = None
    usage: Usage = msgspec.field(default_factory=Usage)


class _Block(msgspec.Struct):
    type: str = ""
    text: str = ""


_message_decoder: Final = msgspec.json.Decoder(ApiMessage)
_blocks_decoder: Final = msgspec.json.Decoder(list[_Block])
_encoder: Final = msgspec.json.Encoder()


class UpstreamReply(msgspec.Struct):
    message: ApiMessage
    text: str
    request_id: str | None
    rate_limits: dict[str, str] | None = None  # the provider's anthropic-ratelimit-* headers, for throttling


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
        self.rate_limits = rate_limits  # the response's anthropic-ratelimit-* headers, for throttling

    async def next_event(self) -> tuple[str, bytes] | None:
        try:
            return await self._events.__anext__()
        except StopAsyncIteration:
            return None
        except httpx2.TimeoutException:
            raise UpstreamError(errors.TIMEOUT, request_id=self.request_id) from None
        except (httpx2.TransportError, anthropic.APIConnectionError):
            raise UpstreamError(errors.CONNECT, request_id=self.request_id) from None

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


def decode_reply(body: bytes, request_id: str | None) -> UpstreamReply:
    try:
        message = _message_decoder.decode(body)
        blocks = _blocks_decoder.decode(message.content)
    except msgspec.MsgspecError:
        raise UpstreamError(errors.MALFORMED, request_id=request_id) from None
    text = "".join(b.text for b in blocks if b.type == "text")
    return UpstreamReply(message, text, request_id)


class Upstream:
    """Owns the SDK clients (one per distinct provider endpoint) and the fast path; shares one pool."""

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
        self._pool = pool
        self._api_key = api_key
        self._base_url = (base_url or DEFAULT_BASE_URL).rstrip("/")
        # The fast path speaks the same API version as the SDK path, unless the operator pins one.
        self._anthropic_version = anthropic_version or SDK_API_VERSION
        self._fast_path = fast_path and api_key is not None
        # Simulated runs hand Bedrock and Vertex stand-in credentials so no cloud SDK is needed, and send
        # every target, whatever its provider and base_url, to the simulated upstream.
        self._provider_credentials = dict(provider_credentials or {})
        self._redirect_to = redirect_to.rstrip("/") if redirect_to else None
        self._sdk_clients: dict[tuple[str, str | None, str | None, str | None], Any] = {}
        self._fast_routes: dict[str, tuple[Origin, bytes, list[tuple[bytes, bytes]]]] = {}

    # ------------------------------------------------------------ calls

    async def create(
        self, target: Target, body: dict[str, Any], *, timeout_s: float, headers: Mapping[str, str] | None = None
    ) -> UpstreamReply:
        """One attempt at a Messages API call; `body` lacks `model`, which comes from the target. `headers` are the
        request's own `anthropic-*` headers (`anthropic-beta`), sent on every path."""
        if target.provider == "anthropic" and self._fast_path:
            return await self._fast_create(target, body, timeout_s, headers)
        return await self._sdk_create(target, body, timeout_s, headers)

    async def _fast_create(
        self, target: Target, body: dict[str, Any], timeout_s: float, extra: Mapping[str, str] | None
    ) -> UpstreamReply:
        origin, path, headers = self._fast_route(self._base_for(target), extra)
        payload = _encoder.encode({"model": target.model, **body})
        try:
            response = await self._pool.request(origin, b"POST", path, headers, payload, read_timeout=timeout_s)
            data = await response.read()
        except httpx2.TimeoutException:
            raise UpstreamError(errors.TIMEOUT) from None
        except httpx2.TransportError:
            raise UpstreamError(errors.CONNECT) from None
        request_id = _str(response.header(b"request-id"))
        if response.status != 200:
            raise errors.from_response(response.status, _header_map(response.headers), data)
        reply = decode_reply(data, request_id)
        reply.rate_limits = _rate_limit_headers(response.headers)
        return reply

    async def open_stream(
        self, target: Target, body: dict[str, Any], headers: Mapping[str, str] | None = None
    ) -> UpstreamStream:
        """Start a streamed call; HTTP errors raise `UpstreamError` here, before any event."""
        if target.provider == "anthropic" and self._fast_path:
            return await self._fast_stream(target, body, headers)
        return await self._sdk_stream(target, body, headers)

    async def _fast_stream(self, target: Target, body: dict[str, Any], extra: Mapping[str, str] | None) -> UpstreamStream:
        origin, path, headers = self._fast_route(self._base_for(target), extra)
        payload = _encoder.encode({"model": target.model, **body, "stream": True})
        try:
            response = await self._pool.request(origin, b"POST", path, headers, payload)
        except httpx2.TimeoutException:
            raise UpstreamError(errors.TIMEOUT) from None
        except httpx2.TransportError:
            raise UpstreamError(errors.CONNECT) from None
        request_id = _str(response.header(b"request-id"))
        if response.status != 200:
            try:
                data = await response.read()
            except httpx2.TransportError:
                data = b""
            raise errors.from_response(response.status, _header_map(response.headers), data)
        return UpstreamStream(
            _sse_events(response.aiter_bytes()), response.aclose, request_id, _rate_limit_headers(response.headers)
        )

    async def _sdk_stream(self, target: Target, body: dict[str, Any], headers: Mapping[str, str] | None) -> UpstreamStream:
        client = self._sdk_client(target)
        try:
            response = await client.post(
                MESSAGES_PATH,
                body={**_plain(body), "model": target.model, "stream": True},
                cast_to=httpx2.Response,
                # Ask the SDK for the unread response: its own stream classes would build pydantic models.
                options={"headers": {**(headers or {}), RAW_RESPONSE_HEADER: "stream"}},
            )
        except anthropic.APIStatusError as exc:
            raise errors.from_response(exc.status_code, exc.response.headers, exc.response.content) from None
        except anthropic.APITimeoutError:
            raise UpstreamError(errors.TIMEOUT) from None
        except anthropic.APIConnectionError:
            raise UpstreamError(errors.CONNECT) from None
        # The client's own decoder: plain SSE for Vertex, AWS event-stream frames for Bedrock.
        sse = client._make_sse_decoder().aiter_bytes(response.aiter_bytes())

        async def events() -> AsyncIterator[tuple[str, bytes]]:
            async for event in sse:
                yield event.event or "", event.data.encode()

        return UpstreamStream(
            events(), response.aclose, response.headers.get("request-id"), _sdk_rate_limit_headers(response.headers)
        )

    async def count_tokens(
        self, target: Target, body: dict[str, Any], *, timeout_s: float, headers: Mapping[str, str] | None = None
    ) -> int:
        client = self._sdk_client(target)
        try:
            response = await client.post(
                "/v1/messages/count_tokens",
                body={**_plain(body), "model": target.model},
                cast_to=httpx2.Response,
                options={"timeout": timeout_s, "headers": dict(headers or {})},
            )
        except anthropic.APIStatusError as exc:
            raise errors.from_response(exc.status_code, exc.response.headers, exc.response.content) from None
        except anthropic.APITimeoutError:
            raise UpstreamError(errors.TIMEOUT) from None
        except anthropic.APIConnectionError:
            raise UpstreamError(errors.CONNECT) from None
        try:
            return int(msgspec.json.decode(response.content)["input_tokens"])
        except (msgspec.MsgspecError, KeyError, TypeError, ValueError):
            raise UpstreamError(errors.MALFORMED, request_id=response.headers.get("request-id")) from None

    def _fast_route(
        self, base_url: str, extra: Mapping[str, str] | None = None
    ) -> tuple[Origin, bytes, list[tuple[bytes, bytes]]]:
        route = self._fast_routes.get(base_url)
        if route is None:
            assert self._api_key is not None
            origin = Origin.from_url(base_url)
            path = (urlsplit(base_url).path.rstrip("/") + MESSAGES_PATH).encode()
            headers = [
                (b"x-api-key", self._api_key.encode()),
                (b"anthropic-version", self._anthropic_version.encode()),
                (b"content-type", b"application/json"),
                (b"accept", b"application/json"),
                (b"user-agent", f"sidecard/{__version__}".encode()),
            ]
            route = self._fast_routes[base_url] = (origin, path, headers)
        if not extra:
            return route
        origin, path, headers = route
        return origin, path, [*headers, *((k.encode(), v.encode("latin-1")) for k, v in extra.items())]

    async def _sdk_create(
        self, target: Target, body: dict[str, Any], timeout_s: float, headers: Mapping[str, str] | None
    ) -> UpstreamReply:
        client = self._sdk_client(target)
        try:
            response = await client.post(
                MESSAGES_PATH,
                body={**_plain(body), "model": target.model},
                cast_to=httpx2.Response,
                options={"timeout": timeout_s, "headers": dict(headers or {})},
            )
        except anthropic.APIStatusError as exc:
            raise errors.from_response(exc.status_code, exc.response.headers, exc.response.content) from None
        except anthropic.APITimeoutError:
            raise UpstreamError(errors.TIMEOUT) from None
        except anthropic.APIConnectionError:
            raise UpstreamError(errors.CONNECT) from None
        reply = decode_reply(response.content, response.headers.get("request-id"))
        reply.rate_limits = _sdk_rate_limit_headers(response.headers)
        return reply

    def _base_for(self, target: Target) -> str:
        if self._redirect_to is not None:
            return f"{self._redirect_to}/v1" if target.provider == "vertex" else self._redirect_to
        return target.base_url or (self._base_url if target.provider == "anthropic" else "")

    # ------------------------------------------------------------ SDK clients

    def _sdk_client(self, target: Target) -> Any:
        key = (target.provider, target.base_url, target.region, target.project_id)
        client = self._sdk_clients.get(key)
        if client is None:
            client = self._sdk_clients[key] = self._new_sdk_client(target)
        return client

    def _new_sdk_client(self, target: Target) -> Any:
        base_url = self._base_for(target) or None
        common: dict[str, Any] = {
            "max_retries": 0,  # sidecard owns retries
            "open_telemetry": False,  # a span per call costs 4-8% CPU; nobody asked for tracing
            "http_client": httpx2.AsyncClient(transport=TrioTransport(self._pool), timeout=None),
        }
        if target.provider == "bedrock":
            return anthropic.AsyncAnthropicBedrock(
                aws_region=target.region,
                base_url=base_url,
                api_key=self._provider_credentials.get("bedrock"),
                **common,
            )
        if target.provider == "vertex":
            return anthropic.AsyncAnthropicVertex(
                region=target.region or "us-east5",
                project_id=target.project_id,
                base_url=base_url,
                access_token=self._provider_credentials.get("vertex"),
                **common,
            )
        return anthropic.AsyncAnthropic(api_key=self._api_key, base_url=base_url, **common)

    async def aclose(self) -> None:
        # Under Trio the SDK's __del__ cannot clean up (it assumes asyncio): close explicitly.
        for client in self._sdk_clients.values():
            await client.close()
        self._sdk_clients.clear()


RATE_LIMIT_PREFIX: Final = "anthropic-ratelimit-"
_RATE_LIMIT_PREFIX_BYTES: Final = RATE_LIMIT_PREFIX.encode()


def _rate_limit_headers(headers: list[tuple[bytes, bytes]]) -> dict[str, str] | None:
    found = {k.decode(): v.decode("latin-1") for k, v in headers if k.startswith(_RATE_LIMIT_PREFIX_BYTES)}
    return found or None


def _sdk_rate_limit_headers(headers: Mapping[str, str]) -> dict[str, str] | None:
    return {k: v for k, v in headers.items() if k.startswith(RATE_LIMIT_PREFIX)} or None


def _plain(body: dict[str, Any]) -> dict[str, Any]:
    """The body as plain Python values for the SDK (which cannot take msgspec Structs or raw JSON)."""
    return msgspec.json.decode(_encoder.encode(body))


def _str(value: bytes | None) -> str | None:
    return None if value is None else value.decode("latin-1")


def _header_map(headers: list[tuple[bytes, bytes]]) -> dict[str, str]:
    return {name.decode("latin-1"): value.decode("latin-1") for name, value in headers}
