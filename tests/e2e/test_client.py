"""The dependency-free Python client (clients/python) against the real daemon, from threads."""

import threading

import pytest
import trio

import sidecard_client as sc
from sidecard.sim import Fault
from tests.harness import until_idle


async def in_thread(fn, *args, **kwargs):
    return await trio.to_thread.run_sync(lambda: fn(*args, **kwargs))


async def test_complete_returns_a_typed_result(daemon):
    with sc.Client(daemon.socket_path) as client:
        reply = await in_thread(client.complete, [{"role": "user", "content": "hi"}], feature="clients", deadline_ms=5000)
    assert isinstance(reply, sc.Completion) and reply.text and reply.usage.output_tokens > 0
    assert reply.served_by["model"] == "claude-sonnet-4-6" and reply.request_id


async def test_errors_are_typed(daemon, sim):
    with sc.Client(daemon.socket_path) as client:
        with pytest.raises(sc.BadRequest) as info:
            await in_thread(client.complete, [{"role": "user", "content": "x"}], max_tokens=0)
        assert info.value.code == "bad_request" and not info.value.retryable
        sim.set_fault("*", Fault(status=400))
        with pytest.raises(sc.InvalidRequest):
            await in_thread(client.complete, [{"role": "user", "content": "x"}])
        with pytest.raises(sc.BadRequest) as info:
            await in_thread(client.complete, prompt="no-such-prompt")
        assert info.value.code == "prompt_not_found"
        # Over the frame limit: the daemon's error named no id, and the call waited out its timeout as a retryable
        # `Timeout` (a fresh-clone trial). The client writes the id first; the daemon reads it from the frame's start.
        with pytest.raises(sc.BadRequest) as info:
            await in_thread(client.count_tokens, [{"role": "user", "content": "x" * 2_000_000}])
        assert info.value.code == "frame_too_large" and not info.value.retryable
        # Values JSON cannot carry (json.dumps wrote NaN) are refused before sending, not waited on.
        for bad in ({"temperature": float("nan")}, {"metadata": {"user_id": "\ud800"}}, {"metadata": {"x": object()}}):
            with pytest.raises(sc.BadRequest) as info:
                await in_thread(client.complete, [{"role": "user", "content": "x"}], **bad)
            assert info.value.code == "bad_request" and not info.value.retryable
        with pytest.raises(sc.BadRequest):
            await in_thread(sc.AdminClient(daemon.admin_socket_path).call, "kill", scope="global", expires_in_s=float("inf"))


async def test_many_threads_share_one_connection(daemon):
    client = sc.Client(daemon.socket_path)
    results, errors = [], []

    def worker(i):
        try:
            results.append(client.complete([{"role": "user", "content": f"thread {i}"}]).text)
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    def run_all():
        threads = [threading.Thread(target=worker, args=(i,)) for i in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    await in_thread(run_all)
    client.close()
    assert not errors and len(results) == 16


async def test_stream_iterates_events_then_the_final_answer(daemon):
    def collect():
        with sc.Client(daemon.socket_path) as client:
            return list(client.stream([{"role": "user", "content": "stream it"}]))

    frames = await in_thread(collect)
    assert frames[0]["event"] == "start" and frames[-1]["event"] == "done"
    text = "".join(f.get("text", "") for f in frames if f.get("event") == "delta")
    assert text == frames[-1]["text"]


async def test_a_broken_stream_raises_partial_answer_with_the_text_so_far(daemon, sim):
    sim.set_fault("*", Fault(reset_after_events=6))

    def collect():
        got = []
        with sc.Client(daemon.socket_path) as client:
            try:
                for frame in client.stream([{"role": "user", "content": "break"}], route="default"):
                    got.append(frame)
            except sc.PartialAnswer as exc:
                return got, exc
        return got, None

    got, exc = await in_thread(collect)
    assert isinstance(exc, sc.PartialAnswer) and exc.text
    assert exc.text == "".join(f.get("text", "") for f in got if f.get("event") == "delta")


async def test_a_stream_left_early_or_a_timeout_stops_the_daemons_work(daemon, sim, capture_log):
    sim.set_fault("*", Fault(stall_after_events=6))  # (the answer would go on until the stall timeout)
    client = sc.Client(daemon.socket_path)

    def leave_early():
        for frame in client.stream([{"role": "user", "content": "[[sim:long]]"}]):
            if frame["event"] == "delta":
                break

    await in_thread(leave_early)
    await until_idle(daemon, sim)  # the client's `cancel`, on a connection still open
    sim.set_fault("*", Fault(hang=True))
    with pytest.raises(sc.Timeout):
        await in_thread(client.complete, [{"role": "user", "content": "hang"}], timeout=0.2)
    await until_idle(daemon, sim)
    assert [e["outcome"] for e in capture_log.events("request")] == ["cancelled", "cancelled"]
    sim.clear_faults()
    assert (await in_thread(client.complete, [{"role": "user", "content": "still usable"}])).text
    client.close()


async def test_connection_errors_are_typed(short_tmp):
    with sc.Client(f"{short_tmp}/missing.sock") as client:
        with pytest.raises(sc.ConnectionLost):
            await in_thread(client.ping)


async def test_count_tokens_counts_and_its_errors_are_typed(daemon, sim):
    ask = [{"role": "user", "content": "count these words, please"}]
    with sc.Client(daemon.socket_path) as client:
        tokens = await in_thread(client.count_tokens, ask, system="be brief")
        assert isinstance(tokens, int) and tokens > await in_thread(client.count_tokens, [{"role": "user", "content": "hi"}])
        sim.set_fault("*", Fault(status=400))
        with pytest.raises(sc.InvalidRequest):
            await in_thread(client.count_tokens, ask)


async def test_max_frame_bytes_is_said_again_on_every_connection(daemon):
    big = "x" * 1_200_000  # over the daemon's default 1 MiB

    def calls():
        with sc.Client(daemon.socket_path, max_frame_bytes=4 << 20) as client:
            assert client.request({"op": "ping", "padding": big})["ok"]
            client.close()  # the next call reconnects, and says hello again
            assert client.request({"op": "ping", "padding": big})["ok"]
        with sc.Client(daemon.socket_path, max_frame_bytes=10) as client:
            with pytest.raises(sc.BadRequest, match="hello refused"):
                client.ping()

    await in_thread(calls)


def test_the_blocking_and_async_clients_offer_the_same_operations():
    from sidecard_client.aio import AsyncClient

    def operations(cls):
        return {name for name in vars(cls) if not name.startswith("_") and callable(getattr(cls, name))} - {"close", "aclose"}

    assert operations(sc.Client) == operations(AsyncClient) == {"ping", "complete", "stream", "count_tokens", "feedback", "request", "submit", "submit_many", "job", "wait"}


async def test_the_admin_client_answers_with_the_reply_and_raises_a_refusal_with_its_frame(daemon, tmp_path):
    admin = sc.AdminClient(daemon.admin_socket_path)
    status = await in_thread(admin.call, "status")
    assert status["ok"] and status["op"] == "status" and status["result"]["routes"]["default"]["targets"]
    with pytest.raises(sc.BadRequest) as refused:
        await in_thread(admin.call, "unkill", scope="feature:none")
    assert refused.value.frame["ok"] is False and refused.value.frame["error"]["message"] == "no kill switch on feature:none"
    with pytest.raises(sc.ConnectionLost):
        await in_thread(sc.AdminClient(str(tmp_path / "none.sock")).call, "status")
