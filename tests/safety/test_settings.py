"""`[safety]` settings: off by default, and every bad value refused with its key named."""

import tomllib

import pytest

from sidecard.safety.settings import JsonSchemaCheck, JudgeCheck, PiiCheck, RegexCheck, SafetySettings, parse

GOOD = """
[guardrails.prompts.support-reply]
on_block = "fallback"
checks = [
  { kind = "regex", name = "internal-ids", pattern = "INTERNAL-[0-9]+", action = "redact" },
  { kind = "blocklist", words = ["Competitor Corp"], action = "block" },
  { kind = "pii", kinds = ["email", "card"], action = "redact" },
  { kind = "json_schema", action = "retry" },
  { kind = "length", max_chars = 4000, action = "block" },
  { kind = "judge", policy = "No medical advice.", sample_rate = 0.1, action = "flag" },
]

[injection.prompts.support-reply]
delimit = ["question"]
action = "route"
route = "strict"

[data.features.billing]
scrub = ["email", "phone", "employee_id"]
refuse = ["card"]
patterns = { employee_id = "EMP-[0-9]{6}" }
providers = ["bedrock"]
regions = ["eu-*"]

[access]
enabled = true
credentials_file = "apps.credentials"
[access.apps.billing]
uids = [1001]
features = ["billing", "billing-*"]
max_tokens = 2000
rate_limit = { requests_per_minute = 60 }
budget = { window = "day", hard_usd = 20.0 }

[audit]
features = ["billing"]
fsync = "interval"
"""


def test_everything_is_off_by_default():
    settings = parse({})
    assert settings == SafetySettings()
    assert not settings.access.enabled
    assert not settings.audit.enabled
    assert not settings.guardrails.prompts and not settings.data.features and not settings.injection.prompts


def test_a_full_config_loads():
    settings = parse(tomllib.loads(GOOD))
    checks = settings.guardrails.prompts["support-reply"].checks
    assert [type(c) for c in checks][:1] == [RegexCheck] and isinstance(checks[2], PiiCheck)
    assert isinstance(checks[3], JsonSchemaCheck) and isinstance(checks[5], JudgeCheck)
    assert settings.access.apps["billing"].models == ["*"]
    assert settings.audit.audits("billing") and not settings.audit.audits("default")
    assert settings.route_references() == [("injection.prompts.support-reply.route", "strict")]
    judged = parse({"guardrails": {"routes": {"r": {"checks": [{"kind": "judge", "policy": "p", "route": "judge2"}]}}}})
    assert judged.route_references() == [("guardrails.routes.r.checks[0].route", "judge2")]


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"guardrails": {"prompts": {"p": {"checks": [{"kind": "regex", "pattern": "("}]}}}},
         "safety.guardrails.prompts.p.checks[0].pattern: invalid regular expression"),
        ({"guardrails": {"prompts": {"p": {"checks": [{"kind": "regex", "pattern": "a*"}]}}}},
         "safety.guardrails.prompts.p.checks[0].pattern: the pattern matches the empty string"),
        ({"guardrails": {"features": {"ok": {}, "bad": {"checks": [{"kind": "length", "max_chars": 9, "action": "redact"}]}}}},
         "safety.guardrails.features.bad.checks[0].action: 'redact' is not possible for a length check"),
        ({"guardrails": {"routes": {"r": {"checks": [{"kind": "nope"}]}}}},
         "safety.guardrails.routes.r.checks[0].kind: invalid value 'nope'"),
        ({"guardrails": {"prompts": {"p": {"checks": [{"kind": "pii", "kinds": ["email", "dna"]}]}}}},
         "safety.guardrails.prompts.p.checks[0].kinds[1]: unknown kind 'dna'"),
        ({"guardrails": {"prompts": {"p": {"checks": [{"kind": "blocklist", "words": []}]}}}},
         "safety.guardrails.prompts.p.checks[0].words: the list is empty"),
        ({"guardrails": {"prompts": {"p": {"checks": [{"kind": "length"}]}}}},
         "safety.guardrails.prompts.p.checks[0]: set min_chars, max_chars or both"),
        ({"guardrails": {"prompts": {"p": {"checks": [{"kind": "json_schema", "schema": {"type": "thing"}}]}}}},
         "safety.guardrails.prompts.p.checks[0].schema.type: unknown type 'thing'"),
        ({"guardrails": {"prompts": {"p": {"checks": [{"kind": "judge", "policy": "x", "sample_rate": 2}]}}}},
         "safety.guardrails.prompts.p.checks[0].sample_rate: expected float <= 1.0"),
        ({"guardrails": {"prompts": {"p": {"checks": [{"kind": "regex", "pattern": "a", "name": "x"},
                                                      {"kind": "regex", "pattern": "b", "name": "x"}]}}}},
         "safety.guardrails.prompts.p.checks[1].name: 'x' is used twice"),
        ({"guardrails": {"prompts": {"p": {"stream_hold_chars": -1}}}},
         "safety.guardrails.prompts.p.stream_hold_chars: expected int >= 0"),
        ({"injection": {"prompts": {"p": {"action": "route"}}}},
         'safety.injection.prompts.p.route: action = "route" needs the route'),
        ({"injection": {"features": {"f": {"delimit": ["*"]}}}},
         "safety.injection.features.f.delimit: only prompts have variables to delimit"),
        ({"injection": {"features": {"f": {"threshold": 1.5}}}},
         "safety.injection.features.f.threshold: expected float <= 1.0"),
        ({"injection": {"prompts": {"p": {"delimit": ["not a name"]}}}},
         "safety.injection.prompts.p.delimit[0]: expected str matching regex"),
        ({"data": {"features": {"f": {"scrub": ["email"], "bogus": 1}}}}, "safety.data.features.f.bogus: unknown key"),
        ({"data": {"routes": {"r": {"providers": ["azure"]}}}}, "safety.data.routes.r.providers[0]: invalid enum value 'azure'"),
        ({"data": {"features": {"f": {"scrub": ["email"], "refuse": ["email"]}}}},
         "safety.data.features.f.refuse: 'email' is also scrubbed"),
        ({"data": {"features": {"f": {"patterns": {"Bad-Name": "x"}}}}}, "safety.data.features.f.patterns.Bad-Name: a name is"),
        ({"data": {"features": {"f": {"patterns": {"email": "x"}}}}}, "safety.data.features.f.patterns.email: the name of a built-in kind"),
        ({"data": {"features": {"f": {"patterns": {"emp": "(["}}}}}, "safety.data.features.f.patterns.emp: invalid regular expression"),
        ({"data": {"features": {"f": {"refuse": ["emp"]}}}}, "safety.data.features.f.refuse[0]: unknown kind 'emp'"),
        ({"access": {"enabled": True}}, "safety.access.apps: access control is enabled but no app is defined"),
        ({"access": {"apps": {"a": {"uids": [5]}, "b": {"uids": [5]}}}}, "safety.access.apps.b.uids: 5 also belongs to app 'a'"),
        ({"access": {"apps": {"a": {"gids": [-1]}}}}, "safety.access.apps.a.gids[0]: expected int >= 0"),
        ({"access": {"apps": {"a": {"budget": {"window": "day"}}}}}, "safety.access.apps.a.budget: set soft_usd, hard_usd or both"),
        ({"access": {"apps": {"a": {"rate_limit": {}}}}}, "safety.access.apps.a.rate_limit: set requests_per_minute"),
        ({"access": {"apps": {"a": {"max_tokens": 0}}}}, "safety.access.apps.a.max_tokens: expected int >= 1"),
        ({"audit": {"fsync": "sometimes"}}, "safety.audit.fsync: invalid enum value 'sometimes'"),
        ({"audit": {"max_file_bytes": 10}}, "safety.audit.max_file_bytes: expected int >= 4096"),
        ({"audits": {}}, "safety.audits: unknown key"),
    ],
)
def test_bad_settings_are_refused_with_the_key_named(raw, message):
    with pytest.raises(ValueError) as info:
        parse(raw)
    assert str(info.value).startswith(message), str(info.value)
