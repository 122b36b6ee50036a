"""Comparisons: statistics checked against independent computations, held-out runs that
are held out, untuned arms, compute budgets and one experiment per study."""

import json
import math

import numpy as np
import pandas as pd
import pytest
import yaml
from scipy import stats

from ganbench import compare
from ganbench.compare import (
    bootstrap_ci,
    heldout_configs,
    heldout_seeds,
    holm,
    min_p_holm,
    rank_sum_p,
    search_seeds,
    units_needed,
)
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


def permutation_p(x, y) -> float:
    """An independent two-sided p: scipy's exact permutation test of the U statistic."""
    return stats.permutation_test(
        (np.asarray(x, float), np.asarray(y, float)),
        lambda a, b: stats.mannwhitneyu(a, b).statistic, permutation_type="independent",
        n_resamples=np.inf, alternative="two-sided").pvalue


def test_rank_sum_p_by_hand_with_ties():
    # Pooled 0,0,1,1,1,2 → midranks 1.5,1.5,4,4,4,6; x = (1,1,2) sums to 14. Of the 20
    # splits, 3 reach 14 (two of the three 4s with the 6): P(W ≥ 14) = 0.15, p = 0.3.
    assert rank_sum_p([1, 1, 2], [0, 0, 1]) == pytest.approx(0.3)
    # Five seeds all better: the most extreme of C(10, 5) = 252 splits, on both sides.
    assert rank_sum_p([1] * 5, [0] * 5) == pytest.approx(2 / 252)
    # The normal approximation the tests used before is not this (it gave 0.0040).
    assert stats.mannwhitneyu([1] * 5, [0] * 5).pvalue == pytest.approx(0.00398, abs=1e-5)


@pytest.mark.parametrize("n1,n2,ties", [(5, 5, False), (5, 5, True), (4, 6, True),
                                        (8, 8, True), (2, 7, True), (6, 3, False)])
def test_rank_sum_p_equals_scipys_permutation_test(n1, n2, ties):
    rng = np.random.default_rng(n1 * 10 + n2)
    for _ in range(3):
        x, y = rng.normal(size=n1), rng.normal(0.7, size=n2)
        if ties:
            x, y = np.round(x), np.round(y)
        assert rank_sum_p(x, y) == pytest.approx(permutation_p(x, y), rel=1e-12)


def test_the_designs_power():
    # 5 seeds and 7 arms cannot reject after Holm; 6 can; 10 has room to spare.
    assert min_p_holm(5, 5, 7) == pytest.approx(7 * 2 / 252)
    assert min_p_holm(5, 5, 7) > 0.05 > min_p_holm(6, 6, 7)
    assert min_p_holm(10, 10, 7) == pytest.approx(7 * 2 / 184756)
    assert units_needed(7) == 6 and units_needed(1) == 4
    assert units_needed(1, paired=True) == 6  # 2 / 2^6 < 0.05 ≤ 2 / 2^5
    # BH reaches the design's smallest p when all its tests do: 4 units (2/70), any size.
    assert units_needed(12, correction="bh") == 4 == units_needed(1)
    # The shipped comparison's replicates are enough for its confirmatory family.
    spec = load_compare("studies/tricks.yaml")
    r, tests = spec.tuning_replicates, len(spec.tests()) * len(spec.targets)
    assert min_p_holm(r, r, tests) < 0.05


def test_hodges_lehmann_shift_and_interval():
    assert compare.hodges_lehmann([1, 2, 3], [0, 0, 0]) == 2.0
    x, y = [1.0, 2.0, 3.0, 4.0, 5.5], [0.0, 1.0, 0.5, 1.5, 0.2]
    low, high = compare.moses_interval(x, y)
    assert low <= compare.hodges_lehmann(x, y) <= high
    # Too few runs for a 95% interval: it says so rather than inventing one.
    assert compare.moses_interval([1.0, 1.0], [1.0, 1.0]) == (-math.inf, math.inf)


def test_held_out_runs_use_their_own_evaluation_sample(tmp_path):
    spec = load_compare(write(tmp_path))
    study = spec.arm_study(spec.targets[0], "plain")
    tuning = study.trial_config({}).eval_seed
    configs = heldout_configs(spec, study, {}, "cpu", heldout_seeds(spec))
    assert {c.eval_seed for c in configs} == {spec.heldout_eval_seed} != {tuning}
    with pytest.raises(SpecError, match="heldout_eval_seed: equals the tuning eval_seed"):
        load_compare(write(tmp_path, heldout_eval_seed=tuning))


def test_a_held_out_seed_does_not_depend_on_its_group(tmp_path):
    from ganbench.population import train_population

    spec = load_compare(write(tmp_path))
    study = spec.arm_study(spec.targets[0], "ema")
    seeds = heldout_seeds(spec)
    group = train_population(heldout_configs(spec, study, {"lr_g": 1e-3}, "cpu", seeds),
                             streams="member")
    alone = train_population(heldout_configs(spec, study, {"lr_g": 1e-3}, "cpu", seeds[1:2]),
                             streams="member")
    # Same data, noise, initial weights and kernels whatever the group: bit for bit.
    assert alone[0].metrics == group[1].metrics
    assert alone[0].history == group[1].history
    assert group[0].metrics != pytest.approx(group[1].metrics, rel=1e-3)


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
    ({"budget": 0}, "budget.trials", "greater than 0"),
    ({"budget": {"g_steps": 10, "trials": 2}}, "budget", "give exactly one unit"),
    ({"budget": "lots"}, "budget", "expected a number of trials or one of {trials: N}"),
    ({"arms": {"plain": {"colour": 1}}}, "arms.plain.colour", "unknown key"),
])
def test_bad_comparisons_are_refused(tmp_path, changes, field, needle):
    with pytest.raises(SpecError) as info:
        load_compare(write(tmp_path, **changes))
    assert info.value.field == field and needle in str(info.value)


@pytest.mark.slow  # spawns processes
def test_cli_bad_comparison_is_one_line_and_runs_nothing(tmp_path):
    path = write(tmp_path, baseline="vanilla")
    proc = ganbench("compare", str(path), cwd=tmp_path)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1
    assert "baseline: no arm named 'vanilla'" in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cmp.yaml"]


@pytest.mark.slow  # spawns processes
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
    out = tmp_path / "runs" / "cmp" / "report"
    table = pd.read_csv(out / "compare.csv")
    runs = pd.read_csv(out / "runs.csv")
    assert list(table.columns[:3]) == ["target", "metric", "arm"]
    assert {"mean", "std", "se", "ci_low", "ci_high", "shift", "shift_low", "shift_high",
            "p_value", "p_adj", "family", "min_p_adj", "rank", "status", "tune_trials",
            "tune_g_steps",
            "tune_d_steps", "tune_seconds", "heldout_g_steps", "heldout_d_steps",
            "heldout_wall_seconds"} <= set(table)
    assert (table["tune_trials"] == 2).all() and (table["tune_g_steps"] == 80).all()
    assert (table["heldout_g_steps"] == 3 * 40).all() and (table["status"] == "tuned").all()
    assert "warning: Confirmatory family: w1 over every contrast and target, 2 tests, Holm " \
           "(familywise error); smallest attainable adjusted p 0.2" in " ".join(
               proc.stdout.split())
    assert set(table["arm"]) == {"plain", "pacgan2", "ema"}
    assert sorted(runs["seed"].unique()) == [1000, 1001, 1002]
    raw_p = {}
    for metric in ("w1", "sliced_w1", "modes", "hq", "kl"):
        rows = table[table["metric"] == metric].set_index("arm")
        base = runs.loc[runs["arm"] == "plain", metric].to_numpy()
        for arm in ("plain", "pacgan2", "ema"):
            vals = runs.loc[runs["arm"] == arm, metric].to_numpy()
            # A seed without any high-quality sample has kl = inf: its mean is inf, std nan.
            with np.errstate(invalid="ignore"):
                std = vals.std(ddof=1)
            assert rows.loc[arm, "n_inf"] == np.isinf(vals).sum()
            assert rows.loc[arm, "mean"] == pytest.approx(vals.mean(), nan_ok=True)
            assert rows.loc[arm, "std"] == pytest.approx(std, nan_ok=True)
            assert rows.loc[arm, "se"] == pytest.approx(std / math.sqrt(3), nan_ok=True)
            low, high = bootstrap_ci(vals)
            assert (rows.loc[arm, "ci_low"], rows.loc[arm, "ci_high"]) == \
                pytest.approx((low, high), nan_ok=True)
            if arm != "plain":
                raw_p[(metric, arm)] = permutation_p(vals, base)
                assert rows.loc[arm, "p_value"] == pytest.approx(raw_p[(metric, arm)],
                                                                 rel=1e-12)
                with np.errstate(invalid="ignore"):
                    shift = np.median(np.subtract.outer(vals, base))
                assert rows.loc[arm, "shift"] == pytest.approx(shift, nan_ok=True)
                assert rows.loc[arm, "reference"] == "plain"
        assert np.isnan(rows.loc["plain", "p_value"])
    # w1 (the objective) over both contrasts is the confirmatory family, adjusted by Holm;
    # the other metrics' 8 tests are one exploratory family, adjusted by BH.
    w1 = [k for k in raw_p if k[0] == "w1"]
    rest = [k for k in raw_p if k[0] != "w1"]
    for keys, family, method in ((w1, "confirmatory", holm),
                                 (rest, "exploratory", compare.benjamini_hochberg)):
        for key, p in zip(keys, method([raw_p[k] for k in keys])):
            row = table[(table["metric"] == key[0]) & (table["arm"] == key[1])].iloc[0]
            assert row["family"] == family and row["family_size"] == len(keys)
            assert row["p_adj"] == pytest.approx(p)
            scale = len(keys) if family == "confirmatory" else 1  # Holm's m; BH's m/m
            assert row["min_p_adj"] == pytest.approx(scale * 2 / math.comb(6, 3))
    for name in ("compare.md", "index.html", "box_w1.png", "samples.png"):
        assert (out / name).stat().st_size > 0
    assert "plain (baseline)" in (out / "compare.md").read_text()
    # Every held-out run keeps its final generator beside the arm's study.
    from ganbench.train import load_checkpoint, rescore

    kept = sorted((tmp_path / "runs").glob("cmp__ring__*/heldout/seed-*.pt"))
    assert len(kept) == 3 * 3
    config, g, data = load_checkpoint(kept[0])
    row = runs[(runs["arm"] == kept[0].parent.parent.name.split("__")[-1]) &
               (runs["seed"] == data["seed"])].iloc[0]
    # Trained as a population (batched products), rescored by the plain module: equal to
    # float32 rounding.
    assert rescore(config, g)["w1"] == pytest.approx(row["w1"], rel=1e-5)
    page = (out / "index.html").read_text()  # the results as HTML tables, best marked
    # Tables: values, contrasts, variance components, compute, the selected parameters.
    assert "<pre>" not in page and page.count("<table") == 5 and "plain (baseline)" in page
    # Bold is exactly the confirmatory cells significant after Holm.
    bold = table[(table["family"] == "confirmatory") & table["significant"]]
    assert page.count("<td><strong>") == len(bold)
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
    assert "tuning (" not in proc.stdout and "No tuning: every arm runs" in proc.stdout
    runs = pd.read_csv(tmp_path / "runs/cmp/report/runs.csv")
    assert len(runs) == 3 * 2


def arm_study(folder, arm):
    import optuna
    from optuna.storages.journal import JournalFileBackend

    spec = load_compare(folder / "cmp.yaml")
    name = spec.arm_study(spec.targets[0], arm).name
    backend = JournalFileBackend(str(folder / "runs" / name / "optuna.log"))
    return optuna.load_study(study_name=name, storage=optuna.storages.JournalStorage(backend))


@pytest.mark.slow
def test_a_top_up_that_changes_the_best_retrains_its_held_out_seeds(tmp_path):
    first = ganbench("compare", str(write(tmp_path, budget=1, eval_seeds=2)), cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    before = {arm: compare.best_params(arm_study(tmp_path, arm), load_compare(
        tmp_path / "cmp.yaml")) for arm in COMPARE["arms"]}
    old = {arm: dict(arm_study(tmp_path, arm).user_attrs) for arm in COMPARE["arms"]}
    more = ganbench("compare", str(write(tmp_path, budget=4, eval_seeds=2)), cwd=tmp_path)
    assert more.returncode == 0, more.stderr
    spec = load_compare(tmp_path / "cmp.yaml")
    changed = 0
    for arm in COMPARE["arms"]:
        study = arm_study(tmp_path, arm)
        after = compare.best_params(study, spec)
        stored = {k: v for k, v in study.user_attrs.items() if k.startswith("eval.")}
        key = compare.config_key(heldout_configs(
            spec, spec.arm_study(spec.targets[0], arm), after, "cpu", [0])[0])
        assert key is not None
        assert {v["config"] for v in stored.values()} == {key}
        if after != before[arm]:
            changed += 1  # retrained: the stored runs are those of the new best
            assert all(stored[k]["seconds"] != old[arm][k]["seconds"] for k in stored)
        else:
            assert all(stored[k] == old[arm][k] for k in stored)  # kept as they were
    assert changed >= 1  # the seeded sampler's four trials beat the first on some arm
    runs = pd.read_csv(tmp_path / "runs/cmp/report/runs.csv")
    assert len(runs) == 3 * 2


@pytest.mark.slow
def test_an_untuned_arm_is_named_and_left_out_of_the_tests(tmp_path):
    arms = COMPARE["arms"] | {"exploding": {"loss": "wasserstein", "optimizer": "sgd",
                                            "lr_d": 1.0e4, "lr_g": 1.0e4}}
    proc = ganbench("compare", str(write(tmp_path, arms=arms)), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "exploding: untuned (2 failed/pruned): no held-out runs" in proc.stdout
    table = pd.read_csv(tmp_path / "runs/cmp/report/compare.csv")
    runs = pd.read_csv(tmp_path / "runs/cmp/report/runs.csv")
    assert "exploding" not in set(table["arm"]) and "exploding" not in set(runs["arm"])
    # Holm counts the two tuned arms only.
    w1 = table[(table["metric"] == "w1") & (table["arm"] != "plain")]
    assert len(w1) == 2 and np.allclose(w1["min_p_adj"], 0.2)
    md = (tmp_path / "runs/cmp/report/compare.md").read_text()
    assert "| exploding | untuned (2 failed/pruned): left out of the tests |" in md


@pytest.mark.slow
def test_a_compute_budget_and_population_tuning(tmp_path):
    path = write(tmp_path, budget={"g_steps": 100}, eval_seeds=2,
                 execution={"mode": "population", "size": 2})
    proc = ganbench("compare", str(path), "--workers", "1", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    table = pd.read_csv(tmp_path / "runs/cmp/report/compare.csv")
    # 40 G steps per trial, a population of 2 at a time: a budget of 100 holds two trials;
    # a third would overshoot it (120), so it is never asked.
    assert set(table["tune_g_steps"]) == {80} and set(table["tune_trials"]) == {2}
    for arm in COMPARE["arms"]:
        trials = arm_study(tmp_path, arm).get_trials()
        assert {t.user_attrs["execution"] for t in trials} == {"population"}
    status = ganbench("status", str(path), cwd=tmp_path)
    assert status.stdout.count("80/100 g steps") == 3


@pytest.mark.slow
def test_a_changed_comparison_is_refused_naming_the_field(tmp_path):
    proc = ganbench("compare", str(write(tmp_path, budget=1, eval_seeds=2)), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    again = ganbench("compare", str(write(tmp_path, budget=1, eval_seeds=2)),
                     "--set", "train.steps=60", cwd=tmp_path)
    assert again.returncode == 2 and again.stderr.count("\n") == 1, again.stderr
    assert "train.steps: 40 there, 60 here" in again.stderr
    assert "--set name=cmp-2" in again.stderr
    for command in ("report", "status"):
        other = ganbench(command, str(tmp_path / "cmp.yaml"), "--set", "train.steps=60",
                         cwd=tmp_path)
        assert other.returncode == 2 and "another experiment" in other.stderr


@pytest.mark.slow
def test_every_mlflow_run_of_a_comparison_ends(tmp_path, mlflow_server):
    from mlflow.tracking import MlflowClient

    path = write(tmp_path, eval_seeds=2, budget=1, tracking={"uri": mlflow_server.url})
    proc = ganbench("compare", str(path), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    client = MlflowClient(mlflow_server.url)
    runs = client.search_runs([client.get_experiment_by_name("cmp").experiment_id])
    assert runs and not [r.info.run_name for r in runs if r.info.status == "RUNNING"]
    arms = [r for r in runs if r.data.tags.get("ganbench.role") == "arm"]
    assert len(arms) == 3 and all(r.info.status == "FINISHED" for r in arms)
    # The comparison's run carries its provenance, as its report does.
    (parent,) = [r for r in runs if r.data.tags.get("ganbench.role") == "compare"]
    made = json.loads((tmp_path / "runs/cmp/report/provenance.json").read_text())["runs"][-1]
    assert parent.data.tags["ganbench.commit"] == made["commit"] is not None
    assert parent.data.tags["ganbench.command"] == f"ganbench compare {path}"
    assert parent.data.tags["ganbench.lib.torch"] == made["libraries"]["torch"]
    assert parent.data.tags["ganbench.workers"] == str(made["workers"])
    table = pd.read_csv(tmp_path / "runs/cmp/report/runs.csv")
    for run in arms:
        values = table.loc[table["arm"] == run.data.tags["arm"], "w1"]
        assert run.data.metrics["heldout.w1"] == pytest.approx(values.mean())


def test_infinite_values_are_counted_and_shown_with_the_median():
    from ganbench.compare import compare_stats
    from ganbench.report import summary

    runs = pd.DataFrame({"target": "ring", "arm": ["base"] * 3 + ["x"] * 3, "seed": range(6),
                         "kl": [0.1, 0.2, 0.3, 1.5, math.inf, 2.0]})
    table = compare_stats(runs, "base").set_index("arm")
    assert table.loc["x", "n_inf"] == 1 and table.loc["x", "median"] == 2.0
    assert summary(table.loc["x"]) == "inf in 1/3 runs, median 2"
    assert summary(table.loc["base"], se_only=True) == "0.2 ± 0.058"
    # The test still ranks it: inf is the largest value, the worst kl.
    assert table.loc["x", "p_value"] == pytest.approx(permutation_p([1.5, math.inf, 2.0],
                                                                    [0.1, 0.2, 0.3]))


@pytest.mark.slow  # spawns processes
@pytest.mark.parametrize("change,needle", [
    ({"arms": {"wgan gp": {"loss": "wasserstein"}, "plain": {}}},
     "arms.'wgan gp': an arm name is letters, digits"),
    ({"baseline": "nope"}, "baseline: no arm named 'nope'"),
    ({"arms": {"plain": {"lr_q": 1}}}, "arms.plain.lr_q"),
    ({"eval_seeds": 1}, "eval_seeds"),
    ({"heartbeat": {"interval": 10, "grace": 5}}, "grace (5 s) must exceed interval"),
])
def test_a_bad_comparison_file_is_one_line_and_creates_nothing(tmp_path, change, needle):
    path = write(tmp_path, **change)
    before = sorted(p.name for p in tmp_path.iterdir())
    proc = ganbench("compare", str(path), cwd=tmp_path)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == before


# ---------------------------------------------------------------- reproducible by construction
REPRODUCED = ["target", "arm", "seed", "w1", "sliced_w1", "modes", "hq", "kl", "g_steps",
              "param.lr_g"]


def tuning_by_index(folder) -> pd.DataFrame:
    tuning = pd.read_csv(folder / "runs/cmp/report/tuning.csv")
    return tuning[tuning["counted"]].sort_values(["arm", "index"])[
        ["arm", "index", "state", "objective", "param.lr_g"]].reset_index(drop=True)


@pytest.mark.slow
def test_tuning_and_results_do_not_depend_on_workers_or_an_interruption(tmp_path):
    """The same comparison with 1 and 2 workers, and with 2 workers interrupted mid-tuning
    and resumed, tries the same configurations and gives bit-identical held-out runs."""
    import signal
    import subprocess
    import sys
    import time

    from ganbench.study import derive_seed
    from tests.conftest import cli_env

    changes = dict(budget=4, eval_seeds=2, tuning_batch=2,
                   train={"steps": 300, "eval_every": 100, "eval_samples": 256,
                          "batch_size": 64})
    folders = {name: tmp_path / name for name in ("one", "two", "resumed")}
    for folder in folders.values():
        folder.mkdir()
        write(folder, **changes)
    for name, workers in (("one", "1"), ("two", "2")):
        proc = ganbench("compare", "cmp.yaml", "--workers", workers, cwd=folders[name])
        assert proc.returncode == 0, proc.stderr
    # Interrupted once two tuning trials of some arm are told, then run again.
    folder = folders["resumed"]
    proc = subprocess.Popen([sys.executable, "-m", "ganbench", "compare", "cmp.yaml",
                             "--workers", "2"], cwd=folder, env=cli_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while "tuning (2/4 trials done)" not in (folder / "out.txt").read_text() \
            if (folder / "out.txt").exists() else True:
        line = proc.stdout.readline()
        assert line, proc.stderr.read()
        with open(folder / "out.txt", "a") as fh:
            fh.write(line)
        assert time.time() < deadline
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert not (folder / "runs/cmp/report").exists()  # stopped before the end
    again = ganbench("compare", "cmp.yaml", "--workers", "2", cwd=folder)
    assert again.returncode == 0, again.stderr
    runs = {name: pd.read_csv(f / "runs/cmp/report/runs.csv")[REPRODUCED]
            for name, f in folders.items()}
    tuning = {name: tuning_by_index(f) for name, f in folders.items()}
    for name in ("two", "resumed"):
        pd.testing.assert_frame_equal(runs[name], runs["one"], check_exact=True)
        pd.testing.assert_frame_equal(tuning[name], tuning["one"], check_exact=True)
    # Four different configurations per arm (each trial has its own draw), and arms that
    # share a search space do not share their candidates (each has its own seed).
    lrs = tuning["one"].groupby("arm")["param.lr_g"].apply(tuple)
    assert all(len(set(lrs[arm])) == 4 for arm in ("plain", "pacgan2"))
    assert not set(lrs["plain"]) & set(lrs["pacgan2"])
    provenance = json.loads((folders["one"] / "runs/cmp/report/provenance.json").read_text())
    assert provenance["runs"][-1]["sampler_seeds"] == {
        f"ring/{arm}": derive_seed(0, "ring", arm) for arm in COMPARE["arms"]}
    resumed = json.loads((folder / "runs/cmp/report/provenance.json").read_text())["runs"]
    assert len(resumed) == 2 and "wall_seconds" not in resumed[0]  # the interrupted run


def test_held_out_seeds_train_in_two_fixed_populations():
    from ganbench.compare import heldout_groups

    assert heldout_groups([1000, 1001, 1002, 1003, 1004]) == [[1000, 1002, 1004], [1001, 1003]]
    assert heldout_groups([1000]) == [[1000]]


@pytest.mark.slow
def test_a_worker_killed_mid_tuning_is_named_and_the_rerun_ends_exact(tmp_path):
    """A comparison runs under the sweep's supervisor: a worker killed with SIGKILL while
    it trains a tuning trial ends the comparison with one line naming it (exit 2, "rerun to
    continue"); the trial is failed uncounted and its parameters re-queued, and the rerun
    ends with exactly the budget of counted trials per arm."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from optuna.trial import TrialState

    from ganbench.accounting import WORKER_DIED, is_counted
    from tests.conftest import cli_env

    write(tmp_path, budget=3, eval_seeds=2, arms={"plain": {}, "pacgan2": COMPARE["arms"][
        "pacgan2"]}, train={"steps": 2000, "eval_every": 500, "eval_samples": 256,
                            "batch_size": 64})
    proc = subprocess.Popen([sys.executable, "-m", "ganbench", "compare", "cmp.yaml",
                             "--workers", "2"], cwd=tmp_path, env=cli_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline, victim = time.time() + 120, None
    while victim is None:
        assert time.time() < deadline and proc.poll() is None, proc.stderr.read()
        time.sleep(0.5)
        if (tmp_path / "runs").exists() and any((tmp_path / "runs").glob("*/optuna.log")):
            with_pid = [t for t in arm_study(tmp_path, "plain").get_trials()
                        if t.state == TrialState.RUNNING and "device" in t.user_attrs]
            victim = with_pid[0] if with_pid else None
    os.kill(victim.user_attrs["pid"], signal.SIGKILL)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 2 and err.count("\n") == 1, err
    assert "died (killed by SIGKILL)" in err and "rerun to continue" in err
    lost = arm_study(tmp_path, "plain").get_trials()[victim.number]
    assert lost.state == TrialState.FAIL and lost.user_attrs["fail_kind"] == WORKER_DIED
    again = ganbench("compare", "cmp.yaml", "--workers", "2", cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    for arm in ("plain", "pacgan2"):
        trials = arm_study(tmp_path, arm).get_trials()
        assert sum(is_counted(t) for t in trials) == 3
    retried = [t for t in arm_study(tmp_path, "plain").get_trials()
               if t.user_attrs.get("retry_of") == victim.number]
    assert len(retried) == 1 and retried[0].params == victim.params and is_counted(retried[0])
