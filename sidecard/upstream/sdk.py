"""The SDK path: Bedrock, Vertex, and first-party calls when the fast path is off.

Imported only when a target needs it (`Upstream.prepare`): the anthropic SDK and httpx2 take about a second
to import, which a daemon on the fast path alone never pays. The SDK's clients send through the shared pool
(`TrioTransport`); their failures become `UpstreamError` here, at the SDK's edge.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from typing import Any

import anthropic
import httpx2

from ..config import Target
from . import errors
from .client import MESSAGES_PATH, THROTTLE_HEADERS, CountReply, UpstreamReply, UpstreamStream, decode_count, decode_reply, plain
from .errors import UpstreamError
from .pool import ConnectionPool
from .transport import TrioTransport

RAW_RESPONSE_HEADER = "X-Stainless-Raw-Response"
STATED_TIMEOUT = "x-stainless-timeout"  # lower case, as the SDK writes it: the request's value replaces the SDK's


def _sdk_failure(exc: Exception) -> UpstreamError:
    """An SDK or httpx2 failure as an `UpstreamError`."""
    if isinstance(exc, anthropic.APIStatusError):
        return errors.from_response(exc.status_code, exc.response.headers, exc.response.content)
    if isinstance(exc, (anthropic.APITimeoutError, httpx2.TimeoutException)):
        return UpstreamError(errors.TIMEOUT)
    return UpstreamError(errors.CONNECT)


# What the SDK raises for a failed call (it wraps httpx2's errors), and what a stream's body raises unwrapped.
_FAILURES = (anthropic.APIStatusError, anthropic.APIConnectionError, httpx2.TransportError)


class SdkPath:
    """One SDK client per distinct provider endpoint, all on the shared pool."""

    def __init__(
        self, pool: ConnectionPool, *, api_key: str | None, provider_credentials: Mapping[str, str]
    ) -> None:
        self._pool = pool
        self._api_key = api_key
        self._provider_credentials = provider_credentials
        self._clients: dict[tuple[str, str | None, str | None, str | None], Any] = {}

    async def create(
        self, target: Target, base_url: str, body: dict[str, Any], timeout_s: float, headers: Mapping[str, str] | None
    ) -> UpstreamReply:
        try:
            response = await self._client(target, base_url).post(
                MESSAGES_PATH,
                body={**plain(body), "model": target.model},
                cast_to=httpx2.Response,
                options={"timeout": timeout_s, "headers": dict(headers or {})},
            )
        except _FAILURES as exc:
            raise _sdk_failure(exc) from None
        reply = decode_reply(response.content, response.headers.get("request-id"))
        reply.rate_limits = _rate_limit_headers(response.headers)
        return reply

    async def open_stream(
        self, target: Target, base_url: str, body: dict[str, Any], timeout_s: float, headers: Mapping[str, str] | None
    ) -> UpstreamStream:
        client = self._client(target, base_url)
        try:
            response = await client.post(
                MESSAGES_PATH,
                body={**plain(body), "model": target.model, "stream": True},
                cast_to=httpx2.Response,
                # Ask the SDK for the unread response: its own stream classes would build pydantic models. The
                # timeout is stated (else the SDK sends "NOT_GIVEN"), not given: the SDK would bound each read with
                # it, and a stream's reads are bounded by the engine's idle timeout.
                options={"headers": {**(headers or {}), RAW_RESPONSE_HEADER: "stream", STATED_TIMEOUT: f"{timeout_s:g}"}},
            )
        except _FAILURES as exc:
            raise _sdk_failure(exc) from None
        request_id = response.headers.get("request-id")
        # The client's own decoder: plain SSE for Vertex, AWS event-stream frames for Bedrock. The SDK has no public
        # name for it (its own stream classes call this one); the public way, `messages.stream`, builds a pydantic
        # model per event, which costs more than the rest of the request.
        sse = client._make_sse_decoder().aiter_bytes(response.aiter_bytes())

        async def events() -> AsyncIterator[tuple[str, bytes]]:
            try:
                async for event in sse:
                    yield event.event or "", event.data.encode()
            except _FAILURES as exc:
                failure = _sdk_failure(exc)
                failure.request_id = request_id
                raise failure from None

        return UpstreamStream(events(), response.aclose, request_id, _rate_limit_headers(response.headers))

    async def count_tokens(
        self, target: Target, base_url: str, body: dict[str, Any], timeout_s: float, headers: Mapping[str, str] | None
    ) -> CountReply:
        try:
            response = await self._client(target, base_url).post(
                "/v1/messages/count_tokens",
                body={**plain(body), "model": target.model},
                cast_to=httpx2.Response,
                options={"timeout": timeout_s, "headers": dict(headers or {})},
            )
        except _FAILURES as exc:
            raise _sdk_failure(exc) from None
        return decode_count(response.content, response.headers.get("request-id"))

    def _client(self, target: Target, base_url: str) -> Any:
        key = (target.provider, target.base_url, target.region, target.project_id)
        client = self._clients.get(key)
        if client is None:
            client = self._clients[key] = self._new_client(target, base_url or None)
        return client

    def _new_client(self, target: Target, base_url: str | None) -> Any:
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
        for client in self._clients.values():
            await client.close()
        self._clients.clear()


def _rate_limit_headers(headers: Mapping[str, str]) -> dict[str, str] | None:
    return {k: v for k, v in headers.items() if k in THROTTLE_HEADERS} or None
