"""The language-neutral conformance cases (tests/conformance/cases) against the real daemon, four ways:

- `socket`: raw frames over the Unix socket (ids, framing, id-less errors included);
- `client`: the blocking stdlib `sidecard_client.Client`, from a worker thread;
- `aio-trio`: `AsyncClient` on the test's own Trio loop, beside the daemon;
- `aio-asyncio`: `AsyncClient` under `asyncio.run`, in a worker thread.

Each case gets a fresh daemon and simulator (the harness fixtures, in-process). The Node client runs the same
files (clients/node/test/conformance.test.mjs, through tests/e2e/test_node_client.py), against one daemon
for all cases; `test_every_case_in_turn_on_one_daemon` checks that the cases allow that.
"""

from __future__ import annotations

import asyncio
import threading
import tomllib
from pathlib import Path
from typing import Any

import msgspec
import pytest
import trio

import sidecard_client as sc
from sidecard.sim import Fault
from sidecard_client.aio import AsyncClient
from tests.conformance.check import STREAM_EVENTS, check, expand, load_cases, raw_bytes, steps
from tests.harness import connect

CASES = load_cases()
# The conformance daemon: the built-in defaults plus what daemon.toml adds (tests/conformance/README.md).
ADDED = tomllib.loads((Path(__file__).parents[1] / "conformance" / "daemon.toml").read_text())
VIAS = ["socket", "client", "aio-trio", "aio-asyncio"]
TIMEOUT_S = 10.0


def set_faults(sim, case: dict[str, Any]) -> None:
    sim.clear_faults()
    for spec in case.get("faults", []):
        spec = dict(spec)
        sim.set_fault(spec.pop("model", "*"), msgspec.convert(spec, Fault))


@pytest.fixture
async def daemon(daemon_factory):
    """The daemon the cases expect (tests/conformance/README.md)."""
    return await daemon_factory(**ADDED)


# ---------------------------------------------------------------- raw socket


async def socket_step_send(client, step: dict[str, Any]) -> Any:
    if "raw" in step:
        await client.send_raw(raw_bytes(step))
        return None
    return await client.send(expand(step["request"]))


_NEXT = object()


async def socket_step_outcome(client, step: dict[str, Any], sent_id: Any) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The step's terminal frame and the stream events before it: the frames with the id the case expects
    (`expect.id`, e.g. null for an unreadable frame), else the id sent; a raw step without either takes the
    next frame."""
    wait_for = step["expect"]["id"] if "id" in step["expect"] else sent_id if "raw" not in step else _NEXT
    events: list[dict[str, Any]] = []
    while True:
        frame = await client.next_frame() if wait_for is _NEXT else await client.reply(wait_for)
        if frame.get("event") not in STREAM_EVENTS:
            return frame, events
        events.append(frame)


async def run_socket(d, case: dict[str, Any]) -> None:
    client = await connect(d)
    try:
        with trio.fail_after(TIMEOUT_S):
            if case.get("concurrent"):
                ids = [await socket_step_send(client, step) for step in steps(case)]
                for step, sent_id in zip(steps(case), ids):
                    frame, events = await socket_step_outcome(client, step, sent_id)
                    check(step["expect"], frame, events=events, sent_id=sent_id)
            else:
                for step in steps(case):
                    sent_id = await socket_step_send(client, step)
                    frame, events = await socket_step_outcome(client, step, sent_id)
                    if "raw" in step:
                        check(step["expect"], frame, events=events)
                    else:
                        check(step["expect"], frame, events=events, sent_id=sent_id)
    finally:
        await client.aclose()


# ---------------------------------------------------------------- clients


def error_frame(exc: sc.SidecardError) -> dict[str, Any]:
    """What a client raised, in the shape of an error frame, for `check`."""
    error: dict[str, Any] = {"code": exc.code, "message": exc.message, "retryable": exc.retryable}
    if exc.retry_after_ms is not None:
        error["retry_after_ms"] = exc.retry_after_ms
    frame: dict[str, Any] = {"ok": False, "error": error}
    if isinstance(exc, sc.PartialAnswer):
        frame.update(partial=True, text=exc.text)
    for key in ("request_id", "upstream_request_id"):
        if getattr(exc, key) is not None:
            frame[key] = getattr(exc, key)
    return frame


def fields_of(request: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in request.items() if k not in ("op", "stream")}


def client_step(client: sc.Client, step: dict[str, Any]) -> None:
    request = expand(step["request"])
    events: list[dict[str, Any]] = []
    frame: dict[str, Any] = {}
    raised = None
    try:
        if request.get("op") == "complete" and request.get("stream"):
            for event in client.stream(timeout=TIMEOUT_S, **fields_of(request)):
                (events.append(event) if event.get("event") in STREAM_EVENTS else frame.update(event))
        elif request.get("op") == "complete":
            frame = client.complete(timeout=TIMEOUT_S, **fields_of(request)).raw
        else:
            frame = client.request(request, timeout=TIMEOUT_S)
    except sc.SidecardError as exc:
        frame, raised = error_frame(exc), type(exc).__name__
    check(step["expect"], frame, events=events, client_error=raised, client=True)


def run_client_case(path: str, case: dict[str, Any]) -> None:
    with sc.Client(path, timeout=TIMEOUT_S) as client:
        if not case.get("concurrent"):
            for step in steps(case):
                client_step(client, step)
            return
        failures: list[BaseException] = []

        def worker(step):
            try:
                client_step(client, step)
            except BaseException as exc:  # noqa: BLE001 - reported below
                failures.append(exc)

        threads = [threading.Thread(target=worker, args=(step,)) for step in steps(case)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if failures:
            raise failures[0]


async def aio_step(client: AsyncClient, step: dict[str, Any]) -> None:
    request = expand(step["request"])
    events: list[dict[str, Any]] = []
    frame: dict[str, Any] = {}
    raised = None
    try:
        if request.get("op") == "complete" and request.get("stream"):
            async for event in client.stream(timeout=TIMEOUT_S, **fields_of(request)):
                (events.append(event) if event.get("event") in STREAM_EVENTS else frame.update(event))
        elif request.get("op") == "complete":
            frame = (await client.complete(timeout=TIMEOUT_S, **fields_of(request))).raw
        else:
            frame = await client.request(request, timeout=TIMEOUT_S)
    except sc.SidecardError as exc:
        frame, raised = error_frame(exc), type(exc).__name__
    check(step["expect"], frame, events=events, client_error=raised, client=True)


async def run_aio_case(path: str, case: dict[str, Any]) -> None:
    import anyio

    async with AsyncClient(path, timeout=TIMEOUT_S) as client:
        if case.get("concurrent"):
            async with anyio.create_task_group() as tg:
                for step in steps(case):
                    tg.start_soon(aio_step, client, step)
        else:
            for step in steps(case):
                await aio_step(client, step)


# ---------------------------------------------------------------- the tests


# Socket-only cases send raw bytes that no client library lets a caller write.
PAIRS = [(case, via) for case in CASES for via in VIAS if via == "socket" or not case.get("socket_only")]


@pytest.mark.parametrize(("case", "via"), PAIRS, ids=[f"{case['name']}-{via}" for case, via in PAIRS])
async def test_case(case, via, daemon, sim):
    set_faults(sim, case)
    try:
        if via == "socket":
            await run_socket(daemon, case)
        elif via == "client":
            await trio.to_thread.run_sync(run_client_case, daemon.socket_path, case)
        elif via == "aio-trio":
            await run_aio_case(daemon.socket_path, case)
        else:
            await trio.to_thread.run_sync(lambda: asyncio.run(run_aio_case(daemon.socket_path, case)))
    except BaseExceptionGroup as group:  # a concurrent case's failure, unwrapped for a readable report
        raise group.exceptions[0] if len(group.exceptions) == 1 else group
    finally:
        sim.clear_faults()


async def test_every_case_in_turn_on_one_daemon(daemon, sim):
    """The cases must not depend on a fresh daemon (the Node runner shares one): breakers, cache and retry
    budget left behind by one case must not change the next one's outcome."""
    for case in CASES:
        set_faults(sim, case)
        try:
            await run_socket(daemon, case)
        except AssertionError as exc:
            raise AssertionError(f"case {case['name']}: {exc}") from None
        finally:
            sim.clear_faults()


def test_cases_are_well_formed():
    names = set()
    for case in CASES:
        assert case["name"] not in names
        names.add(case["name"])
        assert set(case) <= {"name", "description", "faults", "socket_only", "concurrent", "steps", "request", "raw", "expect"}
        assert ("steps" in case) != ("expect" in case), case["name"]
        for step in steps(case):
            assert ("request" in step) != ("raw" in step), case["name"]
            assert "raw" not in step or case.get("socket_only"), f"{case['name']}: raw steps are for socket runners"
            assert "id" not in step.get("request", {}), f"{case['name']}: the runner assigns ids"
            assert set(step["expect"]) <= {"ok", "id", "error", "types", "values", "stream", "client_error"}
        for spec in case.get("faults", []):
            msgspec.convert({k: v for k, v in spec.items() if k != "model"}, Fault)
