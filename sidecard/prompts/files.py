"""Prompt files on disk: `prompts/<name>/v<N>.toml` (one version each) and `prompts/<name>/release.toml`."""

from __future__ import annotations

import hashlib
import re
import tomllib
from typing import Annotated, Any, Final, Literal, Union

import msgspec

from ..errors import Code, SidecardError, describe_validation_error
from ..protocol import MaxTokens, Message
from .shape import check_schema
from .template import Template, TemplateError

PROMPT_NAME: Final = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")
VERSION_FILE: Final = re.compile(r"^v([1-9][0-9]{0,5})\.toml$")
RELEASE_FILE: Final = "release.toml"


class _File(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    pass


class VariableSpec(_File):
    default: Union[str, None] = None
    description: str = ""


class MessageTemplate(_File):
    role: Literal["user", "assistant"]
    content: str


class OutputSpec(_File):
    format: Literal["text", "json"] = "text"
    schema: Union[dict[str, Any], None] = None


class VersionFile(_File):
    messages: list[MessageTemplate]
    description: str = ""
    system: Union[str, None] = None
    variables: dict[str, VariableSpec] = {}
    route: Union[str, None] = None
    max_tokens: Union[MaxTokens, None] = None
    temperature: Union[Annotated[float, msgspec.Meta(ge=0, le=1)], None] = None
    stop_sequences: Union[list[str], None] = None
    cache_ttl_s: Union[Annotated[float, msgspec.Meta(ge=0)], None] = None
    output: OutputSpec = msgspec.field(default_factory=OutputSpec)


class ReleaseFile(_File):
    stable: Annotated[int, msgspec.Meta(ge=1)]
    canary: Union[Annotated[int, msgspec.Meta(ge=1)], None] = None
    canary_percent: Annotated[float, msgspec.Meta(ge=0, le=100)] = 0.0


class PromptFileError(ValueError):
    """A prompt file that cannot be used; the message names the reason (the caller adds the path)."""


class PromptVersion:
    """One compiled, immutable version of a prompt."""

    __slots__ = (
        "name", "version", "digest", "description", "system", "messages", "required", "defaults",
        "route", "max_tokens", "temperature", "stop_sequences", "cache_ttl_s", "output",
    )

    def __init__(self, name: str, version: int, digest: str, spec: VersionFile) -> None:
        self.name = name
        self.version = version
        self.digest = digest
        self.description = spec.description
        try:
            self.system = Template(spec.system) if spec.system is not None else None
            self.messages = [(m.role, Template(m.content)) for m in spec.messages]
        except TemplateError as exc:
            raise PromptFileError(str(exc)) from None
        if not self.messages:
            raise PromptFileError("messages: at least one message template is required")
        used = set().union(*(t.names for _, t in self.messages), self.system.names if self.system else ())
        undeclared = used - set(spec.variables)
        if undeclared:
            raise PromptFileError(f"placeholder {{{sorted(undeclared)[0]}}} is not declared in [variables]")
        self.defaults = {k: v.default for k, v in spec.variables.items() if v.default is not None}
        self.required = frozenset(k for k, v in spec.variables.items() if v.default is None)
        self.route = spec.route
        self.max_tokens = spec.max_tokens
        self.temperature = spec.temperature
        self.stop_sequences = spec.stop_sequences
        self.cache_ttl_s = spec.cache_ttl_s
        self.output = spec.output
        if spec.output.format == "json" and spec.output.schema is not None:
            try:
                check_schema(spec.output.schema, "output.schema")
            except ValueError as exc:
                raise PromptFileError(str(exc)) from None

    def render(self, variables: dict[str, str]) -> tuple[str | None, list[Message]]:
        """The system text and messages for these variables; `bad_request` names a missing or unknown one."""
        for key in variables:
            if key not in self.required and key not in self.defaults:
                raise SidecardError(Code.BAD_REQUEST, f"vars.{key}: prompt {self.name} v{self.version} has no variable {key!r}")
        for key in self.required:
            if key not in variables:
                raise SidecardError(Code.BAD_REQUEST, f"vars.{key}: required by prompt {self.name} v{self.version}")
        values = {**self.defaults, **variables} if self.defaults else variables
        system = self.system.render(values) if self.system is not None else None
        return system, [Message(role, t.render(values)) for role, t in self.messages]


def _text(data: bytes) -> str:
    """A prompt file's text: UTF-8, with or without the byte-order mark some editors write."""
    return data.decode("utf-8-sig")


def parse_version(name: str, version: int, data: bytes) -> PromptVersion:
    try:
        raw = tomllib.loads(_text(data))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise PromptFileError(f"invalid TOML: {exc}") from None
    try:
        spec = msgspec.convert(raw, VersionFile)
    except msgspec.ValidationError as exc:
        raise PromptFileError(describe_validation_error(exc)) from None
    return PromptVersion(name, version, digest(data), spec)


def parse_release(data: bytes) -> ReleaseFile:
    try:
        raw = tomllib.loads(_text(data))
        release = msgspec.convert(raw, ReleaseFile)
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise PromptFileError(f"invalid TOML: {exc}") from None
    except msgspec.ValidationError as exc:
        raise PromptFileError(describe_validation_error(exc)) from None
    if release.canary is not None and release.canary == release.stable:
        raise PromptFileError("canary: must differ from stable")
    return release


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]
