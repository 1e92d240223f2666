"""An httpx2 transport over the Trio-native `ConnectionPool`, so the anthropic SDK's clients share it.

Give it to the SDK as `http_client=httpx2.AsyncClient(transport=TrioTransport(pool))`. The SDK's default
stack costs more CPU per call and degrades badly with thousands of requests in flight. The pool's failures
become httpx2's types of the same name here, which is what the SDK classifies (timeout, connection error).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Final

import httpx2

from . import pool
from .pool import ConnectionPool, Origin, PoolResponse

_DEFAULT_PORTS: Final = {"http": 80, "https": 443}
_HTTP_11: Final = b"HTTP/1.1"


_HTTPX2: Final[dict[type[pool.TransportError], type[httpx2.TransportError]]] = {
    pool.ConnectError: httpx2.ConnectError,
    pool.ReadError: httpx2.ReadError,
    pool.WriteError: httpx2.WriteError,
    pool.RemoteProtocolError: httpx2.RemoteProtocolError,
    pool.LocalProtocolError: httpx2.LocalProtocolError,
    pool.ConnectTimeout: httpx2.ConnectTimeout,
    pool.ReadTimeout: httpx2.ReadTimeout,
    pool.WriteTimeout: httpx2.WriteTimeout,
    pool.PoolTimeout: httpx2.PoolTimeout,
}


def as_httpx2(exc: pool.TransportError) -> httpx2.TransportError:
    """The pool's failure as the httpx2 exception of the same name."""
    return _HTTPX2.get(type(exc), httpx2.TransportError)(str(exc))


class _Body(httpx2.AsyncByteStream):
    """The response body as httpx2 reads it; closing it releases the connection."""

    def __init__(self, response: PoolResponse) -> None:
        self._response = response

    def __aiter__(self) -> AsyncIterator[bytes]:  # a plain method: no async generator in between
        return self

    async def __anext__(self) -> bytes:
        try:
            return await self._response.__anext__()
        except pool.TransportError as exc:
            raise as_httpx2(exc) from exc

    async def aclose(self) -> None:
        await self._response.aclose()


class TrioTransport(httpx2.AsyncBaseTransport):
    """Sends httpx2 requests through a shared `ConnectionPool`.

    Honours the request's read, write and pool timeouts (the read timeout bounds each receive); the connect
    timeout is the pool's. Closing the transport leaves the pool open: its owner (the daemon) closes it.
    """

    def __init__(self, pool: ConnectionPool) -> None:
        self._pool = pool

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        url = request.url
        scheme = url.scheme
        default_port = _DEFAULT_PORTS.get(scheme)
        if default_port is None:
            raise httpx2.UnsupportedProtocol(f"unsupported URL scheme {scheme!r}")
        timeout = request.extensions.get("timeout") or {}
        body = await request.aread()
        try:
            response = await self._pool.request(
                Origin(scheme, url.host, url.port or default_port),
                request.method.encode("ascii"),
                url.raw_path,
                request.headers.raw,
                body,
                read_timeout=timeout.get("read"),
                write_timeout=timeout.get("write"),
                pool_timeout=timeout.get("pool"),
            )
        except pool.TransportError as exc:
            raise as_httpx2(exc) from exc
        return httpx2.Response(
            response.status,
            headers=response.headers,
            stream=_Body(response),
            extensions={"http_version": _HTTP_11, "reason_phrase": response.reason},
            request=request,
        )

    async def aclose(self) -> None:
        """Does not close the pool, which is shared and owned by the daemon."""
