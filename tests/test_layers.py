"""The dependency arrows of the design: lower layers never import higher ones."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).parent.parent / "ganbench"
HIGHER = {"ganbench.sweep", "ganbench.tracking", "ganbench.report", "ganbench.cli",
          "ganbench.compare", "ganbench.spec"}
FORBIDDEN = {
    "targets": HIGHER | {"optuna", "mlflow", "ganbench.train"},
    "models": HIGHER | {"optuna", "mlflow", "ganbench.train"},
    "losses": HIGHER | {"optuna", "mlflow", "ganbench.train"},
    "tricks": HIGHER | {"optuna", "mlflow"},
    "metrics": HIGHER | {"optuna", "mlflow", "ganbench.train"},
    "train": HIGHER | {"optuna", "mlflow"},
    "spec": {"ganbench.sweep", "ganbench.tracking", "ganbench.report", "ganbench.cli",
             "ganbench.compare", "optuna", "mlflow"},
    "report": {"torch", "mlflow", "ganbench.sweep", "ganbench.cli", "ganbench.train"},
    "sweep": {"mlflow", "ganbench.cli", "ganbench.compare"},
    "compare": {"mlflow", "ganbench.cli"},
}


def imports(module: str) -> set[str]:
    tree = ast.parse((PACKAGE / f"{module}.py").read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


@pytest.mark.parametrize("module", sorted(FORBIDDEN))
def test_module_respects_the_layers(module):
    found = imports(module)
    bad = {n for n in found for f in FORBIDDEN[module] if n == f or n.startswith(f + ".")}
    assert not bad, f"ganbench.{module} imports {sorted(bad)}"


def test_only_tracking_imports_mlflow():
    for path in PACKAGE.glob("*.py"):
        if path.stem != "tracking":
            assert not any(n.split(".")[0] == "mlflow" for n in imports(path.stem)), path.stem
