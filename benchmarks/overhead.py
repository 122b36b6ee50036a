"""Harness and tracking overhead per trial, measured side by side in one run.

Trains the same trial configurations of the default study (studies/mog.yaml) three ways,
in one process with one torch thread:
  (a) plain ``train()`` calls,
  (b) through the sweep worker (Optuna journal storage, ask/tell, reporting, pruning checks),
  (c) the same plus MLflow tracking (sqlite backend, curves, artifacts).
Prints each total and the overheads relative to (a).

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

    from ganbench import sweep
    from ganbench.spec import load_spec
    from ganbench.tracking import Tracker
    from ganbench.train import train

    overrides = [f"train.steps={args.steps}", f"trials={args.trials}", "pruner.name=none"]
    spec = load_spec(ROOT / "studies" / "mog.yaml", overrides)
    # Fixed parameter sets so the three variants train exactly the same models.
    grid = [{"noise_dim": 2 + i % 3, "hidden": 128, "lr_g": 5e-4, "lr_d": 5e-4,
             "d_steps": 1 + i % 2} for i in range(args.trials)]

    t0 = time.perf_counter()
    for params in grid:
        train(spec.trial_config(params))
    plain = time.perf_counter() - t0

    def through_sweep(tracking: bool) -> float:
        with tempfile.TemporaryDirectory() as tmp:
            cwd = os.getcwd()
            os.chdir(tmp)
            try:
                s = spec.model_copy(update={"name": f"overhead-{tracking}"})
                study = sweep.open_study(s)
                for params in grid:
                    study.enqueue_trial(params)
                tracker = None
                if tracking:
                    tracker = Tracker.for_study(s, s.model_dump(mode="json"), "journal")
                t = time.perf_counter()
                sweep.worker_loop(s, "cpu", s.trials, tracker=tracker)
                elapsed = time.perf_counter() - t
                if tracker:
                    tracker.finish(study)
                return elapsed
            finally:
                os.chdir(cwd)

    swept = through_sweep(False)
    tracked = through_sweep(True)
    print(f"{args.trials} trials of {args.steps} steps (studies/mog.yaml), one torch thread")
    print(f"  (a) plain train():          {plain:7.2f} s")
    print(f"  (b) sweep worker, journal:  {swept:7.2f} s   harness overhead "
          f"{100 * (swept - plain) / plain:+.1f}%")
    print(f"  (c) (b) + MLflow tracking:  {tracked:7.2f} s   tracking overhead "
          f"{100 * (tracked - swept) / plain:+.1f}%")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
