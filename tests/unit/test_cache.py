import msgspec
import trio

from sidecard.cache import ENTRY_OVERHEAD, CachedAnswer, Entry, ResponseCache, SingleFlight, cache_key, pack, unpack
from sidecard.protocol import ServedBy, Usage


def answer(text="hi") -> CachedAnswer:
    return CachedAnswer(text, b'[{"type":"text","text":"hi"}]', "m", Usage(1, 2), "end_turn", None, ServedBy("anthropic", "m"), "req_1")


def entry(now=0.0, ttl=10.0, stale=5.0, text="hi", feature="f", prompt=None) -> Entry:
    return Entry(pack(answer(text)), now, now + ttl, now + ttl + stale, (feature, prompt))


def test_key_depends_on_every_part_and_not_on_dict_order():
    base = {"model": "m", "messages": [{"role": "user", "content": "x"}], "max_tokens": 5, "temperature": 0.0}
    assert cache_key(base) == cache_key(dict(reversed(list(base.items()))))
    for change in [{"model": "n"}, {"max_tokens": 6}, {"temperature": 0.5}, {"system": "s"}, {"stop_sequences": ["x"]}, {"prompt": ["p", 2, "d"]}]:
        assert cache_key({**base, **change}) != cache_key(base)


# CachedAnswer as daemons before `extra` have it: its fields but the last.
_EightFields = msgspec.defstruct(
    "_EightFields", [(f.name, f.type) for f in msgspec.structs.fields(CachedAnswer)[:-1]], array_like=True
)


def test_entries_read_across_versions_both_ways():
    """A persistent file's or a fleet's shared cache's entries outlive a daemon: an older one (a rollback, a fleet
    mid-upgrade) reads a newer one's, and a newer one an older one's; `extra` comes back as it went in."""
    refused = msgspec.structs.replace(answer(), extra={"stop_details": {"type": "refusal", "category": None}})
    old = msgspec.msgpack.decode(pack(refused), type=_EightFields)
    assert msgspec.structs.astuple(old) == msgspec.structs.astuple(refused)[:-1]
    assert unpack(msgspec.msgpack.encode(old)) == answer() and unpack(pack(refused)) == refused


def test_ttl_then_stale_window_then_gone():
    c = ResponseCache(max_entries=10, max_bytes=1 << 20)
    c.put("k", entry(now=0, ttl=10, stale=5))
    assert c.get("k", 9.9).answer.text == "hi"
    assert c.get("k", 10.0) is None  # expired for normal use
    hit = c.get("k", 14.0, allow_stale=True)
    assert hit.stale and hit.age_s == 14.0
    assert c.get("k", 15.0, allow_stale=True) is None
    assert len(c) == 0 and c.bytes == 0


def test_lru_by_entries():
    c = ResponseCache(max_entries=2, max_bytes=1 << 20)
    c.put("a", entry())
    c.put("b", entry())
    c.get("a", 1)  # a is now the most recent
    c.put("c", entry())
    assert c.get("b", 1) is None and c.get("a", 1) and c.get("c", 1)
    assert c.evictions == 1


def test_byte_bound_holds_and_is_honest():
    big = "x" * 5000
    size = len(pack(answer(big))) + ENTRY_OVERHEAD
    c = ResponseCache(max_entries=1000, max_bytes=size * 3, max_entry_bytes=size)
    for i in range(50):
        c.put(str(i), entry(text=big))
        assert c.bytes <= c.max_bytes
    assert len(c) == 3 and c.bytes == 3 * size
    assert not c.put("huge", entry(text="y" * 10 * size))


def test_replacing_a_key_does_not_leak_bytes():
    c = ResponseCache(max_entries=10, max_bytes=1 << 20)
    for _ in range(5):
        c.put("k", entry())
    assert len(c) == 1 and c.bytes == entry().size


def test_flush_by_feature_and_prompt():
    c = ResponseCache(max_entries=10, max_bytes=1 << 20)
    c.put("a", entry(feature="f1"))
    c.put("b", entry(feature="f2", prompt="p"))
    c.put("c", entry(feature="f2"))
    assert c.flush(prompt="p") == ["b"]
    assert c.flush(feature="f2") == ["c"]
    assert c.flush() == ["a"] and c.bytes == 0


async def test_single_flight_followers_get_the_leaders_answer():
    flights = SingleFlight()
    lead, flight = flights.lead_or_follow("k")
    assert lead
    got = []

    async def follower():
        is_leader, f = flights.lead_or_follow("k")
        assert not is_leader
        await f.done.wait()
        got.append(f.answer)

    async with trio.open_nursery() as n:
        n.start_soon(follower)
        n.start_soon(follower)
        await trio.testing.wait_all_tasks_blocked()
        flights.land("k", flight, answer="A")
    assert got == ["A", "A"] and len(flights) == 0


def test_a_cancelled_leader_lets_the_next_caller_lead():
    flights = SingleFlight()
    lead, flight = flights.lead_or_follow("k")
    flights.land("k", flight)
    assert flight.done.is_set() and flight.answer is None and flight.error is None
    assert flights.lead_or_follow("k")[0]
