"""The Message Batches API over the shared connection pool, on the fast path's terms: the first-party API and an
API key, the same pre-built headers, msgspec at both ends.

`create`, `retrieve` and `cancel` answer the batch (`BatchStatus`); `open_results` streams the results file a
line at a time, holding one line and one read in memory whatever the batch's size. Every failure leaves as an
`UpstreamError`, as the Messages calls' do.
"""

from __future__ import annotations

from collections.abc import Sequence
from types import TracebackType
from typing import Final
from urllib.parse import urlsplit

import msgspec

from .. import __version__
from . import errors
from .client import ANTHROPIC_VERSION, DEFAULT_BASE_URL, MESSAGES_PATH, UpstreamReply, _header_map, _str, _transport_failure, decode_reply
from .errors import UpstreamError
from .pool import ConnectionPool, Origin, PoolResponse, TransportError

BATCHES_PATH: Final = MESSAGES_PATH + "/batches"
MAX_LINE_BYTES: Final = 16 * 1024 * 1024  # one result line (a message) beyond this is refused, not buffered


class RequestCounts(msgspec.Struct):
    processing: int = 0
    succeeded: int = 0
    errored: int = 0
    canceled: int = 0
    expired: int = 0


class BatchStatus(msgspec.Struct):
    """A Message Batch as the API reports it (the fields sidecard reads)."""

    id: str
    processing_status: str  # "in_progress" | "canceling" | "ended"
    request_counts: RequestCounts = msgspec.field(default_factory=RequestCounts)
    results_url: str | None = None
    created_at: str | None = None
    expires_at: str | None = None
    ended_at: str | None = None

    @property
    def ended(self) -> bool:
        return self.processing_status == "ended"


class ErrorDetail(msgspec.Struct):
    type: str = "api_error"
    message: str = ""


class ErrorBody(msgspec.Struct):
    error: ErrorDetail = msgspec.field(default_factory=ErrorDetail)


class ItemResult(msgspec.Struct):
    type: str  # "succeeded" | "errored" | "canceled" | "expired"
    message: msgspec.Raw = msgspec.Raw(b"null")  # succeeded: the Messages API message, untouched
    error: ErrorBody | None = None  # errored: the API's error body


class BatchItem(msgspec.Struct):
    """One line of the results file."""

    custom_id: str
    result: ItemResult

    def reply(self) -> UpstreamReply:
        """A succeeded item's message, as a Messages call's reply (raises `UpstreamError` if it is malformed)."""
        if self.result.type != "succeeded":
            raise UpstreamError(errors.MALFORMED)
        return decode_reply(self.result.message, None)


_status_decoder: Final = msgspec.json.Decoder(BatchStatus)
_item_decoder: Final = msgspec.json.Decoder(BatchItem)
_encoder: Final = msgspec.json.Encoder()


class MessageBatches:
    """The batch calls for one API base URL and key."""

    def __init__(
        self,
        pool: ConnectionPool,
        *,
        api_key: str,
        base_url: str | None = None,
        anthropic_version: str | None = None,
        timeout_s: float = 60.0,
        max_line_bytes: int = MAX_LINE_BYTES,
    ) -> None:
        """`timeout_s` bounds each wait for the upstream (a read, or the whole answer of a small call)."""
        base = (base_url or DEFAULT_BASE_URL).rstrip("/")
        self._pool = pool
        self._origin = Origin.from_url(base)
        self._path = urlsplit(base).path.rstrip("/") + BATCHES_PATH
        self._headers = [
            (b"x-api-key", api_key.encode()),
            (b"anthropic-version", (anthropic_version or ANTHROPIC_VERSION).encode()),
            (b"content-type", b"application/json"),
            (b"accept", b"application/json"),
            (b"user-agent", f"sidecard/{__version__}".encode()),
        ]
        self.timeout_s = timeout_s
        self.max_line_bytes = max_line_bytes

    async def create(self, requests: Sequence[tuple[str, bytes]]) -> BatchStatus:
        """Submit REQUESTS, each (custom_id, the Messages call's params as JSON, `model` included)."""
        body = b'{"requests":[%b]}' % b",".join(
            b'{"custom_id":%b,"params":%b}' % (_encoder.encode(custom_id), params) for custom_id, params in requests
        )
        return await self._call(b"POST", self._path, body)

    async def retrieve(self, batch_id: str) -> BatchStatus:
        return await self._call(b"GET", f"{self._path}/{batch_id}", b"")

    async def cancel(self, batch_id: str) -> BatchStatus:
        return await self._call(b"POST", f"{self._path}/{batch_id}/cancel", b"")

    async def open_results(self, batch: BatchStatus) -> ResultStream:
        """The ended BATCH's results, to read with `async for` (and close: `async with`). The batch's `results_url`
        is followed only on the origin sidecard's key is configured for; elsewhere the API's own path is used."""
        path = f"{self._path}/{batch.id}/results"
        if batch.results_url:
            parts = urlsplit(batch.results_url)
            if parts.scheme in ("http", "https") and Origin.from_url(batch.results_url) == self._origin:
                path = parts.path + (f"?{parts.query}" if parts.query else "")
        response = await self._send(b"GET", path, b"")
        if response.status != 200:
            raise await _failure(response)
        return ResultStream(response, self.max_line_bytes)

    async def _call(self, method: bytes, path: str, body: bytes) -> BatchStatus:
        response = await self._send(method, path, body)
        try:
            data = await response.read()
        except TransportError as exc:
            raise _transport_failure(exc) from None
        if response.status != 200:
            raise errors.from_response(response.status, _header_map(response.headers), data)
        try:
            return _status_decoder.decode(data)
        except msgspec.MsgspecError:
            raise UpstreamError(errors.MALFORMED, request_id=_str(response.header(b"request-id"))) from None

    async def _send(self, method: bytes, path: str, body: bytes) -> PoolResponse:
        try:
            return await self._pool.request(
                self._origin, method, path.encode(), self._headers, body, read_timeout=self.timeout_s
            )
        except TransportError as exc:
            raise _transport_failure(exc) from None


class ResultStream:
    """The results file as `BatchItem`s, in the order the API sends them. A line that does not parse, or that
    is longer than `max_line_bytes`, raises `UpstreamError` (malformed); so does a file cut short."""

    def __init__(self, response: PoolResponse, max_line_bytes: int) -> None:
        self._response = response
        self._max_line_bytes = max_line_bytes
        self._buffer = bytearray()
        self._lines: list[bytes] = []
        self._eof = False
        self.request_id = _str(response.header(b"request-id"))

    def __aiter__(self) -> ResultStream:
        return self

    async def __anext__(self) -> BatchItem:
        while not self._lines:
            if self._eof:
                raise StopAsyncIteration
            await self._fill()
        line = self._lines.pop()
        try:
            return _item_decoder.decode(line)
        except msgspec.MsgspecError:
            raise UpstreamError(errors.MALFORMED, request_id=self.request_id) from None

    async def _fill(self) -> None:
        try:
            chunk = await self._response.__anext__()
        except StopAsyncIteration:
            self._eof = True
            chunk = b"\n"  # a last line without its newline
        except TransportError as exc:
            raise _transport_failure(exc, self.request_id) from None
        buffer = self._buffer
        buffer += chunk
        end = buffer.rfind(b"\n")
        if end < 0:
            if len(buffer) > self._max_line_bytes:
                raise UpstreamError(errors.MALFORMED, request_id=self.request_id)
            return
        lines = [line for line in bytes(buffer[:end]).split(b"\n") if line.strip()]
        del buffer[: end + 1]
        if any(len(line) > self._max_line_bytes for line in lines):
            raise UpstreamError(errors.MALFORMED, request_id=self.request_id)
        lines.reverse()  # popped from the end
        self._lines = lines

    async def aclose(self) -> None:
        await self._response.aclose()

    async def __aenter__(self) -> ResultStream:
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, value: BaseException | None, traceback: TracebackType | None
    ) -> None:
        await self.aclose()


async def _failure(response: PoolResponse) -> UpstreamError:
    try:
        data = await response.read()
    except TransportError:
        data = b""
    return errors.from_response(response.status, _header_map(response.headers), data)
