"""Budget-fair comparisons: tune every arm with the same trial budget, then retrain each
arm's best configuration on held-out seeds (Lucic et al. 2018, "Are GANs Created Equal?").

Each (target, arm) is an Optuna study ``<name>__<target>__<arm>`` run by the sweep machinery
(so it resumes like a sweep); evaluation results are stored per seed as user attributes of
that study, so a rerun skips what is done.
"""

from __future__ import annotations

import multiprocessing as mp
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from ganbench import sweep
from ganbench.spec import CompareSpec, StudySpec

# Search trials train with seed 0 (spec.seeds = 1); evaluation seeds start far from it.
EVAL_SEED_BASE = 1000


def eval_seeds(spec: CompareSpec) -> list[int]:
    """The held-out seeds, disjoint from the seeds used while tuning (0 .. seeds-1)."""
    return [EVAL_SEED_BASE + i for i in range(spec.eval_seeds)]


def search_seeds(study: StudySpec) -> list[int]:
    return list(range(study.seeds))


QUICK = ["budget=2", "eval_seeds=2", "train.steps=200", "train.eval_every=100",
         "train.eval_samples=500"]


@dataclass
class ArmResult:
    target: str
    arm: str
    params: dict[str, Any]
    seeds: dict[int, dict[str, Any]]   # seed → metrics (+ "samples")


def _eval_seeds(args: tuple[str, dict[str, Any], list[int], str, int]
                ) -> list[tuple[int, dict[str, Any]]]:
    """Worker: train one configuration on held-out seeds, all of them as one population
    (seed repeats have one shape: the ideal batch)."""
    import torch

    from ganbench.population import train_population

    study_json, params, seeds, device, threads = args
    if device == "cpu":
        torch.set_num_threads(threads)
    study = StudySpec.model_validate_json(study_json)
    out = []
    configs = sweep.seed_configs(study, params, device, seeds)
    for seed, result in zip(seeds, train_population(configs)):
        row: dict[str, Any] = {k: float(v) for k, v in result.metrics.items()}
        row |= {"status": result.status, "reason": result.reason, "seconds": result.seconds}
        if result.samples.numel():
            row["samples"] = sweep.points(result.samples)
        out.append((seed, row))
    return out


def _tune(args: tuple[str, str, int, Any, int, int]) -> int:
    """Worker: run trials of one arm's study until it holds its budget."""
    import torch

    study_json, device, total, handle, index, threads = args
    if device == "cpu":
        torch.set_num_threads(threads)
    tracker = None
    if handle is not None:
        from ganbench.tracking import Tracker

        tracker = Tracker.attach(handle)
    study = StudySpec.model_validate_json(study_json)
    return sweep.worker_loop(study, device, total, tracker=tracker, worker=index)


def best_params(study, spec: CompareSpec) -> dict[str, Any]:
    complete = [t for t in study.get_trials(deepcopy=False) if t.state.name == "COMPLETE"]
    if not complete:
        return {}
    pick = min if spec.objective.direction == "minimize" else max
    return pick(complete, key=lambda t: t.values[0]).params


def run_compare(spec: CompareSpec, devices: Sequence[str],
                tracker_for: Callable[[str, str], Any] | None = None,
                on_step: Callable[[str], None] | None = None) -> list[ArmResult]:
    """Tune (unless mode: fixed) and evaluate every arm on every target; resumable."""
    results = []
    seeds = eval_seeds(spec)
    # One pool of worker processes for the whole comparison: starting processes costs
    # seconds, far more than a smoke-sized trial.
    with mp.get_context("spawn").Pool(len(devices)) as pool:
        for target in spec.targets:
            for arm in spec.arms:
                results.append(_run_arm(spec, target, arm, devices, pool, seeds,
                                        tracker_for(target.name, arm) if tracker_for else None,
                                        on_step))
    return results


def _run_arm(spec: CompareSpec, target, arm: str, devices: Sequence[str], pool,
             seeds: list[int], tracker, on_step) -> ArmResult:
    study_spec = spec.arm_study(target, arm)
    study = sweep.open_study(study_spec)
    params: dict[str, Any] = {}
    if spec.mode == "tune":
        sweep.recover_dead_workers(study, tracker.end_lost if tracker else None)
        done, _ = sweep.count_trials(study.get_trials(deepcopy=False))
        if on_step:
            on_step(f"{target.name} · {arm}: tuning ({done}/{study_spec.trials} trials done)")
        if done < study_spec.trials:
            workers = devices[:study_spec.trials - done]
            threads = sweep.cpu_threads(study_spec, workers.count("cpu"))
            jobs = [(study_spec.model_dump_json(), device, study_spec.trials,
                     tracker.handle if tracker else None, i, threads)
                    for i, device in enumerate(workers)]
            pool.map(_tune, jobs)
        params = best_params(study, spec)
    done_seeds = {int(k.split(".")[1]): v for k, v in study.user_attrs.items()
                  if k.startswith("eval.")}
    todo = [s for s in seeds if s not in done_seeds]
    if on_step:
        on_step(f"{target.name} · {arm}: held-out seeds ({len(seeds) - len(todo)}/"
                f"{len(seeds)} done)")
    # One population per device, the seeds dealt out among them.
    groups = [(devices[i], todo[i::len(devices)]) for i in range(min(len(devices), len(todo)))]
    cpus = sum(1 for device, _ in groups if device == "cpu")
    threads = sweep.population_threads(cpus)
    jobs = [(study_spec.model_dump_json(), params, part, device, threads)
            for device, part in groups]
    for finished in pool.imap_unordered(_eval_seeds, jobs):
        for seed, out in finished:
            study.set_user_attr(f"eval.{seed}", out)  # stored as each finishes: resumable
            done_seeds[seed] = out
            if tracker:
                tracker.log_eval_seed(target.name, arm, seed, params, out, study_spec)
    return ArmResult(target.name, arm, params, {s: done_seeds[s] for s in seeds})
