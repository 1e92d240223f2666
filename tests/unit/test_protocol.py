import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sidecard.errors import Code
from sidecard.policies.buffers import BufferBudget
from sidecard.framing import NEED_DATA, Frame, FrameDecoder, Oversized
from sidecard.protocol import (
    BadFrame,
    Complete,
    Ping,
    decode_body,
    decode_request,
    salvage_head_id,
    salvage_id,
)


def drain(decoder: FrameDecoder) -> list:
    events = []
    while (event := decoder.next_event()) is not NEED_DATA:
        events.append(event)
    return events


def test_frames_split_on_newlines_and_blank_lines_are_skipped():
    d = FrameDecoder(100)
    d.receive_data(b'{"a":1}\n\n  \r\n{"b":2}\n{"c"')
    assert drain(d) == [Frame(b'{"a":1}'), Frame(b'{"b":2}')]
    d.receive_data(b":3}\n")
    assert drain(d) == [Frame(b'{"c":3}')]


def test_final_frame_without_newline_counts_at_eof():
    d = FrameDecoder(100)
    d.receive_data(b'{"a":1}')
    assert drain(d) == []
    d.receive_data(b"")
    assert drain(d) == [Frame(b'{"a":1}')]


def test_oversized_frame_is_skipped_to_its_newline_without_buffering_it():
    d = FrameDecoder(10)
    d.receive_data(b"x" * 8)
    assert drain(d) == []
    d.receive_data(b"x" * 100)
    assert drain(d) == []
    assert len(d._buffer) == 0  # not buffered while skipping
    d.receive_data(b"xx\n{}\n")
    assert drain(d) == [Oversized(110, head=b"x" * 10), Frame(b"{}")]


def test_oversized_frame_complete_in_one_chunk():
    d = FrameDecoder(4)
    d.receive_data(b"123456\n{}\n")
    assert drain(d) == [Oversized(6, head=b"1234"), Frame(b"{}")]


def test_oversized_then_more_data_before_next_event():
    d = FrameDecoder(4)
    d.receive_data(b"1234567")
    assert drain(d) == []
    d.receive_data(b"8\n{}")
    d.receive_data(b"\n")
    assert drain(d) == [Oversized(8, head=b"1234"), Frame(b"{}")]


def test_oversized_at_eof():
    d = FrameDecoder(4)
    d.receive_data(b"1234567")
    d.receive_data(b"")
    assert drain(d) == [Oversized(7, head=b"1234")]


frames = st.lists(
    st.binary(min_size=1, max_size=40).map(lambda b: b.replace(b"\n", b"_").strip() or b"x"), max_size=12
)


def test_the_same_op_twice_is_one_op_as_the_page_says():
    """docs/protocol.md: a second `op` naming the same op is read as one (no ambiguity), as any key given twice is;
    refusing it would cost every frame a second pass. (The page said it was bad_request: a fresh-clone trial.)"""
    assert decode_request(b'{"op":"ping","op":"ping","id":1}') == Ping(id=1)
    request = decode_request(b'{"op":"complete","id":2,"max_tokens":5,"op":"complete","max_tokens":7}')
    assert isinstance(request, Complete) and request.max_tokens == 7 and not request.passthrough


@settings(max_examples=300, deadline=None)
@given(frames, st.data())
def test_any_split_decodes_the_same(payloads, data):
    stream = b"".join(p + b"\n" for p in payloads)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=8)))
    d = FrameDecoder(1000)
    out = []
    start = 0
    for cut in [*cuts, len(stream)]:
        d.receive_data(stream[start:cut]) if cut > start else None
        start = max(start, cut)
        out += drain(d)
    assert out == [Frame(p) for p in payloads]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(1, 60), max_size=10), st.integers(1, 7))
def test_oversize_accounting_is_split_independent(lengths, chunk):
    limit = 20
    stream = b"".join(b"y" * n + b"\n" for n in lengths)
    d = FrameDecoder(limit)
    out = []
    for i in range(0, len(stream), chunk):
        d.receive_data(stream[i : i + chunk])
        out += drain(d)
    expected = [Oversized(n, head=b"y" * limit) if n > limit else Frame(b"y" * n) for n in lengths]
    assert out == expected


def test_decode_ping_and_complete():
    assert decode_request(b'{"op":"ping","id":7}') == Ping(7)
    req = decode_request(b'{"op":"complete","id":"a","messages":[{"role":"user","content":"hi"}],"feature":"f1"}')
    assert isinstance(req, Complete) and req.feature == "f1" and req.messages[0].content == "hi"


@pytest.mark.parametrize("model", [
    "claude-sonnet-4-6", "anthropic.claude-3-5-sonnet-20241022-v2:0", "us.anthropic.claude-sonnet-4-20250514-v1:0",
    "claude-3-5-sonnet-v2@20241022", "arn:aws:bedrock:us-east-1:123456789012:application-inference-profile/a1b2c3d4e5f6",
])
def test_model_ids_of_every_provider_are_taken(model):
    assert decode_request(b'{"op":"complete","id":1,"model":"%b"}' % model.encode()).model == model


@pytest.mark.parametrize("max_tokens", [1, 64_000, 128_000, 131_072, 300_000, 1_000_000])
def test_max_tokens_any_model_takes_is_taken(max_tokens):
    """Up to the largest context window: 128k (Opus 4.6), 300k (a batch with the output-300k beta) included."""
    frame = b'{"op":"submit","id":1,"messages":[],"max_tokens":%d}' % max_tokens
    assert decode_request(frame).max_tokens == max_tokens


def test_unknown_fields_are_ignored_for_forward_compatibility():
    req = decode_request(b'{"op":"complete","id":1,"messages":[],"future_field":{"x":1}}')
    assert isinstance(req, Complete)


@pytest.mark.parametrize(
    "frame, code, request_id, fragment",
    [
        (b"not json", Code.BAD_FRAME, None, "not valid JSON"),
        # Not JSON, yet the id is readable: the client waits on it, so the reply must carry it.
        (b'{"op":"complete","id":"n","temperature":NaN}', Code.BAD_FRAME, "n", "invalid character"),
        (b'{"op":"complete","id":9,"messages":[{"role":"user","content":"\\ud800"}]}', Code.BAD_FRAME, 9, "lone surrogate"),
        (b'{"op":"complete","vars":{"id":"inner"},"x":Infinity,"id":10}', Code.BAD_FRAME, 10, "invalid character"),
        (b"[1,2]", Code.BAD_FRAME, None, "JSON object"),
        (b'{"op":"dance","id":3}', Code.UNKNOWN_OP, 3, "dance"),
        (b'{"id":4}', Code.UNKNOWN_OP, 4, "no `op`"),
        (b'{"op":"complete","id":5,"max_tokens":"many"}', Code.BAD_REQUEST, 5, "max_tokens: expected int"),
        (b'{"op":"complete","id":6,"max_tokens":0}', Code.BAD_REQUEST, 6, "max_tokens"),
        (b'{"op":"complete","id":"x","messages":[{"role":"robot","content":"hi"}]}', Code.BAD_REQUEST, "x", "messages[0].role"),
        (b'{"op":"complete","id":8,"feature":"has space"}', Code.BAD_REQUEST, 8, "feature"),
        (b'{"op":"ping"}', Code.BAD_REQUEST, None, "id"),
        (b'{"op":"complete","id":[1]}', Code.BAD_REQUEST, None, "id"),
        # A number that is no integer is no id: never answered as another request's (1, 7).
        (b'{"op":"ping","id":1.5}', Code.BAD_REQUEST, None, "id"),
        (b'{"op":"ping","id":7e3}', Code.BAD_REQUEST, None, "id"),
        (b'{"op":"ping","x":NaN,"id":-2E1}', Code.BAD_FRAME, None, "invalid character"),
        # A model is a label and a log field: bounded, and spelled as model ids are.
        (b'{"op":"complete","id":11,"model":"%b"}' % (b"m" * 257), Code.BAD_REQUEST, 11, "model"),
        (b'{"op":"complete","id":12,"model":"claude sonnet"}', Code.BAD_REQUEST, 12, "model"),
        (b'{"op":"complete","id":13,"model":"claude\\nx-evil: 1"}', Code.BAD_REQUEST, 13, "model"),
        (b'{"op":"complete","id":14,"model":""}', Code.BAD_REQUEST, 14, "model"),
        # No model takes more than its context window; the largest is 1M. Before: passed on, and a budget's worst
        # case read $7.5e10.
        (b'{"op":"complete","id":15,"max_tokens":1000000000000000}', Code.BAD_REQUEST, 15, "max_tokens: expected int <= 1000000"),
        (b'{"op":"count_tokens","id":16,"max_tokens":1000001}', Code.BAD_REQUEST, 16, "max_tokens"),
        # `op` twice: msgspec reads the type from the first and finds the second wrong. Before: "unknown op: 'ping'".
        (b'{"op":"complete","op":"ping","id":17}', Code.BAD_REQUEST, 17, "frame has the key `op` more than once"),
        (b'{"id":"d","op":"ping","messages":[],"op":"complete"}', Code.BAD_REQUEST, "d", "`op` more than once"),
        (b'{"op":"complete","id":18,"op":"dance"}', Code.UNKNOWN_OP, 18, "unknown op: 'dance'"),  # (that it is)
    ],
)
def test_bad_frames_get_typed_errors(frame, code, request_id, fragment):
    with pytest.raises(BadFrame) as info:
        decode_request(frame)
    assert info.value.error.code == code and not info.value.error.retryable
    assert info.value.request_id == request_id
    assert fragment in info.value.error.message


def test_a_body_with_one_op_of_another_kind_is_no_duplicate():
    """A job's body is a `complete`'s: one `op` that names another op is what it is, not a second `op`."""
    with pytest.raises(BadFrame) as info:
        decode_body(b'{"op":"ping","messages":[]}')
    assert (info.value.error.code, info.value.error.message) == (Code.UNKNOWN_OP, "unknown op: 'ping'")


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_garbage_never_raises_anything_but_badframe(blob):
    try:
        decode_request(blob)
    except BadFrame as bad:
        assert bad.error.code in {Code.BAD_FRAME, Code.BAD_REQUEST, Code.UNKNOWN_OP}


@pytest.mark.parametrize("depth", [1_000, 100_000])
def test_frames_nested_too_deep_are_bad_frames_not_recursion_errors(depth):
    for value in (b"[" * depth + b"]" * depth, b'{"a":' * depth + b"1" + b"}" * depth):
        frame = b'{"op":"complete","id":1,"messages":[],"x":%b}' % value
        with pytest.raises(BadFrame) as info:
            decode_request(frame)
        assert info.value.error.code == Code.BAD_FRAME and info.value.error.message == "frame is nested too deeply"
        assert info.value.request_id == salvage_id(frame) == 1  # (read without recursing)


def test_incomplete_frames_are_charged_to_a_shared_budget_and_given_back():
    budget = BufferBudget(100)
    first, second = FrameDecoder(1000, budget), FrameDecoder(1000, budget)
    first.receive_data(b'{"op":"ping",' + b" " * 47)  # 60 bytes, no newline yet
    assert drain(first) == [] and budget.used == 60
    second.receive_data(b"x" * 50)  # would make 110: skipped to its newline, and reported once
    assert drain(second) == [] and budget.used == 60
    second.receive_data(b"more of it\n{}\n")
    assert drain(second) == [Oversized(60, over_budget=True, head=b"x" * 50), Frame(b"{}")]
    first.receive_data(b'"id":1}\n')
    assert drain(first) == [Frame(b'{"op":"ping",' + b" " * 47 + b'"id":1}')] and budget.used == 0
    second.receive_data(b"y" * 80)
    assert drain(second) == [] and budget.used == 80
    second.close()  # the connection went mid-frame
    assert budget.used == 0


def test_oversized_frames_are_not_reported_as_over_budget():
    decoder = FrameDecoder(10, BufferBudget(1000))
    decoder.receive_data(b"x" * 20 + b"\n")
    assert drain(decoder) == [Oversized(20, head=b"x" * 10)]


@pytest.mark.parametrize(("head", "found"), [
    (b'{"id":7,"op":"complete","messages":[{"role":"user","content":"xx', 7),
    (b'{"op":"complete","id":"q1","messages":[', "q1"),
    (b'{"messages":[{"content":[{"type":"tool_use","id":"toolu_1"}]}],"id":3', 3),  # a nested "id" is not it
    (b'{"op":"complete","messages":[{"role":"user","content":"xxxx', None),  # the id comes later, if at all
    (b'{"a":"\\"id\\":5","id":2,', 2),  # "id" inside a string is not a key
    (b'{"id":15.5,"op":"complete","messages":[', None),  # no integer: no id (not 15)
    (b'{"id":7e3,"op":"complete","messages":[', None),
    (b'{"id":70,"op":"complete","messages":[', 70),
])
def test_the_id_of_a_frame_too_large_to_read_is_read_from_its_start(head, found):
    assert salvage_head_id(head) == found


def test_a_validation_error_reads_as_a_sentence_and_keeps_an_acronym_whole():
    """The admin socket said "jSON is malformed" (a fresh-clone trial): the first letter is lowered for the sentence
    after the key, not an acronym's."""
    import msgspec

    from sidecard.errors import describe_validation_error

    for frame, expected in ((b"{garbage", "JSON is malformed: "), (b'{"a":"x"}', "[...]: expected int, got str")):
        try:
            msgspec.json.decode(frame, type=dict[str, int])
        except msgspec.MsgspecError as exc:
            assert describe_validation_error(exc).startswith(expected)
