"""The upstream message's fields sidecard does not model (a code execution `container`, a refusal's `stop_details`, the
beta `context_management`, a field the API adds later) reach the app as the API gave them, on both faces, whole and
streamed; an answer with a container is that conversation's alone: never cached, never shared."""

import msgspec

from sidecard.sim import Fault, replies
from sidecard_client.aio import AsyncClient
from tests.e2e.test_httpface import ASK, PRIMARY, async_client
from tests.harness import connect, stream_frame

CONTAINER = {"id": "container_011CVsecretstate", "expires_at": "2026-12-04T23:30:00Z", "skills": None}
REFUSAL = {"type": "refusal", "category": "cyber", "explanation": "The request could enable malware development."}
CONTEXT = {"applied_edits": [{"type": "clear_tool_uses_20250919", "cleared_tool_uses": 2, "cleared_input_tokens": 500}]}
LATER = {"a_field_the_api_adds_later": {"n": 1}}
# The fields of a reply frame before extras existed, in their order: a reply without extras is as it was.
FRAME_FIELDS = ["id", "text", "content", "model", "usage", "stop_reason", "latency_ms", "cost_usd", "upstream_request_id",
                "request_id", "served_by", "attempts", "fallback", "degraded", "cached", "stale", "stop_sequence", "prompt",
                "prompt_version", "ttft_ms", "resumed", "ok", "guardrails", "trace_id"]


def upstream_answers_with(monkeypatch, fields: dict) -> None:
    """The simulator's whole answers get FIELDS at their top level."""
    made = replies.message
    monkeypatch.setattr(replies, "message", lambda *args: {**made(*args), **fields})


def upstream_streams_with(monkeypatch, *, start: dict | None = None, delta: dict | None = None, beside: dict | None = None) -> None:
    """The simulator's streams get START in message_start's message, DELTA in message_delta's delta, BESIDE in
    message_delta itself: where the API sends them."""
    made = replies.stream_events

    def events(*args):
        out = made(*args)
        for event in out:
            if event["type"] == "message_start":
                event["message"].update(start or {})
            elif event["type"] == "message_delta":
                event["delta"].update(delta or {})
                event.update(beside or {})
        return out

    monkeypatch.setattr(replies, "stream_events", events)


async def test_the_sdk_gets_container_stop_details_and_later_fields_of_a_whole_answer(daemon_factory, sim, autojump_clock,
                                                                                     monkeypatch, capture_log):
    """Called directly, the SDK has `container` and `stop_details`; through sidecard both were None, a later field gone."""
    upstream_answers_with(monkeypatch, {"container": CONTAINER, "stop_details": REFUSAL, **LATER, "sidecard": "not this"})
    d = await daemon_factory()
    async with async_client(d) as client:
        raw = await client.messages.with_raw_response.create(model=PRIMARY, max_tokens=50, messages=ASK)
    message = await raw.parse()
    assert message.container is not None and message.container.id == CONTAINER["id"]
    assert message.stop_details is not None and message.stop_details.category == "cyber"
    body = msgspec.json.decode(raw.http_response.content)
    assert body["a_field_the_api_adds_later"] == {"n": 1} and body["sidecard"] == "not this"
    assert body["id"].startswith("msg_") and body["type"] == "message" and body["model"] == PRIMARY  # sidecard's own kept
    assert CONTAINER["id"] not in capture_log.text and "malware" not in capture_log.text


async def test_the_sdk_gets_container_and_stop_details_of_a_stream(daemon_factory, sim, autojump_clock, monkeypatch, capture_log):
    """The SDK reads them from message_delta's delta (and a container a message_start names stays)."""
    upstream_streams_with(monkeypatch, start={"container": None, **LATER}, delta={"container": CONTAINER, "stop_details": REFUSAL})
    d = await daemon_factory()
    async with async_client(d) as client:
        async with client.messages.stream(model=PRIMARY, max_tokens=50, messages=ASK) as stream:
            events = [event async for event in stream]
            final = await stream.get_final_message()
    assert final.container is not None and final.container.id == CONTAINER["id"]
    assert final.stop_details is not None and final.stop_details.category == "cyber"
    start = next(e for e in events if e.type == "message_start")
    delta = next(e for e in events if e.type == "message_delta")
    assert start.message.a_field_the_api_adds_later == {"n": 1}  # where the upstream sent it
    assert delta.delta.container.id == CONTAINER["id"] and delta.delta.stop_reason == final.stop_reason
    assert delta.sidecard["served-by"] == f"anthropic:{PRIMARY}"  # sidecard's own fields of message_delta too
    assert CONTAINER["id"] not in capture_log.text and "malware" not in capture_log.text


async def test_the_beta_sdk_gets_context_management_whole_and_streamed(daemon_factory, sim, autojump_clock, monkeypatch):
    upstream_answers_with(monkeypatch, {"context_management": CONTEXT})
    upstream_streams_with(monkeypatch, beside={"context_management": CONTEXT})
    d = await daemon_factory()
    async with async_client(d) as client:
        whole = await client.beta.messages.create(model=PRIMARY, max_tokens=50, messages=ASK)
        async with client.beta.messages.stream(model=PRIMARY, max_tokens=50, messages=ASK) as stream:
            streamed = await stream.get_final_message()
    for message in (whole, streamed):
        assert message.context_management is not None
        assert message.context_management.applied_edits[0].cleared_tool_uses == 2


async def test_the_socket_reply_has_them_as_extra_and_a_reply_without_is_as_before(daemon_factory, sim, autojump_clock, monkeypatch):
    d = await daemon_factory()
    client = await connect(d)
    plain = await client.complete("no extras")
    assert list(plain) == FRAME_FIELDS
    events, done = await stream_frame(client, {"op": "complete", "messages": [{"role": "user", "content": "no extras"}]})
    assert "extra" not in done and "extra" not in events[0]
    upstream_answers_with(monkeypatch, {"stop_details": REFUSAL, **LATER})
    reply = await client.complete("with extras")
    assert list(reply) == [*FRAME_FIELDS, "extra"] and reply["extra"] == {"stop_details": REFUSAL, **LATER}
    async with AsyncClient(d.socket_path) as python_client:  # the Python client's `Completion.extra`
        assert (await python_client.complete([{"role": "user", "content": "with extras"}])).extra == reply["extra"]
    upstream_streams_with(monkeypatch, start=LATER, delta={"stop_details": REFUSAL}, beside={"context_management": CONTEXT})
    events, done = await stream_frame(client, {"op": "complete", "messages": [{"role": "user", "content": "streamed"}]})
    assert events[0]["event"] == "start" and events[0]["extra"] == LATER
    assert done["event"] == "done" and done["extra"] == {**LATER, "stop_details": REFUSAL, "context_management": CONTEXT}


async def test_the_apis_optional_fields_sent_as_null_are_no_extras(daemon_factory, sim, autojump_clock, monkeypatch):
    """Were the API to send them null on every reply, every reply would be decoded twice and carry an empty-valued
    `extra`: nulls of the fields it may leave out read as left out."""
    d = await daemon_factory()
    upstream_answers_with(monkeypatch, {"container": None, "stop_details": None, "context_management": None})
    assert list(await (await connect(d)).complete("nulls")) == FRAME_FIELDS


async def test_a_stream_with_the_apis_optional_fields_null_has_no_extras(daemon_factory, sim, autojump_clock, monkeypatch):
    """The API's stream sends them null on every answer (message_start's stop_details, message_delta's container and
    stop_details): read as left out, as a whole reply's are, so a stream's start and done frames are as before
    extras. Before, every stream's frames carried an `extra` of nulls, and every cached streamed answer kept it."""
    upstream_streams_with(monkeypatch, start={"stop_details": None}, delta={"container": None, "stop_details": None},
                          beside={"context_management": None})
    d = await daemon_factory()
    client = await connect(d)
    events, done = await stream_frame(client, {"op": "complete", "messages": [{"role": "user", "content": "nulls"}]})
    assert events[0]["event"] == "start" and "extra" not in events[0]
    assert done["event"] == "done" and "extra" not in done
    upstream_answers_with(monkeypatch, {"container": CONTAINER, "stop_details": None})  # one given, one left null
    assert (await client.complete("one of them"))["extra"] == {"container": CONTAINER}


async def test_a_delta_sidecard_does_not_model_reaches_the_sdk_and_the_socket_whole(daemon_factory, sim, autojump_clock,
                                                                                    monkeypatch):
    """The beta compaction block's content and encrypted_content arrive in a compaction_delta; before, sidecard relayed
    it as {"type": "compaction_delta", "value": null}, so the SDK's block had neither and the next turn lost them."""
    compacted = {"content": "The user asked about grass.", "encrypted_content": "opaque-state"}
    made = replies.stream_events

    def events(*args):
        out = made(*args)
        at = next(i for i, e in enumerate(out) if e["type"] == "message_delta")
        index = sum(e["type"] == "content_block_start" for e in out)
        out[at:at] = [{"type": "content_block_start", "index": index, "content_block": {"type": "compaction", "content": None}},
                      {"type": "content_block_delta", "index": index, "delta": {"type": "compaction_delta", **compacted}},
                      {"type": "content_block_stop", "index": index}]
        return out

    monkeypatch.setattr(replies, "stream_events", events)
    d = await daemon_factory()
    async with async_client(d) as client:
        async with client.beta.messages.stream(model=PRIMARY, max_tokens=50, messages=ASK) as stream:
            final = await stream.get_final_message()
    block = final.content[-1]
    assert block.type == "compaction" and (block.content, block.encrypted_content) == tuple(compacted.values())
    frames, done = await stream_frame(await connect(d), {"op": "complete", "messages": [{"role": "user", "content": "compact"}]})
    delta = next(f for f in frames if f["event"] == "delta" and f["type"] == "compaction_delta")
    assert {k: delta[k] for k in compacted} == compacted
    assert msgspec.json.decode(msgspec.json.encode(done["content"]))[-1] == {"type": "compaction", **compacted}


def test_a_reply_with_the_optional_fields_null_is_decoded_once():
    from sidecard.protocol import NULL_IS_ABSENT
    from sidecard.upstream import client

    reply = {"id": "msg_1", "type": "message", "role": "assistant", "model": PRIMARY, "content": [{"type": "text", "text": "hi"}],
             "stop_reason": "end_turn", "stop_sequence": None, "usage": {"input_tokens": 1, "output_tokens": 1}}
    body = msgspec.json.encode({**reply, **dict.fromkeys(NULL_IS_ABSENT)})
    client._known_decoder.decode(body)  # (no ValidationError: not read a second time)


async def test_an_answer_with_a_container_is_never_cached_nor_shared(daemon_factory, sim, autojump_clock, monkeypatch):
    """A container is one conversation's code execution state: a second identical request, or one in flight beside
    it, gets its own answer. Before, the second was the first's cached answer (its container with it)."""
    upstream_answers_with(monkeypatch, {"container": CONTAINER})
    upstream_streams_with(monkeypatch, delta={"container": CONTAINER})
    d = await daemon_factory()
    client = await connect(d)
    answers = []
    for stream in (False, True):
        ask = {"op": "complete", "temperature": 0.0, "messages": [{"role": "user", "content": f"run code ({stream})"}]}
        for _ in range(2):
            answers.append((await stream_frame(client, ask))[1] if stream else await client.call(ask))
    assert [(a["ok"], a["cached"]) for a in answers] == [(True, False)] * 4 and sim.calls_for(PRIMARY) == 4
    sim.set_fault(PRIMARY, Fault(latency_ms=1000))
    ask = {"op": "complete", "temperature": 0.0, "messages": [{"role": "user", "content": "at once"}]}
    ids = [await client.send(ask) for _ in range(2)]
    answers += [await client.reply(i) for i in ids]
    assert [a["cached"] for a in answers[4:]] == [False, False] and sim.calls_for(PRIMARY) == 6
    assert all(a["extra"] == {"container": CONTAINER} for a in answers)


async def test_other_extras_are_cached_and_served_with_the_cached_answer(daemon_factory, sim, autojump_clock, monkeypatch):
    upstream_answers_with(monkeypatch, {"stop_details": REFUSAL})
    d = await daemon_factory()
    client = await connect(d)
    first = await client.complete("refused", temperature=0.0)
    second = await client.complete("refused", temperature=0.0)
    assert (first["cached"], second["cached"]) == (False, True) and second["extra"] == first["extra"] == {"stop_details": REFUSAL}
    async with async_client(d) as http:
        whole = await http.messages.create(model=PRIMARY, max_tokens=50, messages=ASK, extra_body={"temperature": 0.0})
        async with http.messages.stream(model=PRIMARY, max_tokens=50, messages=ASK, extra_body={"temperature": 0.0}) as stream:
            replayed = await stream.get_final_message()  # the cached answer, replayed as a stream
    for message in (whole, replayed):
        assert message.stop_details is not None and message.stop_details.category == "cyber"
    assert sim.calls_for(PRIMARY) == 2


async def test_a_counts_own_fields_reach_the_app(daemon_factory, sim, autojump_clock, monkeypatch):
    """The beta count's context_management (what context editing would leave) was dropped: sidecard answered
    input_tokens alone, on both faces."""
    d = await daemon_factory()
    client = await connect(d)
    plain = await client.call({"op": "count_tokens", "messages": ASK})
    assert plain["ok"] and "extra" not in plain
    made = replies.count
    monkeypatch.setattr(replies, "count", lambda body: {**made(body), "context_management": {"original_input_tokens": 99}})
    async with async_client(d) as sdk:
        counted = await sdk.beta.messages.count_tokens(model=PRIMARY, messages=ASK, betas=["context-management-2025-06-27"])
    assert counted.input_tokens > 0 and counted.context_management.original_input_tokens == 99
    reply = await client.call({"op": "count_tokens", "messages": ASK})
    assert reply["extra"] == {"context_management": {"original_input_tokens": 99}}
