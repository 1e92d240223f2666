"""Operator state in the store: compare-and-set, a change reaching another sidecar, a missed message healed by
the periodic resync, and a store that restarts empty given back the fleet's last state."""

from __future__ import annotations

import time

import pytest
import trio
from trio.testing import MockClock

from sidecard.fleet.errors import StateConflict, StoreDataError
from sidecard.fleet.health import FleetHealth, Hooks
from sidecard.fleet.pubsub import Subscriber
from sidecard.fleet.settings import parse_url
from sidecard.fleet.state import FleetStateStore, StateWatcher, encode
from sidecard.control.backend import State, StoredKill, StoredPrompt

RESYNC_S = 30.0
# Timeouts beyond any virtual time these tests use: the clock may jump while a reply is on its way, and must
# then land on a resync or a backoff, never on an operation's deadline.
PATIENT = 1e6


@pytest.fixture
def clock():
    """Virtual time that jumps after a moment in which nothing moved: messages and replies come in real time."""
    return MockClock(autojump_threshold=0.25)


def kill(scope: str) -> State:
    return State(kills=[StoredKill(scope=scope, mode="error", reason="incident 42", set_at=1.0)])


class Sidecar:
    """What one sidecar runs for operator state: a connection, a subscriber, a watcher with its local copy."""

    def __init__(self, store: FleetStateStore, watcher: StateWatcher) -> None:
        self.store = store
        self.watcher = watcher
        self.seen: list[tuple[int, State]] = []
        self.changed = trio.Event()

    def on_change(self, version: int, document: State) -> None:
        self.seen.append((version, document))
        self.changed.set()

    async def next_change(self) -> tuple[int, State]:
        with trio.fail_after(3 * RESYNC_S):
            await self.changed.wait()
        self.changed = trio.Event()
        return self.seen[-1]

    async def at_version(self, version: int) -> State:
        while self.watcher.version != version:
            await self.next_change()
        assert self.watcher.document is not None
        return self.watcher.document


@pytest.fixture
def sidecar(nursery, connect, keys, store_server):
    async def start(name: str, *, store=None, subscribe: bool = True, version: int = 0, document: State | None = None) -> Sidecar:
        server = store or store_server
        pokes = []
        health = FleetHealth(Hooks(on_up=lambda: [p() for p in pokes]))
        connection = await connect(server, health=health, op_timeout_s=PATIENT, connect_timeout_s=PATIENT)
        state = FleetStateStore(connection, keys, instance=name, timeout_s=PATIENT)
        car = Sidecar(state, None)  # type: ignore[arg-type]
        car.watcher = StateWatcher(state, car.on_change, resync_interval_s=RESYNC_S, version=version, document=document)
        pokes.append(car.watcher.poke)  # the store is back: resync (as the daemon wires it)
        if subscribe:
            subscriber = Subscriber(parse_url(server.url), name=f"sub-{name}", connect_timeout_s=PATIENT)
            car.watcher.attach(subscriber)
            await nursery.start(subscriber.run)
        await nursery.start(car.watcher.run)
        return car

    return start


async def test_a_save_is_a_compare_and_set(connect, keys):
    store = FleetStateStore(await connect(), keys, instance="host-a-1")
    assert await store.load() == (0, None)
    assert await store.save(kill("feature:chat"), 0) == 1
    with pytest.raises(StateConflict) as lost:
        await store.save(kill("feature:search"), 0)  # written on a stale read
    assert (lost.value.expected, lost.value.current) == (0, 1)
    assert await store.save(kill("feature:search"), 1) == 2
    version, document = await store.load()
    assert version == 2 and document.kills[0].scope == "feature:search"
    assert store.written_by == "host-a-1"


async def test_a_change_reaches_another_sidecar(sidecar, clock):
    a = await sidecar("a")
    b = await sidecar("b")
    document = State(prompts={"support-reply": StoredPrompt(stable=3, canary=4, canary_percent=10.0)})
    await a.store.save(document, 0)
    started = trio.current_time()
    assert await b.next_change() == (1, document)
    assert trio.current_time() - started < RESYNC_S  # the message, not the periodic resync
    assert b.store.written_by == "a"


async def test_a_missed_message_is_healed_by_the_resync(sidecar, clock, store_server, keys):
    b = await sidecar("b", subscribe=False)  # hears nothing: only its resync can catch up
    started = trio.current_time()
    writer = FleetStateStore(b.store.connection, keys, instance="a", timeout_s=PATIENT)
    await writer.save(kill("global"), 0)
    assert (await b.next_change())[0] == 1
    assert trio.current_time() - started == pytest.approx(RESYNC_S)
    assert b.watcher.resyncs == 2


async def test_an_unreadable_change_message_leads_to_a_resync(sidecar, clock, store_server, keys):
    b = await sidecar("b")
    await FleetStateStore(b.store.connection, keys, instance="a", timeout_s=PATIENT).save(kill("global"), 0)
    await b.next_change()
    with trio.move_on_after(1):  # the message's own resync may come after the change it announced
        await b.next_change()
    before = b.watcher.resyncs
    store_server.command("PUBLISH", keys.state_channel, "not a version")
    with trio.move_on_after(1):
        await b.next_change()
    assert b.watcher.resyncs == before + 1 and len(b.seen) == 1  # it looked again, and nothing had changed


async def test_a_store_restarted_empty_gets_the_fleets_last_state_back(sidecar, clock, private_store, keys):
    a = await sidecar("a", store=private_store)
    b = await sidecar("b", store=private_store)
    await a.store.save(kill("feature:chat"), 0)
    await a.store.save(kill("feature:search"), 1)
    await b.at_version(2)
    private_store.restart()  # nothing kept: the document and its version are gone
    # Virtual time jumps whenever real time stands still for a moment (the server restarting, a reply slow on a
    # loaded machine), so no virtual bound holds: the guard against a hang is real time, and generous.
    give_up = time.monotonic() + 60
    while private_store.command("HGET", keys.state, "v") != b"2":
        assert time.monotonic() < give_up, "the fleet's state never came back to the restarted store"
        await trio.sleep(RESYNC_S / 6)
    version, document = await a.store.load()
    assert (version, document.kills[0].scope) == (2, "feature:search")
    assert (a.watcher.version, b.watcher.version) == (2, 2)
    # A command after the restart is kept: a late seed of an older copy does not undo it.
    assert await a.store.save(kill("feature:billing"), 2) == 3
    assert not await b.store.seed(kill("feature:chat"), 2)
    assert (await b.at_version(3)).kills[0].scope == "feature:billing"


async def test_the_highest_last_known_version_wins_the_reseed(connect, keys):
    store = FleetStateStore(await connect(), keys, instance="a")
    assert await store.seed(kill("older"), 5)
    assert await store.seed(kill("newer"), 7)
    assert not await store.seed(kill("oldest"), 3)
    assert (await store.load())[0] == 7
    assert await store.save(kill("command"), 7) == 8
    assert not await store.seed(kill("late"), 9)  # a real command since: seeds stop


@pytest.mark.parametrize("garbage", [
    ("HSET", "v", "3", "doc", "{not json"),
    ("HSET", "v", "3", "doc", '{"format": 99}'),
    ("HSET", "v", "three", "doc", "{}"),
    ("HSET", "doc", "{}"),
    ("SET", "a string"),
])
async def test_garbage_state_is_a_data_error(connect, keys, store_server, garbage):
    command, *values = garbage
    store_server.command(command, keys.state, *values)
    store = FleetStateStore(await connect(), keys, instance="a")
    with pytest.raises(StoreDataError):
        await store.load()


async def test_garbage_state_leaves_the_watchers_copy_alone(connect, keys, store_server):
    errors = []
    watcher = StateWatcher(FleetStateStore(await connect(), keys, instance="a"), lambda v, d: None, resync_interval_s=1,
                           version=4, document=kill("global"), on_error=errors.append)
    store_server.command("HSET", keys.state, "v", "5", "doc", encode(kill("global"))[:-3])
    await watcher.resync()
    assert watcher.version == 4 and watcher.document.kills[0].scope == "global"
    assert errors and "not a sidecard state document" in errors[0]
