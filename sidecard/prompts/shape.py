"""A small JSON-schema-like shape check for prompt outputs declared as `format = "json"`.

Supported keywords: `type` (object, array, string, number, integer, boolean, null, or a list of them),
`properties`, `required`, `additionalProperties` (false only), `items`, `enum`, `minLength`, `minItems`.
"""

from __future__ import annotations

from typing import Any

_TYPES = {
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list),
    "string": lambda v: isinstance(v, str),
    "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "boolean": lambda v: isinstance(v, bool),
    "null": lambda v: v is None,
}
KEYWORDS = frozenset({"type", "properties", "required", "additionalProperties", "items", "enum", "minLength", "minItems", "description"})


def check_schema(schema: Any, where: str = "schema") -> None:
    """Raise ValueError if `schema` uses something this checker does not understand."""
    if not isinstance(schema, dict):
        raise ValueError(f"{where}: must be a table")
    unknown = set(schema) - KEYWORDS
    if unknown:
        raise ValueError(f"{where}: unsupported keyword {sorted(unknown)[0]!r}")
    types = schema.get("type")
    for t in [types] if isinstance(types, str) else types or []:
        if t not in _TYPES:
            raise ValueError(f"{where}.type: unknown type {t!r}")
    for name, sub in (schema.get("properties") or {}).items():
        check_schema(sub, f"{where}.properties.{name}")
    if "items" in schema:
        check_schema(schema["items"], f"{where}.items")


def violations(value: Any, schema: dict[str, Any], path: str = "$") -> str | None:
    """The first way `value` breaks `schema`, or None if it fits."""
    types = schema.get("type")
    if types is not None:
        allowed = [types] if isinstance(types, str) else types
        if not any(_TYPES[t](value) for t in allowed):
            return f"{path}: expected {' or '.join(allowed)}"
    if "enum" in schema and value not in schema["enum"]:
        return f"{path}: not one of {schema['enum']}"
    if isinstance(value, str) and len(value) < schema.get("minLength", 0):
        return f"{path}: shorter than {schema['minLength']}"
    if isinstance(value, dict):
        for key in schema.get("required", []):
            if key not in value:
                return f"{path}: missing {key!r}"
        properties = schema.get("properties", {})
        if schema.get("additionalProperties") is False:
            extra = set(value) - set(properties)
            if extra:
                return f"{path}: unexpected {sorted(extra)[0]!r}"
        for key, sub in properties.items():
            if key in value and (problem := violations(value[key], sub, f"{path}.{key}")):
                return problem
    if isinstance(value, list):
        if len(value) < schema.get("minItems", 0):
            return f"{path}: fewer than {schema['minItems']} items"
        if "items" in schema:
            for i, item in enumerate(value):
                if problem := violations(item, schema["items"], f"{path}[{i}]"):
                    return problem
    return None
