"""Per-app access control: who is calling, and what that app may use.

On the Unix sockets the caller is its peer credentials (SO_PEERCRED): an app is matched by uid first, then by
primary gid. On the HTTP face it is a token (`x-api-key` or `Authorization: Bearer`), looked up in the
credentials file:

    # sidecard credentials: app name -> SHA-256 of its token(s); two during a rotation.
    [tokens]
    billing = "sha256:9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
    support = ["sha256:...", "sha256:..."]

The file holds hashes only, so reading it gives no token away. Tokens are 256-bit random strings
(`new_token`), so one SHA-256 is enough (a slow password hash protects guessable secrets; these are not).
A presented token is hashed and compared with every stored hash in constant time, without stopping at a
match. The file must be owned by the daemon's user (or root) and readable by no one else but its group,
writable by no one else: mode 0600, 0640, 0400 or 0440.

With access control off (the default) every caller is `ANYONE` and may use everything, as before.
"""

from __future__ import annotations

import fnmatch
import hashlib
import hmac
import os
import secrets
import stat
import tomllib
from collections.abc import Sequence
from typing import Final, NamedTuple

import msgspec

from ..config import describe_validation_error
from ..pricing import canonical_model
from .settings import AccessSettings, AppIdentity

_PREFIX: Final = "sha256:"
_BAD_MODE: Final = stat.S_IXUSR | stat.S_IWGRP | stat.S_IXGRP | stat.S_IRWXO


class Identity(NamedTuple):
    name: str
    app: AppIdentity | None  # None: access control is off, nothing is restricted


ANYONE: Final = Identity("*", None)


class Denied(NamedTuple):
    """A typed `forbidden`: `key` names the limit (for logs and metrics), `message` is for the client."""

    key: str
    message: str


class RequestFields(NamedTuple):
    """What a request asks to use, as the engine resolved it."""

    feature: str
    route: str | None = None
    prompt: str | None = None
    model: str | None = None
    max_tokens: int | None = None


def _allows(patterns: Sequence[str], value: str) -> bool:
    return any(p == value or fnmatch.fnmatchcase(value, p) for p in patterns)


def authorise(identity: Identity, request: RequestFields) -> Denied | None:
    """None when `identity` may make `request`; else which limit it would exceed."""
    app = identity.app
    if app is None:
        return None
    if request.prompt is None and "*" not in app.prompts:  # its prompts only: never messages of its own
        return Denied("prompt", f"app {identity.name!r} may only use its prompts ({', '.join(app.prompts)}), "
                                "not messages of its own")
    for key, patterns, value in (("feature", app.features, request.feature), ("route", app.routes, request.route),
                                 ("prompt", app.prompts, request.prompt), ("model", app.models, request.model)):
        if value is not None and not _allows(patterns, value):
            # A model's pattern matches its Bedrock or Vertex id too, as the price table does.
            if key != "model" or not _allows(patterns, canonical_model(value)):
                return Denied(key, f"app {identity.name!r} may not use {key} {value!r}")
    if app.max_tokens is not None and request.max_tokens is not None and request.max_tokens > app.max_tokens:
        return Denied("max_tokens", f"app {identity.name!r} may ask for at most {app.max_tokens} max_tokens")
    return None


# ---------------------------------------------------------------- credentials


class CredentialsError(Exception):
    """The credentials file cannot be used; the message names the file and the reason (never a token)."""


class _CredentialsFile(msgspec.Struct, forbid_unknown_fields=True):
    tokens: dict[str, object] = {}  # app name -> a hash or a list of hashes, checked entry by entry for the message


def hash_token(token: str) -> str:
    return _PREFIX + hashlib.sha256(token.encode()).hexdigest()


def new_token() -> str:
    """A fresh app token: 256 random bits, URL-safe (the HTTP face takes it as the SDK's api key)."""
    return "sc-" + secrets.token_urlsafe(32)


class Credentials:
    __slots__ = ("_entries",)

    def __init__(self, entries: Sequence[tuple[str, bytes]]) -> None:
        self._entries = tuple(entries)  # (app, sha256 digest)

    def identify(self, token: str | None) -> str | None:
        """The app `token` belongs to, or None. Every stored hash is compared, in constant time."""
        if not token:
            return None
        digest = hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()
        found: str | None = None
        for app, stored in self._entries:
            if hmac.compare_digest(digest, stored) and found is None:
                found = app
        return found

    def apps(self) -> set[str]:
        return {app for app, _ in self._entries}


def load_credentials(path: str, known_apps: Sequence[str], *, owner_uid: int | None = None) -> Credentials:
    """Read and check the credentials file. `owner_uid`: who must own it besides root (default: this process)."""
    owner = os.getuid() if owner_uid is None else owner_uid
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        raise CredentialsError(f"credentials file {path}: cannot open: {exc.strerror or exc}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise CredentialsError(f"credentials file {path}: not a regular file")
        if info.st_uid not in (owner, 0):
            raise CredentialsError(f"credentials file {path}: owned by uid {info.st_uid}, not by sidecard's user or root")
        if info.st_mode & _BAD_MODE:
            raise CredentialsError(f"credentials file {path}: mode {stat.S_IMODE(info.st_mode):04o} lets others read or "
                                   "change it (use 0600 or 0640)")
        with os.fdopen(fd, "rb", closefd=False) as f:
            data = f.read(1 << 20)
    finally:
        os.close(fd)
    try:
        parsed = msgspec.convert(tomllib.loads(data.decode("utf-8-sig")), _CredentialsFile)
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise CredentialsError(f"credentials file {path}: invalid TOML: {exc}") from None
    except msgspec.ValidationError as exc:
        raise CredentialsError(f"credentials file {path}: {describe_validation_error(exc)}") from None
    entries: list[tuple[str, bytes]] = []
    for app, hashes in parsed.tokens.items():
        if app not in known_apps:
            raise CredentialsError(f"credentials file {path}: tokens.{app}: no such app in [safety.access.apps]")
        values = [hashes] if isinstance(hashes, str) else hashes
        if not isinstance(values, list) or not values:
            raise CredentialsError(f"credentials file {path}: tokens.{app}: expected a hash or a list of hashes")
        for i, value in enumerate(values):
            if not isinstance(value, str) or not value.startswith(_PREFIX) or len(value) != len(_PREFIX) + 64:
                raise CredentialsError(f"credentials file {path}: tokens.{app}[{i}]: not \"sha256:\" and 64 hex digits")
            try:
                entries.append((app, bytes.fromhex(value.removeprefix(_PREFIX))))
            except ValueError:
                raise CredentialsError(f"credentials file {path}: tokens.{app}[{i}]: not hex") from None
    return Credentials(entries)


# ---------------------------------------------------------------- the gate


class AccessControl:
    """Maps callers to identities. Unknown callers are denied, unless access control is off."""

    def __init__(self, settings: AccessSettings, credentials: Credentials | None = None) -> None:
        self.settings = settings
        self._credentials = credentials or Credentials(())
        self._by_uid = {uid: name for name, app in settings.apps.items() for uid in app.uids}
        self._by_gid = {gid: name for name, app in settings.apps.items() for gid in app.gids}

    def for_peer(self, uid: int | None, gid: int | None) -> Identity | Denied:
        """The Unix sockets: the peer's credentials (None when the platform cannot tell)."""
        if not self.settings.enabled:
            return ANYONE
        name = self._by_uid.get(uid) if uid is not None else None
        if name is None and gid is not None:
            name = self._by_gid.get(gid)
        if name is None:
            return Denied("identity", "this caller is not a known app (no uid or gid of it is in safety.access.apps)")
        return Identity(name, self.settings.apps[name])

    def for_token(self, token: str | None) -> Identity | Denied:
        """The HTTP face: the request's token."""
        if not self.settings.enabled:
            return ANYONE
        name = self._credentials.identify(token)
        if name is None:
            return Denied("identity", "missing or unknown app token" if token else "no app token (send x-api-key)")
        return Identity(name, self.settings.apps[name])

    def describe(self) -> list[dict[str, object]]:
        """The identities and what they may use, for `sidecardctl apps` (no token, no hash)."""
        tokens = self._credentials.apps()
        return [
            {"app": name, "uids": app.uids, "gids": app.gids, "token": name in tokens, "features": app.features,
             "routes": app.routes, "prompts": app.prompts, "models": app.models, "max_tokens": app.max_tokens,
             "rate_limit": msgspec.to_builtins(app.rate_limit), "budget": msgspec.to_builtins(app.budget)}
            for name, app in sorted(self.settings.apps.items())
        ]
