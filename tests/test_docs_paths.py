"""The install paths in the operator docs name files that exist in the repository."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
PATH = re.compile(r"(?<![/\w.-])(?:systemd|deploy|docs|prompts)/[\w./{},-]+")


def expand(path: str) -> list[str]:
    """`systemd/sidecard-{app,admin}.socket` as the shell would expand it."""
    match = re.search(r"\{([^}]*)\}", path)
    if match is None:
        return [path.rstrip(".,")]
    return [p for option in match.group(1).split(",") for p in expand(path[: match.start()] + option + path[match.end() :])]


@pytest.mark.parametrize("doc", ["docs/operations.md", "docs/service.md"])
def test_every_repository_path_in_the_install_guide_exists(doc):
    text = (ROOT / doc).read_text()
    named = {p for raw in PATH.findall(text) for p in expand(raw)}
    assert named, doc
    missing = sorted(p for p in named if not (ROOT / p).exists())
    assert not missing, f"{doc} names files that do not exist: {missing}"
