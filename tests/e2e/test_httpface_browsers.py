"""Hostile input from browsers: a web page may make the browser send the HTTP face requests (a text/plain POST needs
no CORS preflight), and a page whose DNS name is rebound to 127.0.0.1 can read the answers. The face refuses both
unless the operator lists the page's origin (`allowed_origins`) or the name (`allowed_hosts`); the official SDK,
which sends neither mark, is unaffected on the TCP port and on the Unix socket. Raw requests over real sockets."""

import functools

import anthropic
import msgspec
import pytest
import trio

from sidecard.config import ConfigError, from_mapping
from sidecard.faces.http import _host_allowed
from tests.e2e.test_httpface import ASK, PRIMARY, in_thread, sync_client
from tests.harness import metric

BODY = b'{"model":"claude-sonnet-4-6","max_tokens":10,"messages":[{"role":"user","content":"spend"}]}'
APP = "https://app.example.com"


async def exchange(d, request: bytes, *, unix: bool = False) -> tuple[int, dict[bytes, bytes], bytes]:
    """REQUEST (its head ends in `connection: close`) on a connection of its own; the response, read to the close."""
    if unix:
        stream = await trio.open_unix_socket(d.config.http.socket)
    else:
        stream = await trio.open_tcp_stream(*d.http_address)
    async with stream:
        await stream.send_all(request)
        data = b""
        while chunk := await stream.receive_some(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    pairs = (line.split(b": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), {name.lower(): value for name, value in pairs}, body


def request(method: str, path: str, *headers: str, body: bytes = b"") -> bytes:
    head = [f"{method} {path} HTTP/1.1", *headers, f"content-length: {len(body)}", "connection: close"]
    return "\r\n".join(head).encode() + b"\r\n\r\n" + body


async def on_a_port(daemon_factory, **http):
    return await daemon_factory(http={"address": "127.0.0.1:0", **http})


def refused(status: int, headers: dict[bytes, bytes], body: bytes) -> dict:
    assert status == 403 and headers[b"x-sidecard-error-code"] == b"forbidden" and headers[b"x-should-retry"] == b"false"
    assert b"access-control-allow-origin" not in headers  # the page cannot even read the refusal
    error = msgspec.json.decode(body)["error"]
    assert error["type"] == "permission_error" and error["sidecard_code"] == "forbidden" and error["retryable"] is False
    return error


async def test_the_trials_curl_request_from_a_web_page_is_refused(daemon_factory, sim):
    """The fresh-clone trial's repro: before, a 200, spent on the operator's key."""
    d = await on_a_port(daemon_factory)
    port = d.http_address[1]
    status, headers, body = await exchange(d, request(
        "POST", "/v1/messages", f"Host: evil.example:{port}", "Content-Type: text/plain", "Origin: https://evil.example",
        "User-Agent: curl/8.5.0", "Accept: */*", body=BODY))
    error = refused(status, headers, body)
    assert error["message"] == ("a request from a web page (origin 'https://evil.example') is refused: "
                                "[http] allowed_origins does not list its origin")
    assert sim.stats_total()["requests"] == 0
    assert metric(d, "sidecard_access_denied_total", face="http", key="origin") == 1


@pytest.mark.parametrize(
    ("method", "path", "marks", "key"),
    [
        # A cross-site page's POST: its browser sends Origin (and Sec-Fetch-Site).
        ("POST", "/v1/messages", ["Origin: https://evil.example", "Sec-Fetch-Site: cross-site"], "origin"),
        # A no-cors GET (an <img>, a <script>) carries no Origin, but Sec-Fetch-Site says where it came from.
        ("GET", "/v1/models", ["Sec-Fetch-Site: cross-site"], "origin"),
        ("GET", "/v1/models", ["Sec-Fetch-Site: same-site", "Origin: http://localhost:3000"], "origin"),
        # A page on a rebound name reads with same-origin GETs: no Origin, but its own name as Host.
        ("GET", "/v1/models", ["Sec-Fetch-Site: same-origin"], "host"),
        ("POST", "/v1/messages", [], "host"),
    ],
)
async def test_each_mark_of_a_web_page_alone_is_refused(daemon_factory, sim, method, path, marks, key):
    d = await on_a_port(daemon_factory)
    port = d.http_address[1]
    host = f"Host: rebound.evil.example:{port}" if key == "host" else f"Host: 127.0.0.1:{port}"
    status, headers, body = await exchange(d, request(method, path, host, "Content-Type: application/json", *marks,
                                                      body=BODY if method == "POST" else b""))
    error = refused(status, headers, body)
    if key == "host":
        assert error["message"].startswith(f"host 'rebound.evil.example:{port}' is not a loopback name")
    assert metric(d, "sidecard_access_denied_total", face="http", key=key) == 1
    assert sim.stats_total()["requests"] == 0


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.1:{port}", "127.9.8.7:{port}", "localhost", "LocalHost:{port}",
                                  "app.localhost:{port}", "[::1]:{port}", "[::1]", "sidecard.internal:{port}", "Sidecard.Internal"])
async def test_loopback_names_and_listed_hosts_are_served_on_the_port(daemon_factory, sim, host):
    d = await on_a_port(daemon_factory, allowed_hosts=["sidecard.internal"])
    host = host.format(port=d.http_address[1])
    status, _, body = await exchange(d, request("POST", "/v1/messages", f"Host: {host}", "Content-Type: application/json", body=BODY))
    assert status == 200, body
    status, headers, body = await exchange(d, request("GET", "/v1/models", "Host: other.internal"))
    refused(status, headers, body)


async def test_an_allowed_origin_is_served_with_cors_and_its_preflight_answered(daemon_factory, sim):
    """The TS SDK in a browser (`dangerouslyAllowBrowser`): its headers make the browser ask first (OPTIONS), then
    send the request with Origin; both are answered for a listed origin, and the page can read the reply's headers."""
    d = await on_a_port(daemon_factory, allowed_origins=["https://App.Example.com"])  # (lowercased, as browsers send it)
    host = f"Host: 127.0.0.1:{d.http_address[1]}"
    asked = "anthropic-dangerous-direct-browser-access,anthropic-version,content-type,x-api-key,x-stainless-os"
    status, headers, body = await exchange(d, request(
        "OPTIONS", "/v1/messages", host, f"Origin: {APP}", "Sec-Fetch-Site: cross-site", "Access-Control-Request-Method: POST",
        f"Access-Control-Request-Headers: {asked}", "Access-Control-Request-Private-Network: true"))
    assert (status, body) == (204, b"")
    assert headers[b"access-control-allow-origin"] == APP.encode() and headers[b"access-control-allow-methods"] == b"GET, POST"
    assert headers[b"access-control-allow-headers"] == asked.encode() and headers[b"access-control-max-age"] == b"600"
    assert headers[b"access-control-allow-private-network"] == b"true" and headers[b"vary"] == b"origin"

    marks = (host, f"Origin: {APP}", "Sec-Fetch-Site: cross-site", "Content-Type: application/json")
    status, headers, body = await exchange(d, request("POST", "/v1/messages", *marks, body=BODY))
    assert status == 200 and msgspec.json.decode(body)["content"][0]["text"]
    assert headers[b"access-control-allow-origin"] == APP.encode() and headers[b"access-control-expose-headers"] == b"*"
    assert headers[b"x-sidecard-served-by"] == f"anthropic:{PRIMARY}".encode()
    status, headers, body = await exchange(d, request("POST", "/v1/messages", *marks, body=BODY.replace(b"10", b"-1")))
    assert status == 400 and headers[b"access-control-allow-origin"] == APP.encode()  # its errors are readable too

    for other in ("https://evil.example", "null", "https://app.example.com.evil.example", "http://app.example.com"):
        status, headers, body = await exchange(d, request("POST", "/v1/messages", host, f"Origin: {other}", body=BODY))
        refused(status, headers, body)
    status, headers, body = await exchange(d, request("OPTIONS", "/v1/messages", host, "Origin: https://evil.example",
                                                      "Access-Control-Request-Method: POST"))
    refused(status, headers, body)  # a preflight failure: the browser never sends the request


@pytest.mark.parametrize(
    ("status", "head"),
    [
        # A chunked body that does not parse (a malformed head has only the headers before the fault to go by).
        (400, "POST /v1/messages HTTP/1.1\r\n{host}\r\nOrigin: {origin}\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n"),
        # The body's length before the Origin: refused at the head's end, still before a byte of the body.
        (413, "POST /v1/messages HTTP/1.1\r\nContent-Length: 999999999\r\n{host}\r\nOrigin: {origin}\r\n\r\n"),
        (431, "GET /v1/models HTTP/1.1\r\n{host}\r\nOrigin: {origin}\r\nX-Big: " + "a" * 70_000 + "\r\n\r\n"),
    ],
)
async def test_the_servers_own_refusals_are_readable_by_an_allowed_origin(daemon_factory, sim, status, head):
    """The HTTP server's refusals (malformed, a body or a head too large) carried no CORS headers, so a page of an
    allowed origin could not read why it was refused; a page of another origin still cannot."""
    d = await on_a_port(daemon_factory, allowed_origins=[APP])
    host = f"Host: 127.0.0.1:{d.http_address[1]}"
    for origin, readable in ((APP, True), ("https://evil.example", False)):
        async with await trio.open_tcp_stream(*d.http_address) as stream:
            await stream.send_all(head.format(host=host, origin=origin).encode())
            await stream.send_eof()
            data = b""
            while chunk := await stream.receive_some(65536):
                data += chunk
        lines = data.partition(b"\r\n\r\n")[0].split(b"\r\n")
        headers = dict(line.split(b": ", 1) for line in lines[1:])
        assert int(lines[0].split()[1]) == status and headers[b"x-sidecard-error-code"]
        if readable:
            assert headers[b"access-control-allow-origin"] == APP.encode() and headers[b"vary"] == b"origin"
        else:
            assert b"access-control-allow-origin" not in headers


async def test_the_unix_socket_checks_origin_but_not_host(daemon_factory, sim):
    """No browser reaches a Unix socket (the SDK's base_url there is any name: `http://sidecard`), but a proxy in front
    of it may pass a page's request on, Origin and all."""
    d = await daemon_factory()
    for host in ("sidecard", "evil.example:8788"):
        status, _, body = await exchange(d, request("POST", "/v1/messages", f"Host: {host}", body=BODY), unix=True)
        assert status == 200, body
    status, headers, body = await exchange(d, request("POST", "/v1/messages", "Host: sidecard", "Origin: https://evil.example",
                                                      "Content-Type: text/plain", body=BODY), unix=True)
    refused(status, headers, body)


@pytest.mark.parametrize("path", ["/v1/messages", "/v1/messages/count_tokens", "/v1/feedback", "/v1/sidecard/jobs"])
@pytest.mark.parametrize("media", ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x"])
async def test_a_post_body_that_is_not_json_is_a_415(daemon, sim, path, media):
    """What an HTML form can send (and what `curl -d` sends unless told): refused by its type, even as JSON."""
    status, headers, body = await exchange(daemon, request("POST", path, "Host: sidecard", f"Content-Type: {media}", body=BODY),
                                           unix=True)
    assert status == 415 and headers[b"x-sidecard-error-code"] == b"bad_request" and headers[b"x-should-retry"] == b"false"
    assert msgspec.json.decode(body)["error"] == {
        "type": "invalid_request_error", "message": f"content-type {media!r} is not taken: send the body as application/json",
        "sidecard_code": "bad_request", "retryable": False}
    assert sim.stats_total()["requests"] == 0


@pytest.mark.parametrize("media", [None, "application/json", "Application/JSON; charset=utf-8"])
async def test_json_or_no_content_type_is_taken(daemon, sim, media):
    typed = [f"Content-Type: {media}"] if media else []
    status, _, body = await exchange(daemon, request("POST", "/v1/messages", "Host: sidecard", *typed, body=BODY), unix=True)
    assert status == 200, body


async def test_healthz_is_open_to_anything_and_answers_head(daemon_factory, sim):
    """Liveness probes: any Host, any Origin; HEAD (before: a 404) gets the status and no body."""
    d = await on_a_port(daemon_factory)
    page = ("Host: evil.example", "Origin: https://evil.example", "Sec-Fetch-Site: cross-site")
    assert (await exchange(d, request("GET", "/healthz", *page)))[::2] == (200, b'{"ok":true}')
    status, headers, body = await exchange(d, request("HEAD", "/healthz", "Host: localhost"))
    assert (status, body, headers[b"content-type"]) == (200, b"", b"application/json")
    assert (await exchange(d, request("HEAD", "/healthz", "Host: sidecard"), unix=True))[::2] == (200, b"")


async def test_the_official_sdk_is_unaffected_on_the_port_and_the_socket(daemon_factory, sim):
    """anthropic 2.x sends no Origin or Sec-Fetch-*, a loopback Host on the port (`sidecard` on the socket) and JSON."""
    d = await on_a_port(daemon_factory)
    host, port = d.http_address

    def calls(client: anthropic.Anthropic) -> tuple[str, str, int, list[str]]:
        with client:
            message = client.messages.create(model=PRIMARY, max_tokens=50, messages=ASK)
            with client.messages.stream(model=PRIMARY, max_tokens=50, messages=ASK) as stream:
                text = stream.get_final_text()
            counted = client.messages.count_tokens(model=PRIMARY, messages=ASK).input_tokens
            return message.content[0].text, text, counted, [model.id for model in client.models.list()]

    on_the_port = [anthropic.Anthropic(api_key="x", base_url=url, max_retries=0) for url in (f"http://{host}:{port}", f"http://localhost:{port}")]
    for client in [*on_the_port, sync_client(d)]:
        answer, streamed, counted, models = await in_thread(functools.partial(calls, client))
        assert answer and streamed and counted > 0 and PRIMARY in models
    async with anthropic.AsyncAnthropic(api_key="x", base_url=f"http://{host}:{port}", max_retries=0) as client:
        assert (await client.messages.create(model=PRIMARY, max_tokens=50, messages=ASK)).content[0].text
    assert metric(d, "sidecard_access_denied_total", face="http", key="origin") == 0
    assert metric(d, "sidecard_access_denied_total", face="http", key="host") == 0


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        (b"127.0.0.1", True), (b"127.255.0.1:1", True), (b"localhost:", True), (b"a.b.localhost", True), (b"[::1]:8788", True),
        (b"[0:0:0:0:0:0:0:1]", True), (b"128.0.0.1", False), (b"127.0.0.1.evil.example", False), (b"localhost.evil.example", False),
        (b"evillocalhost", False), (b"127.0.0.1:x", False), (b"[::1]x", False), (b"[::1", False), (b"[::2]", False),
        (b"::1", False), (b"0x7f.1", False), (b"2130706433", False), (b"127.1", False), (b"", False), (b":80", False),
        (b"[fe80::1]", False), (b"[127.0.0.1]", False),
    ],
)
def test_which_hosts_are_loopback_names(host, loopback):
    assert _host_allowed(host, frozenset()) is loopback


@pytest.mark.parametrize(
    ("http", "problem"),
    [
        ({"allowed_origins": ["null"]}, "'null' is not an origin"),
        ({"allowed_origins": ["*"]}, "'*' is not an origin"),
        ({"allowed_origins": ["https://app.example.com/"]}, "no path"),
        ({"allowed_origins": ["app.example.com"]}, "scheme://host[:port]"),
        ({"allowed_hosts": ["sidecard.internal:8788"]}, "without the port"),
        ({"allowed_hosts": ["http://sidecard.internal"]}, "is not a host name"),
    ],
)
def test_lists_that_would_let_any_page_in_or_never_match_are_refused(http, problem):
    with pytest.raises(ConfigError, match=problem.replace("[", r"\[").replace("*", r"\*")):
        from_mapping({"http": http})
