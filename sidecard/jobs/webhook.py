"""Webhooks: a finished job is POSTed to the URL it named, signed so the app can tell it came from sidecard.

The signature (`Sidecard-Signature: t=<unix time>,v1=<hex>`) is HMAC-SHA256 with the configured secret over
`<t>.` followed by the body, as Stripe signs its events: the app recomputes it over the body it received and
refuses a stale `t` (a replayed delivery). `Sidecard-Delivery` is the job's id: a delivery is made at least once
(a restart between the POST and its record sends it again), so an app that must act once keeps the ids it saw.
The clients' `verify_webhook` does the app's side.

Deliveries run off the request path, from the job store's durable queue (`JobRunner`), with retries
(`next_attempt_at`) until a 2xx, up to `max_attempts`.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from typing import Final
from urllib.parse import urlsplit

import trio

from .. import __version__
from ..upstream.pool import ConnectionPool, Origin, TransportError
from .settings import WebhookSettings

SIGNATURE_HEADER: Final = "sidecard-signature"
DELIVERY_HEADER: Final = "sidecard-delivery"
_REPLY_BYTES: Final = 65536  # of a receiver's reply, read and ignored; the rest is not waited for
# A `.` or `..` path segment, as written or percent-encoded: the receiver's server resolves it, so
# `https://app/hooks/../admin` starts with the allowed prefix and is delivered outside it (to `/admin`).
_DOT_SEGMENT: Final = re.compile(r"(?:^|/)(?:\.|%2e){1,2}(?:/|$)", re.IGNORECASE)
# What a URL cannot carry as it is (RFC 3986): a delivery to one would fail every attempt. A backslash is read as
# `/` by some servers, which would make a dot segment of it.
_UNSENDABLE: Final = re.compile(r"[\x00-\x20\x7f\\]")


def signature(secret: bytes, body: bytes, timestamp: int) -> str:
    """The `Sidecard-Signature` header's value for BODY sent at TIMESTAMP (unix seconds)."""
    digest = hmac.new(secret, b"%d." % timestamp + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={digest}"


def url_problem(url: str, allowed_prefixes: list[str]) -> str | None:
    """Why a job may not name URL as its webhook, or None."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname or _UNSENDABLE.search(url):
        return "webhook: must be an http(s) URL (no spaces, control characters or backslashes)"
    if not allowed_prefixes:
        return "webhook: webhooks are not enabled ([jobs.webhook] allowed_prefixes)"
    if not any(url.startswith(prefix) for prefix in allowed_prefixes):
        return "webhook: the URL is not under one of [jobs.webhook] allowed_prefixes"
    if _DOT_SEGMENT.search(parts.path):
        return "webhook: the URL's path may not have a '.' or '..' segment (it would leave the allowed prefix)"
    return None


def next_attempt_at(attempts: int, now: float, settings: WebhookSettings) -> float | None:
    """When to try again after ATTEMPTS failed deliveries; None once they are spent."""
    if attempts >= settings.max_attempts:
        return None
    return now + min(settings.retry_max_s, settings.retry_initial_s * 2 ** max(0, attempts - 1))


class WebhookSender:
    """One delivery attempt at a time per call, over the shared pool."""

    def __init__(self, pool: ConnectionPool, secret: bytes, settings: WebhookSettings) -> None:
        self._pool = pool
        self._secret = secret
        self.settings = settings

    async def deliver(self, url: str, delivery_id: str, body: bytes, timestamp: int) -> bool:
        """POST BODY to URL; True when the receiver answered 2xx within the timeout."""
        parts = urlsplit(url)
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        headers = [
            (b"content-type", b"application/json"),
            (b"user-agent", f"sidecard/{__version__}".encode()),
            (SIGNATURE_HEADER.encode(), signature(self._secret, body, timestamp).encode()),
            (DELIVERY_HEADER.encode(), delivery_id.encode()),
        ]
        timeout = self.settings.timeout_s
        with trio.move_on_after(timeout):
            try:
                response = await self._pool.request(
                    Origin.from_url(url), b"POST", target.encode(), headers, body, read_timeout=timeout, write_timeout=timeout
                )
                try:
                    await response.__anext__()  # a little of the reply, so a short one leaves the connection reusable
                except StopAsyncIteration:
                    pass
                finally:
                    await response.aclose()
                return 200 <= response.status < 300
            except (TransportError, ValueError):
                return False
        return False
