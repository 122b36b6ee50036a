"""Bad input and damaged surroundings: one line, exit 2, nothing half-written."""

import math
import os

import pytest

from ganbench.files import atomic, atomic_write_text
from tests.conftest import ganbench, write_spec


def test_an_error_while_writing_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "table.csv"
    atomic_write_text(path, "old\n")
    with pytest.raises(RuntimeError):
        with atomic(path) as tmp:
            tmp.write_text("half a ta")
            raise RuntimeError("the disk filled up")
    assert path.read_text() == "old\n"
    assert sorted(os.listdir(tmp_path)) == ["table.csv"]


def test_a_figure_that_cannot_be_drawn_leaves_no_temporary(tmp_path):
    import matplotlib.pyplot as plt

    from ganbench.report import _save

    fig, _ = plt.subplots()
    with pytest.raises(ValueError, match="not supported"):  # raised inside savefig
        _save(fig, tmp_path / "plot.xyz")
    assert os.listdir(tmp_path) == []


def _files(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


@pytest.mark.slow
@pytest.mark.parametrize("command", ["sweep", "report"])
def test_a_report_folder_that_is_a_file_is_one_line_before_any_work(tmp_path, command):
    spec = write_spec(tmp_path, name="blocked", trials=1)
    if command == "report":
        assert ganbench("sweep", str(spec), cwd=tmp_path).returncode == 0
    (tmp_path / "runs/blocked").mkdir(parents=True, exist_ok=True)
    blocker = tmp_path / "runs/blocked/report"
    if blocker.exists():
        import shutil

        shutil.rmtree(blocker)
    blocker.write_text("not a folder")
    before = _files(tmp_path)
    out = ganbench(command, str(spec), cwd=tmp_path)
    assert out.returncode == 2, out.stderr
    assert out.stderr.strip() == "error: runs/blocked/report: is a file; the report needs " \
                                 "a folder runs/blocked/report"
    assert _files(tmp_path) == before  # no trial ran, nothing was written


@pytest.mark.slow
def test_sample_refuses_a_folder_and_huge_requests_in_one_line(tmp_path):
    spec = write_spec(tmp_path, name="s", trials=1)
    assert ganbench("sweep", str(spec), cwd=tmp_path).returncode == 0
    (tmp_path / "out.csv").mkdir()
    before = _files(tmp_path)
    for args, needle in [
        (["--out", "out.csv"], "is a folder"),
        (["--n", str(10**12)], "--n"),
        (["--seed", str(10**20)], "--seed"),
    ]:
        out = ganbench("sample", str(spec), "--trial", "0", *args, cwd=tmp_path)
        assert out.returncode == 2, (args, out.stderr)
        assert needle in out.stderr and "Traceback" not in out.stderr
    assert _files(tmp_path) == before


def test_an_arm_whose_runs_all_diverged_gives_a_table_and_no_warning():
    import math
    import warnings

    import pandas as pd

    from ganbench.compare import compare_stats

    runs = pd.DataFrame({"target": "ring", "arm": ["base"] * 3 + ["x"] * 3, "seed": range(6),
                         "w1": [0.1, 0.2, 0.3] + [math.nan] * 3})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        table = compare_stats(runs, "base").set_index("arm")
    assert math.isnan(table.loc["x", "mean"])
    assert table.loc["base", "mean"] == pytest.approx(0.2)
    tested = compare_stats(runs, "base")
    row = tested[tested["arm"] == "x"].iloc[0]
    assert row["test"] == "not tested: runs without a value" and math.isnan(row["p_value"])
    assert not row["significant"] and row["family_size"] == 0
    from ganbench.report import contrast_text

    assert contrast_text(row) == ("not tested: runs without a value", "")


@pytest.mark.slow
def test_a_sigterm_while_starting_up_is_said_and_exits_143(tmp_path):
    """The command is still starting (waiting for a tracking server that accepts the
    connection and never answers) when SIGTERM comes: one line saying so, exit 143."""
    import signal
    import socket
    import subprocess
    import sys

    from tests.conftest import cli_env

    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    try:
        spec = write_spec(tmp_path, name="early", trials=1, tracking={
            "uri": f"http://127.0.0.1:{silent.getsockname()[1]}"})
        proc = subprocess.Popen([sys.executable, "-m", "ganbench", "sweep", str(spec)],
                                cwd=tmp_path, env=cli_env(), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        silent.settimeout(120)
        conn, _ = silent.accept()  # it connected and waits for an answer that never comes
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
        conn.close()
    finally:
        silent.close()
    assert proc.returncode == 143, err
    assert err.strip() == "interrupted (SIGTERM)"
    assert not (tmp_path / "runs").exists()


def test_an_underpowered_contrast_shows_no_interval_and_infinite_values_read_as_such():
    """Where the design cannot reach significance (its smallest attainable adjusted p is
    above 0.05), the cell withholds the interval and says why; infinities are written."""
    from ganbench.report import contrast_text

    row = {"p_value": 0.33, "p_adj": 0.67, "min_p_adj": 0.67, "shift": -0.54,
           "shift_low": -math.inf, "shift_high": math.inf, "few_hq": False,
           "significant": False, "family": "confirmatory"}
    text, mark = contrast_text(row)
    assert text.startswith("Δ -0.54 (no CI: adj. p ≥ 0.67 here) p=0.33") and mark == ""
    assert "[" not in text
    powered = row | {"min_p_adj": 0.016, "p_value": 0.008, "p_adj": 0.016,
                     "shift": math.inf, "shift_low": 0.69, "shift_high": math.inf,
                     "significant": True}
    text, mark = contrast_text(powered)
    assert text.startswith("Δ ∞ [0.69, ∞] p=0.008") and mark == "**"
