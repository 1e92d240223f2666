"""Webhooks: sidecard's signature, checked by both clients' helpers (a forged one, a stale one, a malformed
header), and a delivery over a real socket."""

from __future__ import annotations

import base64
import functools
import json
import shutil
import subprocess
from pathlib import Path

import pytest

from sidecard.httpserver import HttpRequest, Responder, serve_tcp_http
from sidecard.jobs.settings import WebhookSettings
from sidecard.jobs.webhook import DELIVERY_HEADER, SIGNATURE_HEADER, WebhookSender, next_attempt_at, signature, url_problem
from sidecard.upstream.pool import ConnectionPool
from sidecard_client import InvalidWebhook, verify_webhook

SECRET = b"whsec-test-0123456789"
BODY = b'{"type":"job.finished","job":{"id":"job_1","state":"succeeded"}}'
NOW = 1_700_000_000
NODE = shutil.which("node")
NODE_CLIENT = Path(__file__).parents[2] / "clients" / "node" / "index.js"


def cases() -> list[tuple[str, str, bytes, str | None]]:
    """(name, header, body, the InvalidWebhook reason or None when valid), checked at NOW with a 300 s tolerance."""
    good = signature(SECRET, BODY, NOW)
    forged = signature(b"another secret", BODY, NOW)
    rotated = f"{forged},v1={good.split('v1=')[1]}"  # several v1 entries: any may match (a secret being rotated)
    return [
        ("good", good, BODY, None),
        ("good, within the tolerance", signature(SECRET, BODY, NOW - 299), BODY, None),
        ("rotated", rotated, BODY, None),
        ("forged", forged, BODY, "signature"),
        ("body changed", good, BODY.replace(b"succeeded", b"failed"), "signature"),
        ("timestamp changed", good.replace(f"t={NOW}", f"t={NOW + 1}"), BODY, "signature"),
        ("old", signature(SECRET, BODY, NOW - 301), BODY, "stale"),
        ("from the future", signature(SECRET, BODY, NOW + 301), BODY, "stale"),
        ("no header", "", BODY, "malformed"),
        ("no signature", f"t={NOW}", BODY, "malformed"),
        ("no timestamp", "v1=" + good.split("v1=")[1], BODY, "malformed"),
        ("not a number", good.replace(f"t={NOW}", "t=soon"), BODY, "malformed"),
    ]


@pytest.mark.parametrize(("name", "header", "body", "reason"), cases(), ids=[c[0] for c in cases()])
def test_the_python_helper_verifies_sidecards_signature(name, header, body, reason):
    if reason is None:
        assert verify_webhook(SECRET, header, body, 300, now=NOW) == json.loads(body)
        assert verify_webhook(SECRET.decode(), header, body.decode(), 300, now=NOW) == json.loads(body)
    else:
        with pytest.raises(InvalidWebhook) as caught:
            verify_webhook(SECRET, header, body, 300, now=NOW)
        assert caught.value.reason == reason


def test_a_signed_body_that_is_not_json_is_refused():
    with pytest.raises(InvalidWebhook) as caught:
        verify_webhook(SECRET, signature(SECRET, b"nope", NOW), b"nope", now=NOW)
    assert caught.value.reason == "malformed"


@pytest.mark.skipif(NODE is None, reason="node is not installed")
def test_the_node_helper_agrees():
    script = f"""
import {{ verifyWebhook, InvalidWebhook }} from {json.dumps(NODE_CLIENT.as_uri())};
let input = '';
for await (const chunk of process.stdin) input += chunk;
const out = JSON.parse(input).map(([header, body]) => {{
  try {{ verifyWebhook({json.dumps(SECRET.decode())}, header, Buffer.from(body, 'base64'), 300, {NOW}); return null; }}
  catch (e) {{ return e instanceof InvalidWebhook ? e.reason : String(e); }}
}});
console.log(JSON.stringify(out));
"""
    given = [[header, base64.b64encode(body).decode()] for _, header, body, _ in cases()]
    result = subprocess.run([NODE, "--input-type=module", "-e", script], input=json.dumps(given),
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == [reason for *_, reason in cases()]


def test_webhook_urls_must_be_allowed():
    allowed = ["https://app.internal/hooks/"]
    assert url_problem("https://app.internal/hooks/jobs?x=1", allowed) is None
    assert "not under one of" in url_problem("https://app.internal/admin", allowed)
    assert "not under one of" in url_problem("https://app.internal.evil.example/hooks/", allowed)
    assert "not enabled" in url_problem("https://app.internal/hooks/", [])
    assert "http(s) URL" in url_problem("file:///etc/passwd", allowed)
    assert "'..' segment" in url_problem("https://app.internal/hooks/../admin", allowed)  # resolved by the receiver
    assert "'..' segment" in url_problem("https://app.internal/hooks/%2e%2E/admin", allowed)
    assert "http(s) URL" in url_problem("https://app.internal/hooks/..\\admin", allowed)


def test_delivery_retries_back_off_and_end():
    settings = WebhookSettings(max_attempts=4, retry_initial_s=5, retry_max_s=12)
    assert [next_attempt_at(n, 100.0, settings) for n in range(1, 5)] == [105.0, 110.0, 112.0, None]


async def test_a_delivery_arrives_signed_and_a_failing_receiver_is_a_false(nursery, autojump_clock):
    received: list[HttpRequest] = []
    statuses = [500, 204]

    async def receiver(request: HttpRequest, responder: Responder) -> None:
        received.append(request)
        await responder.send(statuses.pop(0), [], b"ok")

    host, port = await nursery.start(functools.partial(serve_tcp_http, receiver, "127.0.0.1", 0))
    pool = ConnectionPool()
    sender = WebhookSender(pool, SECRET, WebhookSettings(allowed_prefixes=["http://x/"], secret_file="f"))
    url = f"http://{host}:{port}/hooks/jobs?app=1"
    assert not await sender.deliver(url, "job_1", BODY, NOW)
    assert await sender.deliver(url, "job_1", BODY, NOW)
    last = received[-1]
    assert last.target == "/hooks/jobs?app=1" and last.header(DELIVERY_HEADER) == "job_1"
    assert verify_webhook(SECRET, last.header(SIGNATURE_HEADER), last.body, now=NOW) == json.loads(BODY)
    assert not await sender.deliver("http://127.0.0.1:1/hooks/", "job_1", BODY, NOW)  # nobody listening
    await pool.aclose()
