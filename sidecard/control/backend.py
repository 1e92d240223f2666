"""Where operator state is kept across restarts: the `StateBackend` interface, and the local file behind it.

What is kept: kill switches, route overrides, prompt overrides, experiments and rollouts (with the values they
have tallied), the salt of user pseudonyms, and in fleet mode the budget raises (`State`). A
backend that holds something it cannot read (truncated, empty, garbage, a format this version does not know)
raises `CorruptState`: the daemon refuses to start, or with `[state] on_corrupt = "open"` moves it aside and starts
from its config alone. Times kept are wall-clock; in memory they are the daemon's monotonic clock.

`LocalFileBackend` writes the file atomically on every change (temp file, fsync, rename, fsync of the directory),
mode 0600; temp files a killed writer left behind are removed at the next start. Fleet mode puts a shared store
behind the same interface.
"""

from __future__ import annotations

from pathlib import Path
from typing import Final, Protocol, Union

import msgspec
import trio

from ..config import Target
from ..durable import remove_leftovers, replace_file, set_aside
from ..experiments.experiment import Experiment
from ..experiments.metric import Tally
from ..experiments.rollout import Rollout
from ..killswitch import KillSwitch, Mode
from ..limits.spend import Raise

FORMAT: Final = 1


class StoredKill(msgspec.Struct, kw_only=True):
    scope: str
    mode: Mode
    text: Union[str, None] = None
    reason: Union[str, None] = None
    expires_at: Union[float, None] = None  # unix time
    set_at: float = 0.0  # unix time


class StoredPrompt(msgspec.Struct, kw_only=True):
    stable: Union[int, None] = None
    canary: Union[int, None] = None
    canary_percent: Union[float, None] = None
    canary_cleared: bool = False
    rolled_back: Union[int, None] = None  # the canary version the fleet's quality monitor stopped
    history: list[int] = []


class StoredExperiment(msgspec.Struct, kw_only=True):
    experiment: Experiment
    tally: Tally = Tally()


class PendingChange(msgspec.Struct, kw_only=True):
    """Fleet mode: what one command taken while the store was unreachable changed of the fleet's state, kept to be
    replayed onto the fleet's state when the store is back (not a whole-state snapshot: another sidecar's change
    made meanwhile stays). Each part sets a value, so replaying it twice is replaying it once."""

    op: str  # the command, as its audit line names it ("kill", "route.rollback"...)
    taken_at: float  # unix time
    kills_set: list[StoredKill] = []
    kills_lifted: list[StoredKill] = []  # each as this sidecar saw it: lifted only if it is still the one in force
    routes: dict[str, list[list[Target]]] = {}  # a route's override stack after the command ([]: none)
    prompts: dict[str, Union[StoredPrompt, None]] = {}  # a prompt's override after the command (None: none)
    budget_raises: list[Raise] = []


class State(msgspec.Struct, kw_only=True):
    format: int = FORMAT
    # Salt of the user-key pseudonyms: stable across restarts, so per-user spend and limits carry over.
    salt: str = ""
    kills: list[StoredKill] = []
    routes: dict[str, list[list[Target]]] = {}
    prompts: dict[str, StoredPrompt] = {}
    experiments: list[StoredExperiment] = []  # operators' and the config's, with their tallies (times: unix)
    rollouts: list[Rollout] = []  # progressive rollouts of prompt versions, by prompt (`subject`)
    # Fleet mode only: the operators' budget raises, the fleet's (alone, a sidecar keeps them in its spend file).
    budget_raises: list[Raise] = []
    # Fleet mode only, never in the store: this sidecar's changes not yet written to it, in the order taken.
    pending: list[PendingChange] = []


_encoder: Final = msgspec.json.Encoder()
_decoder: Final = msgspec.json.Decoder(State)


def kill_to_disk(kill: KillSwitch, shift: float) -> StoredKill:
    """`shift` = wall clock minus daemon clock."""
    return StoredKill(
        scope=kill.scope, mode=kill.mode, text=kill.text, reason=kill.reason,
        expires_at=None if kill.expires_at is None else kill.expires_at + shift, set_at=kill.set_at + shift,
    )


def kill_from_disk(stored: StoredKill, shift: float) -> KillSwitch:
    return KillSwitch(
        scope=stored.scope, mode=stored.mode, text=stored.text, reason=stored.reason,
        expires_at=None if stored.expires_at is None else stored.expires_at - shift, set_at=stored.set_at - shift,
    )


class CorruptState(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class SaveFailed(Exception):
    """The backend refused a save; `reason` says why in a few words."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class StateBackend(Protocol):
    """Where `State` is kept. `location` names it in logs and errors (a path, a key)."""

    location: str

    def tidy(self) -> list[str]:
        """Remove what a writer killed mid-save left behind; what was removed."""
        ...

    def load(self) -> State:
        """The state kept, an empty one if there is none; raises `CorruptState`."""
        ...

    def move_aside(self, wall_now: float) -> str | None:
        """Keep unreadable state apart, where an operator can inspect it; where, or None if it could not be moved."""
        ...

    def write(self, state: State) -> None:
        """Keep STATE (replacing what was kept), blocking: at start, before the daemon serves. Raises `SaveFailed`."""
        ...

    async def save(self, state: State) -> None:
        """Keep STATE while the daemon serves, without blocking it; raises `SaveFailed`."""
        ...


class _Format(msgspec.Struct):
    format: int = FORMAT


_format_decoder: Final = msgspec.json.Decoder(_Format)


class LocalFileBackend:
    """The state file beside the daemon."""

    def __init__(self, path: str) -> None:
        self.path = Path(path)
        self.location = str(self.path)

    def load(self) -> State:
        """The saved state, an empty one if there is none; raises `CorruptState` saying what is wrong with it."""
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return State()
        except OSError as exc:
            raise CorruptState(f"unreadable: {exc.strerror}") from None
        if not data.strip():
            raise CorruptState("empty")
        try:
            version = _format_decoder.decode(data).format
        except msgspec.MsgspecError as exc:
            raise CorruptState(f"not a state file: {exc}") from None
        if version != FORMAT:
            raise CorruptState(f"format {version}, but this sidecard reads format {FORMAT} (written by another version?)")
        try:
            return _decoder.decode(data)
        except msgspec.MsgspecError as exc:
            raise CorruptState(f"not a state file: {exc}") from None

    def move_aside(self, wall_now: float) -> str | None:
        return set_aside(self.path, wall_now)

    def tidy(self) -> list[str]:
        return remove_leftovers(self.path)

    async def save(self, state: State) -> None:
        await trio.to_thread.run_sync(self.write, state)

    def write(self, state: State) -> None:
        """Atomically replace the file (blocking: it fsyncs)."""
        try:
            replace_file(self.path, _encoder.encode(state))
        except OSError as exc:
            raise SaveFailed(exc.strerror or str(exc)) from None
