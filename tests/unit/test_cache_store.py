"""SqliteStore start-up: only the newest entries that fit the cache's bounds are read, the rest deleted."""

import sqlite3
from contextlib import closing

import pytest

from sidecard.cache import ENTRY_OVERHEAD, Entry
from sidecard.cache_store import Delete, Put, SqliteStore

NOW = 1_000_000.0


def entry(stored_at: float, size: int = 100) -> Entry:
    return Entry(b"p" * size, stored_at, stored_at + 60, stored_at + 120, ("f", None))


def seeded(path: str, entries: dict[str, Entry]) -> None:
    store = SqliteStore(path)
    store.open(NOW, 0.0, (1000, 1 << 30, 1 << 30))
    store._commit([Put(k, e) for k, e in entries.items()], 0.0)
    store.close()


def keys_on_disk(path: str) -> list[str]:
    with closing(sqlite3.connect(path)) as db:
        return sorted(k for (k,) in db.execute("SELECT key FROM entries"))


def test_start_up_stops_at_the_entry_bound_newest_first(tmp_path):
    path = str(tmp_path / "c.db")
    seeded(path, {f"k{i}": entry(NOW - 50 + i) for i in range(10)})
    loaded = SqliteStore(path).open(NOW, 0.0, (3, 1 << 30, 1 << 30))
    assert [k for k, _ in loaded] == ["k7", "k8", "k9"]  # oldest first, as the LRU holds them
    assert keys_on_disk(path) == ["k7", "k8", "k9"]


def test_start_up_stops_at_the_byte_bound(tmp_path):
    path = str(tmp_path / "c.db")
    seeded(path, {f"k{i}": entry(NOW - 50 + i, size=1000) for i in range(10)})
    loaded = SqliteStore(path).open(NOW, 0.0, (1000, 4 * (1000 + ENTRY_OVERHEAD) - 1, 1 << 30))
    assert [k for k, _ in loaded] == ["k7", "k8", "k9"]
    assert keys_on_disk(path) == ["k7", "k8", "k9"]


def test_start_up_drops_expired_and_oversized_rows(tmp_path):
    path = str(tmp_path / "c.db")
    seeded(path, {"gone": entry(NOW - 500), "huge": entry(NOW - 1, size=5000), "kept": entry(NOW - 2)})
    loaded = SqliteStore(path).open(NOW, 0.0, (1000, 1 << 30, 4096))
    assert [k for k, _ in loaded] == ["kept"] and keys_on_disk(path) == ["kept"]


def test_deletes_are_committed_in_one_batch(tmp_path):
    path = str(tmp_path / "c.db")
    seeded(path, {f"k{i}": entry(NOW - 10 + i) for i in range(5)})
    store = SqliteStore(path)
    store.open(NOW, 0.0, (1000, 1 << 30, 1 << 30))
    store._commit([Delete(("k0", "k1")), Delete(("k3",))], 0.0)
    store.close()
    assert keys_on_disk(path) == ["k2", "k4"] and store.dropped_writes == 0


def test_a_file_another_process_holds_is_never_moved_aside(tmp_path, monkeypatch):
    path = str(tmp_path / "c.db")
    seeded(path, {"k": entry(NOW)})
    store = SqliteStore(path)

    def locked(*args):
        raise sqlite3.OperationalError("database is locked")

    monkeypatch.setattr(store, "_open", locked)
    with pytest.raises(sqlite3.OperationalError):  # the daemon then serves from memory
        store.open(NOW, 0.0, (1000, 1 << 30, 1 << 30))
    assert store.moved_aside is None and keys_on_disk(path) == ["k"]
