
import numpy as np
import pandas as pd
import pytest
import yaml
from scipy import stats

from ganbench.compare import bootstrap_ci, heldout_seeds, holm, search_seeds
from ganbench.errors import SpecError
from ganbench.spec import load_compare
from tests.conftest import ganbench

COMPARE = {
    "name": "cmp",
    "targets": [{"name": "ring"}],
    "train": {"steps": 40, "eval_every": 20, "eval_samples": 256, "batch_size": 64},
    "model": {"hidden": 16, "depth": 1},
    "search": {"lr_g": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True}},
    "arms": {"plain": {}, "pacgan2": {"tricks": {"pack": {"m": 2}}},
             "ema": {"tricks": {"ema": {"decay": 0.9}}, "lr_g": 0.002}},
    "baseline": "plain",
    "budget": 2,
    "eval_seeds": 3,
    "tracking": False,
}


def write(folder, **changes):
    path = folder / "cmp.yaml"
    path.write_text(yaml.safe_dump(COMPARE | changes))
    return path




def test_holm_known_values():
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])  # monotone step-down


def test_bootstrap_ci_brackets_the_mean_and_handles_constants():
    values = np.array([1.0, 2.0, 3.0, 4.0, 10.0])
    low, high = bootstrap_ci(values)
    assert low < values.mean() < high
    assert bootstrap_ci(np.array([2.0, 2.0, 2.0])) == (2.0, 2.0)


def test_eval_seeds_are_disjoint_from_search_seeds(tmp_path):
    spec = load_compare(write(tmp_path, eval_seeds=7))
    for arm in spec.arms:
        study = spec.arm_study(spec.targets[0], arm)
        assert not set(heldout_seeds(spec)) & set(search_seeds(study))
    assert len(set(heldout_seeds(spec))) == 7


def test_arm_values_win_over_the_search_space(tmp_path):
    spec = load_compare(write(tmp_path))
    assert "lr_g" not in spec.arm_study(spec.targets[0], "ema").search
    assert spec.arm_study(spec.targets[0], "ema").trial_config({}).lr_g == 0.002
    assert spec.arm_study(spec.targets[0], "pacgan2").trial_config({}).tricks == \
        {"pack": {"m": 2}}


@pytest.mark.parametrize("changes,field,needle", [
    ({"arms": {"plain": {}, "x": {"tricks": {"dropout": {}}}}}, "arms.x.tricks",
     "unknown trick 'dropout'"),
    ({"arms": {"plain": {}, "x": {"tricks": {"ema": {"decay": 2}}}}}, "arms.x.tricks.ema.decay",
     "must be a number in [0, 0.99999]"),
    ({"arms": {"plain": {}, "x": {"tricks": {"clip": {}}}}}, "arms.x.tricks.clip",
     "bounds a WGAN critic"),
    ({"baseline": "vanilla"}, "baseline", "no arm named 'vanilla'"),
    ({"budget": 0}, "budget", "greater than 0"),
    ({"arms": {"plain": {"colour": 1}}}, "arms.plain.colour", "unknown key"),
])
def test_bad_comparisons_are_refused(tmp_path, changes, field, needle):
    with pytest.raises(SpecError) as info:
        load_compare(write(tmp_path, **changes))
    assert info.value.field == field and needle in str(info.value)


def test_cli_bad_comparison_is_one_line_and_runs_nothing(tmp_path):
    path = write(tmp_path, baseline="vanilla")
    proc = ganbench("compare", str(path), cwd=tmp_path)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1
    assert "baseline: no arm named 'vanilla'" in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cmp.yaml"]


def test_report_and_status_of_a_comparison_that_never_ran(tmp_path):
    path = write(tmp_path)
    report = ganbench("report", str(path), cwd=tmp_path)
    assert report.returncode == 2 and report.stderr.count("\n") == 1
    assert "has not run; run `ganbench compare` first" in report.stderr
    status = ganbench("status", str(path), cwd=tmp_path)
    assert status.returncode == 0 and status.stdout.count("0/2") == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cmp.yaml"]


@pytest.mark.slow
def test_comparison_tables_match_scipy_on_the_stored_values(tmp_path):
    proc = ganbench("compare", str(write(tmp_path)), "--workers", "2", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    out = tmp_path / "reports" / "cmp"
    table = pd.read_csv(out / "compare.csv")
    runs = pd.read_csv(out / "runs.csv")
    assert table.columns[0] == "arm"
    assert {"mean", "std", "ci_low", "ci_high", "p_value", "p_holm", "rank"} <= set(table)
    assert set(table["arm"]) == {"plain", "pacgan2", "ema"}
    assert sorted(runs["seed"].unique()) == [1000, 1001, 1002]
    for metric in ("w1", "modes", "kl"):
        rows = table[table["metric"] == metric].set_index("arm")
        base = runs.loc[runs["arm"] == "plain", metric].to_numpy()
        raw_p = {}
        for arm in ("plain", "pacgan2", "ema"):
            vals = runs.loc[runs["arm"] == arm, metric].to_numpy()
            assert rows.loc[arm, "mean"] == pytest.approx(vals.mean())
            assert rows.loc[arm, "std"] == pytest.approx(vals.std(ddof=1))
            low, high = bootstrap_ci(vals)
            assert (rows.loc[arm, "ci_low"], rows.loc[arm, "ci_high"]) == \
                pytest.approx((low, high), nan_ok=True)
            if arm != "plain":
                raw_p[arm] = stats.mannwhitneyu(vals, base, alternative="two-sided").pvalue
                assert rows.loc[arm, "p_value"] == pytest.approx(raw_p[arm])
        adjusted = dict(zip(raw_p, holm(list(raw_p.values()))))
        for arm, p in adjusted.items():
            assert rows.loc[arm, "p_holm"] == pytest.approx(p)
        assert np.isnan(rows.loc["plain", "p_value"])
    for name in ("compare.md", "index.html", "box_w1.png", "samples.png"):
        assert (out / name).stat().st_size > 0
    assert "plain (baseline)" in (out / "compare.md").read_text()
    # Resumes like a sweep: a rerun trains nothing new and gives the same table.
    again = ganbench("compare", str(write(tmp_path)), cwd=tmp_path)
    assert again.returncode == 0
    assert "tuning (2/2 trials done)" in again.stdout and "(3/3 done)" in again.stdout
    pd.testing.assert_frame_equal(pd.read_csv(out / "compare.csv"), table)
    # `report` rebuilds the same tables from the storage alone; `status` reads, writes nothing.
    rebuilt = ganbench("report", str(write(tmp_path)), "--out", "rebuilt", cwd=tmp_path)
    assert rebuilt.returncode == 0, rebuilt.stderr
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "rebuilt" / "compare.csv"), table)
    before = sorted(p for p in tmp_path.rglob("*") if p.is_file())
    status = ganbench("status", str(write(tmp_path)), cwd=tmp_path)
    assert status.returncode == 0, status.stderr
    assert status.stdout.count("2/2") == 3 and status.stdout.count("3/3") == 3
    assert sorted(p for p in tmp_path.rglob("*") if p.is_file()) == before


@pytest.mark.slow
def test_fixed_mode_skips_tuning(tmp_path):
    proc = ganbench("compare", str(write(tmp_path, mode="fixed", eval_seeds=2)), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "tuning" not in proc.stdout
    runs = pd.read_csv(tmp_path / "reports/cmp/runs.csv")
    assert len(runs) == 3 * 2
