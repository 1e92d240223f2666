"""Feedback on answers through the real daemon: both faces, fresh, streamed and cached answers, typed refusals,
metrics, and the quality monitor's feedback signal."""

import msgspec
import pytest
import trio

import sidecard_client as sc
from sidecard_client.aio import AsyncClient

from tests.e2e.test_hostile import http_exchange, post
from tests.harness import admin, connect, metric, stream_frame

QUALITY = {"enabled": True, "sample_rate": 0.0, "canary_sample_rate": 0.0, "monitor": {"window": 4, "min_samples": 3}}


async def test_feedback_round_trip_on_the_socket(daemon_factory, autojump_clock):
    d = await daemon_factory(feedback={"retention_s": 600, "labels": ["helpful", "wrong"]}, quality=QUALITY)
    client = await connect(d)
    fresh = await client.complete("[[sim:say:fresh]]", feature="chat", temperature=0.0)
    cached = await client.complete("[[sim:say:fresh]]", feature="chat", temperature=0.0)
    _, streamed = await stream_frame(client, {"op": "complete", "feature": "chat",
                                              "messages": [{"role": "user", "content": "[[sim:say:streamed]]"}]})
    assert cached["cached"] and cached["request_id"] != fresh["request_id"] and streamed["ok"]

    def feedback(request_id, **fields):
        return client.call({"op": "feedback", "request_id": request_id, **fields})

    taken = await feedback(fresh["request_id"], thumbs="up", label="helpful", comment="thanks")
    assert (taken["ok"], taken["kind"], taken["value"], taken["request_id"]) == (True, "thumbs", 1.0, fresh["request_id"])
    assert (await feedback(cached["request_id"], score=0.25))["value"] == 0.25
    assert (await feedback(streamed["request_id"], signal="abandoned"))["kind"] == "abandoned"
    assert (await feedback(streamed["request_id"], score=0.0, label="wrong"))["ok"]  # a score beside the signal

    refusals = [
        (await feedback(fresh["request_id"], score=0.5), "duplicate_feedback"),
        (await feedback("never-issued", thumbs="down"), "unknown_request"),
        (await feedback(cached["request_id"], score=1.5), "bad_request"),
        (await feedback(cached["request_id"], label="meh", signal="retry"), "bad_request"),
        (await feedback(cached["request_id"], thumbs="up", score=1.0), "bad_request"),
    ]
    for reply, code in refusals:
        assert not reply["ok"] and reply["error"]["code"] == code and not reply["error"]["retryable"], reply
    assert metric(d, "sidecard_feedback_total", feature="chat", prompt="", version="", kind="thumbs") == 1
    assert metric(d, "sidecard_feedback_negative_total", feature="chat", prompt="", version="") == 3
    assert metric(d, "sidecard_feedback_refused_total", reason="score_out_of_range") == 1

    # Mostly negative feedback on one model's answers fires the monitor's feedback alert.
    await trio.testing.wait_all_tasks_blocked()
    quality = (await admin(d, {"op": "quality"}))["result"]
    assert [(a["signal"], a["key"]) for a in quality["firing"]] == [("feedback", "feature:chat claude-sonnet-4-6")]

    await trio.sleep(601)  # past retention: told it is too old, not that it is unknown
    late = await feedback(cached["request_id"], signal="retry")
    assert late["error"]["code"] == "expired_request" and "too old" in late["error"]["message"]


async def test_feedback_round_trip_on_the_http_face(daemon):
    path = daemon.config.http.socket
    ask = msgspec.json.encode({"model": "claude-sonnet-4-6", "max_tokens": 50,
                               "messages": [{"role": "user", "content": "[[sim:say:via http]]"}]})
    status, headers, body = await http_exchange(path, post(ask))
    assert status == 200
    message_id = msgspec.json.decode(body)["id"]  # msg_<request id>: what the SDK shows

    def feedback(**fields):
        return http_exchange(path, post(msgspec.json.encode(fields), path=b"/v1/feedback"))

    status, _, body = await feedback(request_id=message_id, thumbs="down", comment="off topic")
    assert status == 200 and msgspec.json.decode(body) == {
        "type": "feedback", "request_id": headers[b"x-sidecard-request-id"].decode(), "kind": "thumbs", "value": 0.0}
    for fields, want, code in [
        ({"request_id": message_id, "thumbs": "up"}, 409, "duplicate_feedback"),
        ({"request_id": "msg_nothing", "thumbs": "up"}, 404, "unknown_request"),
        ({"request_id": message_id, "score": -1}, 400, "bad_request"),
        ({"thumbs": "up"}, 400, "bad_request"),
    ]:
        status, reply_headers, body = await feedback(**fields)
        error = msgspec.json.decode(body)["error"]
        assert (status, error["sidecard_code"], reply_headers[b"x-should-retry"]) == (want, code, b"false"), body


async def test_the_python_clients_send_feedback(daemon):
    ask = [{"role": "user", "content": "[[sim:say:rate me]]"}]
    async with AsyncClient(daemon.socket_path) as client:
        answer = await client.complete(ask)
        assert (await client.feedback(answer.request_id, score=0.8, label="helpful"))["kind"] == "score"
        with pytest.raises(sc.FeedbackRefused) as refused:
            await client.feedback(answer.request_id, thumbs="up")
        assert refused.value.code == "duplicate_feedback"

    def sync() -> None:
        with sc.Client(daemon.socket_path) as client:
            answer = client.complete(ask)
            assert client.feedback(answer.request_id, signal="retry")["value"] == 0.0
            with pytest.raises(sc.BadRequest):
                client.feedback(answer.request_id, thumbs="sideways")

    await trio.to_thread.run_sync(sync)
