"""What can go wrong with the shared store, as types a caller can act on.

Every store operation raises only these (or returns): `StoreUnavailable` and `StoreTimeout` mean "use the
local state for now"; `StoreDataError` means the store answered but what it holds under the namespace is not
what this sidecard wrote (garbage, another schema version, a key of the wrong type): also local behaviour, and
a clear line in the log, never a crash.
"""

from __future__ import annotations


class StoreError(Exception):
    """Base of the store's errors; `str()` is safe to log (no password, no user data)."""


class StoreUnavailable(StoreError):
    """No connection, the breaker is open, or the server refused the operation (loading, out of memory, auth)."""


class StoreTimeout(StoreError):
    """No answer within the operation's timeout."""


class StoreDataError(StoreError):
    """The store answered, but with something this sidecard did not write or cannot read."""


class StateConflict(StoreError):
    """A compare-and-set lost: the document changed since `expected` was read; it is now at `current`."""

    def __init__(self, expected: int, current: int) -> None:
        super().__init__(f"operator state changed in the store (expected version {expected}, found {current})")
        self.expected = expected
        self.current = current
