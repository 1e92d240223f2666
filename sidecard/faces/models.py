"""The Models API (`GET /v1/models`, `GET /v1/models/{id}`) in the Anthropic API's shape, for the models sidecard
routes to: the official SDKs' `models.list()` and `models.retrieve()` work through the face.

Pure: the model ids in, the API's objects out. sidecard does not ask the upstream: the list is what its routes
would call. `display_name` is read from the id; `created_at` is the date an id carries (`...-20251001`,
`...@20251001`), else the Unix epoch, which sidecard cannot know better.
"""

from __future__ import annotations

import re
from typing import Any, Final
from urllib.parse import parse_qs

from ..errors import Code, SidecardError

DEFAULT_LIMIT: Final = 20
MAX_LIMIT: Final = 1000
_DATED: Final = re.compile(r"[-@](\d{4})(\d{2})(\d{2})$")
_EPOCH: Final = "1970-01-01T00:00:00Z"


def model_object(model_id: str) -> dict[str, Any]:
    return {"type": "model", "id": model_id, "display_name": display_name(model_id), "created_at": created_at(model_id)}


def display_name(model_id: str) -> str:
    """"claude-sonnet-4-6" -> "Claude Sonnet 4.6"; a provider's prefix and suffix (Bedrock, Vertex) and a date go."""
    name = model_id[model_id.find("claude-"):] if "claude-" in model_id else model_id
    name = _DATED.sub("", name.split(":")[0])
    name = re.sub(r"-v\d+$", "", name)
    words: list[str] = []
    for part in name.split("-"):
        if part.isdigit() and words and words[-1][-1].isdigit():
            words[-1] += f".{part}"  # version numbers: "4-6" is 4.6
        else:
            words.append(part.capitalize() if part.isalpha() else part)
    return " ".join(words)


def created_at(model_id: str) -> str:
    dated = _DATED.search(model_id.split(":")[0])
    return f"{dated[1]}-{dated[2]}-{dated[3]}T00:00:00Z" if dated else _EPOCH


def page(models: list[str], query: str) -> dict[str, Any]:
    """One page of the list, as `GET /v1/models?limit=&after_id=&before_id=` asks; raises `SidecardError` for a
    query it cannot serve."""
    params = {key: values[-1] for key, values in parse_qs(query).items()}
    try:
        limit = int(params.get("limit", DEFAULT_LIMIT))
    except ValueError:
        limit = 0
    if not 1 <= limit <= MAX_LIMIT:
        raise SidecardError(Code.BAD_REQUEST, f"limit: must be a whole number from 1 to {MAX_LIMIT}")
    start, end = 0, len(models)
    if "after_id" in params:
        start = _position(models, params["after_id"], "after_id") + 1
    if "before_id" in params:
        end = _position(models, params["before_id"], "before_id")
    chosen = models[start:end]
    shown = chosen[-limit:] if "before_id" in params and "after_id" not in params else chosen[:limit]
    data = [model_object(m) for m in shown]
    return {
        "data": data,
        "has_more": len(shown) < len(chosen),
        "first_id": shown[0] if shown else None,
        "last_id": shown[-1] if shown else None,
    }


def retrieve(models: list[str], model_id: str) -> dict[str, Any]:
    if model_id not in models:
        raise SidecardError(Code.MODEL_NOT_FOUND, f"model: {model_id[:100]!r} is not one sidecard routes to (GET /v1/models lists them)")
    return model_object(model_id)


def _position(models: list[str], model_id: str, field: str) -> int:
    try:
        return models.index(model_id)
    except ValueError:
        raise SidecardError(Code.BAD_REQUEST, f"{field}: {model_id[:100]!r} is not a listed model") from None
