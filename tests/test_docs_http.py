"""docs/http.md's table of errors is what the HTTP face sends and what the installed anthropic SDK raises for it:
every sidecard code is in it, with its status, its `x-should-retry`, and the SDK's exception class by name."""

import re
from pathlib import Path

import anthropic
import httpx2
import pytest

from sidecard.errors import SidecardError
from sidecard.faces.http import _STATUS, _error_response

PAGE = (Path(__file__).parents[1] / "docs" / "http.md").read_text()
TABLE = PAGE.split("| sidecard code | status | SDK exception | `x-should-retry` |\n|---|---|---|---|\n", 1)[1].split("\n\n", 1)[0]
ROWS = {
    code: (int(status.split()[0]), re.findall(r"`(\w+)`", exception)[0], "true" in retry)
    for codes, status, exception, retry in (line.strip("|").split(" | ") for line in TABLE.splitlines())
    for code in re.findall(r"`(\w+)`", codes)
}


def test_the_table_has_every_code_the_face_sends():
    assert sorted(ROWS) == sorted(_STATUS)


@pytest.mark.parametrize("code", sorted(ROWS))
def test_the_sdk_raises_the_exception_the_table_names(code):
    status, exception, should_retry = ROWS[code]
    sent_status, headers, body = _error_response(SidecardError(code, "as sent"))
    assert sent_status == status and (b"x-should-retry", b"true" if should_retry else b"false") in headers

    def answer(request: httpx2.Request) -> httpx2.Response:
        return httpx2.Response(sent_status, headers=[(k.decode(), v.decode()) for k, v in headers], content=body)

    client = anthropic.Anthropic(api_key="unused", base_url="http://sidecard", max_retries=0,
                                 http_client=httpx2.Client(transport=httpx2.MockTransport(answer)))
    with pytest.raises(anthropic.APIStatusError) as raised:
        client.messages.create(model="claude-sonnet-4-6", max_tokens=10, messages=[{"role": "user", "content": "hi"}])
    assert type(raised.value).__name__ == exception
    assert isinstance(raised.value, anthropic.InternalServerError) == (status >= 500)  # what the page says of 5xx
