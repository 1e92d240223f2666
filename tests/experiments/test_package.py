"""The experiments package is a pure core: it imports nothing from the rest of sidecard."""

import ast
import sys
from pathlib import Path

import sidecard.experiments

PACKAGE = Path(sidecard.experiments.__file__).parent
THIRD_PARTY = {"msgspec", "numpy", "scipy"}


def test_the_package_imports_only_itself_the_standard_library_and_its_declared_libraries():
    outside = set()
    for path in PACKAGE.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and node.level > 1:  # from .. : out of the package
                outside.add(f"{path.name}: {'.' * node.level}{node.module or ''}")
                continue
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            elif isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top not in sys.stdlib_module_names and top not in THIRD_PARTY and top != "__future__":
                    outside.add(f"{path.name}: {name}")
    assert not outside


def test_the_config_names_the_metrics_the_core_compares():
    from typing import get_args

    from sidecard.config import MetricName
    from sidecard.ctl_experiments import METRICS as CTL_METRICS
    from sidecard.experiments.metric import METRICS

    assert set(get_args(MetricName)) == set(METRICS) == set(CTL_METRICS)
