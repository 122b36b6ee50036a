"""The dependency arrows of the design: lower layers never import higher ones.

Every module of the package is listed with the ganbench modules it may import (at any
depth: imports inside functions count too) and the libraries it must not import. A new
module fails ``test_every_module_is_listed`` until its arrows are written down here.
"""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).parent.parent / "ganbench"

# module → the ganbench modules it may import (spec → sweep → train → metrics → report).
ALLOWED = {
    "errors": set(),
    "files": {"errors"},
    "metrics": {"errors"},
    "targets": {"errors"},
    "models": {"errors"},
    "losses": {"errors"},
    "devices": {"errors"},
    "tricks": {"errors", "config"},
    "config": {"errors", "losses", "models", "tricks", "devices"},
    "train": {"errors", "config", "devices", "files", "metrics", "targets", "models", "losses",
              "tricks"},
    "population": {"errors", "config", "devices", "metrics", "targets", "models", "losses",
                   "tricks", "train"},
    "spec": {"errors", "config", "metrics", "targets", "tricks"},
    "report": {"errors", "files", "metrics"},
    "recovery": {"files"},
    "study": {"errors", "files", "metrics", "spec", "recovery", "report", "targets"},
    "tracking": {"errors", "config", "files", "report", "targets"},
    "sweep": {"config", "metrics", "recovery", "report", "spec", "study", "train",
              "population"},
    "provenance": set(),
    "workers": {"errors", "devices", "provenance", "recovery", "spec", "study", "sweep",
                "tracking", "train"},
    "compare": {"config", "errors", "metrics", "population", "provenance", "recovery", "report",
                "spec", "study", "sweep", "tracking", "train", "workers"},
    "verify": {"compare", "errors", "metrics", "population", "provenance", "spec", "study",
               "sweep", "train"},
    "cli": {"compare", "devices", "errors", "files", "metrics", "provenance", "recovery",
            "report", "spec", "study", "targets", "tracking", "train", "verify", "workers",
            "__init__"},
    "__init__": set(),  # re-exports by name, loaded lazily (see test_lazy_imports)
    "__main__": {"cli"},
}
# module → libraries it must not import: Optuna only from the sweep layer up, MLflow only
# in tracking, torch never in the report or the plain-data modules.
NO_OPTUNA = {"errors", "files", "metrics", "targets", "models", "losses", "devices", "tricks",
             "config", "train", "population", "spec", "tracking", "provenance"}
NO_TORCH = {"errors", "files", "report", "recovery", "spec", "config", "provenance"}


def imports(module: str) -> set[str]:
    """Every module ``module`` imports at run time (``if TYPE_CHECKING:`` blocks, which
    only name types, are left out)."""
    tree = ast.parse((PACKAGE / f"{module}.py").read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and getattr(node.test, "id", "") == "TYPE_CHECKING":
            node.body = []
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            if node.module == "ganbench":  # from ganbench import sweep, metrics as M
                names |= {f"ganbench.{a.name}" if (PACKAGE / f"{a.name}.py").exists()
                          else "ganbench.__init__" for a in node.names}
            else:
                names.add(node.module)
    return names


def ganbench_imports(module: str) -> set[str]:
    return {n.split(".")[1] for n in imports(module) if n.startswith("ganbench.")} - {module}


def test_every_module_is_listed():
    assert {p.stem for p in PACKAGE.glob("*.py")} == set(ALLOWED)


@pytest.mark.parametrize("module", sorted(ALLOWED))
def test_module_respects_the_layers(module):
    bad = ganbench_imports(module) - ALLOWED[module]
    assert not bad, f"ganbench.{module} imports {sorted(bad)}, above its layer"


@pytest.mark.parametrize("module", sorted(ALLOWED))
def test_libraries_stay_in_their_layer(module):
    roots = {n.split(".")[0] for n in imports(module)}
    if module != "tracking":
        assert "mlflow" not in roots, f"{module} imports mlflow (only tracking may)"
    if module in NO_OPTUNA:
        assert "optuna" not in roots, f"{module} imports optuna"
    if module in NO_TORCH:
        assert "torch" not in roots, f"{module} imports torch"


def test_no_cycles_between_modules():
    graph = {m: ganbench_imports(m) & set(ALLOWED) for m in ALLOWED if m != "__init__"}
    seen: dict[str, int] = {}

    def visit(m: str, path: list[str]) -> None:
        if seen.get(m) == 1:
            raise AssertionError(f"import cycle: {' -> '.join(path + [m])}")
        if seen.get(m) == 2:
            return
        seen[m] = 1
        for n in graph.get(m, ()):
            visit(n, path + [m])
        seen[m] = 2

    for m in graph:
        visit(m, [])


def test_lazy_imports():
    """The CLI, the spec, the metric registry and the package itself load without torch,
    Optuna or MLflow, so --help and a spec error answer at once."""
    code = ("import sys, ganbench, ganbench.cli, ganbench.spec, ganbench.metrics, "
            "ganbench.config\n"
            "from ganbench.spec import load_spec\n"
            "heavy = {'torch', 'optuna', 'mlflow', 'scipy', 'pandas', 'matplotlib'}\n"
            "print(sorted(heavy & set(sys.modules)))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.strip()
    assert out == "[]"
