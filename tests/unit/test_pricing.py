import pytest

from sidecard.config import Config, load
from sidecard.pricing import PriceTable
from sidecard.protocol import Usage


@pytest.fixture
def table():
    return PriceTable(load(None).prices)


def test_longest_prefix_and_provider_ids(table):
    assert table.price("claude-opus-4-1-20250805").input == 15.0
    assert table.price("claude-opus-4-6").input == 5.0
    assert table.price("us.anthropic.claude-sonnet-4-6-v1:0").output == 15.0
    assert table.price("claude-haiku-4-5@20251001").input == 1.0
    assert table.price("gpt-4") is None


def test_cost_includes_cache_tokens(table):
    usage = Usage(input_tokens=1_000_000, output_tokens=1_000_000, cache_creation_input_tokens=1_000_000, cache_read_input_tokens=1_000_000)
    assert table.cost("claude-sonnet-4-6", usage) == pytest.approx(3 + 15 + 3.75 + 0.3)
    assert table.cost("unknown", usage) == 0.0


def test_one_hour_cache_writes_cost_twice_the_input_price(table):
    from sidecard.protocol import CacheCreation

    split = Usage(cache_creation_input_tokens=3_000_000, cache_creation=CacheCreation(1_000_000, 2_000_000))
    assert table.cost("claude-sonnet-4-6", split) == pytest.approx(3.75 + 2 * 6.0)
    unsplit = Usage(cache_creation_input_tokens=1_000_000)  # no split reported: 5-minute writes
    assert table.cost("claude-sonnet-4-6", unsplit) == pytest.approx(3.75)


@pytest.mark.parametrize(("model", "known"), [
    ("claude-haiku-4-5-20251001", True), ("claude-haiku-4-5", True), ("claude-sonnet-4-6", True),
    ("claude-sonnet-4-5-20250929", True), ("claude-3-7-sonnet-latest", True),
    ("us.anthropic.claude-sonnet-4-6-v1:0", True), ("claude-sonnet-4-6@20250514", True),
    ("claude-haiku-4-5-2025100", False), ("claude-sonet-4-6", False), ("claude-sonnet-4-6x", False), ("gpt-4o", False),
])
def test_the_table_knows_model_ids_not_just_their_prefixes(model, known):
    """`route set-primary` refuses models the table does not know; matching by prefix let a date's typo through."""
    assert PriceTable(Config().prices).knows(model) is known
