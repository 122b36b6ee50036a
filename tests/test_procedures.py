"""Comparisons of procedures: tuning replicates as the unit, matched arms, exact intervals
by test inversion, declared families, expected best vs budget and HQ-count validity — each
checked against an independent computation written here."""

import itertools
import math

import numpy as np
import pandas as pd
import pytest
import yaml
from scipy import stats

from ganbench import compare, report
from ganbench.compare import (
    compare_stats,
    expected_best,
    hq_needed,
    moses_interval,
    rank_sum_p,
    signed_rank_p,
    walsh_interval,
)
from ganbench.errors import SpecError
from ganbench.spec import load_compare
from tests.conftest import ganbench


# ---------------------------------------------------------------- expected best vs budget
def test_expected_best_by_hand():
    # Values 1, 2, 3, best = largest, k = 2: P(best = 1) = 1/9, P(2) = 3/9, P(3) = 5/9.
    (m1, _), (m2, sd2) = expected_best([3.0, 1.0, 2.0], 2, "maximize")
    assert m1 == pytest.approx(2.0)
    assert m2 == pytest.approx(22 / 9)
    assert sd2 == pytest.approx(math.sqrt((1 + 4 * 3 + 9 * 5) / 9 - (22 / 9) ** 2))
    # Minimising: the best of two draws from 1, 2, 3 is the smaller: 1·5/9 + 2·3/9 + 3/9.
    assert expected_best([3.0, 1.0, 2.0], 2, "minimize")[1][0] == pytest.approx(14 / 9)


@pytest.mark.parametrize("direction", ["minimize", "maximize"])
def test_expected_best_equals_enumerating_every_draw(direction):
    values = np.array([0.7, 0.2, 0.2, 1.5, 0.9])  # a tie too
    pick = min if direction == "minimize" else max
    for k, (mean, sd) in enumerate(expected_best(values, 4, direction), start=1):
        bests = [pick(values[list(d)]) for d in itertools.product(range(5), repeat=k)]
        assert mean == pytest.approx(np.mean(bests), rel=1e-12)
        assert sd == pytest.approx(np.std(bests), rel=1e-9, abs=1e-12)
    # More trials never hurt in expectation.
    means = [m for m, _ in expected_best(values, 6, direction)]
    assert means == sorted(means, reverse=direction == "minimize")


# ---------------------------------------------------------------- exact tests and intervals
def brute_signed_rank_p(d):
    """Every one of the 2^n sign assignments of the nonzero differences, enumerated."""
    d = np.asarray(d, float)
    ranks = stats.rankdata(np.abs(d))
    ranks[d == 0] = 0
    observed = ranks[d > 0].sum()
    sums = [sum(r for r, s in zip(ranks, signs) if s) for signs in
            itertools.product([0, 1], repeat=len(d))]
    sums = np.array(sums)
    upper, lower = np.mean(sums >= observed - 1e-9), np.mean(sums <= observed + 1e-9)
    return min(1.0, 2 * min(upper, lower))


@pytest.mark.parametrize("d", [[0.3, 1.2, -0.4, 2.0, 0.9, 1.1],
                               [1, 1, -1, 2, 0, 3, 3],          # ties and a zero
                               [0.5, 0.1, 0.2, 0.3, 0.4]])
def test_signed_rank_p_equals_enumeration(d):
    assert signed_rank_p(d) == pytest.approx(brute_signed_rank_p(d), rel=1e-12)


def test_signed_rank_p_matches_scipy_without_ties():
    rng = np.random.default_rng(3)
    d = rng.normal(0.5, 1, size=9)
    assert signed_rank_p(d) == pytest.approx(stats.wilcoxon(d, method="exact").pvalue,
                                             rel=1e-12)


@pytest.mark.parametrize("n1,n2", [(5, 5), (4, 7), (6, 6), (3, 8)])
def test_moses_interval_is_the_inversion_of_the_rank_sum_test(n1, n2):
    rng = np.random.default_rng(n1 * 100 + n2)
    x, y = rng.normal(1.0, 1, size=n1), rng.normal(0, 1, size=n2)
    low, high = moses_interval(x, y)
    diffs = np.sort(np.subtract.outer(x, y).ravel())
    # Between consecutive differences the shifted samples have no ties, so the test's p
    # is that of the continuous law: inside the interval it accepts, outside it rejects.
    mids = (diffs[1:] + diffs[:-1]) / 2
    for delta in np.concatenate([mids, [diffs[0] - 1, diffs[-1] + 1]]):
        accepted = rank_sum_p(x - delta, y) > 0.05
        assert accepted == (low < delta < high), (delta, low, high)
    assert low in diffs and high in diffs


@pytest.mark.parametrize("n", [6, 8, 10])
def test_walsh_interval_is_the_inversion_of_the_signed_rank_test(n):
    rng = np.random.default_rng(n)
    d = rng.normal(0.4, 1, size=n)
    low, high = walsh_interval(d)
    i, j = np.triu_indices(n)
    walsh = np.sort((d[i] + d[j]) / 2)
    for delta in np.concatenate([(walsh[1:] + walsh[:-1]) / 2, [walsh[0] - 1,
                                                                walsh[-1] + 1]]):
        accepted = brute_signed_rank_p(d - delta) > 0.05
        assert accepted == (low < delta < high), (delta, low, high)
    # Five pairs cannot give a 95% interval (2/32 > 0.05): unbounded, not invented.
    assert walsh_interval(d[:5]) == (-math.inf, math.inf)


# ---------------------------------------------------------------- replicates and families
def replicate_runs(seed=0, arms=("base", "x", "y"), targets=("ring", "grid"), r=5, s=3):
    """Runs with a tuning-replicate effect and seed noise nested in it."""
    rng = np.random.default_rng(seed)
    rows = []
    for target in targets:
        for a, arm in enumerate(arms):
            for rep in range(r):
                effect = 0.3 * a + rng.normal(0, 0.4)  # what the tuning landed on
                for k in range(s):
                    w1 = 1 + effect + rng.normal(0, 0.1)
                    rows.append({"target": target, "arm": arm, "replicate": rep,
                                 "seed": 1000 * (rep + 1) + k, "w1": w1,
                                 "modes": float(rng.integers(20, 26)), "hq": 80.0,
                                 "hq_samples": 2000})
    return pd.DataFrame(rows)


def holm_by_hand(p):
    order = sorted(range(len(p)), key=lambda i: p[i])
    out, running = [0.0] * len(p), 0.0
    for rank, i in enumerate(order):
        running = max(running, (len(p) - rank) * p[i])
        out[i] = min(1.0, running)
    return out


def bh_by_hand(p):
    m = len(p)
    return [min(1.0, min(m * p[j] / (sorted(p).index(p[j]) + 1 + sorted(p).count(p[j]) - 1)
                         for j in range(m) if p[j] >= p[i])) for i in range(m)]


def test_replicates_are_the_unit_with_both_variance_components():
    runs = replicate_runs()
    table = compare_stats(runs, "base", objective="w1")
    for target in ("ring", "grid"):
        sub = runs[runs["target"] == target]
        means = {a: sub[sub["arm"] == a].groupby("replicate")["w1"].mean().to_numpy()
                 for a in ("base", "x", "y")}
        for arm in ("x", "y"):
            row = table[(table["target"] == target) & (table["metric"] == "w1")
                        & (table["arm"] == arm)].iloc[0]
            assert row["unit"] == "replicate" and row["units"] == 5 and row["n"] == 15
            # An independent test on the replicate means: scipy's exact permutation test.
            p = stats.permutation_test(
                (means[arm], means["base"]), lambda a, b: stats.mannwhitneyu(a, b).statistic,
                permutation_type="independent", n_resamples=np.inf).pvalue
            assert row["p_value"] == pytest.approx(p, rel=1e-12)
            assert row["mean"] == pytest.approx(means[arm].mean())
            assert row["se"] == pytest.approx(means[arm].std(ddof=1) / math.sqrt(5))
            assert row["sd_between"] == pytest.approx(means[arm].std(ddof=1))
            within = sub[sub["arm"] == arm].groupby("replicate")["w1"].var(ddof=1).mean()
            assert row["sd_within"] == pytest.approx(math.sqrt(within))
            low, high = moses_interval(means[arm], means["base"])
            assert (row["shift_low"], row["shift_high"]) == (low, high)
    # The simulated tuning spread (0.4) dominates the seed noise (0.1), as the table says.
    w1 = table[table["metric"] == "w1"]
    assert (w1["sd_between"] > w1["sd_within"]).all()


def test_a_single_arm_has_values_and_no_tests():
    runs = replicate_runs(arms=("base",))
    table = compare_stats(runs, "base")
    assert len(table) == 2 * 3 and table["p_value"].isna().all()
    assert not table["significant"].any() and (table["n"] == 15).all()


def test_one_replicate_keeps_the_seed_as_the_unit():
    runs = replicate_runs(r=1, s=6)
    table = compare_stats(runs, "base")
    row = table[(table["metric"] == "w1") & (table["arm"] == "x")].iloc[0]
    assert row["unit"] == "seed" and row["units"] == 6 and math.isnan(row["sd_between"])


def test_families_are_declared_and_adjusted_as_declared():
    runs = replicate_runs(seed=4)
    table = compare_stats(runs, "base", objective="w1",
                          contrasts=[("x", "base"), ("y", "base"), ("y", "x")])
    tests = table[table["p_value"].notna()]
    confirmatory = tests[tests["family"] == "confirmatory"]
    exploratory = tests[tests["family"] == "exploratory"]
    # Every contrast on every target: 3 × 2 w1 tests, and 3 × 2 × 2 for modes and hq.
    assert len(confirmatory) == 6 and set(confirmatory["metric"]) == {"w1"}
    assert len(exploratory) == 12 and set(exploratory["metric"]) == {"modes", "hq"}
    assert set(tests["reference"]) == {"base", "x"}  # tests against any named arm
    p = confirmatory["p_value"].tolist()
    assert confirmatory["p_adj"].tolist() == pytest.approx(holm_by_hand(p))
    q = exploratory["p_value"].tolist()
    assert exploratory["p_adj"].tolist() == pytest.approx(bh_by_hand(q))
    assert (confirmatory["family_size"] == 6).all() and (exploratory["family_size"] == 12).all()
    assert (tests["significant"] == (tests["p_adj"] < 0.05)).all()
    # The smallest attainable adjusted p: Holm multiplies the design's smallest p by the
    # family's size; BH reaches the smallest p itself when every test does.
    floor = 2 / math.comb(10, 5)
    assert confirmatory["min_p_adj"].tolist() == pytest.approx([6 * floor] * 6)
    assert exploratory["min_p_adj"].tolist() == pytest.approx([floor] * 12)
    assert compare.benjamini_hochberg([floor] * 12) == pytest.approx([floor] * 12)
    # Declared otherwise: Bonferroni for the confirmatory family, none for the rest.
    other = compare_stats(runs, "base", objective="w1", correction=("bonferroni", "none"))
    o = other[other["p_value"].notna()]
    c = o[o["family"] == "confirmatory"]
    assert c["p_adj"].tolist() == pytest.approx([min(1, 4 * v) for v in c["p_value"]])
    e = o[o["family"] == "exploratory"]
    assert e["p_adj"].tolist() == e["p_value"].tolist()


def test_matched_contrasts_pair_units():
    runs = replicate_runs(seed=7, arms=("base", "x"), r=6)
    table = compare_stats(runs, "base", matched=[("x", "base")])
    row = table[(table["metric"] == "w1") & (table["arm"] == "x")].iloc[0]
    sub = runs[runs["target"] == row["target"]]
    d = (sub[sub["arm"] == "x"].groupby("replicate")["w1"].mean()
         - sub[sub["arm"] == "base"].groupby("replicate")["w1"].mean()).to_numpy()
    assert row["test"] == "signed-rank (matched)"
    assert row["p_value"] == pytest.approx(brute_signed_rank_p(d), rel=1e-12)
    assert (row["shift_low"], row["shift_high"]) == walsh_interval(d)


# ---------------------------------------------------------------- metric validity at low HQ
def expected_modes(h, m):
    """Modes a perfectly balanced generator covers with h high-quality samples."""
    return m * (1 - (1 - 1 / m) ** h)


@pytest.mark.parametrize("m", [8, 25, 100])
def test_hq_threshold_is_where_a_balanced_generator_misses_half_a_mode(m):
    h = hq_needed(m, "modes")
    assert m - expected_modes(h, m) <= 0.5 < m - expected_modes(h - 1, m)
    # The example: 72 HQ samples of a 25-mode grid still "cover" 23.7 modes.
    assert expected_modes(72, 25) == pytest.approx(23.67, abs=0.01) and hq_needed(25, "modes") > 72
    # KL: the plug-in KL's sampling bias (M − 1)/2H, simulated for a balanced generator.
    hk = hq_needed(m, "kl")
    rng = np.random.default_rng(m)
    counts = rng.multinomial(hk, [1 / m] * m, size=4000)
    with np.errstate(divide="ignore", invalid="ignore"):
        p = counts / hk
        kl = np.nansum(np.where(p > 0, p * np.log(p * m), 0.0), axis=1)
    assert kl.mean() == pytest.approx(compare.KL_RESOLUTION, rel=0.1)


def test_cells_with_too_few_hq_samples_are_flagged_and_never_significant():
    runs = replicate_runs(arms=("base", "x"), r=6)
    runs.loc[runs["arm"] == "x", "modes"] = 25.0
    runs.loc[runs["arm"] == "base", "modes"] = 12.0
    strong = compare_stats(runs, "base", modes={"ring": 25, "grid": 25})
    modes = strong[(strong["metric"] == "modes") & (strong["arm"] == "x")]
    assert not modes["few_hq"].any() and modes["significant"].all()
    runs.loc[(runs["arm"] == "x") & (runs["replicate"] == 2), "hq_samples"] = 72
    weak = compare_stats(runs, "base", modes={"ring": 25, "grid": 25})
    modes = weak[(weak["metric"] == "modes") & (weak["arm"] == "x")]
    assert modes["few_hq"].all() and modes["pair_few_hq"].all()
    assert not modes["significant"].any()
    assert (modes["hq_min"] == 72).all() and (modes["hq_needed"] == 96).all()
    w1 = weak[(weak["metric"] == "w1") & (weak["arm"] == "x")]
    assert not w1["few_hq"].any() and not w1["pair_few_hq"].any()  # w1 counts no HQ sample
    # Too few in the reference arm alone: the arm's own value is sound, the contrast is not.
    runs["hq_samples"] = 2000
    runs.loc[(runs["arm"] == "base") & (runs["seed"] % 1000 == 1), "hq_samples"] = 50
    ref = compare_stats(runs, "base", modes={"ring": 25, "grid": 25})
    modes = ref[(ref["metric"] == "modes") & (ref["arm"] == "x")]
    assert not modes["few_hq"].any() and modes["pair_few_hq"].all()
    assert (modes["pair_hq_min"] == 50).all() and not modes["significant"].any()
    assert "⚠ HQ 50 < 96" in report.contrast_text(modes.iloc[0])[0]


# ---------------------------------------------------------------- specs
BASE = {
    "name": "proc", "targets": [{"name": "ring"}],
    "train": {"steps": 60, "eval_every": 30, "eval_samples": 256, "batch_size": 64},
    "model": {"hidden": 16, "depth": 1},
    "search": {"lr_g": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True},
               "beta1": {"type": "categorical", "choices": [0.5, 0.8]}},
    "arms": {"plain": {}, "ema": {"tricks": {"ema": {"decay": 0.9}}},
             "ema-matched": {"from": "plain", "tricks": {"ema": {"decay": 0.9}}},
             "ema-b1": {"from": "plain", "tricks": {"ema": {"decay": 0.9}}, "beta1": 0.8}},
    "baseline": "plain", "budget": 3, "eval_seeds": 2, "tuning_replicates": 2,
    "sampler": {"name": "tpe", "seed": 0, "n_startup_trials": 2},
    "pruner": {"name": "none"}, "tracking": False,
}


def write(folder, **changes):
    path = folder / "proc.yaml"
    path.write_text(yaml.safe_dump(BASE | changes))
    return path


@pytest.mark.parametrize("arms,field", [
    ({"plain": {}, "m": {"from": "nope"}}, "arms.m.from"),
    ({"plain": {}, "m": {"from": "m"}}, "arms.m.from"),
    ({"plain": {}, "m": {"from": "plain"}, "n": {"from": "m"}}, "arms.n.from"),
])
def test_a_matched_arm_names_an_arm_that_tunes(tmp_path, arms, field):
    with pytest.raises(SpecError) as info:
        load_compare(write(tmp_path, arms=arms))
    assert info.value.field == field and "expected another arm that tunes" in str(info.value)


def test_contrasts_name_two_arms(tmp_path):
    with pytest.raises(SpecError) as info:
        load_compare(write(tmp_path, contrasts=[["ema", "vanilla"]]))
    assert info.value.field == "contrasts.0" and "vanilla" in str(info.value)
    spec = load_compare(write(tmp_path, contrasts=[["ema", "ema-matched"]]))
    assert spec.tests() == [("ema", "ema-matched")]
    default = load_compare(write(tmp_path))
    assert set(default.tests()) == {("ema", "plain"), ("ema-matched", "plain"),
                                    ("ema-b1", "plain")}
    assert default.matched("ema-matched", "plain") and not default.matched("ema", "plain")


def test_replicates_have_their_own_sampler_seeds_studies_and_held_out_seeds(tmp_path):
    spec = load_compare(write(tmp_path, tuning_replicates=3))
    target = spec.targets[0]
    seeds = {spec.arm_sampler(target, "plain", r).seed for r in range(3)}
    names = {spec.arm_study(target, "plain", r).name for r in range(3)}
    held = [set(compare.heldout_seeds(spec, r)) for r in range(3)]
    assert len(seeds) == 3 and len(names) == 3
    assert not (held[0] & held[1]) and not (held[1] & held[2])
    # Replicate 0 keeps the names and seeds of a comparison without replicates.
    assert spec.arm_study(target, "plain").name == "proc__ring__plain"
    # A matched arm does not search.
    assert spec.arm_study(target, "ema-matched").search == {}


def test_the_page_says_when_tuning_is_random_search(tmp_path):
    spec = load_compare(write(tmp_path, budget=6, sampler={"name": "tpe", "seed": 0}))
    note = compare.Comparison(spec, *[None] * 5).tuning_note()
    assert "random search" in note and "start-up is 10 trials" in note
    spec = load_compare(write(tmp_path, budget=6))
    assert "then samples from its model" in compare.Comparison(spec, *[None] * 5).tuning_note()


@pytest.mark.slow
def test_a_matched_arm_retrains_exactly_its_sources_selection(tmp_path):
    proc = ganbench("compare", str(write(tmp_path)), "--workers", "2", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    out = tmp_path / "runs" / "proc" / "report"
    runs = pd.read_csv(out / "runs.csv")
    tuning = pd.read_csv(out / "tuning.csv")
    assert set(tuning["arm"]) == {"plain", "ema"}  # matched arms do not tune
    assert set(runs["replicate"]) == {0, 1}
    for rep in (0, 1):
        plain = tuning[(tuning["arm"] == "plain") & (tuning["replicate"] == rep)]
        best = plain.loc[plain["objective"].idxmin()]
        for arm in ("plain", "ema-matched"):
            rows = runs[(runs["arm"] == arm) & (runs["replicate"] == rep)]
            assert (rows["param.lr_g"] == best["param.lr_g"]).all()
            assert (rows["param.beta1"] == best["param.beta1"]).all()
            assert sorted(rows["seed"]) == compare.heldout_seeds(load_compare(
                tmp_path / "proc.yaml"), rep)
        # The arm's own fixed value wins over its source's selection.
        b1 = runs[(runs["arm"] == "ema-b1") & (runs["replicate"] == rep)]
        assert (b1["param.lr_g"] == best["param.lr_g"]).all()
        assert "param.beta1" not in b1 or b1["param.beta1"].isna().all()
    table = pd.read_csv(out / "compare.csv")
    w1 = table[table["metric"] == "w1"].set_index("arm")
    assert w1.loc["ema-matched", "test"] == "signed-rank (matched)"
    assert w1.loc["ema", "test"] == "rank-sum"
    assert (w1.loc[["ema", "ema-matched", "ema-b1"], "unit"] == "replicate").all()
    expected = pd.read_csv(out / "expected_best.csv")
    assert set(expected["arm"]) == {"plain", "ema"} and set(expected["budget"]) == {1, 2, 3}
    assert (expected["trials"] == 6).all()  # 3 trials × 2 replicates, pooled
    arms = pd.read_csv(out / "runs.csv")
    assert "hq_samples" in arms
    page = (out / "index.html").read_text()
    assert "Unit of replication: the tuning replicate" in page
    assert "expected_best.png" in page and "from plain" in page
    status = ganbench("status", str(tmp_path / "proc.yaml"), cwd=tmp_path)
    assert status.returncode == 0 and "replicate" in status.stdout
    assert status.stdout.count("from plain") == 4 and status.stdout.count("2/2") == 8
    # The verify command re-trains a matched arm's replicate from the committed files.
    check = ganbench("verify", str(out), "--runs", "3", cwd=tmp_path)
    assert check.returncode == 0, check.stdout + check.stderr
