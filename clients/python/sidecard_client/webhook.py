"""Verify a webhook from sidecard (an async job has finished) before acting on it.

    from sidecard_client import verify_webhook, InvalidWebhook

    try:
        event = verify_webhook(SECRET, headers["Sidecard-Signature"], raw_body)
    except InvalidWebhook:
        return 400          # not from sidecard, or replayed: do not act on it
    job = event["job"]      # {"id", "state", "outcome" or "error", ...}

The signature is HMAC-SHA256 with the shared secret over `<t>.<body>` (`t=<unix time>,v1=<hex>`); a delivery
older (or newer) than `tolerance_s` is refused, so a captured one cannot be replayed later. Deliveries come at
least once: `Sidecard-Delivery` (the job id) tells a repeat.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from typing import Any, Optional, Union


class InvalidWebhook(ValueError):
    """The delivery is not from sidecard or is stale. `reason`: "malformed", "stale" or "signature"."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def verify_webhook(
    secret: Union[str, bytes],
    header: Optional[str],
    body: Union[str, bytes],
    tolerance_s: float = 300.0,
    *,
    now: Optional[float] = None,
) -> Any:
    """The delivery's JSON payload, once its `Sidecard-Signature` HEADER is checked over the raw BODY; raises
    `InvalidWebhook` otherwise."""
    key = secret.encode() if isinstance(secret, str) else secret
    raw = body.encode() if isinstance(body, str) else bytes(body)
    timestamp, signatures = None, []
    for part in (header or "").split(","):
        name, _, value = part.strip().partition("=")
        if name == "t" and value.isascii() and value.isdigit():
            timestamp = int(value)
        elif name == "v1" and value:
            signatures.append(value)
    if timestamp is None or not signatures:
        raise InvalidWebhook("malformed", "the Sidecard-Signature header is missing or malformed")
    if abs((time.time() if now is None else now) - timestamp) > tolerance_s:
        raise InvalidWebhook("stale", "the delivery's timestamp is outside the tolerance (a replay?)")
    expected = hmac.new(key, b"%d." % timestamp + raw, hashlib.sha256).hexdigest()
    if not any(hmac.compare_digest(expected, candidate) for candidate in signatures):
        raise InvalidWebhook("signature", "the delivery's signature does not match")
    try:
        return json.loads(raw)
    except ValueError:
        raise InvalidWebhook("malformed", "the delivery's body is not JSON") from None
