"""The layers of the package: lower layers never import higher ones.

Every module of the package sits in one layer, listed bottom to top, and may import (at any
depth: imports inside functions count too) only modules of the layers below its own. A new
module fails ``test_every_module_is_listed`` until it is placed. Libraries stay in theirs:
MLflow only in tracking, Optuna from the Optuna adapter up, matplotlib only in the report,
Ray only in the cluster,
torch never in the plain-data modules.
"""

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).parent.parent / "ganbench"

# Bottom to top: spec → sweep → train → metrics → tracking/report, as imports run.
LAYERS = [
    ("errors",),                                        # the one error type, redaction
    ("files", "signals", "provenance"),                 # I/O, signals and exit codes, facts
    ("metrics", "targets", "models", "losses", "devices"),   # the trainer's parts
    ("tricks",),
    ("config",),
    ("train",),                                         # one GAN, trained
    ("population",),                                    # K GANs, trained as one program
    ("spec",),                                          # study and comparison files
    ("schema",),                                        # their JSON Schemas
    ("optuna_adapter",),                                # Optuna beyond its public API
    ("accounting",),                                    # what counts, budgets, recovery
    ("study",),                                         # storage, sampler, pruner, journal
    ("report",),                                        # tables and plots (matplotlib)
    ("tracking",),                                      # MLflow (its images via report)
    ("trial",),                                         # one trial: ask, train, tell
    ("worker",),                                        # the worker loop and process
    ("supervisor",),                                    # every multi-process run
    ("cluster",),                                       # workers as Ray tasks
    ("registry",),                                      # the best generator, registered
    ("sweep",),                                         # a sweep as the CLI runs it
    ("compare",),                                       # comparisons and their statistics
    ("verify",),                                        # re-training committed results
    ("cli",),
    ("__main__",),
]
LAYER = {m: i for i, layer in enumerate(LAYERS) for m in layer}
OPTUNA_FROM = LAYER["optuna_adapter"]
# Plain data: no torch.
NO_TORCH = {"errors", "files", "signals", "provenance", "report", "spec", "config", "schema",
            "optuna_adapter", "accounting", "supervisor", "cluster"}


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
    assert {p.stem for p in PACKAGE.glob("*.py")} - {"__init__"} == set(LAYER)


@pytest.mark.parametrize("module", sorted(LAYER))
def test_lower_layers_never_import_higher_ones(module):
    bad = {m for m in ganbench_imports(module) - {"__init__"} if LAYER[m] >= LAYER[module]}
    assert not bad, f"ganbench.{module} imports {sorted(bad)}, not below its layer"


def test_the_package_root_imports_nothing_eagerly():
    """``ganbench/__init__.py`` re-exports by name, loaded lazily (see test_lazy_imports)."""
    assert ganbench_imports("__init__") == set()


@pytest.mark.parametrize("module", sorted(LAYER))
def test_libraries_stay_in_their_layer(module):
    roots = {n.split(".")[0] for n in imports(module)}
    if module != "tracking":
        assert "mlflow" not in roots, f"{module} imports mlflow (only tracking may)"
    if module != "report":
        assert "matplotlib" not in roots, f"{module} imports matplotlib (only report may)"
    if module != "cluster":
        assert "ray" not in roots, f"{module} imports ray (only cluster may)"
    if LAYER[module] < OPTUNA_FROM:
        assert "optuna" not in roots, f"{module} imports optuna, below the Optuna layer"
    if module == "tracking":  # MLflow's module speaks of runs, not of Optuna's trials
        assert "optuna" not in roots, "tracking imports optuna"
    if module in NO_TORCH:
        assert "torch" not in roots, f"{module} imports torch"


@pytest.mark.slow  # spawns processes
def test_workers_load_no_plotting():
    """A worker process (trial, worker loop, supervisor, a comparison's jobs) loads neither
    matplotlib nor the report module: storing a trial's points goes through ``files``."""
    code = ("import sys, ganbench.trial, ganbench.worker, ganbench.supervisor, "
            "ganbench.sweep, ganbench.compare\n"
            "print(sorted({'matplotlib', 'ganbench.report'} & set(sys.modules)))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.strip()
    assert out == "[]"


# Optuna's private names: a storage behind a study, a trial's id, private modules.
PRIVATE_OPTUNA = re.compile(r"\._storage\b|\._trial_id\b|\._study_id\b|"
                            r"optuna(\.\w+)*\._\w+")


def test_optuna_private_api_only_in_the_adapter():
    """Outside ``optuna_adapter`` the package uses Optuna's public API only."""
    found = [f"{path.name}:{n}: {line.strip()}"
             for path in sorted(PACKAGE.glob("*.py")) if path.stem != "optuna_adapter"
             for n, line in enumerate(path.read_text().splitlines(), 1)
             if PRIVATE_OPTUNA.search(line)]
    assert not found, "\n".join(found)


def test_no_cycles_between_modules():
    graph = {m: ganbench_imports(m) & set(LAYER) for m in LAYER}
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


@pytest.mark.slow  # spawns processes
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


@pytest.mark.slow  # spawns processes
def test_importing_the_package_changes_no_process_wide_state():
    """Importing every module leaves the process as it was: no MLflow variables, no
    matplotlib backend chosen, Optuna's log level and glibc's allocator untouched (the
    ganbench command and its workers set what they need for themselves)."""
    modules = ", ".join(f"ganbench.{m}" for m in sorted(LAYER) if m != "__main__")
    code = ("import os, sys, logging\n"
            "before = dict(os.environ)\n"
            f"import {modules}\n"
            "import matplotlib, optuna\n"
            "from ganbench import population\n"
            "print(sorted(set(os.environ) - set(before)),\n"
            "      matplotlib.rcParams._get_backend_or_none(),\n"
            "      optuna.logging.get_verbosity() == optuna.logging.INFO,\n"
            "      population._TUNED)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, env={k: v for k, v in __import__("os").environ.items()
                                          if k != "MPLBACKEND"}).stdout.strip()
    assert out == "[] None True False"
