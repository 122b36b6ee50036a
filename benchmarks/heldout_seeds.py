"""What more held-out seeds cost a comparison: 5, 10 and 20 seeds side by side in one run.

A comparison retrains each arm's best configuration on its held-out seeds as one population
(ganbench.compare). This times exactly that step — ``train_population`` of the shipped
tricks comparison's baseline configuration on 5, 10 and 20 held-out seeds, with the
held-out evaluation sample and per-member streams — round-robin over ``--rounds`` rounds
(so a busy machine slows each size alike), and prints each size's median wall time and its
ratio to 5 seeds, with the range over rounds.

    python benchmarks/heldout_seeds.py [--steps 1500] [--rounds 2]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from ganbench.compare import heldout_configs, heldout_seeds  # noqa: E402
from ganbench.population import train_population  # noqa: E402
from ganbench.spec import load_compare  # noqa: E402

SIZES = (5, 10, 20)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    spec = load_compare(ROOT / "studies" / "tricks.yaml",
                        [f"train.steps={args.steps}", "eval_seeds=20"])
    study = spec.arm_study(spec.targets[0], spec.baseline)
    params = {"lr_g": 5e-4, "lr_d": 5e-4}
    seeds = heldout_seeds(spec)
    times: dict[int, list[float]] = {n: [] for n in SIZES}
    for _ in range(args.rounds):
        for n in SIZES:
            configs = heldout_configs(spec, study, params, "cpu", seeds[:n])
            start = time.perf_counter()
            train_population(configs, streams="member")
            times[n].append(time.perf_counter() - start)
    print(f"# held-out seeds of one arm: {args.steps} steps, {study.target.name}, "
          f"{torch.get_num_threads()} torch threads, {args.rounds} rounds")
    print(f"{'seeds':>6} {'median s':>9} {'vs 5':>7} {'range vs 5':>16}")
    base = statistics.median(times[SIZES[0]])
    for n in SIZES:
        ratios = [t / b for t, b in zip(times[n], times[SIZES[0]])]
        median = statistics.median(times[n])
        print(f"{n:>6} {median:>9.1f} {median / base:>6.2f}x"
              f" {min(ratios):>7.2f}-{max(ratios):.2f}x")


if __name__ == "__main__":
    main()
