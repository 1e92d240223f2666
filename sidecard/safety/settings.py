"""The `[safety]` config: guardrails, injection defences, data policies, app identities and the audit trail.

Every section is off by default, so a config without `[safety]` behaves as before. Like the rest of the config,
unknown keys are errors and each check names the key it refuses.
"""

from __future__ import annotations

import fnmatch
import math
import re
from typing import Annotated, Any, ClassVar, Final, Literal, Union

import msgspec

from ..config import Fraction, Name, OptionalName, Positive, PositiveInt, describe_validation_error
from ..prompts.shape import check_schema
from .pii import CUSTOM_NAME, KINDS, compile_pattern

NonNegativeInt = Annotated[int, msgspec.Meta(ge=0)]
Glob = Annotated[str, msgspec.Meta(min_length=1, max_length=128)]
VarName = Annotated[str, msgspec.Meta(pattern=r"^(?:\*|[A-Za-z_][A-Za-z0-9_]{0,63})$")]
Provider = Literal["anthropic", "bedrock", "vertex"]

Action = Literal["block", "redact", "retry", "flag"]


class _Section(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    pass


# ---------------------------------------------------------------- guardrails


class _Check(_Section, tag_field="kind"):
    action: Action = "flag"
    name: OptionalName = ""  # what logs and metrics call it; "" = the kind and its position, e.g. "regex.0"

    # The actions that make sense for this kind of check (redact needs a check that finds text).
    ACTIONS: ClassVar[frozenset[str]] = frozenset({"block", "redact", "retry", "flag"})

    def __post_init__(self) -> None:
        if self.action not in self.ACTIONS:
            raise ValueError(f"action: {self.action!r} is not possible for a {type(self).__struct_config__.tag} check"
                             f" (use {', '.join(sorted(self.ACTIONS))})")


class RegexCheck(_Check, tag="regex", kw_only=True):
    """The answer matches `pattern` (Python syntax)."""

    pattern: str
    ignore_case: bool = False
    mask: str = "[redacted]"

    def __post_init__(self) -> None:
        super().__post_init__()
        compile_pattern(f"(?i:{self.pattern})" if self.ignore_case else self.pattern, "pattern")


class BlocklistCheck(_Check, tag="blocklist", kw_only=True):
    """The answer holds one of `words` (phrases allowed) as whole words, whatever their case."""

    words: list[Annotated[str, msgspec.Meta(min_length=1, max_length=200)]]
    mask: str = "[redacted]"

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.words:
            raise ValueError("words: the list is empty")
        for i, word in enumerate(self.words):
            if not word.strip():
                raise ValueError(f"words[{i}]: blank")


class PiiCheck(_Check, tag="pii", kw_only=True):
    """The answer holds personal data or a credential of these kinds (see `safety/pii.py` for each)."""

    kinds: list[str] = msgspec.field(default_factory=lambda: list(KINDS))

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_kinds(self.kinds, {}, "kinds")


class JsonSchemaCheck(_Check, tag="json_schema", kw_only=True):
    """The answer is JSON in this shape (the prompt's own `[output]` schema when `schema` is not given)."""

    ACTIONS: ClassVar[frozenset[str]] = frozenset({"block", "retry", "flag"})
    schema: Union[dict[str, Any], None] = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.schema is not None:
            check_schema(self.schema, "schema")


class LengthCheck(_Check, tag="length", kw_only=True):
    """The answer has between `min_chars` and `max_chars` characters."""

    ACTIONS: ClassVar[frozenset[str]] = frozenset({"block", "retry", "flag"})
    min_chars: NonNegativeInt = 0
    max_chars: Union[PositiveInt, None] = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.max_chars is not None and self.max_chars < self.min_chars:
            raise ValueError("max_chars: smaller than min_chars")
        if self.min_chars == 0 and self.max_chars is None:
            raise ValueError("set min_chars, max_chars or both")


class JudgeCheck(_Check, tag="judge", kw_only=True):
    """A sampled share of answers is scored against `policy` by the judge model; below `min_score` fails.

    Runs after the answer (it is a model call, on `route`): the answer waits for the verdict, so a sampled
    request gains the judge's latency, whatever the action. On a stream it runs once the text is sent: `block`
    and `retry` then end the stream with a partial `output_blocked` error.
    """

    ACTIONS: ClassVar[frozenset[str]] = frozenset({"block", "retry", "flag"})
    policy: Annotated[str, msgspec.Meta(min_length=1, max_length=4000)]
    sample_rate: Fraction = 0.05
    min_score: Fraction = 0.5
    route: Union[Name, None] = None  # None: [quality] judge_route


Check = Union[RegexCheck, BlocklistCheck, PiiCheck, JsonSchemaCheck, LengthCheck, JudgeCheck]


class GuardrailScope(_Section):
    """The checks on answers for one prompt, feature or route."""

    checks: list[Check] = []
    # A blocked answer: a typed `output_blocked` error, or the route's (or feature's) static fallback text.
    on_block: Literal["error", "fallback"] = "error"
    # A check that fails to run is counted and logged; "block" also treats the answer as blocked (fail closed).
    on_error: Literal["flag", "block"] = "flag"
    # Streams: characters held back before the client gets them, so a match up to this long is caught (and
    # masked or blocked) before any of it is sent. 0: nothing is held; matches are then found once sent.
    stream_hold_chars: Annotated[int, msgspec.Meta(ge=0, le=4096)] = 128

    def __post_init__(self) -> None:
        seen: set[str] = set()
        for i, check in enumerate(self.checks):
            name = check.name or f"{type(check).__struct_config__.tag}.{i}"
            if name in seen:
                raise ValueError(f"checks[{i}].name: {name!r} is used twice")
            seen.add(name)


class GuardrailSettings(_Section):
    prompts: dict[Name, GuardrailScope] = {}
    features: dict[Name, GuardrailScope] = {}
    routes: dict[Name, GuardrailScope] = {}


# ---------------------------------------------------------------- prompt injection


class InjectionScope(_Section):
    """Injection defences for one prompt (its variables) or one feature (its user messages)."""

    # Prompt variables rendered inside delimited, escaped blocks ("*": all of them), with the system prompt
    # told that their content is data. Off by default: it changes the text the model sees.
    delimit: list[VarName] = []
    # What to do with an input whose detector score reaches `threshold`: "off" skips the detector.
    action: Literal["off", "flag", "block", "route"] = "flag"
    threshold: Fraction = 0.5
    route: Union[Name, None] = None  # with action = "route": the stricter route such requests go to

    def __post_init__(self) -> None:
        if self.action == "route" and self.route is None:
            raise ValueError('route: action = "route" needs the route to send flagged requests to')
        if self.action != "route" and self.route is not None:
            raise ValueError('route: only used with action = "route"')


class InjectionSettings(_Section):
    prompts: dict[Name, InjectionScope] = {}
    features: dict[Name, InjectionScope] = {}

    def __post_init__(self) -> None:
        for name, scope in self.features.items():
            if scope.delimit:
                raise ValueError(f"features.{name}.delimit: only prompts have variables to delimit")


# ---------------------------------------------------------------- data policy


class DataPolicy(_Section):
    """What may leave the host for one feature or route."""

    scrub: list[str] = []  # kinds replaced by placeholders in outbound requests
    restore: bool = True  # put the originals back where the answer repeats a placeholder
    refuse: list[str] = []  # kinds whose presence refuses the request with `policy_refused`
    patterns: dict[str, str] = {}  # operator-named regexes, usable in scrub and refuse by name
    providers: list[Provider] = []  # [] = any provider
    regions: list[Glob] = []  # region globs, e.g. "eu-*"; [] = any; a target without a region never matches

    def __post_init__(self) -> None:
        for name, source in self.patterns.items():
            if not CUSTOM_NAME.match(name):
                raise ValueError(f"patterns.{name}: a name is lowercase letters, digits and _ (at most 32)")
            if name in KINDS:
                raise ValueError(f"patterns.{name}: the name of a built-in kind")
            compile_pattern(source, f"patterns.{name}")
        _check_kinds(self.scrub, self.patterns, "scrub")
        _check_kinds(self.refuse, self.patterns, "refuse")
        both = set(self.scrub) & set(self.refuse)
        if both:
            raise ValueError(f"refuse: {sorted(both)[0]!r} is also scrubbed; a kind is either scrubbed or refused")

    @property
    def pins(self) -> bool:
        return bool(self.providers or self.regions)


class DataSettings(_Section):
    features: dict[Name, DataPolicy] = {}
    routes: dict[Name, DataPolicy] = {}

    def __post_init__(self) -> None:
        # A request falls under a feature's and a route's policy at once, so a pattern name means one pattern.
        seen: dict[str, tuple[str, str]] = {}
        for table, policies in (("features", self.features), ("routes", self.routes)):
            for name, policy in policies.items():
                for key, source in policy.patterns.items():
                    where, first = seen.setdefault(key, (f"{table}.{name}", source))
                    if first != source:
                        raise ValueError(f"{table}.{name}.patterns.{key}: differs from the pattern of that name in {where}")


# ---------------------------------------------------------------- access control


class AppRateLimit(_Section):
    """The app's own rate limit (scope `app:NAME`), besides every other limit."""

    requests_per_minute: Union[PositiveInt, None] = None
    tokens_per_minute: Union[PositiveInt, None] = None
    burst_s: Positive = 10.0

    def __post_init__(self) -> None:
        if not (self.requests_per_minute or self.tokens_per_minute):
            raise ValueError("set requests_per_minute, tokens_per_minute or both")


class AppBudget(_Section):
    """The app's own spend budget (scope `app:NAME`)."""

    window: Literal["hour", "day", "month"] = "day"
    soft_usd: Union[Annotated[float, msgspec.Meta(ge=0)], None] = None
    hard_usd: Union[Annotated[float, msgspec.Meta(ge=0)], None] = None

    def __post_init__(self) -> None:
        if self.soft_usd is None and self.hard_usd is None:
            raise ValueError("set soft_usd, hard_usd or both")
        for key in ("soft_usd", "hard_usd"):
            value = getattr(self, key)
            if value is not None and not math.isfinite(value):
                raise ValueError(f"{key}: must be a finite number")


def _everything() -> list[str]:
    return ["*"]


class AppIdentity(_Section):
    """One app: who it is (peer uids or gids on the sockets; a token in the credentials file on HTTP) and what
    it may use. Lists are exact names or globs ("support-*"); the default "*" allows all."""

    uids: list[NonNegativeInt] = []
    gids: list[NonNegativeInt] = []
    features: list[Glob] = msgspec.field(default_factory=_everything)
    routes: list[Glob] = msgspec.field(default_factory=_everything)
    prompts: list[Glob] = msgspec.field(default_factory=_everything)
    models: list[Glob] = msgspec.field(default_factory=_everything)
    max_tokens: Union[PositiveInt, None] = None  # a request asking for more is refused
    rate_limit: Union[AppRateLimit, None] = None
    budget: Union[AppBudget, None] = None


class AccessSettings(_Section):
    # Off: any peer that can open the sockets may use everything (the behaviour before access control).
    enabled: bool = False
    # Per-app tokens for the HTTP face, stored hashed (see `safety/access.py`); relative to the config file.
    credentials_file: Union[str, None] = None
    apps: dict[Name, AppIdentity] = {}

    def __post_init__(self) -> None:
        if self.enabled and not self.apps:
            raise ValueError("apps: access control is enabled but no app is defined, so every request would be refused")
        for key in ("uids", "gids"):
            owner: dict[int, str] = {}
            for name, app in self.apps.items():
                for peer_id in getattr(app, key):
                    if peer_id in owner:
                        raise ValueError(f"apps.{name}.{key}: {peer_id} also belongs to app {owner[peer_id]!r}")
                    owner[peer_id] = name


# ---------------------------------------------------------------- audit trail


class AuditSettings(_Section):
    """A durable, append-only record of requests and answers (redacted), for incident review."""

    features: list[Glob] = []  # features audited ("*": all); [] = off
    directory: str = "audit"  # relative to the config file; created 0700, files 0600
    max_file_bytes: Annotated[int, msgspec.Meta(ge=4096)] = 64 << 20  # a file this large is closed, a new one begun
    rotate_interval_s: Positive = 86_400.0  # and one this old
    retention_days: Positive = 90.0  # closed files older than this are deleted
    # "batch": fsync after each batch written (a crash loses at most the batch in flight); "interval": at most
    # every fsync_interval_s; "never": when the OS writes back.
    fsync: Literal["batch", "interval", "never"] = "batch"
    fsync_interval_s: Positive = 1.0
    queue: PositiveInt = 1000  # records waiting for the writer; more are dropped and counted, never waited for
    max_text_chars: PositiveInt = 8000  # each text field is cut to this many characters (after redaction)

    @property
    def enabled(self) -> bool:
        return bool(self.features)

    @property
    def written(self) -> str | None:
        """The directory the daemon writes when audit is on (`config.written_paths`)."""
        return self.directory if self.enabled else None

    def audits(self, feature: str) -> bool:
        return any(fnmatch.fnmatchcase(feature, pattern) for pattern in self.features)


# ---------------------------------------------------------------- the section


class SafetySettings(_Section):
    guardrails: GuardrailSettings = msgspec.field(default_factory=GuardrailSettings)
    injection: InjectionSettings = msgspec.field(default_factory=InjectionSettings)
    data: DataSettings = msgspec.field(default_factory=DataSettings)
    access: AccessSettings = msgspec.field(default_factory=AccessSettings)
    audit: AuditSettings = msgspec.field(default_factory=AuditSettings)

    def route_references(self) -> list[tuple[str, str]]:
        """(key, route) for every route these settings name, for the config to check against its routes."""
        refs = [(f"injection.{kind}.{name}.route", scope.route)
                for kind, scopes in (("prompts", self.injection.prompts), ("features", self.injection.features))
                for name, scope in scopes.items() if scope.route is not None]
        for kind in ("prompts", "features", "routes"):
            for name, scope in getattr(self.guardrails, kind).items():
                refs.extend((f"guardrails.{kind}.{name}.checks[{i}].route", check.route)
                            for i, check in enumerate(scope.checks) if isinstance(check, JudgeCheck) and check.route)
        return refs


def _check_kinds(kinds: list[str], custom: dict[str, str], key: str) -> None:
    for i, kind in enumerate(kinds):
        if kind not in KINDS and kind not in custom:
            raise ValueError(f"{key}[{i}]: unknown kind {kind!r} (use {', '.join(KINDS)} or a name from patterns)")


def parse(raw: object, where: str = "safety") -> SafetySettings:
    """`raw` (the `[safety]` table) as settings; `ValueError` names the key, e.g.
    `safety.guardrails.prompts.support-reply.checks[0].pattern: invalid regular expression: ...`."""
    try:
        return msgspec.convert(raw, SafetySettings)
    except msgspec.ValidationError as exc:
        described = describe_validation_error(exc)
        raise ValueError(f"{where}.{name_entries(raw, SafetySettings, described)}") from None


_SEGMENT: Final = re.compile(r"([^.\[]+)((?:\[(?:\.\.\.|\d+)\])*)")
_INDEX: Final = re.compile(r"\[(\.\.\.|\d+)\]")
_SUBKEY: Final = re.compile(r"^([A-Za-z_][\w.\[\]-]*): ")


def name_entries(raw: object, struct: type, described: str) -> str:
    """msgspec writes a table entry's key as `[...]`; put the name of the entry that fails in its place, and
    fold a check's own key into the path (`checks[0]: pattern: ...` becomes `checks[0].pattern: ...`)."""
    path, sep, message = described.partition(": ")
    if not sep:
        return described
    if "[...]" in path:
        path = _named_path(raw, struct, path)
    if sub := _SUBKEY.match(message):
        path, message = f"{path}.{sub.group(1)}", message[sub.end():]
    return f"{path}: {message}"


def _named_path(raw: object, struct: type, path: str) -> str:
    out: list[str] = []
    value: Any = raw
    info: Any = msgspec.inspect.type_info(struct)
    for field, indexes in _SEGMENT.findall(path):
        value = value.get(field) if isinstance(value, dict) else None
        info = _member(_field_type(info, field), (msgspec.inspect.DictType, msgspec.inspect.ListType))
        out.append(field)
        for index in _INDEX.findall(indexes):
            if index == "...":
                info = _member(getattr(info, "value_type", None), (msgspec.inspect.StructType,))
                key = _failing_key(value, info)
                out.append(f".{key}" if key is not None else "[...]")
                value = value.get(key) if key is not None else None
            else:
                info = _member(getattr(info, "item_type", None), (msgspec.inspect.StructType,))
                value = value[int(index)] if isinstance(value, list) and int(index) < len(value) else None
                out.append(f"[{index}]")
        out.append(".")
    return "".join(out).rstrip(".")


def _field_type(info: Any, field: str) -> Any:
    info = _member(info, (msgspec.inspect.StructType,))
    if info is not None:
        for f in info.fields:
            if f.name == field:
                return f.type
    return None


def _member(info: Any, kinds: tuple[type, ...]) -> Any:
    """`info` itself, or the member of a union that is one of `kinds`."""
    if isinstance(info, msgspec.inspect.UnionType):
        return next((t for t in info.types if isinstance(t, kinds)), None)
    return info if isinstance(info, kinds) else (info if isinstance(info, msgspec.inspect.StructType) else None)


def _failing_key(entries: Any, info: Any) -> str | None:
    if not isinstance(entries, dict) or not isinstance(info, msgspec.inspect.StructType):
        return None
    for key, entry in entries.items():
        try:
            msgspec.convert(entry, info.cls)
        except msgspec.ValidationError:
            return key
    return None
