"""Every config example in the docs is a file that loads: sidecard's own config as `check-config` loads it, and
the prompt files of prompts.md as the prompt store parses them. Docs cannot drift from the code."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

from sidecard.config import load
from sidecard.prompts.files import parse_release, parse_version
from sidecard.safety.rules import check

DOCS = Path(__file__).parents[1] / "docs"
PROMPT_FILES = "prompts.md"  # its examples are a version file and a release file, not sidecard's config


def examples(doc: Path) -> list[str]:
    return re.findall(r"```toml\n(.*?)```", doc.read_text(), re.DOTALL)


CONFIG_DOCS = sorted(p.name for p in DOCS.glob("*.md") if p.name != PROMPT_FILES and examples(p))


def test_the_docs_have_config_examples():
    assert {"configuration.md", "traffic.md", "resilience.md", "quality.md", "cache.md"} <= set(CONFIG_DOCS)


@pytest.mark.parametrize("doc", CONFIG_DOCS)
def test_every_config_example_loads(tmp_path, doc):
    for i, block in enumerate(examples(DOCS / doc)):
        path = tmp_path / f"example-{i}.toml"
        path.write_text(block)
        check(load(path), str(path))  # raises ConfigError, naming the file and key, as check-config reports it


def test_a_config_that_adds_a_route_keeps_the_built_in_default(tmp_path):
    """traffic.md's budget example defines `[routes.cheap]` alone: the built-in default route stays, and
    check-config says so."""
    path = tmp_path / "budgets.toml"
    path.write_text(examples(DOCS / "traffic.md")[0])
    result = subprocess.run([sys.executable, "-m", "sidecard", "check-config", str(path)], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert "routes: default (2 targets), cheap (1 targets)" in result.stdout


def test_the_prompt_file_examples_parse():
    version_file, release_file = examples(DOCS / PROMPT_FILES)
    version = parse_version("support", 1, version_file.encode())
    assert version.route == "default" and version.max_tokens == 400
    assert parse_release(release_file.encode()).stable == 1
