"""The planner, pure: a request, the config and the prompt store in, a Plan out (no daemon, no upstream)."""

from pathlib import Path

import msgspec
import pytest

from sidecard.config import from_mapping
from sidecard.engine.plan import Planner, estimate_input_tokens, worst_cost_usd
from sidecard.errors import Code, SidecardError
from sidecard.pricing import PriceTable
from sidecard.prompts.registry import PromptStore
from sidecard.protocol import Complete, Message
from sidecard.routes import RouteTable

ROUTES = {
    "default": {"targets": [{"model": "claude-sonnet-4-6", "hedge_after_ms": 500}, {"model": "claude-haiku-4-5"}]},
    "cheap": {"targets": [{"model": "claude-haiku-4-5"}], "cache_ttl_s": 30},
    "fresh": {"targets": [{"model": "claude-haiku-4-5"}], "cache_ttl_s": 0},
    "safe": {"targets": [{"model": "claude-haiku-4-5"}]},
}
GREET = '''description = "greet"
temperature = 0.0
max_tokens = 77
route = "cheap"
system = "You greet {who}."
[variables]
who = {}
[[messages]]
role = "user"
content = "Say hello to {who}."
'''
STARTED = 1000.0


def planner(tmp_path: Path | None = None, *, cache: bool = True, switched: dict[str, str] | None = None, **sections):
    config = from_mapping({"routes": ROUTES, "requests": {"default_deadline_ms": 20_000, "max_deadline_ms": 60_000,
                                                          "stream_max_duration_s": 10}, **sections})
    store = PromptStore(None)
    if tmp_path is not None:
        (tmp_path / "greet").mkdir()
        (tmp_path / "greet" / "v1.toml").write_text(GREET)
        (tmp_path / "greet" / "release.toml").write_text("stable = 1\n")
        store = PromptStore(tmp_path)
        assert store.reload().errors == ()
    return Planner(config, store, RouteTable(config.routes), cache=cache, route_for_prompt=(switched or {}).get)


def ask(text: str = "hello", **fields) -> Complete:
    return Complete(id=1, messages=[Message("user", text)], **fields)


def test_a_plain_request():
    plan = planner().plan(ask("hello there"), STARTED)
    assert plan.body == {"max_tokens": 1024, "messages": [Message("user", "hello there")]}
    assert plan.route_name == "default" and [t.model for t in plan.route.targets] == ["claude-sonnet-4-6", "claude-haiku-4-5"]
    assert plan.deadline == STARTED + 20 and plan.headers == {} and plan.version is None
    assert plan.cache_key is None  # no temperature: the API's default of 1, a fresh sample each time
    assert plan.estimated_tokens == len("hello there") / 4 + 1024 and plan.first_text == "hello there"


def test_deadlines_are_capped_and_a_stream_bounded_by_its_total_duration():
    p = planner()
    assert p.plan(ask(deadline_ms=5_000), STARTED).deadline == STARTED + 5
    assert p.plan(ask(deadline_ms=600_000), STARTED).deadline == STARTED + 60
    assert p.plan(ask(stream=True), STARTED, stream=True).deadline == STARTED + 10


def test_what_is_cached_and_for_how_long():
    p = planner(features={"faq": {"cache_ttl_s": 5}})
    deterministic = p.plan(ask(temperature=0.0), STARTED)
    assert deterministic.cache_key is not None and deterministic.cache_ttl_s == 300  # [cache] ttl_s
    assert p.plan(ask(temperature=0.0), STARTED).cache_key == deterministic.cache_key
    assert p.plan(ask("other", temperature=0.0), STARTED).cache_key != deterministic.cache_key
    assert p.plan(ask(temperature=0.0, feature="faq", route="cheap"), STARTED).cache_ttl_s == 5  # the feature's wins
    assert p.plan(ask(temperature=0.0, route="cheap"), STARTED).cache_ttl_s == 30
    assert p.plan(ask(temperature=0.0, route="fresh"), STARTED).cache_key is None  # a route that never caches
    assert p.plan(ask(temperature=0.0, cache="bypass"), STARTED).cache_key is None
    assert planner(cache=False).plan(ask(temperature=0.0), STARTED).cache_key is None
    beta = p.plan(ask(temperature=0.0, betas=["files-api-2025-04-14"]), STARTED)
    assert beta.headers == {"anthropic-beta": "files-api-2025-04-14"} and beta.cache_key != deterministic.cache_key


def test_a_named_model_leads_and_model_fallback_decides_the_rest():
    p = planner()
    led = p.plan(ask(model="claude-opus-4-6"), STARTED).route.targets
    assert [t.model for t in led] == ["claude-opus-4-6", "claude-sonnet-4-6", "claude-haiku-4-5"]
    assert led[0].hedge_after_ms == 500  # the lead keeps the route's first target's settings
    alone = p.plan(ask(model="claude-opus-4-6", model_fallback=False), STARTED).route.targets
    assert [t.model for t in alone] == ["claude-opus-4-6"]


def test_a_prompt_renders_and_brings_its_settings_and_route(tmp_path):
    p = planner(tmp_path)
    plan = p.plan(Complete(id=1, prompt="greet", vars={"who": "Ada"}), STARTED)
    assert plan.version is not None and (plan.version.name, plan.version.version) == ("greet", 1)
    assert plan.body["system"] == "You greet Ada." and plan.body["messages"] == [Message("user", "Say hello to Ada.")]
    assert plan.body["max_tokens"] == 77 and plan.body["temperature"] == 0.0 and plan.route_name == "cheap"
    assert plan.cache_key is not None and plan.cache_ttl_s == 30
    assert p.plan(Complete(id=1, prompt="greet", vars={"who": "Ada"}, route="default"), STARTED).route_name == "default"


def test_a_quality_switch_moves_a_prompt_but_not_a_request_that_names_its_route(tmp_path):
    p = planner(tmp_path, switched={"greet": "safe"})
    assert p.plan(Complete(id=1, prompt="greet", vars={"who": "Ada"}), STARTED).route_name == "safe"
    assert p.plan(Complete(id=1, prompt="greet", vars={"who": "Ada"}, route="cheap"), STARTED).route_name == "cheap"


@pytest.mark.parametrize(("request_", "code", "message"), [
    (Complete(id=1, prompt="greet", messages=[Message("user", "x")]), Code.BAD_REQUEST, "messages: send either"),
    (Complete(id=1, prompt="greet", system="s"), Code.BAD_REQUEST, "system: a prompt brings its own"),
    (Complete(id=1), Code.BAD_REQUEST, "messages: at least one message is required"),
    (ask(route="nowhere"), Code.BAD_REQUEST, "route: no route named 'nowhere' (routes: cheap, default, fresh, judge, safe)"),
    (Complete(id=1, prompt="absent"), Code.PROMPT_NOT_FOUND, "no prompt named 'absent'"),
])
def test_requests_that_cannot_be_planned(tmp_path, request_, code, message):
    with pytest.raises(SidecardError) as refused:
        planner(tmp_path).plan(request_, STARTED)
    assert refused.value.code == code and message in refused.value.message


def test_a_route_not_there_names_at_most_ten_of_the_routes_there_are():
    """As the admin route ops do: a typo is seen at once, and a config of many routes does not make a long error."""
    many = {f"r{n:02}": {"targets": [{"model": "claude-haiku-4-5"}]} for n in range(25)}
    config = from_mapping({"routes": many, "requests": {"default_route": "r00"}})
    p = Planner(config, PromptStore(None), RouteTable(config.routes), cache=True)
    with pytest.raises(SidecardError) as refused:
        p.plan(ask(route="r99" * 50), STARTED)
    listed = ", ".join(["judge", *(f"r{n:02}" for n in range(9))])  # the [quality] judge's route is there too
    assert refused.value.message == f"route: no route named {('r99' * 50)[:80]!r} (routes: {listed}, and 16 more)"


def test_a_soft_budget_reroute_takes_the_whole_route_and_recomputes_the_cache_key():
    p = planner()
    plan = p.plan(ask(temperature=0.0, model="claude-opus-4-6"), STARTED)
    cheap = p.routes.get("cheap")
    cheaper = p.reroute(plan, "cheap", cheap)
    assert cheaper.route_name == "cheap" and cheaper.route is cheap  # the pinned model goes with the route
    assert cheaper.cache_key not in (None, plan.cache_key) and cheaper.cache_ttl_s == 30
    uncached = p.plan(ask(), STARTED)
    assert p.reroute(uncached, "cheap", cheap).cache_key is None


def test_the_worst_case_cost_counts_the_dearest_target_or_a_target_and_its_hedge():
    prices = PriceTable(from_mapping({}).prices)
    plan = planner().plan(ask("x" * 4000, max_tokens=1000), STARTED)  # 1,000 input tokens, 1,000 output
    sonnet, haiku = (1000 * 3 + 1000 * 15) / 1e6, (1000 * 1 + 1000 * 5) / 1e6
    assert worst_cost_usd(plan, prices) == pytest.approx(sonnet + haiku)  # the sonnet target is hedged on haiku
    unhedged = msgspec.structs.replace(plan, route=planner().routes.get("cheap"))
    assert worst_cost_usd(unhedged, prices) == pytest.approx(haiku)


def test_token_estimates_count_text_images_and_tool_json():
    image = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "A" * 100_000}}
    assert estimate_input_tokens("four", [Message("user", [image, {"type": "text", "text": "abcd"}])], {}) == 2 + 1600
    tools = {"tools": msgspec.Raw(b'[{"name":"t"}]')}
    assert estimate_input_tokens(None, [Message("user", "")], tools) == len(b'[{"name":"t"}]') / 4
