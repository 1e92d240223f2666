"""The [fleet] settings: urls, defaults, and what a scope does while the store cannot be reached."""

from __future__ import annotations

import msgspec
import pytest

from sidecard.fleet.settings import FleetSettings, StoreAddress, StoreSecretError, parse_url



def settings(**fields) -> FleetSettings:
    return msgspec.convert({"url": "redis://localhost", **fields}, FleetSettings)


@pytest.mark.parametrize("url, address", [
    ("redis://cache.internal", StoreAddress("tcp", host="cache.internal")),
    ("redis://cache.internal:6380/2", StoreAddress("tcp", host="cache.internal", port=6380, db=2)),
    ("rediss://app:s%40cret@cache.internal/1", StoreAddress("tls", host="cache.internal", db=1, username="app", password="s@cret")),
    ("redis://[::1]:7000", StoreAddress("tcp", host="::1", port=7000)),
    ("unix:///run/redis/redis.sock", StoreAddress("unix", path="/run/redis/redis.sock")),
    ("unix://:pw@/run/redis/redis.sock?db=3", StoreAddress("unix", path="/run/redis/redis.sock", db=3, password="pw")),
])
def test_urls(url, address):
    assert parse_url(url) == address


@pytest.mark.parametrize("url, problem", [
    ("http://cache", "use redis://, rediss:// or unix://"),
    ("cache.internal:6379", "use redis://"),
    ("redis://", "no host"),
    ("redis://cache:99999", "port"),
    ("redis://cache/zero", "database must be a number"),
    ("unix://", "needs a socket path"),
])
def test_bad_urls_say_what_is_wrong(url, problem):
    with pytest.raises(ValueError, match=problem):
        parse_url(url)
    with pytest.raises(msgspec.ValidationError, match=problem):
        settings(url=url)


def test_a_password_is_never_shown():
    address = parse_url("rediss://app:hunter2@cache.internal:6380/0")
    assert "hunter2" not in str(address) + repr(address)
    assert str(address) == "rediss://app@cache.internal:6380/0"


def test_the_password_can_come_from_the_environment():
    fleet = settings(url="redis://cache.internal", password_env="FLEET_PASSWORD")
    assert fleet.address({"FLEET_PASSWORD": "from-env"}).password == "from-env"
    with pytest.raises(StoreSecretError, match="FLEET_PASSWORD"):
        fleet.address({})


def test_the_password_can_come_from_a_file(tmp_path):
    (tmp_path / "password").write_text("from-file\n")
    assert settings(url="redis://cache.internal", password_file=str(tmp_path / "password")).address().password == "from-file"
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(StoreSecretError, match="is empty"):
        settings(url="redis://cache.internal", password_file=str(tmp_path / "empty")).address()
    # A relative path is a systemd credential: in $CREDENTIALS_DIRECTORY under systemd, else beside the config.
    (tmp_path / "creds").mkdir()
    (tmp_path / "creds" / "store_password").write_text("credential\n")
    (tmp_path / "store_password").write_text("source\n")
    fleet = settings(url="redis://cache.internal", password_file="store_password")
    assert fleet.address({"CREDENTIALS_DIRECTORY": str(tmp_path / "creds")}, config_dir=str(tmp_path)).password == "credential"
    assert fleet.address({}, config_dir=str(tmp_path)).password == "source"
    with pytest.raises(msgspec.ValidationError, match="not both"):
        settings(url="redis://cache.internal", password_env="X", password_file=str(tmp_path / "password"))


def test_defaults():
    fleet = settings()
    assert (fleet.namespace, fleet.op_timeout_s, fleet.expected_instances) == ("sidecard", 0.005, 1)
    assert fleet.instance_name().rsplit("-", 1)[1].isdigit()  # hostname-pid
    assert settings(instance="web-7").instance_name() == "web-7"
    assert fleet.cache.l2 and fleet.cache.max_entry_bytes == 256 << 10


def test_fail_modes_per_scope_and_the_local_share():
    fleet = settings(budgets_on_failure="closed", expected_instances=4,
                     on_failure={"user": "local_share", "feature:search": "closed", "feature": "local_share"})
    assert fleet.fail_mode("budget", "global") == "closed"
    assert fleet.fail_mode("rate_limit", "global") == "local_share"
    assert fleet.fail_mode("budget", "user") == "local_share"
    assert fleet.fail_mode("budget", "feature:search") == "closed"
    assert fleet.fail_mode("budget", "feature:chat") == "local_share"
    assert fleet.local_share(100.0) == 25.0


@pytest.mark.parametrize("fields, problem", [
    ({"namespace": "{app}"}, "namespace"),
    ({"on_failure": {"tenant": "closed"}}, "on_failure scope"),
    ({"on_failure": {"global": "open"}}, "Invalid enum value .open."),
    ({"heartbeat_ttl_s": 5.0}, "heartbeat_ttl_s must be longer"),
    ({"op_timeout_ms": 0}, "op_timeout_ms"),
    ({"surprise": 1}, "surprise"),
])
def test_bad_settings_are_refused(fields, problem):
    with pytest.raises(msgspec.ValidationError, match=problem):
        settings(**fields)
