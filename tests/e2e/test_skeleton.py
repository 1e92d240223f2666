"""The walking skeleton end to end: real daemon, real Unix socket, real SDK, simulated upstream."""

import os
import socket
import stat

import pytest
import trio

from sidecard import __version__
from sidecard.errors import StartupError
from sidecard.metrics_endpoint import MAX_CONNECTIONS as METRICS_MAX_CONNECTIONS
from sidecard.sim import Fault
from tests.harness import connect, fake_api_key, http_get, make_config, new_daemon, stream_frame

PLANTED_KEY = fake_api_key("PLANTEDplantedPLANTEDplanted0123456789")


async def test_ping(daemon):
    client = await connect(daemon)
    reply = await client.call({"op": "ping"})
    assert reply == {"id": reply["id"], "ok": True, "version": __version__}


async def test_complete_reply_has_every_field(daemon, sim):
    client = await connect(daemon)
    reply = await client.complete("What is the capital of France?", feature="geo", max_tokens=200)
    assert reply["ok"] is True
    assert reply["text"] and reply["content"][0]["type"] == "text"
    assert reply["text"] == "".join(b["text"] for b in reply["content"] if b["type"] == "text")
    assert reply["model"] == "claude-sonnet-4-6"
    assert reply["usage"]["input_tokens"] > 0 and reply["usage"]["output_tokens"] > 0
    assert reply["stop_reason"] in ("end_turn", "max_tokens")
    assert reply["latency_ms"] > 0
    assert reply["cost_usd"] > 0
    assert reply["upstream_request_id"].startswith("req_")
    assert reply["request_id"]
    assert reply["served_by"] == {"provider": "anthropic", "model": "claude-sonnet-4-6"}
    assert reply["attempts"] == 1 and reply["fallback"] is False and reply["degraded"] is False
    assert sim.calls_for("claude-sonnet-4-6") == 1


async def test_sdk_path_gives_the_same_answer(daemon_factory, sim):
    fast = await daemon_factory()
    slow = await daemon_factory(upstream={"fast_path": False})
    a = await (await connect(fast)).complete("same question", temperature=0.0, cache="bypass")
    b = await (await connect(slow)).complete("same question", temperature=0.0, cache="bypass")
    assert a["text"] == b["text"] and a["usage"] == b["usage"]


async def test_replies_come_back_by_id_in_any_order(daemon, sim, mock_clock):
    sim.set_fault("claude-slow", Fault(latency_ms=5000))
    client = await connect(daemon)
    slow = await client.send({"op": "complete", "model": "claude-slow", "messages": [{"role": "user", "content": "a"}]})
    fast = await client.send({"op": "complete", "messages": [{"role": "user", "content": "b"}]})
    first = await client.next_frame()
    assert first["id"] == fast and first["ok"]
    mock_clock.jump(5)
    second = await client.next_frame()
    assert second["id"] == slow and second["ok"]


async def test_many_in_flight_on_one_connection(daemon):
    client = await connect(daemon)
    ids = [await client.send({"op": "complete", "messages": [{"role": "user", "content": f"q{i}"}]}) for i in range(50)]
    replies = [await client.reply(i) for i in ids]
    assert all(r["ok"] for r in replies)
    assert len({r["request_id"] for r in replies}) == 50


@pytest.mark.parametrize(
    "raw, code, expect_id",
    [
        (b"this is not json\n", "bad_frame", None),
        (b'{"op":"fly","id":"x1"}\n', "unknown_op", "x1"),
        (b'{"op":"complete","id":"x2","max_tokens":"lots","messages":[]}\n', "bad_request", "x2"),
        (b'{"op":"complete","id":"x3","messages":[]}\n', "bad_request", "x3"),
        (b'{"op":"complete","id":"x4","route":"nope","messages":[{"role":"user","content":"hi"}]}\n', "bad_request", "x4"),
        (b"[]\n", "bad_frame", None),
    ],
)
async def test_bad_input_gets_an_error_frame_and_the_connection_lives(daemon, raw, code, expect_id):
    client = await connect(daemon)
    await client.send_raw(raw)
    reply = await client.next_frame()
    assert reply["ok"] is False and reply["id"] == expect_id
    assert reply["error"]["code"] == code and reply["error"]["retryable"] is False
    assert "Traceback" not in reply["error"]["message"]
    assert (await client.call({"op": "ping"}))["ok"]


async def test_oversized_frame_is_skipped_and_answered(daemon_factory):
    d = await daemon_factory(server={"max_frame_bytes": 2048})
    client = await connect(d)
    await client.send_raw(b'{"op":"complete","id":1,"messages":[{"role":"user","content":"' + b"x" * 10_000 + b'"}]}\n')
    reply = await client.next_frame()
    assert reply["error"]["code"] == "frame_too_large" and reply["id"] == 1  # read from the frame's start
    assert (await client.complete("still here"))["ok"]


async def test_a_frame_split_at_every_byte_decodes_the_same(daemon):
    client = await connect(daemon)
    frame = b'{"op":"ping","id":"split"}\n'
    for cut in range(1, len(frame)):
        await client.send_raw(frame[:cut])
        await trio.testing.wait_all_tasks_blocked()
        await client.send_raw(frame[cut:])
        assert (await client.reply("split"))["ok"]


async def test_in_flight_request_ids_must_be_unique(daemon, sim):
    sim.set_fault("*", Fault(hang=True))
    client = await connect(daemon)
    await client.send({"op": "complete", "id": "dup", "messages": [{"role": "user", "content": "a"}]})
    await sim.wait_for_calls(1)
    await client.send({"op": "complete", "id": "dup", "messages": [{"role": "user", "content": "b"}]})
    reply = await client.next_frame()
    assert reply["error"]["code"] == "bad_request" and "already in flight" in reply["error"]["message"]


async def test_client_disconnect_cancels_the_upstream_call(daemon, sim, capture_log):
    sim.set_fault("*", Fault(hang=True))
    client = await connect(daemon)
    await client.send({"op": "complete", "messages": [{"role": "user", "content": "hang"}]})
    await sim.wait_for_calls(1)
    assert daemon.engine.in_flight == 1
    await client.aclose()
    with trio.fail_after(5):
        while daemon.engine.in_flight:
            await trio.sleep(0)
    assert capture_log.events("request")[-1]["outcome"] == "cancelled"


async def test_half_close_still_gets_its_answers(daemon):
    client = await connect(daemon)
    request_id = await client.send({"op": "complete", "messages": [{"role": "user", "content": "after half-close"}]})
    await client.stream.send_eof()
    reply = await client.reply(request_id)
    assert reply["ok"]
    with pytest.raises(EOFError):
        await client.next_frame()  # then the daemon closes


async def test_upstream_400_is_the_callers_error_and_not_retried(daemon, sim):
    sim.set_fault("*", Fault(status=400))
    reply = await (await connect(daemon)).complete("bad")
    assert reply["error"]["code"] == "invalid_request" and reply["error"]["retryable"] is False
    assert sim.stats_total()["requests"] == 1


@pytest.fixture
async def keyed_daemon(nursery, sim, capture_log, short_tmp):
    """A daemon holding a real-looking configured API key, which the simulator checks."""
    key = fake_api_key("CONFIGUREDconfiguredCONFIGURED0123456789")
    sim.api_key = key

    d = new_daemon(make_config(short_tmp), sim, capture_log, api_key=key)
    await nursery.start(d.run)
    d.test_key = key
    return d


async def test_log_never_holds_the_api_key_or_planted_secrets(keyed_daemon, capture_log):
    client = await connect(keyed_daemon)
    text = f"my key is {PLANTED_KEY} and my mail is jane@example.com; also {keyed_daemon.test_key}"
    reply = await client.complete(text, feature="support", user="customer-42")
    assert reply["ok"]
    log = capture_log.text
    assert PLANTED_KEY not in log and keyed_daemon.test_key not in log and "jane@example.com" not in log
    assert "customer-42" not in log
    line = capture_log.events("request")[-1]
    for field in ("request_id", "upstream_request_id", "feature", "model", "latency_ms", "input_tokens",
                  "output_tokens", "stop_reason", "cost_usd", "outcome", "prompt_prefix", "attempts", "user"):
        assert field in line, field
    assert line["outcome"] == "ok" and line["feature"] == "support"
    assert len(line["prompt_prefix"]) <= 80 and "[key]" in line["prompt_prefix"]


async def test_prompt_prefix_masks_what_users_type_about_accounts_addresses_passwords_and_birthdays(daemon, capture_log):
    # Each reached the log in clear before (the hostile-input and privacy trial): an IBAN, an IP address, a
    # password said in prose, a street address; a date of birth was masked, but as a phone number.
    client = await connect(daemon)
    prompts = {
        "pay to DE89 3704 0044 0532 0130 00 today, my password is hunter2": "pay to [iban] today, my [secret]",
        "GB82WEST12345698765432 is mine; the passcode is 4417": "[iban] is mine; the [secret]",
        "my server 203.0.113.7 (and 2001:db8::7) is down": "my server [ip] (and [ip]) is down",
        "born 1985-04-12, I live at 12 Baker Street; pin: 1234": "born [date], I live at [address]; [secret]",
        "my number is +44 20 7946 0958.": "my number is [phone].",  # at a sentence's end: it was kept whole
    }
    for text in prompts:
        assert (await client.complete(text))["ok"]
    assert [line["prompt_prefix"] for line in capture_log.events("request")] == list(prompts.values())
    log = capture_log.text
    for clear in ("DE89", "GB82WEST", "hunter2", "4417", "203.0.113.7", "2001:db8::7", "1985-04-12", "Baker Street", "7946"):
        assert clear not in log, clear


async def test_wrong_api_key_is_upstream_auth(nursery, sim, capture_log, short_tmp):

    sim.api_key = "the-right-key-0123456789"
    config = make_config(short_tmp, routes={"default": {"targets": [{"model": "claude-sonnet-4-6"}]}})
    d = new_daemon(config, sim, capture_log, api_key="a-wrong-key-0123456789")
    await nursery.start(d.run)
    client = await connect(d)
    reply = await client.complete("hi")
    assert reply["error"]["code"] == "upstream_auth" and not reply["error"]["retryable"]
    assert capture_log.events("request")[-1]["attempts"][0]["outcome"] == "401"
    again = await client.complete("hi again")  # the 401 opened the breaker: the same answer, with no upstream call
    assert again["error"]["code"] == "upstream_auth" and not again["error"]["retryable"]
    assert capture_log.events("request")[-1]["attempts"][0]["outcome"] == "breaker_open"


async def test_socket_mode_and_stale_socket_replaced(short_tmp, nursery, sim, capture_log):

    path = os.path.join(short_tmp, "app.sock")
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(path)
    stale.close()  # a crash leaves the file behind
    d = new_daemon(make_config(short_tmp), sim, capture_log)
    await nursery.start(d.run)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o660
    assert stat.S_IMODE(os.stat(d.admin_socket_path).st_mode) == 0o600
    assert (await (await connect(d)).call({"op": "ping"}))["ok"]

    second = new_daemon(make_config(short_tmp), sim, capture_log)
    with pytest.raises(BaseExceptionGroup) as info:
        await nursery.start(second.run)
    assert info.group_contains(StartupError, match="another process is already serving")


async def test_graceful_drain_finishes_in_flight_then_refuses(daemon, sim, mock_clock):
    sim.set_fault("*", Fault(latency_ms=3000))
    client = await connect(daemon)
    request_id = await client.send({"op": "complete", "messages": [{"role": "user", "content": "slow"}]})
    await sim.wait_for_calls(1)
    daemon.shutdown()
    await trio.testing.wait_all_tasks_blocked()
    with pytest.raises(OSError):
        await trio.open_unix_socket(daemon.socket_path)  # no longer accepting
    mock_clock.jump(3)
    assert (await client.reply(request_id))["ok"]


async def test_drain_grace_expiry_answers_shutting_down(daemon_factory, sim, capture_log, mock_clock):
    """The request the drain stops is logged `shutting_down`, as its client was told, and one whose client left
    during the drain `cancelled` (before, both were `cancelled`, as the HTTP face's are: test_httpface_dropin.py)."""
    d = await daemon_factory(server={"drain_grace_s": 5})
    sim.set_fault("*", Fault(hang=True))
    client, leaving = await connect(d), await connect(d)
    request_id = await client.send({"op": "complete", "messages": [{"role": "user", "content": "forever"}]})
    await leaving.send({"op": "complete", "messages": [{"role": "user", "content": "given up"}]})
    await sim.wait_for_calls(2)
    d.shutdown()
    await leaving.aclose()
    await trio.testing.wait_all_tasks_blocked()
    assert [e["outcome"] for e in capture_log.events("request")] == ["cancelled"]
    mock_clock.jump(5)
    reply = await client.reply(request_id)
    assert reply["error"] == {"code": "shutting_down", "message": "the daemon stopped before the answer", "retryable": True,
                              "retry_after_ms": 1000}
    assert [e["outcome"] for e in capture_log.events("request")] == ["cancelled", "shutting_down"]
    assert reply["request_id"] == capture_log.events("request")[-1]["request_id"]  # it named no request
    # The drain's lines count it by what it got (they said `cancelled_requests`).
    await trio.testing.wait_all_tasks_blocked()
    assert capture_log.events("drain_timeout")[-1]["stopped_requests"] == 1
    assert capture_log.events("stopped")[-1]["stopped_requests"] == 1


async def test_metrics_endpoint(daemon_factory):
    d = await daemon_factory(metrics={"enabled": True, "address": "127.0.0.1:0"})
    assert (await (await connect(d)).complete("count me", feature="metered"))["ok"]
    status, text = await http_get(*d.metrics_address, "/metrics")
    assert status == 200
    assert 'sidecard_requests_total{feature="metered",model="claude-sonnet-4-6",outcome="ok"} 1.0' in text
    for name in ("sidecard_request_duration_seconds_bucket", "sidecard_upstream_duration_seconds_bucket",
                 "sidecard_tokens_total", "sidecard_cost_usd_total", "sidecard_requests_in_flight"):
        assert name in text


async def test_metrics_endpoint_answers_head(daemon_factory):
    d = await daemon_factory(metrics={"enabled": True, "address": "127.0.0.1:0"})
    assert await http_get(*d.metrics_address, "/metrics", method="HEAD") == (200, "")  # a monitor's probe
    assert (await http_get(*d.metrics_address, "/metrics", method="POST"))[0] == 404


async def test_connections_to_the_metrics_port_are_capped(daemon_factory, autojump_clock):
    """Any local process may connect to the metrics port, and each connection it opened took a descriptor until
    the idle timeout: 19,990 of them left the daemon none for its upstream calls, and every request failed (third
    fresh-clone trial). Past the cap, connections wait in the backlog or take the slot of an idle one."""
    d = await daemon_factory(metrics={"enabled": True, "address": "127.0.0.1:0"})
    before = len(os.listdir("/proc/self/fd"))
    flood = [await trio.open_tcp_stream(*d.metrics_address) for _ in range(200)]
    await trio.sleep(0.5)
    held = len(os.listdir("/proc/self/fd")) - before - len(flood)  # the daemon's side (it runs in this process)
    assert held <= METRICS_MAX_CONNECTIONS
    status, text = await http_get(*d.metrics_address, "/metrics")  # a scraper still gets in (an idle one makes room)
    assert status == 200 and "sidecard_build_info" in text
    assert (await (await connect(d)).complete("still served"))["ok"]
    for stream in flood:
        await stream.aclose()


async def test_the_sdk_path_states_a_streams_timeout_upstream(daemon_factory, sim):
    """Every call states how long sidecard waits for it; a stream on the SDK path once said `NOT_GIVEN`."""
    d = await daemon_factory(upstream={"fast_path": False}, routes={"default": {"targets": [{"model": "claude-a", "timeout_s": 40}]}})
    client = await connect(d)
    assert (await client.complete("a question", cache="bypass"))["ok"]
    _, done = await stream_frame(client, {"op": "complete", "messages": [{"role": "user", "content": "b"}], "cache": "bypass"})
    assert done["ok"]
    created, streamed = sim.calls[-2], sim.calls[-1]
    assert streamed.stream and float(streamed.headers["x-stainless-timeout"]) == pytest.approx(40, abs=1)
    assert float(created.headers["x-stainless-timeout"]) == pytest.approx(40, abs=1)
