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


@pytest.mark.parametrize("page,line", commands(), ids=lambda v: v[:60])
def test_every_command_shown_parses(page, line):
    """The command and every option exist and their values have the right types (the CLI's
    own parser; nothing runs)."""
    group = typer.main.get_command(app)
    name, *rest = shlex.split(line)[1:]
    command = group.get_command(group.make_context("ganbench", [name]), name)
    assert command is not None, f"no command {name!r}"
    command.make_context(name, rest)


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
