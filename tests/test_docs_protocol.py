"""Every request frame shown in docs/protocol.md is one the daemon takes, as the op it shows: a client written
from that page alone (what it promises) does not meet `unknown_op` or `bad_request` on its first try."""

import re
from pathlib import Path

import msgspec
import pytest

from sidecard.protocol import decode_request

PAGE = (Path(__file__).parents[1] / "docs" / "protocol.md").read_text()
BLOCKS = re.findall(r"^```json\n(.*?)^```$", PAGE, re.M | re.S)


def frames(block: str) -> list[bytes]:
    """A block is one frame over several lines, or one frame per line."""
    try:
        return [msgspec.json.encode(msgspec.json.decode(block))]
    except msgspec.DecodeError:
        return [line.encode() for line in block.splitlines() if line.strip()]


REQUESTS = [f for block in BLOCKS for f in frames(block) if b'"op"' in f]


def test_the_page_shows_a_frame_of_every_op():
    shown = {msgspec.json.decode(f)["op"] for f in REQUESTS}
    assert shown == {"ping", "hello", "complete", "count_tokens", "feedback", "cancel", "submit", "job", "wait"}


@pytest.mark.parametrize("frame", REQUESTS, ids=lambda f: msgspec.json.decode(f)["op"])
def test_every_request_frame_on_the_page_decodes_as_its_op(frame):
    request = decode_request(frame)
    assert type(request).__struct_config__.tag == msgspec.json.decode(frame)["op"]
