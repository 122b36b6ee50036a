"""Every report says how it was made: provenance recorded with the run, written beside the
report and on its page, tagged on MLflow; the report rebuilt from its committed export."""

import json
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
import yaml

from ganbench import provenance
from ganbench.study import derive_seed
from tests.conftest import ganbench, write_spec

REPO = Path(__file__).resolve().parent.parent


def head() -> str:
    return subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True,
                          text=True, check=True).stdout.strip()


def test_derived_seeds_are_fixed_numbers():
    # The same on every machine and Python (sha256 of the JSON of the parts), and distinct.
    assert derive_seed(0, "ring", "plain") == derive_seed(0, "ring", "plain")
    assert len({derive_seed(0, "ring", a) for a in ("plain", "ema", "r1")}) == 3
    assert derive_seed(0, 3) == int.from_bytes(
        __import__("hashlib").sha256(b"[0, 3]").digest()[:4], "big")


@pytest.mark.parametrize("command,expected", [
    ("ganbench compare studies/tricks.yaml", "ganbench report studies/tricks.yaml"),
    ("ganbench compare studies/p.yaml --set train.steps=4000 --workers 2 --compile",
     "ganbench report studies/p.yaml --set train.steps=4000"),
    ("ganbench sweep s.yaml --trials 8 --population=4 --devices cpu",
     "ganbench report s.yaml --set trials=8"),
    ("ganbench compare studies/tricks.yaml --quick", "ganbench report studies/tricks.yaml "
                                                     "--quick"),
])
def test_the_rebuild_command_keeps_what_defines_the_study(command, expected):
    assert provenance.report_command([{"command": command}]) == expected


def test_the_rebuild_command_names_the_folder_it_was_written_to():
    runs = [{"command": "ganbench sweep s.yaml --out mine --trials 4"}]
    assert provenance.report_command(runs) == "ganbench report s.yaml --set trials=4"
    assert provenance.report_command(runs, "reports/s") == \
        "ganbench report s.yaml --set trials=4 --out reports/s"


@pytest.mark.slow  # spawns processes
def test_a_sweeps_report_records_its_provenance_and_rebuilds_from_its_export(in_tmp):
    path = write_spec(in_tmp, trials=3)
    proc = ganbench("sweep", str(path), "--workers", "2", cwd=in_tmp)
    assert proc.returncode == 0, proc.stderr
    report = ganbench("report", str(path), cwd=in_tmp)
    assert report.returncode == 0, report.stderr
    out = in_tmp / "runs" / "tiny" / "report"
    made = json.loads((out / "provenance.json").read_text())
    run = made["runs"][-1]
    assert run["command"] == f"ganbench sweep {path} --workers 2"
    assert run["commit"] == head() and isinstance(run["dirty"], bool)
    assert run["libraries"]["torch"] == torch.__version__
    assert run["workers"] == 2 and run["devices"] == ["cpu"] and run["torch_threads"] == 1
    assert run["sampler_seeds"] == {"tiny": 0} and run["wall_seconds"] > 0
    assert run["spec"]["trials"] == 3 and run["spec"]["search"]["hidden"]["choices"] == [16, 32]
    page = (out / "index.html").read_text()
    assert head() in page and f"ganbench sweep {path} --workers 2" in page
    # Committed with --out, whose rebuild command names it; a fresh clone has that report
    # but not runs/: `report` rebuilds it from the export, byte for byte.
    committed = in_tmp / "reports" / "tiny"
    made = ganbench("report", str(path), "--out", "reports/tiny", cwd=in_tmp)
    assert made.returncode == 0, made.stderr
    assert f"ganbench report {path} --out reports/tiny" in \
        (committed / "index.html").read_text()
    kept = {p.name: p.read_bytes() for p in committed.iterdir()}
    assert (committed / "storage.json.gz").stat().st_size < 100_000
    shutil.rmtree(in_tmp / "runs")
    again = ganbench("report", str(path), "--out", "reports/tiny", cwd=in_tmp)
    assert again.returncode == 0, again.stderr
    assert "rebuilding from reports/tiny/storage.json.gz" in again.stdout
    assert {p.name: p.read_bytes() for p in committed.iterdir()} == kept
    # Without --out, the same rebuild goes to runs/, the committed folder untouched.
    mine = ganbench("report", str(path), cwd=in_tmp)
    assert mine.returncode == 0, mine.stderr
    assert (in_tmp / "runs/tiny/report/leaderboard.csv").read_bytes() == \
        kept["leaderboard.csv"]
    assert {p.name: p.read_bytes() for p in committed.iterdir()} == kept


@pytest.mark.slow  # spawns processes
def test_a_run_without_storage_or_export_is_named(in_tmp):
    path = write_spec(in_tmp)
    proc = ganbench("report", str(path), cwd=in_tmp)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1
    assert "study 'tiny' has not run; run `ganbench sweep` first" in proc.stderr


# ---------------------------------------------------------------- the committed reports
SHIPPED = sorted(p.name for p in (REPO / "reports").iterdir() if p.is_dir())


@pytest.mark.slow
@pytest.mark.parametrize("name", SHIPPED)
def test_a_committed_report_is_rebuilt_from_its_export(name, tmp_path):
    """From a fresh clone (no runs/): the command the report names rebuilds every table
    equal to the committed one."""
    made = json.loads((REPO / "reports" / name / "provenance.json").read_text())
    run = made["runs"][-1]
    assert isinstance(run["dirty"], bool) and run["wall_seconds"] > 0
    # The code that made it is in this repository's history.
    assert subprocess.run(["git", "-C", str(REPO), "merge-base", "--is-ancestor",
                           run["commit"], "HEAD"]).returncode == 0
    (tmp_path / "reports").mkdir()
    subprocess.run(["cp", "-r", str(REPO / "reports" / name), str(tmp_path / "reports")],
                   check=True)
    (tmp_path / "studies").symlink_to(REPO / "studies")
    argv = shlex.split(provenance.report_command(made["runs"], f"reports/{name}"))[1:]
    proc = ganbench(*argv, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    for table in ("compare.csv", "compare.md", "runs.csv", "tuning.csv", "leaderboard.csv",
                  "leaderboard.md", "provenance.json", "storage.json.gz"):
        committed = REPO / "reports" / name / table
        if committed.exists():
            assert (tmp_path / "reports" / name / table).read_bytes() == \
                committed.read_bytes(), table
    assert (REPO / "reports" / name / "storage.json.gz").stat().st_size < 1_000_000


def test_every_shipped_study_has_a_report():
    studies = {yaml.safe_load(p.read_text())["name"] for p in (REPO / "studies").glob("*.yaml")}
    assert studies <= set(SHIPPED)
