"""The durable job store: the lifecycle, fencing (exactly-once completion under crashes, restarts and racing
workers), recovery, cancellation, upkeep, the file itself. A real SIGKILL in the middle of a transaction too."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading

import msgspec
import pytest

from sidecard.jobs.store import (
    ABANDONED,
    IN_PROGRESS,
    Failure,
    JobSpec,
    JobStore,
    Outcome,
    Settle,
    StoreError,
    custom_id,
    parse_custom_id,
)
from sidecard.protocol import Usage

NOW = 1_700_000_000.0
DAY = 86_400.0


def spec(i: int = 0, *, batch: bool = True, webhook: str | None = None, deadline: float = NOW + DAY) -> JobSpec:
    return JobSpec(
        request=b'{"messages": "request %d"}' % i,
        created=NOW,
        deadline=deadline,
        target="anthropic" if batch else None,
        params=b'{"model": "m", "n": %d}' % i if batch else None,
        webhook=webhook,
        meta=b"meta %d" % i,
    )


def outcome(text: str, *, served: str = "batch", cost: float = 0.5, listed: float = 1.0) -> Outcome:
    message = msgspec.Raw(msgspec.json.encode({"content": [{"type": "text", "text": text}]}))
    return Outcome(served=served, message=message, usage=Usage(input_tokens=3, output_tokens=4), cost_usd=cost, list_usd=listed)


@pytest.fixture
def path(tmp_path):
    return tmp_path / "state" / "jobs.sqlite"


@pytest.fixture
def store(path):
    store = JobStore(path)
    yield store
    store.close()


def into_batch(store: JobStore, n: int) -> tuple[list[str], str, list]:
    ids = store.add([spec(i) for i in range(n)], NOW)
    store.route([(job_id, "batch") for job_id in ids], NOW)
    batch_id, claims = store.form_batch("anthropic", ids, NOW + 1)
    return ids, batch_id, claims


def test_a_job_through_a_batch(store):
    ids, batch_id, claims = into_batch(store, 3)
    assert [c.id for c in claims] == ids and [c.fence for c in claims] == [1, 1, 1] and claims[0].attempt == 1
    assert claims[1].payload == b'{"model": "m", "n": 1}' and claims[1].meta == b"meta 1"
    assert store.view(ids[0]).state == "running" and store.batch(batch_id).state == "submitting"
    store.batch_submitted(batch_id, "msgbatch_1", NOW + 2, next_poll=NOW + 12)
    assert [b.upstream for b in store.batches_in_flight()] == ["msgbatch_1"]
    assert sorted(store.batch_jobs(batch_id)) == sorted((c.id, 1, NOW + DAY) for c in claims)

    done = store.settle([Settle(claims[0].id, 1, outcome=outcome("one")), Settle(claims[1].id, 1, failure=Failure("invalid_request", "bad")),
                         Settle(claims[2].id, 1, not_before=NOW + 30)], NOW + 100)  # fmt: skip
    assert len(done) == 3
    first, second, third = (store.view(i) for i in ids)
    assert first.state == "succeeded" and first.outcome.served == "batch" and first.outcome.usage.output_tokens == 4
    assert first.finished == NOW + 100 and msgspec.json.decode(first.outcome.message)["content"][0]["text"] == "one"
    assert second.state == "failed" and second.error == Failure("invalid_request", "bad")
    assert third.state == "queued_engine" and store.next_engine_at() == NOW + 30
    assert store.claim_engine(NOW + 29, 10) == []
    (claim,) = store.claim_engine(NOW + 30, 10)
    assert claim.id == ids[2] and claim.fence == 3 and claim.attempt == 2 and claim.payload == b'{"messages": "request 2"}'
    store.batch_done(batch_id, NOW + 100)
    assert store.batches_in_flight() == []


def test_a_stale_result_never_completes_a_job_that_moved_on(store):
    ids, batch_id, claims = into_batch(store, 1)
    # The job leaves its batch for the engine (its deadline came near), then the batch's result arrives late.
    assert store.settle([Settle(ids[0], claims[0].fence)], NOW + 10)
    (engine,) = store.claim_engine(NOW + 10, 1)
    assert store.settle([Settle(ids[0], claims[0].fence, outcome=outcome("from the batch"))], NOW + 20) == []
    assert store.settle([Settle(ids[0], engine.fence, outcome=outcome("from the engine", served="engine"))], NOW + 30)
    assert store.settle([Settle(ids[0], engine.fence, outcome=outcome("again", served="engine"))], NOW + 40) == []
    view = store.view(ids[0])
    assert view.state == "succeeded" and view.outcome.served == "engine" and view.finished == NOW + 30


def test_a_crash_between_result_fetched_and_job_completed_completes_it_once_after_restart(path):
    store = JobStore(path)
    ids, batch_id, claims = into_batch(store, 2)
    store.batch_submitted(batch_id, "msgbatch_1", NOW, next_poll=NOW)
    store.settle([Settle(ids[0], claims[0].fence, outcome=outcome("a"))], NOW + 5)
    store.close()  # the crash: the second result was fetched, never recorded

    store = JobStore(path)
    assert store.recover(NOW + 60) == {"engine": 0, "unrecorded_batches": 0, "batch_jobs": 0}
    (batch,) = store.batches_in_flight()  # still in flight: its results are read again
    again = [Settle(ids[0], claims[0].fence, outcome=outcome("a")), Settle(ids[1], claims[1].fence, outcome=outcome("b"))]
    assert [s.id for s in store.settle(again, NOW + 70)] == [ids[1]]  # the first was already complete
    assert store.view(ids[0]).finished == NOW + 5 and store.view(ids[1]).finished == NOW + 70
    store.close()


def test_recovery_requeues_engine_runs_and_abandons_unrecorded_batches(path):
    store = JobStore(path)
    engine_ids = store.add([spec(0, batch=False)], NOW)
    store.route([(engine_ids[0], "engine")], NOW)
    (running,) = store.claim_engine(NOW, 1)
    batch_ids, batch_id, claims = into_batch(store, 2)  # create call sent, its answer never recorded
    store.close()

    store = JobStore(path)
    assert store.recover(NOW + 60) == {"engine": 1, "unrecorded_batches": 1, "batch_jobs": 2}
    assert store.batch(batch_id).state == ABANDONED
    assert [w[0] for w in store.waiting()] == batch_ids  # queued for a batch again, in their order
    assert store.settle([Settle(running.id, running.fence, outcome=outcome("late", served="engine"))], NOW + 61) == []
    (again,) = store.claim_engine(NOW + 61, 1)
    assert again.id == running.id and again.attempt == 2
    store.close()


def test_two_stores_on_one_file_never_claim_or_complete_a_job_twice(path):
    first, second = JobStore(path), JobStore(path)
    ids = first.add([spec(i, batch=False) for i in range(40)], NOW)
    first.route([(job_id, "engine") for job_id in ids], NOW)
    claimed: list[list] = [[], []]

    def worker(store: JobStore, mine: list) -> None:
        while claims := store.claim_engine(NOW, 3):
            mine.extend(claims)

    threads = [threading.Thread(target=worker, args=(store, mine)) for store, mine in zip((first, second), claimed)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(c.id for c in claimed[0] + claimed[1]) == sorted(ids)  # each once, between them

    # Both try to complete the same claim at once: one wins.
    claim = (claimed[0] + claimed[1])[0]
    wins: list[int] = []
    barrier = threading.Barrier(2)

    def complete(store: JobStore, text: str) -> None:
        barrier.wait()
        wins.append(len(store.settle([Settle(claim.id, claim.fence, outcome=outcome(text, served="engine"))], NOW + 1)))

    threads = [threading.Thread(target=complete, args=(store, text)) for store, text in ((first, "x"), (second, "y"))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(wins) == [0, 1] and first.view(claim.id).state == "succeeded"
    first.close()
    second.close()


def test_a_sigkill_inside_a_transaction_loses_it_whole_and_nothing_else(path):
    store = JobStore(path)
    ids, batch_id, claims = into_batch(store, 60)
    store.batch_submitted(batch_id, "msgbatch_1", NOW, next_poll=NOW)
    store.close()
    fences = {c.id: c.fence for c in claims}
    # A child applies results 20 at a time and is killed (SIGKILL, by itself, at a known point) before the
    # second transaction commits, with its updates written.
    child = textwrap.dedent(f"""
        import os, signal
        from contextlib import contextmanager
        import msgspec
        from sidecard.jobs.store import JobStore, Outcome, Settle

        class Dying(JobStore):
            writes = 0

            @contextmanager
            def _write(self):
                with super()._write() as db:
                    yield db
                    Dying.writes += 1
                    if Dying.writes == 2:
                        os.kill(os.getpid(), signal.SIGKILL)

        store = Dying({str(path)!r})
        fences = {fences!r}
        ids = {ids!r}
        for start in range(0, 60, 20):
            chunk = ids[start : start + 20]
            store.settle([Settle(i, fences[i], outcome=Outcome(served="batch", message=msgspec.Raw(b'"%s"' % i.encode()))) for i in chunk], {NOW})
        """)
    result = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=60)
    assert result.returncode == -signal.SIGKILL, result.stderr

    store = JobStore(path)
    store.recover(NOW + 1)
    states = [store.view(i).state for i in ids]
    assert states == ["succeeded"] * 20 + ["running"] * 40  # the killed transaction left no trace
    again = [Settle(i, fences[i], outcome=Outcome(served="batch", message=msgspec.Raw(b'"%s"' % i.encode()))) for i in ids]
    assert [s.id for s in store.settle(again, NOW + 2)] == ids[20:]  # reading the results again completes the rest once
    assert all(msgspec.json.decode(store.view(i).outcome.message) == i for i in ids)
    store.close()


def test_a_failed_create_puts_the_jobs_back_in_the_queue_with_their_age(store):
    ids, batch_id, claims = into_batch(store, 2)
    assert store.batch_unsubmitted(batch_id) == 2
    assert store.batch(batch_id).state == ABANDONED
    assert [(w[0], w[3]) for w in store.waiting()] == [(ids[0], NOW), (ids[1], NOW)]
    assert store.settle([Settle(ids[0], claims[0].fence, outcome=outcome("x"))], NOW) == []
    store.to_engine([ids[1]], NOW + 5)
    assert store.view(ids[1]).state == "queued_engine" and [w[0] for w in store.waiting()] == [ids[0]]


def test_a_batch_done_sends_jobs_without_a_result_to_the_engine(store):
    ids, batch_id, claims = into_batch(store, 2)
    store.batch_submitted(batch_id, "msgbatch_1", NOW, next_poll=NOW)
    store.settle([Settle(ids[0], claims[0].fence, outcome=outcome("x"))], NOW)
    store.batch_done(batch_id, NOW + 1, wasted_usd=0.25)
    assert store.view(ids[1]).state == "queued_engine" and store.batch(batch_id).state == "done"
    assert store.stats(NOW + 1, at_risk_s=0)["savings_usd"] == pytest.approx(1.0 - 0.5 - 0.25)


def test_cancel(store):
    ids, batch_id, claims = into_batch(store, 2)
    cancelled = Failure("cancelled", "cancelled by the operator")
    assert store.cancel(ids[0], NOW + 1, cancelled) == "cancelled"
    assert store.view(ids[0]).error == cancelled and store.batch_jobs(batch_id) == [(ids[1], 1, NOW + DAY)]
    assert store.settle([Settle(ids[0], claims[0].fence, outcome=outcome("too late"))], NOW + 2) == []
    store.settle([Settle(ids[1], claims[1].fence, outcome=outcome("done"))], NOW + 2)
    assert store.cancel(ids[1], NOW + 3, cancelled) == "succeeded"  # a finished job stays finished
    assert store.cancel("job_unknown", NOW, cancelled) is None


def test_a_cached_answer_completes_at_once_and_queues_its_webhook(store):
    job_id = store.add_done(spec(1, webhook="https://app/hooks/"), outcome("cached", served="cache", cost=0, listed=0))
    view = store.view(job_id)
    assert view.state == "succeeded" and view.outcome.served == "cache" and view.finished == NOW
    assert [h.id for h in store.hooks_due(NOW, 10)] == [job_id]


def test_webhook_deliveries_are_queued_on_finish_and_settled(store):
    ids = store.add([spec(0, webhook="https://app/hooks/"), spec(1)], NOW)
    store.route([(i, "engine") for i in ids], NOW)
    claims = store.claim_engine(NOW, 2)
    store.settle([Settle(c.id, c.fence, failure=Failure("overloaded", "busy", True)) for c in claims], NOW + 1)
    (hook,) = store.hooks_due(NOW + 1, 10)
    assert (hook.id, hook.url, hook.attempts) == (ids[0], "https://app/hooks/", 0)
    store.hook_attempted(ids[0], delivered=False, next_at=NOW + 6)
    assert store.hooks_due(NOW + 5, 10) == [] and store.next_hook_at() == NOW + 6
    store.hook_attempted(ids[0], delivered=True, next_at=None)
    assert store.hooks_due(NOW + 100, 10) == [] and store.next_hook_at() is None


def test_stats_and_purge(store):
    ids, batch_id, claims = into_batch(store, 3)
    store.add([spec(9, deadline=NOW + 50)], NOW)
    store.settle([Settle(claims[0].id, 1, outcome=outcome("x", cost=0.5, listed=1.0))], NOW + 10)
    stats = store.stats(NOW + 20, at_risk_s=60)
    assert stats["jobs"] == {"accepted": 1, "queued_batch": 0, "queued_engine": 0, "running": 2, "succeeded": 1,
                             "failed": 0, "cancelled": 0}  # fmt: skip
    assert stats["oldest_pending_s"] == 20 and stats["batches_in_flight"] == 1 and stats["jobs_in_batches"] == 3
    assert stats["at_risk"] == 1 and stats["batch_cost_usd"] == 0.5 and stats["savings_usd"] == 0.5
    assert store.pending() == 3
    assert store.purge(NOW + 10) == 0 and store.purge(NOW + 11) == 1
    assert store.view(claims[0].id) is None and store.view(ids[1]).state == "running"


def test_the_file_is_private_durable_and_refused_when_corrupt_or_newer(path, tmp_path):
    store = JobStore(path, synchronous="normal")
    (job_id,) = store.add([spec()], NOW)
    store.close()
    for name in os.listdir(path.parent):
        assert os.stat(path.parent / name).st_mode & 0o777 == 0o600, name
    assert os.stat(path.parent).st_mode & 0o777 == 0o700
    store = JobStore(path)
    assert store.view(job_id).state == "accepted"
    store.close()

    db = sqlite3.connect(path)
    db.execute("PRAGMA user_version=99")
    db.close()
    with pytest.raises(StoreError, match="written by a newer sidecard"):
        JobStore(path)
    corrupt = tmp_path / "corrupt.sqlite"
    corrupt.write_bytes(b"this is not a database" * 100)
    with pytest.raises(StoreError, match="move it aside"):
        JobStore(corrupt)
    with pytest.raises(ValueError):
        JobStore(tmp_path / "x.sqlite", synchronous="off")


def test_custom_ids_carry_the_fence_within_the_apis_pattern(store):
    (job_id,) = store.add([spec()], NOW)
    value = custom_id(job_id, 12)
    assert parse_custom_id(value) == (job_id, 12) and len(value) <= 64
    assert all(c.isalnum() or c in "_-" for c in value)
    assert parse_custom_id("nonsense") is None and parse_custom_id("job_x-y") is None


def test_in_progress_batches_are_polled_in_order(store):
    _, first, _ = into_batch(store, 1)
    ids = store.add([spec(5)], NOW)
    store.route([(ids[0], "batch")], NOW)
    second, _ = store.form_batch("anthropic", ids, NOW)
    store.batch_submitted(first, "u1", NOW, next_poll=NOW + 50)
    store.batch_submitted(second, "u2", NOW, next_poll=NOW + 20)
    store.batch_polled(first, NOW + 10)
    assert [(b.upstream, b.polls, b.state) for b in store.batches_in_flight()] == [("u1", 1, IN_PROGRESS), ("u2", 0, IN_PROGRESS)]
