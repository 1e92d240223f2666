"""Cost of a call in USD from its usage and the configured price table."""

from __future__ import annotations

import re
from typing import NamedTuple

from .config import Config, Price
from .protocol import Usage

_PER_TOKEN = 1e-6  # prices are per million tokens
_MODELS_KEPT = 1024  # prices found by model id, kept for the next request
# What may follow a price entry in a model id: a minor version ("-6"), a date ("-20251001") or "-latest", and a
# Bedrock ("-v1:0") or Vertex ("@20250514") suffix. Anything else (a digit short of a date) is not a model we know.
_MODEL_TAIL = re.compile(r"(?:-\d{1,2})?(?:-\d{8}|-latest)?(?:-v\d+(?::\d+)?)?(?:@\d{8})?")


def canonical_model(model: str) -> str:
    """A model id without a provider's prefix: Bedrock ids look like "us.anthropic.claude-sonnet-4-6-v1:0",
    Vertex ids like "claude-sonnet-4-6@20250514"."""
    at = model.find("claude-")
    return model[at:] if at > 0 else model


class PriceTable:
    def __init__(self, prices: dict[str, Price]) -> None:
        # Longest prefix first, so "claude-opus-4-1" wins over "claude-opus-4".
        self._prefixes = sorted(prices.items(), key=lambda kv: len(kv[0]), reverse=True)
        self._by_model: dict[str, Price | None] = {}

    def price(self, model: str) -> Price | None:
        try:
            return self._by_model[model]
        except KeyError:
            canonical = canonical_model(model)
            found = next((p for prefix, p in self._prefixes if canonical.startswith(prefix)), None)
            if len(self._by_model) >= _MODELS_KEPT:  # (models named and given back come and go: start afresh)
                self._by_model.clear()
            self._by_model[model] = found
            return found

    def knows(self, model: str) -> bool:
        """Whether MODEL is an id of a priced model: an entry, then only what ids add to a family's name."""
        canonical = canonical_model(model)
        return any(canonical.startswith(prefix) and _MODEL_TAIL.fullmatch(canonical, len(prefix)) for prefix, _ in self._prefixes)

    def cost(self, model: str, usage: Usage) -> float:
        """USD for one call; 0.0 for a model with no price (the log line still has its tokens)."""
        p = self.price(model)
        if p is None:
            return 0.0
        cache_write = p.cache_write if p.cache_write is not None else p.input * 1.25
        cache_read = p.cache_read if p.cache_read is not None else p.input * 0.1
        written = usage.cache_creation_input_tokens * cache_write
        split = usage.cache_creation
        if split is not None and split.ephemeral_1h_input_tokens:
            # 1-hour writes cost twice the input price; the rest of the writes are 5-minute ones.
            hour = min(split.ephemeral_1h_input_tokens, usage.cache_creation_input_tokens)
            written += hour * (p.input * 2 - cache_write)
        return _PER_TOKEN * (
            usage.input_tokens * p.input
            + usage.output_tokens * p.output
            + written
            + usage.cache_read_input_tokens * cache_read
        )


def unpriced_problem(model: str) -> str:
    """What is wrong with a model the price table does not know (the admin commands refuse it, a config is warned)."""
    return (f"model {model!r} is not in the price table: a typo? (Its calls would cost $0 against budgets.) "
            f'Add [prices."{model}"] with its input and output prices (USD per million tokens) to the config')


class Unpriced(NamedTuple):
    """A model the config sends calls to that the price table does not know, and what sends them there."""

    where: str  # "route fast", "experiment NAME, arm A", "shadow NAME"
    model: str


def unpriced_models(config: Config) -> list[Unpriced]:
    """The config's models the price table does not know: only warned of (check-config, start, reload), since a
    model newer than the table must not block a start."""
    prices = PriceTable(config.prices)
    named = [Unpriced(f"route {name}", target.model) for name, route in config.routes.items() for target in route.targets]
    named += [Unpriced(f"experiment {spec.name}, arm {arm.name}", arm.model)
              for spec in config.experiments for arm in spec.arms if arm.model is not None]
    named += [Unpriced(f"shadow {shadow.name}", shadow.model) for shadow in config.shadows if shadow.model is not None]
    return [each for each in dict.fromkeys(named) if not prices.knows(each.model)]
