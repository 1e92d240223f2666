"""Checking an answer against its prompt's declared output format."""

from __future__ import annotations

from typing import Final

import msgspec

from .files import OutputSpec
from .shape import violations

_decoder: Final = msgspec.json.Decoder()


def strip_fence(text: str) -> str:
    """Models often wrap JSON in a ```json fence; the JSON inside is what was asked for."""
    body = text.strip()
    if body.startswith("```") and body.endswith("```") and len(body) >= 6:
        body = body[3:-3]
        newline = body.find("\n")
        if newline >= 0 and body[:newline].strip().isalpha():
            body = body[newline + 1 :]
    return body.strip()


def output_problem(text: str, spec: OutputSpec) -> str | None:
    """Why `text` does not fit `spec`, or None when it does."""
    if spec.format != "json":
        return None
    try:
        value = _decoder.decode(strip_fence(text))
    except msgspec.DecodeError:
        return "the answer is not valid JSON"
    if spec.schema is not None:
        return violations(value, spec.schema)
    return None


def corrective_instruction(problem: str) -> str:
    return (
        f"Your previous answer could not be used: {problem}. "
        "Answer again with only the JSON value, in exactly the required shape, and nothing else."
    )
