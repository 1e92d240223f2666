"""StreamState assembles a streamed answer exactly as the API's non-streamed reply has it."""

import msgspec

from sidecard.engine.plan import estimate_input_tokens
from sidecard.protocol import CacheCreation, Message, Usage
import pytest

from sidecard.streaming import OWN_FIELDS, Delta, Ending, MalformedEvent, StreamState

CITATION = {"type": "char_location", "cited_text": "The grass is green.", "document_index": 0,
            "document_title": "Facts", "start_char_index": 0, "end_char_index": 19}


def feed(state, *events):
    frames = []
    for event in events:
        frames += state.feed(event["type"], msgspec.json.encode(event))
    return frames


def test_citations_deltas_are_kept_in_the_assembled_block():
    state = StreamState()
    frames = feed(
        state,
        {"type": "message_start", "message": {"id": "m", "model": "claude-sonnet-4-6", "usage": {"input_tokens": 5}}},
        {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": "", "citations": []}},
        {"type": "content_block_delta", "index": 0, "delta": {"type": "citations_delta", "citation": CITATION}},
        {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "the grass is green"}},
        {"type": "content_block_stop", "index": 0},
        {"type": "message_stop"},
    )
    assert state.content() == [{"type": "text", "text": "the grass is green", "citations": [CITATION]}]
    assert frames[0].block["citations"] == []  # the announced block is a copy, not the growing one
    assert frames[1] == Delta(0, "citation", "citation", CITATION)


def test_the_whole_usage_object_survives_and_a_broken_stream_bills_what_was_streamed():
    state = StreamState()
    usage = {"input_tokens": 5, "output_tokens": 1, "cache_creation_input_tokens": 10, "cache_read_input_tokens": 0,
             "cache_creation": {"ephemeral_5m_input_tokens": 4, "ephemeral_1h_input_tokens": 6},
             "server_tool_use": {"web_search_requests": 2}, "service_tier": "standard", "some_future_count": 3}
    feed(
        state,
        {"type": "message_start", "message": {"id": "m", "usage": usage}},
        {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
        {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "x" * 400}},
    )
    got = state.usage_struct()
    assert got.cache_creation == CacheCreation(4, 6) and got.server_tool_use == {"web_search_requests": 2}
    assert got.service_tier == "standard" and got.output_tokens == 1
    assert state.billed_usage().output_tokens == 100  # no final count came: what was streamed, ~4 chars a token
    feed(state, {"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": 90, "input_tokens": None}},
         {"type": "message_stop"})
    assert state.billed_usage().output_tokens == 90 and state.billed_usage().input_tokens == 5


def test_usage_totals_add_every_part():
    total = Usage(1, 2, 3, 4)
    total.add(Usage(1, 1, 6, 0, CacheCreation(0, 6), {"web_search_requests": 1}, "priority"))
    total.add(Usage(0, 0, 2, 0, CacheCreation(2, 0), {"web_search_requests": 2, "web_fetch_requests": 1}))
    assert (total.input_tokens, total.output_tokens, total.cache_creation_input_tokens) == (2, 3, 11)
    assert total.cache_creation == CacheCreation(2, 6)
    assert total.server_tool_use == {"web_search_requests": 3, "web_fetch_requests": 1}
    assert total.service_tier == "priority"


def test_the_input_estimate_counts_tools_documents_and_tool_payloads():
    big = "y" * 40_000
    messages = [
        Message("user", [{"type": "document", "source": {"type": "text", "media_type": "text/plain", "data": big}}]),
        Message("assistant", [{"type": "tool_use", "id": "t1", "name": "lookup", "input": {"q": big}}]),
        Message("user", [{"type": "tool_result", "tool_use_id": "t1", "content": [{"type": "text", "text": big}]}]),
        Message("user", [{"type": "tool_result", "tool_use_id": "t2", "content": big}]),
    ]
    tools = msgspec.Raw(msgspec.json.encode([{"name": "lookup", "description": big, "input_schema": {"type": "object"}}]))
    estimate = estimate_input_tokens(None, messages, {"tools": tools})
    assert estimate >= 5 * 40_000 / 4
    image = [{"type": "tool_result", "tool_use_id": "t", "content": [{"type": "image", "source": {"type": "base64", "data": big}}]}]
    assert estimate_input_tokens(None, [Message("user", image)], {}) < 2_000  # an image counts as one, not by size


def test_the_upstreams_own_fields_are_kept_where_they_came_and_assembled_as_a_whole_answer_has_them():
    """message_start's message, message_delta's delta and message_delta itself: what sidecard does not model is kept
    (a face writes it back there; the answer's `extra` has it all), a later null not erasing an earlier value."""
    container = {"id": "container_1", "expires_at": "2026-12-04T23:30:00Z"}
    state = StreamState()
    frames = feed(
        state,
        {"type": "message_start", "message": {"id": "m", "type": "message", "role": "assistant", "model": "x",
                                              "content": [], "usage": {"input_tokens": 5}, "container": None, "new": 1}},
        {"type": "message_delta", "delta": {"stop_reason": "refusal", "container": container, "stop_details": {"type": "refusal"}},
         "usage": {"output_tokens": 2}, "context_management": {"applied_edits": []}},
        {"type": "message_delta", "delta": {"stop_reason": "refusal", "container": None}, "usage": {"output_tokens": 2}},
        {"type": "message_stop"},
    )
    assert state.start_extra == {"new": 1}  # (the API's optional fields sent null are as if left out)
    assert frames == [Ending({"container": container, "stop_details": {"type": "refusal"}}, {"context_management": {"applied_edits": []}})]
    assert state.extra() == {"container": container, "new": 1, "stop_details": {"type": "refusal"},
                             "context_management": {"applied_edits": []}}
    plain = StreamState()  # as the API streams an answer without them: its optional fields null
    assert feed(plain, {"type": "message_start", "message": {"id": "m", "type": "message", "usage": {}, "stop_details": None}},
                {"type": "message_delta", "delta": {"stop_reason": "end_turn", "container": None, "stop_details": None},
                 "usage": {"output_tokens": 2}, "context_management": None}) == []
    assert plain.start_extra == {} and plain.extra() is None


def test_a_delta_sidecard_does_not_model_keeps_its_fields_and_sets_them_on_its_block():
    """The beta compaction_delta carries content and encrypted_content (the next turn sends the block back): before,
    sidecard relayed it as {"type": "compaction_delta", "value": null} and the assembled block had neither."""
    state = StreamState()
    frames = feed(
        state,
        {"type": "message_start", "message": {"id": "m", "usage": {}}},
        {"type": "content_block_start", "index": 0, "content_block": {"type": "compaction", "content": None}},
        {"type": "content_block_delta", "index": 0,
         "delta": {"type": "compaction_delta", "content": "The user asked about grass.", "encrypted_content": "opaque"}},
        {"type": "content_block_stop", "index": 0},
    )
    pieces = {"content": "The user asked about grass.", "encrypted_content": "opaque"}
    assert frames[-1] == Delta(0, "compaction_delta", OWN_FIELDS, pieces)
    assert state.content() == [{"type": "compaction", **pieces}]
    with pytest.raises(MalformedEvent):  # (a text piece that is not text: later text deltas could not extend it)
        feed(state, {"type": "content_block_delta", "index": 0, "delta": {"type": "later_delta", "text": 5}})
