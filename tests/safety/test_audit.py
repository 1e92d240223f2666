"""The audit trail: redacted, append-only, rotated, pruned, exported, and never in a request's way."""

import os
import stat

import msgspec
import pytest
import trio

from sidecard.observe.redact import Redactor
from sidecard.safety.audit import (
    AuditDirectoryError,
    AuditLog,
    AuditRecord,
    Export,
    audit_files,
    channel,
    file_start,
    run_writer,
)
from sidecard.safety.settings import AuditSettings

DAY = 86_400.0
T0 = 1_780_000_000.0  # 2026-05-28


class WallClock:
    def __init__(self, now=T0):
        self.now = now

    def __call__(self):
        return self.now


def record(i, ts=T0, **fields):
    return AuditRecord(**{"ts": ts, "id": f"r{i}", "feature": "billing", "question": f"question {i}",
                          "answer": f"answer {i}", **fields})


def settings(**overrides):
    return AuditSettings(features=["*"], **overrides)


def lines(directory):
    return [msgspec.json.decode(line, type=AuditRecord) for line in Export(str(directory))]


async def write_all(log, records):
    sink, receive = channel(log.settings)
    async with trio.open_nursery() as nursery:
        await nursery.start(run_writer, receive, log)
        for r in records:
            assert sink.offer(r)
        sink._send.close()  # the integration closes the send end at drain
    return sink


async def test_records_are_redacted_cut_and_kept_in_private_files(tmp_path):
    directory = tmp_path / "audit"
    log = AuditLog(str(directory), settings(max_text_chars=40), Redactor(["sk-configured-secret"]), now=WallClock())
    await write_all(log, [record(1, question="I am bob@example.com, key sk-configured-secret", answer="x" * 500,
                                 guardrails=["pii:redact"], policy=["feature:billing:refuse:card"])])
    assert stat.S_IMODE(os.stat(directory).st_mode) == 0o700
    (path,) = [p for _, p in audit_files(directory)]
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    (saved,) = lines(directory)
    assert saved.question == "I am [email], key [key]…"  # Redactor.prefix: the original was longer than the limit
    assert saved.answer == "x" * 39 + "…"
    assert saved.guardrails == ["pii:redact"] and saved.policy == ["feature:billing:refuse:card"]
    assert "bob@example.com" not in path.read_text()


async def test_a_directory_open_to_others_is_refused_at_start(tmp_path):
    directory = tmp_path / "open"
    directory.mkdir(mode=0o755)
    os.chmod(directory, 0o755)
    log = AuditLog(str(directory), settings(), Redactor())
    _, receive = channel(log.settings)
    with pytest.raises(AuditDirectoryError, match=r"mode 0755 is open to group or others \(use 0700\)"):
        await run_writer(receive, log)
    link = tmp_path / "link"
    os.symlink(tmp_path / "elsewhere", link)
    (tmp_path / "elsewhere").mkdir(mode=0o700)
    with pytest.raises(AuditDirectoryError, match="not a directory"):
        AuditLog(str(link), settings(), Redactor()).open()


def test_files_rotate_by_size_and_by_age_and_are_never_reopened(tmp_path):
    clock = WallClock()
    log = AuditLog(str(tmp_path), settings(max_file_bytes=4096, rotate_interval_s=3600), Redactor(), now=clock)
    log.open()
    for i in range(60):  # about 150 bytes each: rotates by size a couple of times
        log.write([record(i, question="q" * 80)], sync=False)
    by_size = len(audit_files(tmp_path))
    assert by_size >= 2
    assert all(os.path.getsize(p) <= 4096 for _, p in audit_files(tmp_path))
    clock.now += 3600
    log.write([record(99, ts=clock.now)], sync=True)
    assert len(audit_files(tmp_path)) == by_size + 1
    log.close()
    AuditLog(str(tmp_path), settings(), Redactor(), now=clock).open()  # a restart begins a new file
    assert len(audit_files(tmp_path)) == by_size + 2
    assert [r.id for r in lines(tmp_path)] == [f"r{i}" for i in range(60)] + ["r99"]


def test_closed_files_go_once_every_record_in_them_is_past_the_retention(tmp_path):
    clock = WallClock()
    log = AuditLog(str(tmp_path), settings(retention_days=30, rotate_interval_s=DAY), Redactor(), now=clock)
    starts = []
    for day in range(40):
        clock.now = T0 + day * DAY
        log.open() if day == 0 else log.write([record(day, ts=clock.now)], sync=False)
        starts.append(clock.now)
    log.close()
    clock.now = T0 + 45 * DAY
    removed = log.prune()
    kept = [start for start, _ in audit_files(tmp_path)]
    # A file is deleted when the one after it began more than 30 days ago; the newest file always stays.
    assert all(start >= clock.now - 30 * DAY - DAY for start in kept)
    assert kept[-1] == starts[-1] and removed and len(kept) == 26  # days 14 to 39
    assert min(r.ts for r in lines(tmp_path)) >= clock.now - 31 * DAY


def test_export_takes_a_time_range_and_skips_a_torn_line(tmp_path):
    clock = WallClock()
    log = AuditLog(str(tmp_path), settings(rotate_interval_s=DAY), Redactor(), now=clock)
    log.open()
    for i in range(10):
        clock.now = T0 + i * DAY / 2
        log.write([record(i, ts=clock.now)], sync=False)
    log.close()
    _, newest = audit_files(tmp_path)[-1]
    with open(newest, "ab") as f:
        f.write(b'{"ts": 1780000000.0, "id": "torn", "feat')
    export = Export(str(tmp_path), since=T0 + DAY, until=T0 + 3 * DAY)
    assert [msgspec.json.decode(line)["id"] for line in export] == ["r2", "r3", "r4", "r5", "r6"]
    everything = Export(str(tmp_path))
    assert len(list(everything)) == 10 and everything.skipped == 1


def test_file_names_carry_their_start_time():
    assert file_start("audit-20260528T123456Z-3.jsonl") == 1_779_971_696.0
    assert file_start("audit-garbage-1.jsonl") is None and file_start("notes.txt") is None


async def test_the_sink_never_waits_a_full_queue_drops_and_counts():
    sink, receive = channel(settings(queue=2))
    assert sink.offer(record(1)) and sink.offer(record(2))
    assert not sink.offer(record(3))
    receive.close()
    assert not sink.offer(record(4))
    assert sink.dropped == 2


async def test_cancelling_the_writer_flushes_what_is_queued(tmp_path):
    log = AuditLog(str(tmp_path), settings(), Redactor(), now=WallClock())
    sink, receive = channel(log.settings)
    async with trio.open_nursery() as nursery:
        await nursery.start(run_writer, receive, log)
        for i in range(50):
            sink.offer(record(i))
        nursery.cancel_scope.cancel()  # before the writer has run again: everything is still queued
    assert [r.id for r in lines(tmp_path)] == [f"r{i}" for i in range(50)]
    assert log._fd is None  # closed


async def test_fsync_batch_syncs_each_batch_and_interval_syncs_when_quiet(tmp_path, monkeypatch, autojump_clock):
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(stat.S_ISREG(os.fstat(fd).st_mode)) or real_fsync(fd))
    for mode in ("batch", "interval"):
        synced.clear()
        log = AuditLog(str(tmp_path / mode), settings(fsync=mode, fsync_interval_s=1.0), Redactor(), now=WallClock())
        sink, receive = channel(log.settings)
        async with trio.open_nursery() as nursery:
            await nursery.start(run_writer, receive, log)
            sink.offer(record(1))
            await trio.sleep(0.1)
            after_first = synced.count(True)
            await trio.sleep(2)  # quiet for longer than the interval
            after_quiet = synced.count(True)
            nursery.cancel_scope.cancel()
        if mode == "batch":
            assert after_first == 1
        else:
            assert (after_first, after_quiet) == (0, 1)


async def test_a_failing_disk_loses_records_counted_not_the_writer(tmp_path, monkeypatch):
    log = AuditLog(str(tmp_path), settings(), Redactor(), now=WallClock())
    sink, receive = channel(log.settings)
    real_write = os.write
    failing = True

    def write(fd, data):
        if failing:
            raise OSError(28, "No space left on device")
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", write)
    async with trio.open_nursery() as nursery:
        await nursery.start(run_writer, receive, log)
        sink.offer(record(1))
        await trio.testing.wait_all_tasks_blocked()
        while log.failed_records == 0:
            await trio.sleep(0.01)
        failing = False
        sink.offer(record(2))
        sink._send.close()
    assert log.failed_records == 1
    assert [r.id for r in lines(tmp_path)] == ["r2"]
