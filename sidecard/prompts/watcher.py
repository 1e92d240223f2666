"""Hot reload: watch the prompt directory and reload on every change.

watchfiles' Rust watcher runs in a worker thread and only signals "something changed"; the reload itself
(`PromptStore.reload_async`) reads files in another thread and swaps the snapshot in on the Trio loop.
A burst of changes (an editor's write, rename, chmod) collapses into one reload.
"""

from __future__ import annotations

import threading
from collections.abc import Awaitable, Callable

import trio
import watchfiles

DEBOUNCE_MS = 150
TICK_MS = 1000


async def watch_directory(
    root: str,
    on_change: Callable[[], Awaitable[None]],
    *,
    debounce_ms: int = DEBOUNCE_MS,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Call `on_change` after changes under `root`, until cancelled. Calls never overlap.

    The watcher arms itself in its thread shortly after start; an edit made in that window is caught by
    one extra reload on the watcher's first tick.
    """
    stop = threading.Event()
    changed = trio.Event()
    token = trio.lowlevel.current_trio_token()

    def signal() -> None:
        changed.set()

    def blocking_watch() -> None:
        first_tick = True
        for changes in watchfiles.watch(
            root, stop_event=stop, debounce=debounce_ms, step=50, rust_timeout=TICK_MS,
            yield_on_timeout=True, raise_interrupt=False,
        ):
            if stop.is_set():
                return
            if changes or first_tick:
                first_tick = False
                try:
                    trio.from_thread.run_sync(signal, trio_token=token)
                except trio.RunFinishedError:
                    return

    async def consume() -> None:
        nonlocal changed
        while True:
            await changed.wait()
            changed = trio.Event()
            await on_change()

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(consume)
            task_status.started()
            await trio.to_thread.run_sync(blocking_watch, abandon_on_cancel=True)
    finally:
        stop.set()  # an abandoned watcher thread sees this within one step and exits
