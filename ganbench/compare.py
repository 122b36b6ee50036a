"""Budget-fair comparisons, whole: tune every arm with the same trial budget, retrain each
arm's best configuration on held-out seeds (Lucic et al. 2018, "Are GANs Created Equal?"),
assemble the per-seed frame and compute its statistics, once. ``report`` only renders.

Each (target, arm) is an Optuna study ``<name>__<target>__<arm>`` run by the sweep machinery
(so it resumes like a sweep); held-out results are stored per seed as user attributes of
that study, so a rerun skips what is done and ``ganbench report`` rebuilds the tables
without training.
"""

from __future__ import annotations

import multiprocessing as mp
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np

from ganbench import workers
from ganbench.errors import GanbenchError
from ganbench.metrics import METRICS
from ganbench.recovery import count_trials, recover_dead_workers
from ganbench.spec import CompareSpec, StudySpec, TargetSpec
from ganbench.study import get_storage, open_study

if TYPE_CHECKING:
    import pandas as pd

# Search trials train with seed 0 (spec.seeds = 1); held-out seeds start far from it.
HELDOUT_SEED_BASE = 1000



def heldout_seeds(spec: CompareSpec) -> list[int]:
    """The held-out training seeds, disjoint from the seeds used while tuning."""
    return [HELDOUT_SEED_BASE + i for i in range(spec.eval_seeds)]


def search_seeds(study: StudySpec) -> list[int]:
    """The training seeds of a tuning trial (0 .. seeds-1)."""
    return list(range(study.seeds))


@dataclass
class ArmResult:
    target: str
    arm: str
    params: dict[str, Any]
    seeds: dict[int, dict[str, Any]]   # held-out seed → metrics (+ status, "samples")


# ---------------------------------------------------------------- running the arms
def _train_heldout(args: tuple[str, dict[str, Any], list[int], str, int]
                   ) -> list[tuple[int, dict[str, Any]]]:
    """Worker: train one configuration on held-out seeds, all of them as one population
    (seed repeats have one shape: the ideal batch)."""
    from ganbench.population import train_population
    from ganbench.report import points
    from ganbench.sweep import seed_configs

    study_json, params, seeds, device, threads = args
    workers.set_threads(device, threads)
    study = StudySpec.model_validate_json(study_json)
    out = []
    for seed, result in zip(seeds, train_population(seed_configs(study, params, device,
                                                                 seeds))):
        row: dict[str, Any] = {k: float(v) for k, v in result.metrics.items()}
        row |= {"status": result.status, "reason": result.reason, "seconds": result.seconds}
        if result.samples.numel():
            row["samples"] = points(result.samples)
        out.append((seed, row))
    return out


def best_params(study, spec: CompareSpec) -> dict[str, Any]:
    """The parameters of the arm's best COMPLETE tuning trial ({} if none)."""
    complete = [t for t in study.get_trials(deepcopy=False) if t.state.name == "COMPLETE"]
    if not complete:
        return {}
    pick = min if spec.objective.direction == "minimize" else max
    return pick(complete, key=lambda t: t.values[0]).params


def _stored_seeds(study) -> dict[int, dict[str, Any]]:
    return {int(k.split(".")[1]): v for k, v in study.user_attrs.items()
            if k.startswith("eval.")}


def run_arms(spec: CompareSpec, devices: Sequence[str],
             tracker_for: Callable[[str, str], Any] | None = None,
             on_step: Callable[[str], None] | None = None) -> list[ArmResult]:
    """Tune (unless mode: fixed) and evaluate every arm on every target; resumable."""
    results = []
    seeds = heldout_seeds(spec)
    # One pool of worker processes for the whole comparison: starting processes costs
    # seconds, far more than a smoke-sized trial.
    with mp.get_context("spawn").Pool(len(devices)) as pool:
        for target in spec.targets:
            for arm in spec.arms:
                results.append(_run_arm(spec, target, arm, devices, pool, seeds,
                                        tracker_for(target.name, arm) if tracker_for else None,
                                        on_step))
    return results


def _run_arm(spec: CompareSpec, target: TargetSpec, arm: str, devices: Sequence[str], pool,
             seeds: list[int], tracker, on_step) -> ArmResult:
    study_spec = spec.arm_study(target, arm)
    study = open_study(study_spec)
    params: dict[str, Any] = {}
    if spec.mode == "tune":
        recover_dead_workers(study, tracker.end_lost if tracker else None)
        done, _ = count_trials(study.get_trials(deepcopy=False))
        if on_step:
            on_step(f"{target.name} · {arm}: tuning ({done}/{study_spec.trials} trials done)")
        if done < study_spec.trials:
            jobs = workers.worker_jobs(study_spec, devices[:study_spec.trials - done],
                                       study_spec.trials, None,
                                       tracker.handle if tracker else None)
            pool.map(workers.run_worker, jobs)
        params = best_params(study, spec)
    done_seeds = _stored_seeds(study)
    todo = [s for s in seeds if s not in done_seeds]
    if on_step:
        on_step(f"{target.name} · {arm}: held-out seeds ({len(seeds) - len(todo)}/"
                f"{len(seeds)} done)")
    # One population per device, the seeds dealt out among them.
    groups = [(devices[i], todo[i::len(devices)]) for i in range(min(len(devices), len(todo)))]
    threads = workers.population_threads(sum(1 for device, _ in groups if device == "cpu"))
    jobs = [(study_spec.model_dump_json(), params, part, device, threads)
            for device, part in groups]
    for finished in pool.imap_unordered(_train_heldout, jobs):
        for seed, out in finished:
            study.set_user_attr(f"eval.{seed}", out)  # stored as each finishes: resumable
            done_seeds[seed] = out
            if tracker:
                tracker.log_eval_seed(target.name, arm, seed, params, out, study_spec)
    return ArmResult(target.name, arm, params, {s: done_seeds[s] for s in seeds})


def stored_arms(spec: CompareSpec) -> list[ArmResult]:
    """Every arm's held-out results as stored, without training; GanbenchError naming the
    first arm whose held-out seeds are not all there."""
    results = []
    seeds = heldout_seeds(spec)
    for target in spec.targets:
        for arm in spec.arms:
            try:
                study = open_study(spec.arm_study(target, arm), create=False)
            except GanbenchError:
                raise GanbenchError(f"comparison {spec.name!r}: arm {arm!r} on {target.name} "
                                    "has not run; run `ganbench compare` first") from None
            done = _stored_seeds(study)
            missing = [s for s in seeds if s not in done]
            if missing:
                raise GanbenchError(f"comparison {spec.name!r}: arm {arm!r} on {target.name} "
                                    f"has {len(seeds) - len(missing)} of {len(seeds)} held-out "
                                    "seeds; run `ganbench compare` to finish it")
            params = best_params(study, spec) if spec.mode == "tune" else {}
            results.append(ArmResult(target.name, arm, params, {s: done[s] for s in seeds}))
    return results


# ---------------------------------------------------------------- statistics
def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm-Bonferroni adjusted p-values (step-down, monotone, capped at 1)."""
    p = np.asarray(pvalues, dtype=float)
    order = np.argsort(p)
    m = len(p)
    adjusted = np.empty(m)
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, (m - rank) * p[i])
        adjusted[i] = min(1.0, running)
    return adjusted.tolist()


def bootstrap_ci(values: np.ndarray, seed: int = 0) -> tuple[float, float]:
    """95% bootstrap confidence interval of the mean (``scipy.stats.bootstrap``, BCa,
    percentile when BCa is undefined); a constant sample gives (mean, mean)."""
    from scipy import stats

    values = np.asarray(values, dtype=float)
    if len(values) < 2 or np.ptp(values) == 0:
        return float(values.mean()), float(values.mean())
    for method in ("BCa", "percentile"):
        res = stats.bootstrap((values,), np.mean, confidence_level=0.95, n_resamples=2000,
                              method=method, rng=np.random.default_rng(seed))
        low, high = res.confidence_interval
        if np.isfinite(low) and np.isfinite(high):
            return float(low), float(high)
    return float("nan"), float("nan")


STATS_COLUMNS = ["arm", "target", "metric", "n", "mean", "std", "ci_low", "ci_high", "rank",
                 "p_value", "p_holm"]


def compare_stats(runs: "pd.DataFrame", baseline: str,
                  metrics: Sequence[str] | None = None) -> "pd.DataFrame":
    """Per target, arm and metric: n, mean, std, 95% bootstrap CI, rank, two-sided
    Mann-Whitney U p-value against the baseline arm and its Holm-adjusted value.

    ``runs`` has one row per (target, arm, seed) with a column per metric; ``metrics``
    defaults to every registered metric present in it.
    """
    import pandas as pd
    from scipy import stats

    names = list(metrics) if metrics is not None else [m for m in METRICS if m in runs]
    rows = []
    for target in runs["target"].unique():
        sub = runs[runs["target"] == target]
        for metric in names:
            if sub[metric].isna().all():
                continue
            base = sub.loc[sub["arm"] == baseline, metric].to_numpy(float)
            block = []
            for arm, group in sub.groupby("arm", sort=False):
                vals = group[metric].to_numpy(float)
                low, high = bootstrap_ci(vals)
                p = float("nan")
                if arm != baseline and len(vals) and len(base):
                    p = float(stats.mannwhitneyu(vals, base, alternative="two-sided").pvalue)
                block.append({"arm": arm, "target": target, "metric": metric, "n": len(vals),
                              "mean": float(vals.mean()), "std": float(vals.std(ddof=1))
                              if len(vals) > 1 else 0.0, "ci_low": low, "ci_high": high,
                              "p_value": p})
            means = pd.Series([b["mean"] for b in block])
            ranks = means.rank(ascending=METRICS[metric].direction == "minimize",
                               method="min")
            tested = [i for i, b in enumerate(block) if not np.isnan(b["p_value"])]
            adjusted = holm([block[i]["p_value"] for i in tested]) if tested else []
            for i, b in enumerate(block):
                b["rank"] = int(ranks[i])
                b["p_holm"] = adjusted[tested.index(i)] if i in tested else float("nan")
            rows += block
    return pd.DataFrame(rows, columns=STATS_COLUMNS)


# ---------------------------------------------------------------- the comparison, whole
@dataclass
class Comparison:
    """A comparison's results: per-seed values, their statistics and what the report draws."""

    spec: CompareSpec
    runs: "pd.DataFrame"                     # one row per (target, arm, held-out seed)
    table: "pd.DataFrame"                    # compare_stats(runs)
    references: dict[str, Any]               # target → stored evaluation points and centres
    samples: dict[tuple[str, str], Any]      # (target, arm) → first held-out seed's samples
    files: list[Path] = field(default_factory=list)  # the report files written


def assemble(spec: CompareSpec, results: Sequence[ArmResult]) -> Comparison:
    """The per-seed frame, its statistics and the sample panels of arm results."""
    import pandas as pd

    rows, samples, references = [], {}, {}
    targets = {t.name: t for t in spec.targets}
    for r in results:
        study = open_study(spec.arm_study(targets[r.target], r.arm), create=False)
        references[r.target] = study.user_attrs.get("reference")
        for seed, out in r.seeds.items():
            rows.append({"target": r.target, "arm": r.arm, "seed": seed} | {
                k: v for k, v in out.items() if k != "samples"})
        samples[(r.target, r.arm)] = r.seeds[min(r.seeds)].get("samples")
    runs = pd.DataFrame(rows)
    return Comparison(spec, runs, compare_stats(runs, spec.baseline), references, samples)


def write_report(comparison: Comparison, out: Path | None = None) -> list[Path]:
    """Render the comparison into reports/<name>/ (or ``out``)."""
    from ganbench.report import write_compare_report

    spec = comparison.spec
    comparison.files = write_compare_report(
        comparison.runs, comparison.table, spec.baseline, comparison.references,
        comparison.samples, out or Path("reports") / spec.name, f"Comparison {spec.name}")
    return comparison.files


def run(spec: CompareSpec, devices: Sequence[str] | None = None,
        on_step: Callable[[str], None] | None = None) -> Comparison:
    """Run a comparison end to end, resumably: check the services, tune and evaluate every
    arm (logged to MLflow under one parent run), compute the statistics, write the report."""
    from ganbench.study import check_spec

    first = spec.arm_study(spec.targets[0], spec.baseline)
    check_spec(first, spec.name)
    device_list = workers.default_devices(spec.workers, devices)
    root = None
    if spec.tracking is not False:
        from ganbench.tracking import Tracker, check_reachable, resolve_uri

        check_reachable(resolve_uri(spec.tracking.uri))
    get_storage(first)  # an unreachable storage fails here, before any training
    if spec.tracking is not False:
        root = Tracker.for_compare(spec, spec.model_dump(exclude_none=True, mode="json"))

    def tracker_for(target: str, arm: str):
        return root.nested(f"{target}__{arm}", {"ganbench.role": "arm",
                                                "ganbench.study": spec.name, "arm": arm,
                                                "target": target})

    results = run_arms(spec, device_list, tracker_for if root else None, on_step)
    comparison = assemble(spec, results)
    write_report(comparison)
    if root is not None:
        root.end()
    return comparison


def rebuild(spec: CompareSpec, out: Path | None = None) -> Comparison:
    """The report of a finished comparison from its storage alone (no training)."""
    comparison = assemble(spec, stored_arms(spec))
    write_report(comparison, out)
    return comparison


@dataclass
class ArmProgress:
    """How far one arm of a comparison is (``ganbench status``)."""

    target: str
    arm: str
    tuned: int          # counted tuning trials
    budget: int         # tuning trials planned
    heldout: int        # held-out seeds stored
    seeds: int          # held-out seeds planned


def progress(spec: CompareSpec) -> list[ArmProgress]:
    """Every arm's tuning and held-out progress, read from the storage (nothing created)."""
    out = []
    for target in spec.targets:
        for arm in spec.arms:
            study_spec = spec.arm_study(target, arm)
            try:
                study = open_study(study_spec, create=False)
            except GanbenchError:  # not started yet
                out.append(ArmProgress(target.name, arm, 0, study_spec.trials, 0,
                                       spec.eval_seeds))
                continue
            done, _ = count_trials(study.get_trials(deepcopy=False))
            stored = set(_stored_seeds(study)) & set(heldout_seeds(spec))
            out.append(ArmProgress(target.name, arm, done, study_spec.trials, len(stored),
                                   spec.eval_seeds))
    return out
