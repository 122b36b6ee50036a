"""TPE's batched asks with and without a constant liar, side by side on the mog study.

A population worker asks K trials before it tells any. Without ``constant_liar``, TPE draws
all K from the same posterior; with it, the running trials count as (bad) observations and
the batch spreads out. For each sampler seed the mog study runs twice in population mode —
the same trials, steps and population size — and this prints the best W1 each reached and
the median W1 of the trials drawn after the first population (the first K are TPE's random
start-up draws, the same in both runs).

    python benchmarks/constant_liar.py [--seeds 3] [--trials 48] [--population 8]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parent.parent


def best_w1(seed: int, liar: bool, args: argparse.Namespace) -> tuple[float, float]:
    """Best W1 of one sweep, and the median W1 of its trials after the first population."""
    with tempfile.TemporaryDirectory() as folder:
        cmd = [sys.executable, "-m", "ganbench", "sweep", str(ROOT / "studies/mog.yaml"),
               "--set", "name=liar", "--set", "tracking=false",
               "--set", f"sampler.seed={seed}", "--set", f"sampler.constant_liar={liar}",
               "--set", f"train.steps={args.steps}", "--set", "train.eval_every=250",
               "--set", "pruner={name: none}",
               "--trials", str(args.trials), "--population", str(args.population)]
        subprocess.run(cmd, cwd=folder, check=True, capture_output=True, text=True)
        frame = pd.read_csv(Path(folder) / "reports/liar/leaderboard.csv")
        later = frame[frame["number"] >= args.population]["objective_w1"]
        return float(frame["objective_w1"].min()), float(later.median())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--trials", type=int, default=48)
    parser.add_argument("--population", type=int, default=8)
    parser.add_argument("--steps", type=int, default=500)
    args = parser.parse_args()
    print(f"# mog, {args.trials} trials of {args.steps} steps, populations of "
          f"{args.population}, TPE; best W1 (lower is better)")
    print(f"{'':>12}{'best W1':>26}{'median W1 after the 1st population':>40}")
    print(f"{'sampler seed':>12}{'no liar':>10}{'liar':>8}{'diff':>8}{'no liar':>16}{'liar':>12}"
          f"{'diff':>12}")
    diffs = []
    for seed in range(args.seeds):
        without, median_without = best_w1(seed, False, args)
        with_liar, median_liar = best_w1(seed, True, args)
        diffs.append(with_liar - without)
        print(f"{seed:>12}{without:>10.4f}{with_liar:>8.4f}{diffs[-1]:>+8.4f}"
              f"{median_without:>16.4f}{median_liar:>12.4f}{median_liar - median_without:>+12.4f}",
              flush=True)
    print(f"mean difference (liar − no liar): {statistics.mean(diffs):+.4f} over "
          f"{len(diffs)} sampler seeds ({sum(d < 0 for d in diffs)} of {len(diffs)} better "
          "with the liar)")


if __name__ == "__main__":
    main()
