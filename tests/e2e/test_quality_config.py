"""Quality settings as an operator writes them: empty values mean "off", bad sinks are config errors (never a crash
at start), and the judge works without a prompts directory. (The docs' config examples: tests/test_docs_config.py.)"""

import subprocess
import sys
from pathlib import Path

import pytest
from prometheus_client import generate_latest

from sidecard.config import ConfigError, load
from tests.e2e.test_quality import JUDGE_MODEL, MONITOR, PRIMARY, until
from tests.harness import connect

def check_config(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sidecard", "check-config", str(path)], capture_output=True, text=True, timeout=30)


async def test_empty_sink_values_mean_off_and_the_daemon_starts(daemon_factory, short_tmp):
    d = await daemon_factory(quality={"enabled": True, "webhook_url": "http://127.0.0.1:9/alerts", "command": [], "review_log": "",
                                      "prompts": {"p": {"fallback_route_on_alert": ""}}})  # fmt: skip
    assert d.config.quality.command is None and d.config.quality.review_log is None
    assert d.config.quality.prompts["p"].fallback_route_on_alert is None
    assert d.alert_sinks is not None and [s.name for s in d.alert_sinks._sinks] == ["webhook"]
    off = await daemon_factory(quality={"enabled": True, "webhook_url": "", "command": []})
    assert off.alert_sinks is None


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ('webhook_url = "ftp://alerts.example.com/x"', "quality: webhook_url: not an http:// or https:// URL with a host"),
        ('webhook_url = "https://"', "quality: webhook_url: not an http:// or https:// URL with a host"),
        ('webhook_url = "http://h:99999/"', "quality: webhook_url: not an http:// or https:// URL with a host"),
        ('command = [""]', "quality: command: the first element must name the program to run"),
    ],
)
def test_bad_alert_sinks_are_config_errors_naming_the_file_and_key(tmp_path, line, expected):
    path = tmp_path / "sidecard.toml"
    path.write_text(f"[quality]\n{line}\n")
    with pytest.raises(ConfigError) as caught:
        load(path)
    assert str(caught.value) == f"config error in {path}: {expected}"
    result = check_config(path)
    assert result.returncode == 2 and expected in result.stderr and "Traceback" not in result.stderr


async def test_the_built_in_judge_works_without_a_prompts_directory(daemon_factory, sim, short_tmp, autojump_clock):
    d = await daemon_factory(quality={"enabled": True, "sample_rate": 1.0, "monitor": MONITOR},
                             routes={"default": {"targets": [{"model": PRIMARY}]}},
                             prompts={"directory": f"{short_tmp}/no-such-directory"})  # fmt: skip
    client = await connect(d)
    for i in range(3):
        assert (await client.complete(f"q{i}", cache="bypass"))["ok"]
    await until(lambda: d.metrics.quality_judged("ok").value == 3)
    assert sim.calls_for(JUDGE_MODEL) == 3 and d.metrics.quality_judged("error").value == 0
    text = generate_latest(d.metrics.registry).decode()
    judge = f'sidecard_requests_total{{feature="quality-judge",model="{JUDGE_MODEL}",outcome="ok"}} 3.0'
    app = f'sidecard_requests_total{{feature="default",model="{PRIMARY}",outcome="ok"}} 3.0'
    assert judge in text and app in text and "prompt_not_found" not in text


def test_an_operators_own_judge_prompt_overrides_the_built_in_one(tmp_path):
    from sidecard.prompts.registry import PromptStore
    from sidecard.quality.judge import BUILTIN_RUBRIC, JUDGE_PROMPT

    builtins = {JUDGE_PROMPT: BUILTIN_RUBRIC.encode()}
    store = PromptStore(None, builtins=builtins)
    version, _ = store.resolve(JUDGE_PROMPT)
    assert version.version == 1 and not store.snapshot.errors
    own = tmp_path / JUDGE_PROMPT
    own.mkdir()
    (own / "v7.toml").write_text(BUILTIN_RUBRIC.replace("strict, fair reviewer", "kind reviewer"))
    (own / "release.toml").write_text("stable = 7\n")
    store = PromptStore(tmp_path, builtins=builtins)
    store.reload()
    assert store.resolve(JUDGE_PROMPT)[0].version == 7 and not store.snapshot.errors
    (own / "release.toml").unlink()
    (own / "v7.toml").unlink()
    own.rmdir()
    fresh = PromptStore(tmp_path, builtins=builtins)
    fresh.reload()
    assert fresh.resolve(JUDGE_PROMPT)[0].version == 1 and not fresh.snapshot.errors


def test_a_bad_webhook_url_is_never_quoted_back(tmp_path):
    path = tmp_path / "sidecard.toml"
    path.write_text('[quality]\nwebhook_url = "ftp://hooks.example.com/services/T0/B0/s3cr3tT0k3n"\n')
    with pytest.raises(ConfigError) as caught:
        load(str(path))
    assert "s3cr3tT0k3n" not in str(caught.value) and "webhook_url" in str(caught.value)
