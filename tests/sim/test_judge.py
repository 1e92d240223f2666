"""The simulated upstream as a quality judge ([[sim:judge]]), scoring answers it or anyone else gave."""

from __future__ import annotations

import json
from typing import Any

import anthropic
import pytest
import trio

from sidecard.sim import Fault, Simulator, serve_sim
from sidecard.sim.replies import OFF_TOPIC, REFUSAL

MODEL = "claude-sonnet-4-6"
JUDGE = "claude-haiku-4-5"
QUESTION = "How do I reset my password?"
SYSTEM = "You grade answers. Reply with JSON only. [[sim:judge]]"


@pytest.fixture
def sim() -> Simulator:
    return Simulator()


@pytest.fixture
async def client(nursery: trio.Nursery, sim: Simulator):
    url = await nursery.start(serve_sim, sim)
    client = anthropic.AsyncAnthropic(api_key="k", base_url=url, max_retries=0, open_telemetry=False)
    yield client
    await client.close()


async def judge(client: anthropic.AsyncAnthropic, answer: str, question: str = QUESTION, **overrides: Any) -> Any:
    prompt = f"Grade this.\n<question>{question}</question>\n<answer>{answer}</answer>"
    request = {"model": JUDGE, "max_tokens": 300, "system": SYSTEM, "messages": [{"role": "user", "content": prompt}]}
    message = await client.messages.create(**{**request, **overrides})
    assert message.stop_reason == "end_turn" and message.usage.input_tokens > 0 and message.usage.output_tokens > 0
    return message.content[0].text


async def scores(client: anthropic.AsyncAnthropic, answer: str, question: str = QUESTION) -> dict[str, Any]:
    verdict = json.loads(await judge(client, answer, question))
    assert set(verdict) == {"relevance", "accuracy", "format", "overall", "reason"} and verdict["reason"]
    for name in ("relevance", "accuracy", "format", "overall"):
        assert 0.0 <= verdict[name] <= 1.0 and round(verdict[name], 2) == verdict[name]
    return verdict


async def test_a_sim_answer_scores_well_and_deterministically(client):
    answer = (
        (await client.messages.create(model=MODEL, max_tokens=200, messages=[{"role": "user", "content": QUESTION}]))
        .content[0]
        .text
    )
    verdict = await scores(client, answer)
    assert all(0.85 <= verdict[k] <= 0.95 for k in ("relevance", "accuracy", "format", "overall"))
    assert await scores(client, answer) == verdict
    on_topic = await scores(client, "Open Settings and choose Reset password.")  # shares "reset", "password"
    assert on_topic["overall"] >= 0.85


async def test_degraded_answers_score_low(client):
    assert await scores(client, "   ") == {
        "relevance": 0.0, "accuracy": 0.0, "format": 0.0, "overall": 0.0, "reason": "The answer is empty.",
    }  # fmt: skip
    refusal = await scores(client, REFUSAL)
    assert (refusal["relevance"], refusal["overall"]) == (0.1, 0.1)
    off_topic = await scores(client, OFF_TOPIC)
    assert (off_topic["relevance"], off_topic["overall"]) == (0.0, 0.2)
    unrelated = await scores(client, "Zebras gallop across savannahs.")
    assert unrelated["relevance"] == 0.3 and unrelated["overall"] < 0.85


async def test_quality_faults_are_caught_by_the_judge(client, sim):
    sim.set_fault(MODEL, Fault(quality="refusal"))  # the judge's model is left alone
    answer = (
        (await client.messages.create(model=MODEL, max_tokens=200, messages=[{"role": "user", "content": QUESTION}]))
        .content[0]
        .text
    )
    assert (await scores(client, answer))["overall"] == 0.1


async def test_the_marker_may_be_in_the_user_text_and_garbage_is_garbage(client):
    text = await judge(client, REFUSAL, system="Grade.", messages=[
        {"role": "user", "content": f"[[sim:judge]] <question>{QUESTION}</question><answer>{REFUSAL}</answer>"}
    ])  # fmt: skip
    assert json.loads(text)["relevance"] == 0.1
    garbage = await judge(client, "fine", system=[{"type": "text", "text": "[[sim:judge_garbage]]"}])
    with pytest.raises(json.JSONDecodeError):
        json.loads(garbage)
    async with client.messages.stream(
        model=JUDGE, max_tokens=300, system=SYSTEM, messages=[{"role": "user", "content": "<answer></answer>"}]
    ) as stream:
        assert json.loads(await stream.get_final_text())["overall"] == 0.0
