"""Per-app access control: identities from peer credentials or tokens, and what each may use."""

import os

import pytest

from sidecard.safety.access import (
    ANYONE,
    AccessControl,
    Credentials,
    CredentialsError,
    Denied,
    RequestFields,
    authorise,
    hash_token,
    load_credentials,
    new_token,
)
from sidecard.safety.settings import parse

APPS = {
    "billing": {"uids": [1001], "features": ["billing", "invoice-*"], "models": ["claude-haiku-*"], "max_tokens": 1000},
    "support": {"gids": [2000], "prompts": ["support-reply"], "routes": ["default"]},
}


def control(credentials=None, **access):
    return AccessControl(parse({"access": {"enabled": True, "apps": APPS, **access}}).access, credentials)


def test_off_by_default_everyone_may_use_everything():
    gate = AccessControl(parse({}).access)
    assert gate.for_peer(4242, 4242) is ANYONE and gate.for_token(None) is ANYONE
    assert authorise(ANYONE, RequestFields("anything", "any", "any", "any-model", 10**6)) is None


def test_peers_map_by_uid_first_then_gid_and_unknown_peers_are_denied():
    gate = control()
    assert gate.for_peer(1001, 2000).name == "billing"  # the uid wins over the gid
    assert gate.for_peer(5, 2000).name == "support"
    denied = gate.for_peer(5, 5)
    assert isinstance(denied, Denied) and denied.key == "identity"
    assert isinstance(gate.for_peer(None, None), Denied)


@pytest.mark.parametrize(
    ("fields", "denied_key"),
    [
        (RequestFields("billing", model="claude-haiku-4-5"), None),
        (RequestFields("invoice-eu", model="claude-haiku-4-5", max_tokens=1000), None),
        (RequestFields("support"), "feature"),
        (RequestFields("billing", model="claude-opus-4-6"), "model"),
        (RequestFields("billing", max_tokens=1001), "max_tokens"),
    ],
)
def test_an_identity_cannot_exceed_its_features_models_or_max_tokens(fields, denied_key):
    result = authorise(control().for_peer(1001, 0), fields)
    assert (result.key if result else None) == denied_key
    if result:
        assert result.message.startswith("app 'billing' may")


def test_routes_and_prompts_are_limited_too():
    support = control().for_peer(0, 2000)
    assert authorise(support, RequestFields("f", route="default", prompt="support-reply")) is None
    assert authorise(support, RequestFields("f", route="judge", prompt="support-reply")).key == "route"
    assert authorise(support, RequestFields("f", prompt="ticket-triage")).key == "prompt"
    # An app limited to prompts sent messages of its own, free text, and was served (a fresh-clone trial).
    denied = authorise(support, RequestFields("f", route="default"))
    assert denied.key == "prompt" and "not messages of its own" in denied.message


def test_tokens_identify_their_app_and_only_hashes_are_kept():
    billing, support, rotated = new_token(), new_token(), new_token()
    assert billing != support and len(billing) > 40
    credentials = Credentials([("billing", bytes.fromhex(hash_token(billing)[7:])),
                               ("support", bytes.fromhex(hash_token(support)[7:])),
                               ("support", bytes.fromhex(hash_token(rotated)[7:]))])
    gate = control(credentials)
    assert gate.for_token(billing).name == "billing"
    assert gate.for_token(rotated).name == "support"
    assert gate.for_token("sc-wrong").key == "identity"
    assert gate.for_token(None).message == "no app token (send x-api-key)"
    view = gate.describe()
    assert [row["app"] for row in view] == ["billing", "support"] and view[0]["token"] is True
    assert billing not in repr(view) and hash_token(billing)[7:] not in repr(view)


def write(path, text, mode):
    path.write_text(text)
    os.chmod(path, mode)
    return str(path)


def test_the_credentials_file_loads(tmp_path):
    token = new_token()
    path = write(tmp_path / "apps.credentials",
                 f'[tokens]\nbilling = "{hash_token(token)}"\nsupport = ["{hash_token("a")}", "{hash_token("b")}"]\n', 0o640)
    credentials = load_credentials(path, list(APPS))
    assert credentials.identify(token) == "billing" and credentials.identify("b") == "support"
    assert credentials.apps() == {"billing", "support"}


@pytest.mark.parametrize(
    ("text", "mode", "message"),
    [
        ('[tokens]\nbilling = "sha256:00"\n', 0o644, "mode 0644 lets others read or change it (use 0600 or 0640)"),
        ('[tokens]\nbilling = "sha256:00"\n', 0o660, "mode 0660 lets others read or change it"),
        ('[tokens]\nbilling = "sha256:00"\n', 0o600, 'tokens.billing[0]: not "sha256:" and 64 hex digits'),
        (f'[tokens]\nbilling = "sha256:{"zz" * 32}"\n', 0o600, "tokens.billing[0]: not hex"),
        (f'[tokens]\nstranger = "{hash_token("x")}"\n', 0o600, "tokens.stranger: no such app in [safety.access.apps]"),
        ('[tokens]\nbilling = 5\n', 0o600, "tokens.billing: expected a hash or a list of hashes"),
        ('[tokens]\nbilling = []\n', 0o600, "tokens.billing: expected a hash or a list of hashes"),
        ('[tokens]\nbilling = [1]\n', 0o600, 'tokens.billing[0]: not "sha256:" and 64 hex digits'),
        ('[token]\n', 0o600, "token: unknown key"),
        ("tokens = [", 0o600, "invalid TOML"),
    ],
)
def test_a_bad_credentials_file_is_refused_with_the_reason(tmp_path, text, mode, message):
    path = write(tmp_path / "apps.credentials", text, mode)
    with pytest.raises(CredentialsError) as info:
        load_credentials(path, list(APPS))
    assert str(info.value).startswith(f"credentials file {path}: ") and message in str(info.value)


def test_the_credentials_file_must_be_a_regular_file_owned_by_us(tmp_path):
    path = write(tmp_path / "real", "[tokens]\n", 0o600)
    with pytest.raises(CredentialsError, match="cannot open"):
        load_credentials(str(tmp_path / "missing"), [])
    os.symlink(path, tmp_path / "link")
    with pytest.raises(CredentialsError, match="cannot open"):  # O_NOFOLLOW
        load_credentials(str(tmp_path / "link"), [])
    with pytest.raises(CredentialsError, match="not a regular file"):
        load_credentials(str(tmp_path), [])


@pytest.mark.skipif(os.getuid() != 0, reason="giving a file to another user needs root")
def test_a_credentials_file_owned_by_another_user_is_refused(tmp_path):
    path = write(tmp_path / "theirs", "[tokens]\n", 0o600)
    os.chown(path, 12345, 12345)
    with pytest.raises(CredentialsError, match="owned by uid 12345, not by sidecard's user or root"):
        load_credentials(path, [], owner_uid=os.getuid())


def test_a_model_pattern_matches_bedrock_and_vertex_ids_too():
    """`models = ["claude-sonnet-4-*"]` refused `anthropic.claude-sonnet-4-6-v1:0`, so safety.md's own `billing`
    app could never use its `eu` route (a third fresh-clone trial)."""
    billing = control().for_peer(1001, 0)
    for model in ("anthropic.claude-haiku-4-5-20251001-v1:0", "eu.anthropic.claude-haiku-4-5-20251001-v1:0",
                  "claude-haiku-4-5@20251001"):
        assert authorise(billing, RequestFields("billing", model=model)) is None, model
    assert authorise(billing, RequestFields("billing", model="anthropic.claude-opus-4-6-v1:0")).key == "model"
