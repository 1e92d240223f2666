"""Versioned prompts through the real daemon, with the real watcher on a real directory."""

import pytest
import trio

from tests.harness import ECHO_VERSION, connect, metric, prompts_with_echo

@pytest.fixture
def prompt_dir(short_tmp):
    return prompts_with_echo(short_tmp, versions=1)


async def test_prompt_request_end_to_end(daemon_factory, sim, prompt_dir, capture_log):
    d = await daemon_factory(prompts={"directory": str(prompt_dir)})
    reply = await (await connect(d)).call(
        {"op": "complete", "prompt": "support-reply", "vars": {"question": "How do I reset my password?"}, "user": "u-1"}
    )
    assert reply["ok"] and reply["prompt"] == "support-reply" and reply["prompt_version"] in (1, 2)
    sent = sim.calls[-1].body
    assert "support assistant for Acme Cloud" in sent["system"]
    assert sent["messages"] == [{"role": "user", "content": "How do I reset my password?"}]
    line = capture_log.events("request")[-1]
    assert line["prompt"] == "support-reply" and line["prompt_version"] == reply["prompt_version"]


async def test_unknown_prompt_and_bad_variables(daemon_factory, prompt_dir):
    d = await daemon_factory(prompts={"directory": str(prompt_dir)})
    client = await connect(d)
    assert (await client.call({"op": "complete", "prompt": "nope"}))["error"]["code"] == "prompt_not_found"
    missing = await client.call({"op": "complete", "prompt": "support-reply", "vars": {}})
    assert missing["error"]["code"] == "bad_request" and "question" in missing["error"]["message"]
    extra = await client.call({"op": "complete", "prompt": "support-reply", "vars": {"question": "q", "colour": "red"}})
    assert extra["error"]["code"] == "bad_request" and "colour" in extra["error"]["message"]


async def test_a_bad_variable_value_is_named(daemon_factory, prompt_dir):
    """Found by a fresh-clone trial: the decoder's error said `vars[...]`, not which variable."""
    d = await daemon_factory(prompts={"directory": str(prompt_dir)})
    client = await connect(d)
    for value, got in ((None, "null"), ([1], "array"), ({"a": 1}, "object")):
        reply = await client.call({"op": "complete", "prompt": "support-reply", "vars": {"product": "x", "question": value}})
        assert reply["error"] == {"code": "bad_request", "retryable": False,
                                  "message": f"vars.question: expected bool | int | float | str, got {got}"}


async def test_injection_attempts_render_literally(daemon_factory, sim, prompt_dir):
    d = await daemon_factory(prompts={"directory": str(prompt_dir)})
    nasty = "{product} {0} {question.__class__} {{x}} {q:>99}"
    reply = await (await connect(d)).call({"op": "complete", "prompt": "echo", "vars": {"q": nasty}})
    assert reply["ok"]
    assert sim.calls[-1].body["messages"][0]["content"] == f"[v1] {nasty}"


async def test_file_written_during_traffic_goes_live_without_failures(daemon_factory, sim, prompt_dir):
    d = await daemon_factory(prompts={"directory": str(prompt_dir)})
    client = await connect(d)
    failures = 0
    seen = set()
    with trio.fail_after(10):
        (prompt_dir / "echo" / "v2.toml").write_text(ECHO_VERSION.format(n=2))
        (prompt_dir / "echo" / "release.toml").write_text("stable = 2\n")
        written = trio.current_time()
        while 2 not in seen:
            reply = await client.call({"op": "complete", "prompt": "echo", "vars": {"q": "x"}, "cache": "bypass"})
            failures += not reply["ok"]
            seen.add(reply.get("prompt_version"))
            await trio.sleep(0.02)
        assert trio.current_time() - written < 2.0
    assert failures == 0


async def test_a_broken_file_keeps_the_old_set_serving(daemon_factory, sim, prompt_dir, capture_log):
    d = await daemon_factory(prompts={"directory": str(prompt_dir)})
    client = await connect(d)
    (prompt_dir / "echo" / "release.toml").write_text("stable = [not valid\n")
    with trio.fail_after(10):
        while not d.prompts.snapshot.errors:
            await trio.sleep(0.02)
    reply = await client.call({"op": "complete", "prompt": "echo", "vars": {"q": "x"}})
    assert reply["ok"] and reply["prompt_version"] == 1
    assert any("release.toml" in e["file"] for e in d.status()["prompt_errors"])


async def test_rollback_takes_effect_on_the_next_request(daemon_factory, prompt_dir):
    (prompt_dir / "echo" / "v2.toml").write_text(ECHO_VERSION.format(n=2))
    (prompt_dir / "echo" / "release.toml").write_text("stable = 2\n")
    d = await daemon_factory(prompts={"directory": str(prompt_dir)})
    client = await connect(d)
    assert (await client.call({"op": "complete", "prompt": "echo", "vars": {"q": "x"}}))["prompt_version"] == 2
    d.prompts.rollback("echo")
    assert (await client.call({"op": "complete", "prompt": "echo", "vars": {"q": "x"}}))["prompt_version"] == 1


async def test_canary_is_sticky_per_user(daemon_factory, prompt_dir):
    (prompt_dir / "echo" / "v2.toml").write_text(ECHO_VERSION.format(n=2))
    (prompt_dir / "echo" / "release.toml").write_text("stable = 1\ncanary = 2\ncanary_percent = 50\n")
    d = await daemon_factory(prompts={"directory": str(prompt_dir)})
    client = await connect(d)
    first = {}
    for u in range(40):
        r = await client.call({"op": "complete", "prompt": "echo", "vars": {"q": "x"}, "user": f"user-{u}"})
        first[u] = r["prompt_version"]
    assert set(first.values()) == {1, 2}
    for u in range(40):
        r = await client.call({"op": "complete", "prompt": "echo", "vars": {"q": "y"}, "user": f"user-{u}"})
        assert r["prompt_version"] == first[u]


async def test_bad_output_is_retried_once_then_bad_output(daemon_factory, sim, prompt_dir):
    d = await daemon_factory(prompts={"directory": str(prompt_dir)})
    client = await connect(d)
    # the simulator's answers are plain words, never JSON: one corrective retry, then bad_output
    reply = await client.call({"op": "complete", "prompt": "ticket-triage", "vars": {"ticket": "card declined"}})
    assert reply["error"]["code"] == "bad_output"
    assert sim.calls_for("claude-sonnet-4-6") == 2
    retry = sim.calls[-1].body["messages"]
    assert retry[-2]["role"] == "assistant" and "could not be used" in retry[-1]["content"]


async def test_good_json_output_passes_and_a_fenced_answer_is_accepted(daemon_factory, sim, prompt_dir):
    d = await daemon_factory(prompts={"directory": str(prompt_dir)})
    client = await connect(d)
    answer = '{"category": "billing", "urgency": "high", "summary": "Card declined"}'
    for said in (answer, f"```json\n{answer}\n```"):
        reply = await client.call(
            {"op": "complete", "prompt": "ticket-triage", "vars": {"ticket": f"[[sim:say:{said}]]"}, "cache": "bypass"}
        )
        assert reply["ok"] and reply["prompt_version"] == 2, reply
    assert sim.calls_for("claude-sonnet-4-6") == 2  # no corrective retries


async def test_a_wrong_shape_is_retried_with_the_reason(daemon_factory, sim, prompt_dir):
    d = await daemon_factory(prompts={"directory": str(prompt_dir)})
    client = await connect(d)
    wrong = '{"category": "weather", "urgency": "high", "summary": "x"}'
    reply = await client.call({"op": "complete", "prompt": "ticket-triage", "vars": {"ticket": f"[[sim:say:{wrong}]]"}})
    assert reply["error"]["code"] == "bad_output"
    correction = sim.calls[-1].body["messages"][-1]["content"]
    assert "$.category: not one of" in correction and sim.calls_for("claude-sonnet-4-6") == 2


async def test_a_start_logs_and_counts_one_load_and_the_watcher_only_what_changed(daemon_factory, prompt_dir, capture_log):
    """The watcher's first tick reloads the directory (an edit may have beaten it) and once logged a second
    `prompts_loaded` at every start."""
    d = await daemon_factory(prompts={"directory": str(prompt_dir)})
    started = d.prompts.snapshot
    with trio.fail_after(10):
        while d.prompts.snapshot is started:  # the first tick's reload (real time: the watcher is a real thread)
            await trio.sleep(0.02)
    assert len(capture_log.events("prompts_loaded")) == 1
    assert metric(d, "sidecard_prompt_reloads_total", result="ok") == 1
    (prompt_dir / "echo" / "v2.toml").write_text(ECHO_VERSION.format(n=2))
    with trio.fail_after(10):
        while 2 not in d.prompts.snapshot.prompts["echo"].versions:
            await trio.sleep(0.02)
    assert len(capture_log.events("prompts_loaded")) == 2
    assert metric(d, "sidecard_prompt_reloads_total", result="ok") == 2
