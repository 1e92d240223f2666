"""docs/safety.md is true: its config loads and passes the safety check, its credentials file loads, its commands
run, and its detector figures are the ones the corpus gives."""

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from sidecard.config import load
from sidecard.ctl import _parser as ctl_parser
from sidecard.observe.redact import Redactor
from sidecard.safety import rules
from sidecard.safety.access import load_credentials
from sidecard.safety.audit import AuditLog, AuditRecord
from sidecard.safety.injection import score
from sidecard.safety.settings import AuditSettings, InjectionScope
from tests.safety.test_injection import corpus, eval_inputs

DOC = Path(__file__).parents[1] / "docs" / "safety.md"
TEXT = DOC.read_text()


def blocks(info: str) -> list[str]:
    return re.findall(rf"```{info}\n(.*?)```", TEXT, re.DOTALL)


def test_every_config_example_loads_and_passes_the_safety_check(tmp_path):
    examples = blocks("toml")
    assert len(examples) >= 5
    for i, block in enumerate(examples):
        path = tmp_path / f"safety-{i}.toml"
        path.write_text(block)
        rules.check(load(path), str(path))


def test_the_credentials_example_loads(tmp_path):
    (block,) = blocks("toml credentials")
    path = tmp_path / "credentials.toml"
    path.write_text(block)
    os.chmod(path, 0o600)
    credentials = load_credentials(str(path), ["billing", "support"])
    assert credentials.apps() == {"billing", "support"}


def commands() -> list[list[str]]:
    return [shlex.split(line) for block in blocks("sh") for line in block.splitlines() if line.strip()]


def test_every_command_is_one_the_tools_take():
    found = {tuple(argv[:2]) for argv in commands()}
    assert found == {("sidecard", "new-token"), ("sidecardctl", "apps"), ("sidecard", "audit-export"), ("sidecard", "check-config")}
    for argv in commands():
        if argv[0] == "sidecardctl":
            ctl_parser().parse_args(argv[1:])


def test_new_token_prints_a_line_the_credentials_file_takes(tmp_path):
    (argv,) = [a for a in commands() if a[1] == "new-token"]
    result = subprocess.run([sys.executable, "-m", "sidecard", *argv[1:]], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    token = result.stdout.splitlines()[0].rsplit(" ", 1)[1]
    path = tmp_path / "credentials.toml"
    path.write_text("[tokens]\n" + result.stdout.splitlines()[-1] + "\n")
    os.chmod(path, 0o600)
    assert load_credentials(str(path), ["billing"]).identify(token) == "billing"


def test_audit_export_prints_the_range(tmp_path):
    (argv,) = [a for a in commands() if a[1] == "audit-export"]
    directory = tmp_path / "audit"
    log = AuditLog(str(directory), AuditSettings(features=["*"]), Redactor(), now=lambda: 1772460000.0)
    log.open()
    # 2026-03-02 at 13:00, 15:00 and 17:00 UTC: the doc's range holds the middle one.
    log.write([AuditRecord(ts=1772456400.0 + h * 3600, id=str(h), answer="write to ada@example.com") for h in (0, 2, 4)], sync=True)
    log.close()
    result = subprocess.run([sys.executable, "-m", "sidecard", "audit-export", str(directory), *argv[3:]],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 1 and '"id":"2"' in lines[0] and "ada@example.com" not in lines[0]


@pytest.mark.parametrize("kind", ["attacks", "false positives"])
def test_the_detector_figures_are_the_corpus_figures(kind):
    threshold = InjectionScope().threshold
    attacks, benign = corpus("attacks.txt"), corpus("benign.txt") + eval_inputs()
    if kind == "attacks":
        detected = sum(score(a).score >= threshold for a in attacks)
        assert f"**{detected} of {len(attacks)} attacks ({detected / len(attacks):.1%})**" in TEXT
    else:
        flagged = sum(score(b).score >= threshold for b in benign)
        assert f"**{flagged} false positives out of {len(benign)}**" in TEXT
