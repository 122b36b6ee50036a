"""The documentation is run, not only read: every command line shown parses as the CLI
parses it, every study file shown loads, the field reference is the models' own, every link
points at a file, and README stays a front page."""

import re
import shlex
from pathlib import Path

import pytest
import typer
import yaml

from ganbench.cli import app
from ganbench.schema import field_table
from ganbench.spec import is_compare, load_compare, load_spec

ROOT = Path(__file__).parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
MAX_README_LINES = 250


def code_lines(text: str) -> list[str]:
    """Lines of fenced and four-space indented code blocks."""
    out, fenced = [], False
    for line in text.splitlines():
        if line.startswith("```"):
            fenced = not fenced
            continue
        if fenced or line.startswith("    "):
            out.append(line.strip())
    return out


def commands() -> list[tuple[str, str]]:
    found = []
    for page in PAGES:
        for line in code_lines(page.read_text()):
            line = line.removeprefix("$ ")
            if line.startswith("ganbench ") and "…" not in line and "<" not in line:
                command = line.split(" #")[0].split(" | ")[0].split(" > ")[0].strip()
                found.append((page.name, command))
    return found


def parse(line: str) -> None:
    """Parse a ``ganbench …`` line with the CLI's own parser (nothing runs)."""
    group = typer.main.get_command(app)
    name, *rest = shlex.split(line)[1:]
    command = group.get_command(group.make_context("ganbench", [name]), name)
    assert command is not None, f"no command {name!r}"
    command.make_context(name, rest)


@pytest.mark.parametrize("page,line", commands(), ids=lambda v: v[:60])
def test_every_command_shown_parses(page, line):
    """The command and every option exist and their values have the right types."""
    parse(line)


RECIPES = sorted((ROOT / "docs" / "recipes").glob("*.sbatch"))
EXAMPLE_VALUES = {"$STUDY": "studies/mog.yaml", "$GANBENCH_STORAGE": "postgresql://u@db/g",
                  "$MLFLOW_TRACKING_URI": "http://mlflow:5000", "$head_ip": "10.0.0.1",
                  "$PORT": "6379"}


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_the_slurm_recipes_parse_and_name_the_right_commands(recipe):
    """Not run here (no Slurm): bash reads each script, and every ganbench command in it
    parses with the values a user would export."""
    import subprocess

    assert subprocess.run(["bash", "-n", str(recipe)]).returncode == 0
    text = recipe.read_text()
    assert text.startswith("#!/usr/bin/env bash") and "Not run here" in text
    assert "#SBATCH" in text and "set -euo pipefail" in text
    lines = [line.strip() for line in text.replace("\\\n", " ").splitlines()
             if not line.lstrip().startswith("#")]
    shown = []
    for line in lines:
        line = line.removeprefix("srun ").strip()
        if line.startswith("ganbench "):
            for var, value in EXAMPLE_VALUES.items():
                line = line.replace(f'"{var}"', value).replace(f"{var}", value)
            parse(line)
            shown.append(shlex.split(line)[1])
    if recipe.name == "slurm-workers.sbatch":
        assert shown == ["worker"] and "--array=" in text and "--storage" in text
    else:
        assert shown == ["sweep", "report"] and "ray start --head" in text
        assert re.search(r"ganbench sweep .*--ray ", text.replace("\\\n", " "))


def yaml_blocks(text: str) -> list[str]:
    return re.findall(r"```yaml\n(.*?)```", text, flags=re.S)


STUDY_BLOCKS = [(page.name, block) for page in PAGES for block in yaml_blocks(page.read_text())
                if isinstance(yaml.safe_load(block), dict)
                and {"name"} <= set(yaml.safe_load(block))
                and {"target", "targets"} & set(yaml.safe_load(block))]


@pytest.mark.parametrize("page,block", STUDY_BLOCKS, ids=lambda v: v[:40])
def test_every_study_file_shown_loads(page, block, tmp_path):
    path = tmp_path / "shown.yaml"
    path.write_text(block)
    (load_compare if is_compare(yaml.safe_load(block)) else load_spec)(path)


def test_the_examples_are_found():
    assert len(commands()) >= 20 and len(STUDY_BLOCKS) >= 2


def test_the_field_reference_is_the_models_own():
    page = (ROOT / "docs" / "study-files.md").read_text()
    for kind in ("study", "compare"):
        shown = page.split(f"<!-- generated: {kind} -->\n")[1].split(f"\n<!-- end: {kind} -->")[0]
        assert shown.strip() == field_table(kind).strip(), \
            f"regenerate docs/study-files.md from `ganbench schema {kind} --markdown`"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_link_points_at_a_file(page):
    text = page.read_text()
    for target in re.findall(r"\]\(([^)]+)\)", text):
        if target.startswith(("http://", "https://", "#")):
            continue
        path = (page.parent / target.split("#")[0]).resolve()
        assert path.exists(), f"{page.name}: {target}"


def test_readme_is_a_front_page():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= MAX_README_LINES


# ---------------------------------------------------------------- the tour, run
# README's tour runs as shown, shrunk only in size so it takes a minute: the study file is
# made smaller in the clone (fewer trials, shorter training), and options add to commands
# that do not read it; every command's own options, paths and defaults are the user's.
SMALLER = {
    "train": ["--steps", "100", "--eval-every", "50"],
    "sweep": ["--workers", "1"],
    "report": [],
    "sample": [],
    "compare": ["--set", "train.steps=100", "--set", "train.eval_every=50",
                "--set", "eval_seeds=2", "--workers", "1"],
}
SMALLER_STUDY = "trials: 3\ntrain: {steps: 100, batch_size: 256, eval_every: 50}\n" \
                "pruner: {name: median, n_startup_trials: 1, n_warmup_steps: 50}\n"


def tour() -> list[tuple[str, list[str]]]:
    """README's tour: each ``$ ganbench …`` command with the files its output says it
    wrote (lines elided with … are skipped)."""
    steps: list[tuple[str, list[str]]] = []
    text = (ROOT / "README.md").read_text().split("## A short tour")[1].split("\n## ")[0]
    for line in code_lines(text):
        if line.startswith("$ ganbench "):
            steps.append((line.removeprefix("$ "), []))
        elif steps and line.startswith("wrote ") and "…" not in line:
            steps[-1][1].extend(re.split(r",? and |, ", line.removeprefix("wrote ")))
    return steps


def python_blocks(page: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", page.read_text(), flags=re.S)


@pytest.mark.slow  # a minute of training in subprocesses
def test_the_readme_tour_runs_and_leaves_the_clone_clean(tmp_path):
    """Every tour command, then the docs' Python, in a clone-like folder (a git repository
    with studies/, reports/ and .gitignore committed): each exits 0, writes the files its
    shown output names, and `git status` is clean after it (what a run writes is ignored,
    nothing committed is overwritten)."""
    import shutil
    import subprocess
    import sys

    from tests.conftest import cli_env

    for name in ("studies", "schemas", "reports", ".gitignore"):
        source = ROOT / name
        (shutil.copytree if source.is_dir() else shutil.copy)(source, tmp_path / name)
    mog = tmp_path / "studies/mog.yaml"
    kept = [line for line in mog.read_text().splitlines(keepends=True)
            if not line.startswith(("trials:", "train:", "pruner:"))]
    mog.write_text("".join(kept) + SMALLER_STUDY)
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-C", str(tmp_path)]
    subprocess.run(git[:5] + ["init", "-q", str(tmp_path)], check=True)
    subprocess.run(git + ["add", "-A"], check=True)
    subprocess.run(git + ["commit", "-qm", "clone"], check=True)

    steps = tour()
    assert [s.split()[1] for s, _ in steps] == list(SMALLER)
    for shown, wrote in steps:
        argv = shlex.split(shown)[1:]
        proc = subprocess.run([sys.executable, "-m", "ganbench", *argv, *SMALLER[argv[0]]],
                              cwd=tmp_path, env=cli_env(), capture_output=True, text=True,
                              timeout=600)
        assert proc.returncode == 0, f"{shown}: {proc.stderr}"
        for path in wrote:
            assert (tmp_path / path).is_file(), f"{shown}: {path} not written"
            assert path in proc.stdout, f"{shown}: does not say it wrote {path}"
        status = subprocess.run(git + ["status", "--porcelain"], capture_output=True,
                                text=True, check=True).stdout
        assert status == "", f"{shown} changed the clone:\n{status}"
    for page in PAGES:
        for block in python_blocks(page):  # after the sweep registered its generator
            proc = subprocess.run([sys.executable, "-c", block], cwd=tmp_path, env=cli_env(),
                                  capture_output=True, text=True, timeout=300)
            assert proc.returncode == 0, f"{page.name}: {block}\n{proc.stderr}"
