"""`ganbench verify`: re-trains a report's runs from its provenance and checks every metric
bit for bit; refuses, in one line, what cannot be checked."""

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest

from tests.conftest import ganbench
from tests.test_compare import write

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """A small comparison, run once: its report folder."""
    folder = tmp_path_factory.mktemp("verify")
    write(folder, budget=2, eval_seeds=2)
    proc = ganbench("compare", "cmp.yaml", "--workers", "2", cwd=folder)
    assert proc.returncode == 0, proc.stderr
    return folder / "runs" / "cmp" / "report"


def copy(report, tmp_path) -> Path:
    out = tmp_path / "cmp"
    shutil.copytree(report, out)
    return out


@pytest.mark.slow  # spawns processes
def test_an_untouched_report_verifies(made, tmp_path):
    proc = ganbench("verify", str(made), "--all", cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    assert sum(line.startswith("ok ring · ") for line in lines) == 6  # 3 arms × 2 seeds
    assert "all 6 re-trained run(s) equal the committed values, bit for bit" in lines[-1]


@pytest.mark.slow  # spawns processes
def test_one_changed_value_fails_naming_the_run(made, tmp_path):
    report = copy(made, tmp_path)
    runs = pd.read_csv(report / "runs.csv")
    row = runs.index[(runs["arm"] == "ema") & (runs["seed"] == 1001)][0]
    committed = float(runs.loc[row, "sliced_w1"])
    runs.loc[row, "sliced_w1"] = committed + 1e-12
    runs.to_csv(report / "runs.csv", index=False)
    proc = ganbench("verify", str(report), "--all", cwd=tmp_path)
    assert proc.returncode == 1
    (line,) = [x for x in proc.stdout.splitlines() if x.startswith("MISMATCH")]
    assert line.startswith("MISMATCH ring · ema · seed 1001: sliced_w1: committed ")
    assert f"re-trained {committed!r}" in line
    assert "1 of 6 run(s) differ" in proc.stdout


@pytest.mark.slow  # spawns processes
def test_a_subset_spreads_over_arms(made, tmp_path):
    proc = ganbench("verify", str(made), "--runs", "3", cwd=tmp_path)
    assert proc.returncode == 0
    checked = [x.split(":")[0] for x in proc.stdout.splitlines() if x.startswith("ok ")]
    assert {c.split(" · ")[1] for c in checked} == {"plain", "pacgan2", "ema"}


@pytest.mark.slow  # spawns processes
@pytest.mark.parametrize("damage,message", [
    (lambda r: (r / "provenance.json").unlink(), "no provenance.json"),
    (lambda r: _edit(r, lambda p: p["runs"][-1]["libraries"].update(torch="2.0.0")),
     "torch 2.0.0 → "),
    (lambda r: _edit(r, lambda p: p["runs"][-1].update(devices=["cuda:0"])),
     "trained on cuda:0"),
    (lambda r: _edit(r, lambda p: p.update(runs=[])), "no recorded run with its spec"),
])
def test_what_cannot_be_checked_is_refused_in_one_line(made, tmp_path, damage, message):
    report = copy(made, tmp_path)
    damage(report)
    proc = ganbench("verify", str(report), cwd=tmp_path)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert message in proc.stderr and not proc.stdout


def _edit(report, change):
    data = json.loads((report / "provenance.json").read_text())
    change(data)
    (report / "provenance.json").write_text(json.dumps(data))


# A run of these re-trains its whole held-out population (5 × 10k steps of 3×128 MLPs;
# 3 × 4000 steps of PacGAN's networks): minutes each on 2 cores, so they are verified by
# hand (`ganbench verify reports/<name> --runs 1`), not on every CI run; so are the grid
# sweep (a 3000-step trial, 90 s) and tricks-reseed (the code path of tricks, verified).
BY_HAND = {"grid25", "pacgan", "grid", "tricks-reseed"}
SHIPPED = sorted(p.name for p in (REPO / "reports").iterdir() if p.is_dir()
                 and p.name not in BY_HAND)


@pytest.mark.slow
@pytest.mark.parametrize("name", SHIPPED)
def test_a_committed_report_verifies(name, tmp_path):
    """One run of every committed report (but BY_HAND), re-trained from a fresh clone's
    view."""
    proc = ganbench("verify", str(REPO / "reports" / name), "--runs", "1", cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "equal the committed values, bit for bit" in proc.stdout
