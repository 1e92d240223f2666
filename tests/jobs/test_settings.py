"""`[jobs]` settings: defaults that work, and a bad value refused with its name."""

from __future__ import annotations

import msgspec
import pytest

from sidecard.jobs.settings import JobsSettings


def test_defaults_are_valid_and_within_the_apis_limits():
    settings = JobsSettings()
    assert not settings.enabled and settings.synchronous == "full" and settings.price_multiplier == 0.5
    assert settings.batch_max_requests <= 100_000 and settings.batch_max_bytes <= 256 * 1024 * 1024
    assert settings.webhook.allowed_prefixes == []


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"batch_max_requests": 100_001}, "batch_max_requests must be at most 100000"),
        ({"batch_max_bytes": 300 * 1024 * 1024}, "batch_max_bytes must be within"),
        ({"batch_max_age_s": 0}, "batch_max_age_s must be positive"),
        ({"min_slack_s": -1}, "min_slack_s must not be negative"),
        ({"price_multiplier": 0}, "price_multiplier must be within (0, 1]"),
        ({"poll_multiplier": 0.5}, "poll_multiplier must be at least 1"),
        ({"engine_concurrency": 0}, "engine_concurrency must be at least 1"),
        ({"synchronous": "off"}, "Invalid enum value 'off' - at `$.synchronous`"),
        ({"batch_size": 10}, "unknown field `batch_size`"),
        ({"webhook": {"allowed_prefixes": ["https://app/hooks/"]}}, "webhook.secret_file is required"),
        ({"webhook": {"allowed_prefixes": ["ftp://app/x"], "secret_file": "s"}}, "must be an http(s) URL with a path"),
        ({"webhook": {"allowed_prefixes": ["https://app"], "secret_file": "s"}}, "must be an http(s) URL with a path"),
    ],
)
def test_a_bad_value_is_refused_by_name(raw, message):
    with pytest.raises(msgspec.ValidationError) as caught:
        msgspec.convert(raw, JobsSettings)
    assert message in str(caught.value)


def test_the_daemon_config_takes_jobs_and_names_a_bad_key():
    from sidecard.config import ConfigError, from_mapping

    config = from_mapping({"jobs": {"enabled": True, "batch_max_age_s": 5}})
    assert config.jobs.enabled and config.jobs.batch_max_age_s == 5
    with pytest.raises(ConfigError, match=r"jobs: batch_max_requests must be at most 100000"):
        from_mapping({"jobs": {"batch_max_requests": 200_000}})
    with pytest.raises(ConfigError, match=r"jobs.webhook.allowed_prefix: unknown key"):
        from_mapping({"jobs": {"webhook": {"allowed_prefix": []}}})
