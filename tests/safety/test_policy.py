"""The data policy: refusals, scrubbing across a feature's and a route's policy, and provider/region pins."""

import pytest

from sidecard.config import Target
from sidecard.safety.policy import DataPolicies, PolicyRefusal
from sidecard.safety.settings import parse

ANTHROPIC = Target(model="claude-sonnet-4-6")
BEDROCK_EU = Target(model="anthropic.claude-sonnet-4-6", provider="bedrock", region="eu-central-1")
BEDROCK_US = Target(model="anthropic.claude-sonnet-4-6", provider="bedrock", region="us-east-1")
VERTEX_EU = Target(model="claude-sonnet-4-6", provider="vertex", region="europe-west1", project_id="p")


def policies(**data):
    return DataPolicies(parse({"data": data}).data)


def test_no_policy_means_none():
    assert policies().for_request(feature="default", route="default") is None
    assert policies(features={"f": {}}).for_request(feature="made-up", route=None) is None


def test_a_pinned_feature_only_gets_its_allowed_targets_in_route_order():
    outbound = policies(features={"eu": {"providers": ["bedrock"], "regions": ["eu-*"]}}).for_request(feature="eu", route="default")
    assert outbound.pinned
    assert outbound.allowed_targets([ANTHROPIC, BEDROCK_US, BEDROCK_EU, VERTEX_EU]) == [BEDROCK_EU]
    assert outbound.permits(BEDROCK_EU) and not outbound.permits(BEDROCK_US) and not outbound.permits(ANTHROPIC)


@pytest.mark.parametrize(
    ("pin", "targets", "message"),
    [
        ({"providers": ["bedrock"]}, [ANTHROPIC, VERTEX_EU],
         "no target this feature may use: provider anthropic is not allowed (only bedrock)"),
        ({"regions": ["eu-*"]}, [ANTHROPIC], "no target this feature may use: a target without a region is not allowed (only eu-*)"),
        ({"regions": ["eu-*"]}, [BEDROCK_US], "no target this feature may use: region us-east-1 is not allowed (only eu-*)"),
    ],
)
def test_a_pinned_feature_with_no_allowed_target_is_refused_never_sent_elsewhere(pin, targets, message):
    outbound = policies(features={"f": pin}).for_request(feature="f", route=None)
    refusal = outbound.allowed_targets(targets)
    assert refusal == PolicyRefusal(("feature:f:pin",), message)


def test_the_feature_and_route_policies_both_apply():
    data = policies(features={"f": {"scrub": ["email"], "providers": ["bedrock", "anthropic"]}},
                    routes={"r": {"scrub": ["phone"], "refuse": ["card"], "restore": False, "regions": ["eu-*"]}})
    outbound = data.for_request(feature="f", route="r")
    assert not outbound.restore
    assert outbound.allowed_targets([ANTHROPIC, VERTEX_EU, BEDROCK_EU]) == [BEDROCK_EU]
    (text,), mapping = outbound.scrub(["mail a@b.io or call +44 20 7946 0958"])
    assert text == "mail [EMAIL_1] or call [PHONE_1]" and mapping.rules == ["email", "phone"]
    refusal = outbound.refused(["my card is 4111 1111 1111 1111"])
    assert refusal == PolicyRefusal(("route:r:refuse:card",), "the request carries data this route may not send (card)")
    assert outbound.refused(["no card"]) is None
    assert data.for_request(feature="f", route="r") is outbound  # compiled once per configured pair


def test_named_patterns_scrub_and_refuse():
    outbound = policies(features={"hr": {"scrub": ["employee_id"], "refuse": ["salary"],
                                         "patterns": {"employee_id": r"EMP-[0-9]{6}", "salary": r"(?i)salary:\s*\$?[0-9]"}}}
                        ).for_request(feature="hr", route=None)
    assert outbound.scrub(["EMP-123456 asked"])[0] == ["[EMPLOYEE_ID_1] asked"]
    assert outbound.refused(["Salary: $90,000"]).rules == ("feature:hr:refuse:salary",)


def test_one_pattern_name_means_one_pattern():
    with pytest.raises(ValueError, match=r"safety.data.routes.r.patterns.emp: differs from the pattern of that name in features.f"):
        parse({"data": {"features": {"f": {"patterns": {"emp": "E[0-9]"}}}, "routes": {"r": {"patterns": {"emp": "X"}}}}})


def test_a_route_whose_own_pins_forbid_all_its_targets_is_a_config_problem():
    data = policies(routes={"eu": {"regions": ["eu-*"]}})
    assert data.route_problem("eu", [BEDROCK_US]) == (
        "data.routes.eu: no target this route may use: region us-east-1 is not allowed (only eu-*)")
    assert data.route_problem("eu", [BEDROCK_US, BEDROCK_EU]) is None
    assert data.route_problem("other", [BEDROCK_US]) is None
