"""Harness and tracking overhead per trial, measured side by side in one run.

Trains the same trial configurations of the default study (studies/mog.yaml) three ways,
in one process with one torch thread:
  (a) plain ``train()`` calls,
  (b) through the sweep worker (Optuna journal storage, ask/tell, reporting, pruning checks),
  (c) the same plus MLflow tracking (sqlite backend, curves, artifacts).
Wall-clock totals of (a)-(c) differ by machine noise as much as by overhead, so the worker
runs are also instrumented: the time spent in the harness (everything in the worker loop
outside ``train()``) and in MLflow calls is summed directly and compared to training time.

    python benchmarks/overhead.py [--trials 4] [--steps 1500]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=4)
    parser.add_argument("--steps", type=int, default=1500)
    args = parser.parse_args()
    torch.set_num_threads(1)

    from ganbench import trial as trial_mod
    from ganbench import worker
    from ganbench.spec import load_spec
    from ganbench.study import open_study
    from ganbench.tracking import Tracker
    from ganbench.train import train

    overrides = [f"train.steps={args.steps}", f"trials={args.trials}", "pruner={name: none}"]
    spec = load_spec(ROOT / "studies" / "mog.yaml", overrides)
    # Fixed parameter sets so the three variants train exactly the same models.
    grid = [{"noise_dim": 2 + i % 3, "hidden": 128, "lr_g": 5e-4, "lr_d": 5e-4,
             "d_steps": 1 + i % 2} for i in range(args.trials)]

    t0 = time.perf_counter()
    for params in grid:
        train(spec.trial_config(params))
    plain = time.perf_counter() - t0

    import ganbench.tracking as tracking_mod

    spent = {"train": 0.0, "tracking": 0.0}

    def timed(fn, key):
        def wrapper(*a, **k):
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                spent[key] += time.perf_counter() - t
        return wrapper

    trial_mod.train = timed(train, "train")
    for name in ("__init__", "log_eval", "end"):
        setattr(tracking_mod.TrialRun, name,
                timed(getattr(tracking_mod.TrialRun, name), "tracking"))

    def through_sweep(tracking: bool) -> float:
        with tempfile.TemporaryDirectory() as tmp:
            cwd = os.getcwd()
            os.chdir(tmp)
            try:
                s = spec.model_copy(update={"name": f"overhead-{tracking}"})
                study = open_study(s)
                for params in grid:
                    study.enqueue_trial(params)
                tracker = None
                if tracking:  # as in a worker process: attach() also loads the plotting stack
                    handle = Tracker.for_study(s, s.model_dump(mode="json"), "journal").handle
                    tracker = Tracker.attach(handle)
                t = time.perf_counter()
                worker.worker_loop(s, "cpu", s.trials, tracker=tracker)
                elapsed = time.perf_counter() - t
                if tracker:
                    tracker.finish(study)
                return elapsed
            finally:
                os.chdir(cwd)

    swept = through_sweep(False)
    harness = swept - spent["train"]
    spent.update(train=0.0, tracking=0.0)
    tracked = through_sweep(True)
    # log_eval runs inside train(): subtract it to get pure training time.
    log_eval_inside = spent["tracking"]
    pure_train = spent["train"] - log_eval_inside
    print(f"{args.trials} trials of {args.steps} steps (studies/mog.yaml), one torch thread")
    print(f"  (a) plain train():          {plain:7.2f} s")
    print(f"  (b) sweep worker, journal:  {swept:7.2f} s   harness overhead "
          f"{100 * (swept - plain) / plain:+.1f}%")
    print(f"  (c) (b) + MLflow tracking:  {tracked:7.2f} s   tracking overhead "
          f"{100 * (tracked - swept) / plain:+.1f}%")
    print(f"  instrumented, (b): harness time outside train() {harness:.2f} s = "
          f"{100 * harness / (swept - harness):.2f}% of training time")
    print(f"  instrumented, (c): time in MLflow calls {spent['tracking']:.2f} s = "
          f"{100 * spent['tracking'] / pure_train:.2f}% of training time")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
