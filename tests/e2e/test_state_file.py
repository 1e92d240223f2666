"""The state file across restarts: what a restart brings back says so, and a damaged file never quietly
re-enables what an operator switched off."""

import os
import subprocess
import sys

import pytest

from sidecard.errors import StartupError
from tests.harness import admin, connect, metric

GOOD = b'{"format":1,"salt":"00ff","kills":[{"scope":"feature:chat","mode":"error","reason":"INC-1","set_at":1.0}]}'
DAMAGE = {
    "truncated": GOOD[: len(GOOD) // 2],
    "empty": b"",
    "garbage": b"\x00\x13\xfe not json at all",
    "unknown format": b'{"format": 2, "kills": []}',  # written by a newer sidecard, read after a downgrade
}


@pytest.mark.parametrize("damage", DAMAGE)
async def test_a_damaged_state_file_refuses_the_start_in_one_line_and_stays_where_it_is(persistent, short_tmp, damage):
    path = f"{short_tmp}/state.json"
    with open(path, "wb") as f:
        f.write(DAMAGE[damage])
    with pytest.raises(BaseExceptionGroup) as info:
        await persistent()
    assert info.group_contains(StartupError)
    (error,) = [e for e in _leaves(info.value) if isinstance(e, StartupError)]
    message = str(error)
    assert "\n" not in message and path in message and 'on_corrupt = "open"' in message and "move it aside" in message
    with open(path, "rb") as f:
        assert f.read() == DAMAGE[damage]  # left for the operator to inspect
    assert not os.path.exists(f"{short_tmp}/app.sock")  # nothing was served


async def test_on_corrupt_open_sets_it_aside_says_so_and_serves(persistent, short_tmp, capture_log):
    path = f"{short_tmp}/state.json"
    with open(path, "wb") as f:
        f.write(DAMAGE["truncated"])
    d = await persistent(state={"on_corrupt": "open"})
    (event,) = capture_log.events("state_corrupt")
    assert event["level"] == "error" and event["path"] == path and event["moved_to"].startswith(f"{path}.corrupt-")
    assert metric(d, "sidecard_state_discarded") == 1
    assert "moved to" in d.status()["state_error"]
    with open(event["moved_to"], "rb") as f:
        assert f.read() == DAMAGE["truncated"]
    assert (await (await connect(d)).complete("fine", feature="chat"))["ok"]  # what it held is no longer in force
    assert (await admin(d, {"op": "kill", "scope": "global"}))["ok"]  # and a new state file is written
    assert os.stat(path).st_mode & 0o777 == 0o600


async def test_temp_files_of_a_writer_killed_mid_save_are_removed_at_start(persistent, short_tmp, capture_log):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True).stdout.strip()
    leftover = f"{short_tmp}/.state.json.{dead}.tmp"
    live = f"{short_tmp}/.state.json.{os.getppid()}.tmp"  # a process that still runs may be writing it
    for temp in (leftover, live):
        with open(temp, "w") as f:
            f.write('{"format":1,"ki')
    await persistent()
    assert not os.path.exists(leftover) and os.path.exists(live)
    assert capture_log.events("state_temp_files_removed")[0]["removed"] == [leftover]


async def test_a_restart_warns_what_the_state_file_keeps_in_force_and_how_to_undo_it(persistent, capture_log):
    first = await persistent()
    await admin(first, {"op": "kill", "scope": "feature:demo", "mode": "static", "text": "paused", "reason": "try-out"})
    await admin(first, {"op": "route.set_primary", "route": "default", "model": "claude-haiku-4-5-20251001"})
    await admin(first, {"op": "prompt.use", "prompt": "support-reply", "version": 2})
    await persistent.stop(first)
    await persistent()
    (restored,) = capture_log.events("state_restored")
    assert restored["level"] == "warning"
    (kill,) = restored["kills"]
    assert (kill["scope"], kill["mode"], kill["reason"]) == ("feature:demo", "static", "try-out")
    assert restored["route_overrides"]["default"][0] == "anthropic:claude-haiku-4-5-20251001"
    assert restored["prompt_overrides"]["support-reply"]["stable"] == 2
    assert all(undo in restored["undo"] for undo in ("sidecardctl unkill", "route rollback", "prompt clear"))
    events = [e["event"] for e in capture_log.events()]
    second_start = events[events.index("stopped"):]
    assert second_start.index("state_restored") < second_start.index("started")  # said before it serves


def _leaves(group):
    for exc in group.exceptions:
        yield from _leaves(exc) if isinstance(exc, BaseExceptionGroup) else (exc,)
