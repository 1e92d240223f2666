"""Safe templates: `{name}` placeholders, `{{` and `}}` for literal braces, nothing else.

A template is parsed once, when its file loads, into literal text and variable names. Rendering only
concatenates: a value is never parsed again, so a value holding `{other}` or `{0:>99}` comes out literally,
and there is no attribute access, indexing, conversion or format spec to abuse.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Final

_NAME: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")


class TemplateError(ValueError):
    pass


class Template:
    __slots__ = ("source", "_parts", "names")

    def __init__(self, source: str) -> None:
        self.source = source
        # Even indexes are literal text, odd indexes variable names.
        self._parts: list[str] = _parse(source)
        self.names: frozenset[str] = frozenset(self._parts[1::2])

    def render(self, values: Mapping[str, str]) -> str:
        parts = self._parts
        if len(parts) == 1:
            return parts[0]
        out = []
        for i, part in enumerate(parts):
            out.append(values[part] if i % 2 else part)
        return "".join(out)

    def __repr__(self) -> str:
        return f"Template({self.source!r})"


def _parse(source: str) -> list[str]:
    parts: list[str] = []
    literal: list[str] = []
    i, n = 0, len(source)
    while i < n:
        ch = source[i]
        if ch == "{":
            if source.startswith("{{", i):
                literal.append("{")
                i += 2
                continue
            end = source.find("}", i + 1)
            if end < 0:
                raise TemplateError(f"unclosed '{{' at offset {i} (write '{{{{' for a literal brace)")
            name = source[i + 1 : end]
            if not _NAME.fullmatch(name):
                raise TemplateError(
                    f"invalid placeholder {{{name}}} at offset {i}: only {{variable_name}} is allowed"
                    " (write '{{' and '}}' for literal braces)"
                )
            parts.append("".join(literal))
            parts.append(name)
            literal = []
            i = end + 1
        elif ch == "}":
            if source.startswith("}}", i):
                literal.append("}")
                i += 2
                continue
            raise TemplateError(f"single '}}' at offset {i} (write '}}}}' for a literal brace)")
        else:
            nxt = min((p for p in (source.find("{", i), source.find("}", i)) if p >= 0), default=n)
            literal.append(source[i:nxt])
            i = nxt
    parts.append("".join(literal))
    return parts
