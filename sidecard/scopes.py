"""Cancel scopes the request path can do without.

Entering and leaving a trio cancel scope costs microseconds. A scope whose deadline an enclosing scope meets as
soon or sooner can never be the one that catches the cancellation (trio lets the outer, visible cancellation
through), so it is left out: the engine's request scope already bounds every attempt by the request's deadline,
and the attempt bounds the pool's waits by its timeout.
"""

from __future__ import annotations

from typing import Final

import trio


class NoScope:
    """Stands in for a cancel scope that could never fire first: `cancelled_caught` is always False."""

    cancelled_caught = False

    def __enter__(self) -> NoScope:
        return self

    def __exit__(self, *exc: object) -> None:
        return None


NO_SCOPE: Final = NoScope()


def timeout_scope(timeout: float | None, *, now: float | None = None, bound: float | None = None) -> trio.CancelScope | NoScope:
    """A scope ending its block after `timeout` (None: never), unless the caller's own deadline comes as soon.
    `now`: the trio clock's reading, when the caller has it. `bound`: a deadline the caller knows it is held to;
    a timeout ending before it needs a scope, known without asking trio for the effective deadline (a walk up
    every enclosing scope, the connection's and the daemon's too)."""
    if timeout is None:
        return NO_SCOPE
    deadline = (trio.current_time() if now is None else now) + timeout
    if bound is not None and deadline < bound:
        return trio.CancelScope(deadline=deadline)
    if trio.current_effective_deadline() <= deadline:
        return NO_SCOPE
    return trio.CancelScope(deadline=deadline)
