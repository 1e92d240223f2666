"""The pure parts of fleet mode's wiring: a sidecar's share of each limit, the canary verdict on the fleet's
counts, the config hash the fleet compares, and check-config on a [fleet] section."""

from __future__ import annotations

import subprocess
import sys

import pytest

from sidecard.config import MonitorSettings, from_mapping
from sidecard.fleet.gate import local_share
from sidecard.fleet.node import config_hash
from sidecard.fleet.quality import Counts, canary_verdict, merged

FLEET = {"url": "redis://sidecard:hunter2-secret@10.0.0.5:6379/0", "expected_instances": 4}


def config(**sections):
    return from_mapping({"fleet": FLEET, **sections})


def test_a_sidecar_cut_off_from_the_store_keeps_its_share_of_each_limit():
    c = config(rate_limits=[{"scope": "user", "requests_per_minute": 40, "tokens_per_minute": 4000}],
               budgets=[{"scope": "global", "window": "day", "soft_usd": 8.0, "hard_usd": 10.0}])
    share = local_share(c, c.fleet)
    assert (share.rate_limits[0].requests_per_minute, share.rate_limits[0].tokens_per_minute) == (10, 1000)
    assert (share.budgets[0].soft_usd, share.budgets[0].hard_usd) == (2.0, 2.5)
    assert c.budgets[0].hard_usd == 10.0  # the configured limits are untouched


def test_the_config_hash_ignores_what_differs_per_host_and_never_holds_the_store():
    a = config(server={"socket": "/run/a/app.sock"})
    b = config(server={"socket": "/run/b/app.sock"}, fleet={**FLEET, "instance": "web-2"})
    assert config_hash(a) == config_hash(b)
    assert config_hash(a) != config_hash(config(cache={"ttl_s": 5}))


def test_check_config_names_the_store_without_its_password(tmp_path):
    path = tmp_path / "fleet.toml"
    path.write_text('[fleet]\nurl = "redis://sidecard:hunter2-secret@10.0.0.5:6379/0"\nnamespace = "shop"\n')
    done = subprocess.run([sys.executable, "-m", "sidecard", "check-config", str(path)], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    assert "fleet: redis://sidecard@10.0.0.5:6379/0 namespace shop" in done.stdout and "hunter2" not in done.stdout
    path.write_text('[fleet]\nurl = "memcached://hunter2-secret@host"\n')
    bad = subprocess.run([sys.executable, "-m", "sidecard", "check-config", str(path)], capture_output=True, text=True, timeout=30)
    assert bad.returncode == 2 and "use redis://, rediss:// or unix://" in bad.stderr and "hunter2" not in bad.stderr


SETTINGS = MonitorSettings(min_samples=5, baseline=None, threshold=0.6, max_drop=0.1, baseline_samples=10, check_rate_threshold=0.2)


def counts(scores: list[float], checked: int = 0, failures: dict[str, int] | None = None) -> Counts:
    return Counts(sum(scores), len(scores), checked, failures or {})


@pytest.mark.parametrize(
    ("canary", "stable", "fails"),
    [
        (counts([0.2] * 4), counts([]), False),  # too few answers judged, fleet-wide
        (counts([0.5] * 5), counts([]), True),  # below the threshold
        (counts([0.75] * 5), counts([0.9] * 10), True),  # more than max_drop below stable's fleet mean
        (counts([0.75] * 5), counts([0.9] * 9), False),  # stable's mean is not a baseline yet: the threshold
        (counts([0.9] * 5, checked=10, failures={"refusal": 3}), counts([]), True),  # a check failing on 30%
        (counts([0.9] * 5, checked=10, failures={"refusal": 2}), counts([]), False),  # 20% is not more than 20%
    ],
)
def test_a_canary_verdict_counts_the_fleets_sample(canary, stable, fails):
    assert (canary_verdict(canary, stable, SETTINGS) is not None) is fails


def test_a_version_is_judged_over_every_model():
    window = {("echo", "2", "sonnet"): counts([0.5, 0.5]), ("echo", "2", "haiku"): counts([0.2], 3, {"refusal": 1}),
              ("echo", "1", "sonnet"): counts([0.9])}
    total = merged(window, "echo", "2")
    assert total == Counts(score_sum=pytest.approx(1.2), scores=3, checked=3, failures={"refusal": 1})
