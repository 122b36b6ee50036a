"""What order-independent tuning costs in wall time: a comparison's arms ask their trials in
synchronous batches (ask a batch in order, train it, tell it, ask the next), so a worker can
wait at a batch's end. Side by side in one run, on the same comparison and workers, this
prints each layout's wall time and the seconds its tuning trials trained (summed over
trials): with one arm and batches of 1, one of two workers waits through the tuning.

    python benchmarks/tuning_batch.py            # 2 workers, about 3 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

from ganbench import compare
from ganbench.spec import CompareSpec

SPEC = {
    "targets": [{"name": "ring"}],
    "train": {"steps": 600, "eval_every": 300, "eval_samples": 500, "batch_size": 128},
    "model": {"hidden": 64, "depth": 2, "noise_dim": 2},
    "search": {"lr_g": {"type": "float", "low": 1e-4, "high": 2e-3, "log": True},
               "lr_d": {"type": "float", "low": 1e-4, "high": 2e-3, "log": True}},
    "baseline": "plain", "budget": 4, "eval_seeds": 4, "tracking": False,
    "sampler": {"name": "tpe", "seed": 0}, "pruner": {"name": "none"},
}
ARMS = {"plain": {}, "ema": {"tricks": {"ema": {"decay": 0.99}}},
        "r1": {"tricks": {"r1": {"gamma": 0.1}}}, "pacgan2": {"tricks": {"pack": {"m": 2}}}}


def run(name: str, arms: dict, batch: int, workers: int) -> tuple[float, float]:
    """(wall seconds, tuning trials' training seconds) of one comparison, in the current
    folder."""
    spec = CompareSpec.model_validate(SPEC | {"name": name, "arms": arms,
                                              "baseline": next(iter(arms)),
                                              "tuning_batch": batch, "workers": workers})
    start = time.perf_counter()
    result = compare.run(spec, ["cpu"] * workers)
    wall = time.perf_counter() - start
    arms_used = result.table.drop_duplicates(["target", "arm"])
    return wall, float(arms_used["tune_seconds"].sum())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    print(f"{args.workers} workers, {os.cpu_count()} cores; 4 tuning trials per arm, 4 "
          "held-out seeds, 600 steps")
    layouts = [("4 arms, batches of 1", ARMS, 1), ("4 arms, batches of 2", ARMS, 2),
               ("1 arm, batches of 1", {"plain": {}}, 1),
               ("1 arm, batches of 2", {"plain": {}}, 2)]
    print(f"{'layout':<24}{'wall s':>8}{'tuning s':>10}")
    for i, (label, arms, batch) in enumerate(layouts):
        with tempfile.TemporaryDirectory() as tmp:
            os.chdir(tmp)
            wall, tuning = run(f"bench{i}", arms, batch, args.workers)
        print(f"{label:<24}{wall:>8.1f}{tuning:>10.1f}", flush=True)


if __name__ == "__main__":
    main()
