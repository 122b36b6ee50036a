"""ganbench beside the tools a user would pick instead, on the same work, in one run.

The same search of studies/mog.yaml — its space, its trainer and evaluation (exact W1 on
2500 samples, ganbench's ``train``), TPE with the study's start-up trials, ``--trials``
trials at the study's full length and no pruning (so every tool spends the same budget:
trials × steps) — run for each of ``--seeds`` sampler seeds as
  (a) ``ganbench sweep``: one worker process per core, the storage a journal file;
  (b) ``ganbench sweep --population K``: K trials trained as one batched program;
  (c) Ray Tune with ``OptunaSearch`` (the same TPE) calling ganbench's ``train``, one trial
      per core on a local Ray instance (its start counted);
  (d) a plain Optuna script, ``study.optimize(objective, n_jobs=cores)`` around ``train``
      (threads of one process, in-memory storage).
MLflow is off everywhere (only ganbench would log). Each tool's TPE draws its own
configurations, and wide or D-heavy ones take longer to train, so beside the wall time and
trials per minute the table gives the rate of useful work: the matrix-product FLOPs of
every trial trained (``population.step_flops`` × steps), per second of wall time — the fair
speed comparison. Prints, per tool, medians over seeds of wall time, trials per minute and
GFLOP/s, best W1 (median, and the range over seeds), and the GFLOP/s ratio to (a); every
tool runs once per seed, the tools of a seed one after another, so the machine's load is
shared out alike.

    python benchmarks/peers.py [--trials 32] [--seeds 3] [--population 16] [--only abcd]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STUDY = ROOT / "studies" / "mog.yaml"
TOOLS = {"a": "ganbench sweep", "b": "ganbench sweep --population K",
         "c": "Ray Tune + OptunaSearch", "d": "Optuna optimize(n_jobs)"}


def overrides(trials: int, seed: int) -> list[str]:
    return [f"trials={trials}", f"sampler.seed={seed}", "pruner={name: none}",
            "tracking=false"]


def spec_for(trials: int, seed: int):
    from ganbench.spec import load_spec

    return load_spec(STUDY, overrides(trials, seed))


def tpe(spec, seed: int):
    import optuna

    opts = dict(spec.sampler.model_extra or {})
    return optuna.samplers.TPESampler(seed=seed, **opts)


def distributions(spec) -> dict:
    """The study's search space as Optuna distributions (what ganbench's sweep samples)."""
    import optuna.distributions as od

    out = {}
    for name, d in spec.search.items():
        if d.type == "categorical":
            out[name] = od.CategoricalDistribution(d.choices)
        elif d.type == "int":
            out[name] = od.IntDistribution(d.low, d.high, log=d.log)
        else:
            out[name] = od.FloatDistribution(d.low, d.high, log=d.log)
    return out


def w1_of(spec, params: dict) -> float:
    """ganbench's trainer and evaluation on the study's fixed values and ``params``."""
    import torch

    from ganbench.train import train

    torch.set_num_threads(1)
    result = train(spec.trial_config(params))
    return float(result.metrics["w1"])


def work(spec, trials: list[dict]) -> float:
    """Matrix-product FLOPs of training every one of ``trials`` (their parameters)."""
    from ganbench.population import step_flops

    return sum(step_flops(c) * c.steps for c in (spec.trial_config(p) for p in trials))


def run_ganbench(trials: int, seed: int, cores: int, population: int | None
                 ) -> tuple[float, list[dict]]:
    """(a)/(b): the CLI as a user runs it, in a fresh folder; best W1 and every trial's
    parameters."""
    import optuna
    from optuna.storages.journal import JournalFileBackend

    with tempfile.TemporaryDirectory() as tmp:
        name = f"peers-{'pop' if population else 'sweep'}-{seed}"
        args = [sys.executable, "-m", "ganbench", "sweep", str(STUDY), "--set", f"name={name}"]
        for o in overrides(trials, seed):
            args += ["--set", o]
        args += ["--population", str(population)] if population else ["--workers", str(cores)]
        subprocess.run(args, cwd=tmp, check=True, capture_output=True, text=True,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
        storage = optuna.storages.JournalStorage(
            JournalFileBackend(str(Path(tmp) / "runs" / name / "optuna.log")))
        study = optuna.load_study(study_name=name, storage=storage)
        return study.best_value, [t.params for t in study.trials if t.state.is_finished()]


def run_ray_tune(trials: int, seed: int, cores: int) -> tuple[float, list[dict]]:
    """(c): Ray Tune's Optuna search over the same space, the same trainer per trial."""
    import ray
    from ray import tune
    from ray.tune.search.optuna import OptunaSearch

    spec = spec_for(trials, seed)
    ray.init(num_cpus=cores, include_dashboard=False, log_to_driver=False,
             logging_level="ERROR")
    try:
        def trainable(config: dict) -> dict:
            return {"w1": w1_of(spec, config)}

        searcher = OptunaSearch(space=distributions(spec), metric="w1", mode="min",
                                sampler=tpe(spec, seed))
        with tempfile.TemporaryDirectory() as tmp:
            tuner = tune.Tuner(
                tune.with_resources(trainable, {"cpu": 1}),
                tune_config=tune.TuneConfig(search_alg=searcher, num_samples=trials,
                                            max_concurrent_trials=cores),
                run_config=tune.RunConfig(storage_path=tmp, name="peers", verbose=0))
            results = tuner.fit()
            return (float(results.get_best_result("w1", "min").metrics["w1"]),
                    [r.config for r in results])
    finally:
        ray.shutdown()


def run_optuna(trials: int, seed: int, cores: int) -> tuple[float, list[dict]]:
    """(d): the plain script a user writes: optimize with n_jobs threads."""
    import optuna

    spec = spec_for(trials, seed)
    space = distributions(spec)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="minimize", sampler=tpe(spec, seed))

    def objective(trial) -> float:
        params = {k: _suggest(trial, k, d) for k, d in space.items()}
        return w1_of(spec, params)

    study.optimize(objective, n_trials=trials, n_jobs=cores)
    return study.best_value, [t.params for t in study.trials]


def _suggest(trial, name, d):
    import optuna.distributions as od

    if isinstance(d, od.CategoricalDistribution):
        return trial.suggest_categorical(name, d.choices)
    if isinstance(d, od.IntDistribution):
        return trial.suggest_int(name, d.low, d.high, log=d.log)
    return trial.suggest_float(name, d.low, d.high, log=d.log)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=32)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--population", type=int, default=16)
    parser.add_argument("--only", default="abcd", help="Tools to run, e.g. ad.")
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    import platform

    import torch

    print(f"{platform.processor() or platform.machine()}, {cores} cores, torch "
          f"{torch.__version__}; {args.trials} trials of {STUDY.name} per tool and seed, "
          f"seeds 0..{args.seeds - 1}", flush=True)
    rows: dict[str, list[tuple[float, float, float]]] = {k: [] for k in args.only}
    for seed in range(args.seeds):
        spec = spec_for(args.trials, seed)
        for key in args.only:
            start = time.perf_counter()
            if key == "a":
                best, trained = run_ganbench(args.trials, seed, cores, None)
            elif key == "b":
                best, trained = run_ganbench(args.trials, seed, cores, args.population)
            elif key == "c":
                best, trained = run_ray_tune(args.trials, seed, cores)
            else:
                best, trained = run_optuna(args.trials, seed, cores)
            wall = time.perf_counter() - start
            flops = work(spec, trained) / wall
            rows[key].append((wall, best, flops))
            print(f"seed {seed} · ({key}) {TOOLS[key]}: {wall:.1f} s, {len(trained)} trials, "
                  f"{flops / 1e9:.2f} GFLOP/s, best W1 {best:.4f}", flush=True)
    base = statistics.median(f for _, _, f in rows["a"]) if rows.get("a") else None
    print("\n| tool | wall | trials/min | GFLOP/s | vs (a) | best W1, median [range] |")
    print("|---|---|---|---|---|---|")
    for key, runs in rows.items():
        wall = statistics.median(w for w, _, _ in runs)
        rate = statistics.median(args.trials / w * 60 for w, _, _ in runs)
        flops = statistics.median(f for _, _, f in runs)
        bests = [b for _, b, _ in runs]
        ratio = f"{flops / base:.2f}" if base else "–"
        print(f"| ({key}) {TOOLS[key].replace('K', str(args.population))} | {wall:.0f} s | "
              f"{rate:.1f} | {flops / 1e9:.2f} | {ratio} | {statistics.median(bests):.3f} "
              f"[{min(bests):.3f}, {max(bests):.3f}] |")


if __name__ == "__main__":
    main()
