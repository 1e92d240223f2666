"""The prompt registry: immutable snapshots of the prompt directory, and the store that picks versions.

A reload builds a new snapshot off to the side from the files and the previous snapshot, then swaps it in
with one assignment: a request holds the `PromptVersion` it started with, so it is never affected. A bad
file never replaces its last good version; a version that is live (stable, canary or overridden) may be
neither edited nor lost while it is live.
"""

from __future__ import annotations

import os
import random
import functools
from collections.abc import Callable, Collection, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import ParamSpec, TypeVar

import trio

from ..errors import Code, SidecardError
from ..policies.canary import in_canary
from .files import (
    PROMPT_NAME,
    RELEASE_FILE,
    VERSION_FILE,
    PromptFileError,
    PromptVersion,
    ReleaseFile,
    digest,
    parse_release,
    parse_version,
)

P = ParamSpec("P")
R = TypeVar("R")


@dataclass(frozen=True, slots=True)
class LoadError:
    path: str
    reason: str


@dataclass(frozen=True, slots=True)
class Prompt:
    name: str
    versions: dict[int, PromptVersion]
    release: ReleaseFile | None


@dataclass(frozen=True, slots=True)
class Snapshot:
    prompts: dict[str, Prompt] = field(default_factory=dict)
    errors: tuple[LoadError, ...] = ()
    # Digests of the files each version was loaded from, to skip unchanged files on reload.
    release_digests: dict[str, str] = field(default_factory=dict)
    # Versions served from memory, not from their file, because they were live: an edit refused or a file deleted.
    # They are read again as soon as the release moves off them (`PromptStore.settle`).
    held: frozenset[tuple[str, int]] = frozenset()
    removed: tuple[str, ...] = ()  # prompts this load removed: their directory is gone


@dataclass(slots=True)
class Override:
    """Runtime choices that win over release.toml until cleared (persisted by the admin layer)."""

    stable: int | None = None
    canary: int | None = None
    canary_percent: float | None = None
    canary_cleared: bool = False
    rolled_back: int | None = None  # the canary the fleet's quality monitor stopped: `clear` keeps it stopped


@dataclass(frozen=True, slots=True)
class Effective:
    stable: int
    canary: int | None
    canary_percent: float
    overridden: bool
    # Versions an override names that no longer exist: ignored, release.toml decides in their place.
    missing: tuple[int, ...] = ()

    def describe(self) -> dict[str, object]:
        described: dict[str, object] = {
            "stable": self.stable, "canary": self.canary, "canary_percent": self.canary_percent, "overridden": self.overridden,
        }
        if self.missing:
            described["override_missing"] = list(self.missing)
        return described


def load_directory(
    root: str | os.PathLike[str],
    previous: Snapshot,
    live: set[tuple[str, int]],
    overrides: Mapping[str, Override] | None = None,
    only: Collection[str] | None = None,
) -> Snapshot:
    """Read every prompt under `root` (or only the prompts named `only`, keeping the others as `previous` has them).

    `previous` supplies last-good versions; `live` holds the versions serving now (never edited in place,
    never lost while they serve); `overrides` the runtime choices, which decide with each release what serves.
    A prompt whose directory is gone is removed; if `root` itself is gone, everything keeps serving.
    """
    base = Path(root)
    if not base.is_dir():  # unmounted, or mid-swap: not an operator removing every prompt at once
        problem = LoadError(str(base), "the prompt directory is gone: every prompt loaded keeps serving")
        return replace(previous, errors=(problem,), removed=())
    overrides = overrides or {}
    names = {p.name for p in base.iterdir() if p.is_dir() and not p.name.startswith(".")}
    wanted = (names | set(previous.prompts)) if only is None else set(only)
    errors: list[LoadError] = [e for e in previous.errors if _prompt_of(base, e.path) not in wanted] if only is not None else []
    prompts = {name: p for name, p in previous.prompts.items() if name not in wanted}
    release_digests = {name: d for name, d in previous.release_digests.items() if name not in wanted}
    held: set[tuple[str, int]] = {key for key in previous.held if key[0] not in wanted}
    removed = []
    for name in sorted(wanted):
        directory = base / name
        if name not in names:
            if name in previous.prompts:
                removed.append(name)  # the directory itself is gone, not a file: the operator removed the prompt
            continue
        if not PROMPT_NAME.match(name):
            errors.append(LoadError(str(directory), "a prompt name may only use A-Z a-z 0-9 _ . : -"))
            continue
        prompt, release_digest = _load_prompt(directory, name, previous, live, overrides.get(name), errors, held)
        if release_digest:
            release_digests[name] = release_digest
        if prompt is not None:
            prompts[name] = prompt
    return Snapshot(prompts, tuple(errors), release_digests, frozenset(held), tuple(removed))


def effective_of(prompt: Prompt, override: Override | None) -> Effective | None:
    """The versions that serve PROMPT with OVERRIDE; None without a valid release."""
    release = prompt.release
    stable = release.stable if release else None
    canary = release.canary if release else None
    percent = release.canary_percent if release else 0.0
    missing: list[int] = []
    if override is not None:
        # A version the override names that is gone (its file deleted before a restart) is ignored and
        # reported: release.toml decides that part, and every admin op keeps working.
        if override.stable is not None:
            if override.stable in prompt.versions:
                stable = override.stable
            else:
                missing.append(override.stable)
        if override.canary_cleared:
            canary, percent = None, 0.0
        if override.canary is not None:
            if override.canary in prompt.versions:
                canary = override.canary
                if override.canary_percent is not None:
                    percent = override.canary_percent
            else:
                missing.append(override.canary)
        elif override.canary_percent is not None:
            percent = override.canary_percent
    if stable is None or stable not in prompt.versions:
        return None
    if canary is not None and (canary not in prompt.versions or canary == stable):
        canary, percent = None, 0.0
    return Effective(stable, canary, percent if canary is not None else 0.0, override is not None, tuple(missing))


def _prompt_of(base: Path, path: str) -> str | None:
    """The prompt a load error's PATH belongs to."""
    parts = Path(path).relative_to(base).parts if Path(path).is_relative_to(base) else ()
    return parts[0] if parts else None


def _load_prompt(
    directory: Path,
    name: str,
    previous: Snapshot,
    live: set[tuple[str, int]],
    override: Override | None,
    errors: list[LoadError],
    held: set[tuple[str, int]],
) -> tuple[Prompt | None, str | None]:
    old = previous.prompts.get(name)
    versions: dict[int, PromptVersion] = {}
    edited: dict[int, PromptVersion] = {}  # live versions whose file changed: the version as it serves
    seen: set[int] = set()
    try:
        paths = sorted(directory.iterdir())
    except OSError as exc:  # unreadable, or gone since it was listed: what served goes on serving
        errors.append(LoadError(str(directory), f"cannot be read ({exc.strerror}): the prompt as loaded before keeps serving"))
        held.update(key for key in previous.held if key[0] == name)
        return old, previous.release_digests.get(name)
    for path in paths:
        if path.name == RELEASE_FILE or path.suffix != ".toml" or path.name.startswith("."):
            continue
        match = VERSION_FILE.match(path.name)
        if not match:
            errors.append(LoadError(str(path), "unexpected file: version files are named v<N>.toml"))
            continue
        number = int(match.group(1))
        seen.add(number)
        before = old.versions.get(number) if old else None
        try:
            data = path.read_bytes()
        except OSError as exc:
            errors.append(LoadError(str(path), f"unreadable: {exc.strerror}"))
            if before is not None:
                versions[number] = before
            continue
        if before is not None and before.digest == digest(data):
            versions[number] = before
            continue
        try:
            versions[number] = parse_version(name, number, data)
        except PromptFileError as exc:
            errors.append(LoadError(str(path), str(exc)))
            if before is not None:
                versions[number] = before
            continue
        if before is not None and (name, number) in live:
            edited[number] = before  # refused below if the new release still serves it
    deleted_live = {
        number: version
        for number, version in (old.versions.items() if old else ())
        if number not in seen and (name, number) in live
    }
    candidates = {**versions, **deleted_live}
    release, release_digest = _load_release(directory, name, old, candidates, previous, errors)
    # Judged against what serves once this load is in (the release it installs, with the overrides): an edit made
    # as the release moves off the version goes through, and is not reported as refused after the move.
    effective = effective_of(Prompt(name, candidates, release), override)
    still_used = {effective.stable, effective.canary} if effective is not None else set()
    for number, version in edited.items():
        if number in still_used:
            errors.append(LoadError(str(directory / f"v{number}.toml"),
                                    f"v{number} is live and must not be edited: add a new version instead"))
            versions[number] = version
            held.add((name, number))
    for number, version in deleted_live.items():
        if number in still_used:
            errors.append(
                LoadError(str(directory / f"v{number}.toml"), "deleted while live: kept until the release moves off it")
            )
            versions[number] = version
            held.add((name, number))
    return (Prompt(name, versions, release) if versions or release else None), release_digest


def _load_release(
    directory: Path,
    name: str,
    old: Prompt | None,
    versions: dict[int, PromptVersion],
    previous: Snapshot,
    errors: list[LoadError],
) -> tuple[ReleaseFile | None, str | None]:
    path = directory / RELEASE_FILE
    kept = old.release if old else None
    kept_digest = previous.release_digests.get(name)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        if versions:
            errors.append(LoadError(str(path), "missing: name the stable version in release.toml"))
        return kept, kept_digest
    except OSError as exc:
        errors.append(LoadError(str(path), f"unreadable: {exc.strerror}"))
        return kept, kept_digest
    try:
        release = parse_release(data)
        for role, number in (("stable", release.stable), ("canary", release.canary)):
            if number is not None and number not in versions:
                raise PromptFileError(f"{role}: v{number} does not exist (or failed to load)")
    except PromptFileError as exc:
        errors.append(LoadError(str(path), str(exc)))
        return kept, kept_digest
    return release, digest(data)


def _switch(method: Callable[P, R]) -> Callable[P, R]:
    """A change of the overrides, as one `change()` block (unless within one already): undone if it raises, settled."""

    @functools.wraps(method)
    def switched(*args: P.args, **kwargs: P.kwargs) -> R:
        store = args[0]
        assert isinstance(store, PromptStore)
        if store._changing:  # the caller's block undoes and settles it with the rest
            return method(*args, **kwargs)
        with store.change():
            return method(*args, **kwargs)

    return switched


class PromptStore:
    """The current snapshot plus runtime overrides; picks the version that answers a request."""

    def __init__(
        self, root: str | os.PathLike[str] | None, *, rng: random.Random | None = None, builtins: dict[str, bytes] | None = None,
        on_settled: Callable[[set[str]], None] | None = None,
    ) -> None:
        """`builtins`: a v1 file's text per prompt name, served while the directory has no prompt of that name;
        `on_settled`: told the prompts `settle` read again."""
        self.root = root
        self.on_settled = on_settled
        self.builtins = {
            name: Prompt(name, {1: parse_version(name, 1, data)}, ReleaseFile(stable=1)) for name, data in (builtins or {}).items()
        }
        self.snapshot = self._with_builtins(Snapshot())
        self.overrides: dict[str, Override] = {}
        self.history: dict[str, list[int]] = {}  # stable versions before the current one, newest last
        self._rng = rng or random.Random()
        self._reload_lock = trio.Lock()
        self._changing = 0  # depth of `change()` blocks

    # -- loading

    def reload(self) -> Snapshot:
        """Re-read the directory and swap the new snapshot in. Returns it (its `errors` say what was refused)."""
        if self.root is None:
            return self.snapshot
        return self.install(load_directory(self.root, self._loaded(), self.live_versions(), self.overrides))

    async def reload_async(self) -> Snapshot:
        """`reload()` with the file reading in a worker thread, so the loop keeps serving meanwhile."""
        if self.root is None:
            return self.snapshot
        async with self._reload_lock:
            previous, live, overrides = self._loaded(), self.live_versions(), self._copied_overrides()
            snapshot = await trio.to_thread.run_sync(load_directory, self.root, previous, live, overrides)
            installed = self.install(snapshot)
            self.settle()  # the release may have moved off a version this load held, while it read
            # (a settle's own load removes nothing: what this one removed is still to be reported)
            return self.snapshot if self.snapshot is installed else replace(self.snapshot, removed=installed.removed)

    def install(self, snapshot: Snapshot) -> Snapshot:
        before = {name: self.effective_or_none(name) for name in self.snapshot.prompts}
        self.snapshot = self._with_builtins(snapshot)
        for name, was in before.items():
            now = self.effective_or_none(name)
            if was is not None and now is not None and now.stable != was.stable:
                self._remember(name, was.stable)
        return self.snapshot

    def settle(self) -> None:
        """Read again, now, the prompts with a version held from memory (an edit refused, a file deleted) that the
        release has moved off: the edit goes in (or the version goes) as the release moves, not at whatever reload
        comes next, so what a later `prompt use` of that version serves does not depend on unrelated changes.
        Called after every change of the overrides (at the end of a `change()` block); reads a prompt's directory
        on the loop, which only happens when such a version exists."""
        if self.root is None or self._changing:
            return
        live = self.live_versions()
        names = {name for name, number in self.snapshot.held if (name, number) not in live}
        if names:
            self.install(load_directory(self.root, self._loaded(), live, self.overrides, only=names))
            if self.on_settled is not None:
                self.on_settled(names)

    def _with_builtins(self, snapshot: Snapshot) -> Snapshot:
        missing = {name: p for name, p in self.builtins.items() if name not in snapshot.prompts}
        return replace(snapshot, prompts={**snapshot.prompts, **missing}) if missing else snapshot

    def _loaded(self) -> Snapshot:
        """The current snapshot without the built-ins (which no directory holds, so a reload must not miss them)."""
        own = {name: p for name, p in self.snapshot.prompts.items() if self.builtins.get(name) is not p}
        return replace(self.snapshot, prompts=own)

    def _copied_overrides(self) -> dict[str, Override]:
        return {name: replace(o) for name, o in self.overrides.items()}

    def live_versions(self) -> set[tuple[str, int]]:
        live = set()
        for name in self.snapshot.prompts:
            effective = self.effective_or_none(name)
            if effective is not None:
                live.add((name, effective.stable))
                if effective.canary is not None:
                    live.add((name, effective.canary))
        return live

    def errors(self) -> tuple[LoadError, ...]:
        """What is refused right now: the files the last load refused, and overrides naming a missing version."""
        return self.snapshot.errors + self.override_problems()

    def override_problems(self) -> tuple[LoadError, ...]:
        """Overrides naming a version that no longer exists (ignored: release.toml decides in their place), and
        overrides of a prompt that is gone (its directory removed)."""
        problems = []
        for name in sorted(self.overrides):
            if name not in self.snapshot.prompts:
                path = os.path.join(str(self.root or ""), name)
                problems.append(LoadError(path, f"no such prompt (its directory is gone), but a runtime override names it; "
                                                f"`sidecardctl prompt clear {name}` drops the override"))
                continue
            effective = self.effective_or_none(name)
            if effective is None:
                continue  # the prompt cannot serve at all: its own load errors say why
            for number in effective.missing:
                path = os.path.join(str(self.root or ""), name, f"v{number}.toml")
                reason = (f"missing, but a runtime override names v{number}: release.toml decides instead "
                          f"(v{effective.stable} serves); `sidecardctl prompt clear {name}` drops the override")
                problems.append(LoadError(path, reason))
        return tuple(problems)

    @contextmanager
    def change(self) -> Iterator[None]:
        """Overrides and history as they were if the block raises: an admin op refused after the fact leaves no trace.
        Once the block is through, what the release moved off is read again (`settle`)."""
        overrides, history = self._copied_overrides(), {name: list(h) for name, h in self.history.items()}
        self._changing += 1
        try:
            yield
        except BaseException:
            self.overrides, self.history = overrides, history
            raise
        finally:
            self._changing -= 1
        self.settle()

    # -- choosing

    def resolve(self, name: str, *, version: int | None = None, sticky_key: str | None = None) -> tuple[PromptVersion, bool]:
        """The version to render for a request, and whether it is the canary."""
        prompt = self.snapshot.prompts.get(name)
        if prompt is None:
            raise SidecardError(Code.PROMPT_NOT_FOUND, f"no prompt named {name!r}")
        if version is not None:
            chosen = prompt.versions.get(version)
            if chosen is None:
                raise SidecardError(Code.PROMPT_NOT_FOUND, f"prompt {name!r} has no version {version}")
            effective = self.effective_or_none(name)
            return chosen, effective is not None and effective.canary == version
        effective = self.effective_or_none(name)
        if effective is None:
            raise SidecardError(Code.PROMPT_NOT_FOUND, f"prompt {name!r} has no valid release")
        if effective.canary is not None and effective.canary_percent > 0:
            key = sticky_key if sticky_key is not None else str(self._rng.random())
            if in_canary(name, key, effective.canary_percent):
                return prompt.versions[effective.canary], True
        return prompt.versions[effective.stable], False

    def effective(self, name: str) -> Effective:
        effective = self.effective_or_none(name)
        if effective is None:
            raise SidecardError(Code.PROMPT_NOT_FOUND, f"no prompt named {name!r} with a valid release")
        return effective

    def effective_or_none(self, name: str) -> Effective | None:
        """The versions that serve PROMPT now; None for a prompt without a valid release (or no such prompt)."""
        prompt = self.snapshot.prompts.get(name)
        return None if prompt is None else effective_of(prompt, self.overrides.get(name))

    # -- switching (the admin socket calls these; each returns (before, after))

    @_switch
    def use(self, name: str, version: int) -> tuple[Effective, Effective]:
        """VERSION serves everyone: the stable version, and no canary (a pin)."""
        before = self.effective(name)
        self._require(name, version)
        override = self.overrides.setdefault(name, Override())
        override.stable = version
        override.canary, override.canary_percent, override.canary_cleared = None, None, True
        if before.stable != version:
            self._remember(name, before.stable)
        return before, self.effective(name)

    @_switch
    def rollback(self, name: str) -> tuple[Effective, Effective]:
        """Back to the stable version before the current one, and no canary; on a first version, the canary stopped."""
        before = self.effective(name)
        previous = [v for v in self.history.get(name, []) if v != before.stable and v in self.snapshot.prompts[name].versions]
        if previous:
            target = previous[-1]
        else:
            older = [v for v in self.snapshot.prompts[name].versions if v < before.stable]
            if not older:
                if before.canary is not None:
                    return self.stop_canary(name)  # the newest change is the canary: undo that
                raise SidecardError(
                    Code.BAD_REQUEST,
                    f"prompt {name!r} is on v{before.stable}, its first version, with no canary: there is nothing to roll "
                    f"back to. To stop serving it: sidecardctl kill prompt:{name} (or pin another version: sidecardctl "
                    f"prompt use {name} N)",
                )
            target = max(older)
        override = self.overrides.setdefault(name, Override())
        override.stable = target
        override.canary, override.canary_percent, override.canary_cleared = None, None, True
        history = self.history.setdefault(name, [])
        while history and history[-1] != target:
            history.pop()
        if history:
            history.pop()
        return before, self.effective(name)

    @_switch
    def set_canary(self, name: str, version: int | None, percent: float) -> tuple[Effective, Effective]:
        """Start or change a canary (`version` None keeps the current canary); percent 0 stops it."""
        before = self.effective(name)
        if not 0 <= percent <= 100:
            raise SidecardError(Code.BAD_REQUEST, "percent: must be between 0 and 100")
        if percent == 0 and version is None:
            return self.stop_canary(name)  # also when none runs: "no canary" is what was asked for
        version = version if version is not None else before.canary
        if version is None:
            raise SidecardError(Code.BAD_REQUEST, f"prompt {name!r} has no canary: name a version")
        self._require(name, version)
        if version == before.stable:
            raise SidecardError(Code.BAD_REQUEST, f"v{version} is already the stable version")
        override = self.overrides.setdefault(name, Override())
        override.canary, override.canary_percent, override.canary_cleared = version, percent, False
        override.rolled_back = None  # an operator's release: the fleet judges it afresh
        return before, self.effective(name)

    @_switch
    def stop_canary(self, name: str, *, rolled_back: int | None = None) -> tuple[Effective, Effective]:
        """Everyone back on the stable version (the quality monitor's automatic rollback); nothing if no canary runs.
        `rolled_back`: the fleet's quality monitor stops this canary version, which `clear` then keeps stopped."""
        before = self.effective(name)
        if before.canary is None or (rolled_back is not None and before.canary != rolled_back):
            return before, before
        override = self.overrides.setdefault(name, Override())
        override.canary, override.canary_percent, override.canary_cleared = None, None, True
        if rolled_back is not None:
            override.rolled_back = rolled_back
        return before, self.effective(name)

    @_switch
    def promote(self, name: str) -> tuple[Effective, Effective]:
        """The canary becomes the stable version for everyone."""
        before = self.effective(name)
        if before.canary is None:
            raise SidecardError(Code.BAD_REQUEST, f"prompt {name!r} has no canary to promote")
        override = self.overrides.setdefault(name, Override())
        override.stable = before.canary
        override.canary, override.canary_percent, override.canary_cleared = None, None, True
        self._remember(name, before.stable)
        return before, self.effective(name)

    @_switch
    def clear(self, name: str, *, force: bool = False) -> tuple[Effective, Effective]:
        """Drop runtime overrides: release.toml decides again, except that a canary the fleet's quality monitor
        rolled back stays stopped (unless `force`)."""
        before = self.effective(name)
        dropped = self.overrides.pop(name, None)
        if dropped is not None and dropped.rolled_back is not None and not force and self.effective(name).canary == dropped.rolled_back:
            self.overrides[name] = Override(canary_cleared=True, rolled_back=dropped.rolled_back)
        return before, self.effective(name)

    def forget(self, name: str) -> bool:
        """Drop the overrides and history of a prompt that is gone (`prompt clear` on it); whether there were any."""
        if name in self.snapshot.prompts or name not in self.overrides:
            return False
        del self.overrides[name]
        self.history.pop(name, None)
        return True

    def _require(self, name: str, version: int) -> None:
        prompt = self.snapshot.prompts.get(name)
        if prompt is None:
            raise SidecardError(Code.PROMPT_NOT_FOUND, f"no prompt named {name!r}")
        if version not in prompt.versions:
            raise SidecardError(Code.PROMPT_NOT_FOUND, f"prompt {name!r} has no version {version}")

    def _remember(self, name: str, stable: int) -> None:
        history = self.history.setdefault(name, [])
        if not history or history[-1] != stable:
            history.append(stable)
        del history[:-20]
