"""The layer table in docs/architecture.md is true: every module under sidecard/ is in it, and imports only from
its own layer and the ones below."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).parents[1]
PACKAGE = ROOT / "sidecard"
ROW = re.compile(r"^\| (\d) [^|]*\| ([^|]*) \|", re.M)


def layer_table() -> dict[str, int]:
    """`engine/` (a package) or `prompts/template` (a module) -> its layer, from the doc's table."""
    text = (ROOT / "docs" / "architecture.md").read_text()
    table = {name: int(layer) for layer, cell in ROW.findall(text) for name in re.findall(r"`([\w/]+)`", cell)}
    assert len(set(table.values())) == 7, table
    return table


def module_name(path: Path) -> str:
    """sidecard/engine/walk.py -> "engine/walk"; sidecard/engine/__init__.py -> "engine"."""
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    if parts[-1] == "__init__" and len(parts) > 1:
        parts = parts[:-1]
    return "/".join(parts)


def layer_of(module: str, table: dict[str, int]) -> int | None:
    """The layer of the most specific entry that covers MODULE."""
    covering = [entry for entry in table if entry == module or (entry.endswith("/") and f"{module}/".startswith(entry))]
    return table[max(covering, key=len)] if covering else None


def imported(path: Path) -> set[str]:
    """The sidecard modules PATH imports (type-only imports included: they are dependencies too)."""
    package = module_name(path).split("/")
    if path.name != "__init__.py" or package == ["__init__"]:
        package = package[:-1]
    return imports_in(path.read_text(), package)


def imports_in(source: str, package: list[str]) -> set[str]:
    """The sidecard modules SOURCE imports, relative imports read from PACKAGE (["engine"] for engine/walk.py)."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                target = [*base, *(node.module.split(".") if node.module else [])]
            elif node.module and node.module.split(".")[0] == "sidecard":
                target = node.module.split(".")[1:]
            else:
                continue
            # `from . import ops` names a module; `from .config import Target` names a thing in one.
            for alias in node.names:
                candidate = [*target, alias.name]
                found.add("/".join(candidate) if _exists(candidate) else "/".join(target) or "__init__")
        elif isinstance(node, ast.Import):
            found.update("/".join(a.name.split(".")[1:]) or "__init__" for a in node.names if a.name.split(".")[0] == "sidecard")
    return found


def _exists(parts: list[str]) -> bool:
    """Whether PARTS name a module or a package (a directory of modules, `__init__.py` or not)."""
    return PACKAGE.joinpath(*parts).with_suffix(".py").exists() or PACKAGE.joinpath(*parts).is_dir()


def test_every_module_is_on_the_map():
    table = layer_table()
    unplaced = sorted(module_name(p) for p in PACKAGE.rglob("*.py") if layer_of(module_name(p), table) is None)
    assert not unplaced, f"add these to the layer table in docs/architecture.md: {unplaced}"
    stale = sorted(entry for entry in table if not _exists(entry.rstrip("/").split("/")) and entry != "__init__")
    assert not stale, f"the layer table names modules that do not exist: {stale}"


def test_nothing_imports_from_a_layer_above_its_own():
    table = layer_table()
    upward = []
    for path in sorted(PACKAGE.rglob("*.py")):
        module = module_name(path)
        own = layer_of(module, table)
        for dependency in sorted(imported(path)):
            theirs = layer_of(dependency, table)
            if own is not None and theirs is not None and theirs > own:
                upward.append(f"{module} (layer {own}) imports {dependency} (layer {theirs})")
    assert not upward, "\n".join(upward)


def test_the_check_sees_an_upward_import_however_it_is_written():
    table = {"low": 1, "high/": 2, "__init__": 1}
    for source in ("from sidecard.high import thing", "from .high.part import thing", "import sidecard.high.part",
                   "def f():\n    from .high import part"):
        assert any(layer_of(d, table) == 2 for d in imports_in(source, [])), source
    assert imports_in("from .. import __version__", ["faces"]) == {"__init__"}
