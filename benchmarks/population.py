"""Population engine vs one trial at a time, measured side by side in one run.

For each scenario the same member configurations are trained
  (a) naively, one ``train()`` after another in this process (all torch threads),
  (b) by a naive pool of worker processes, one ``train()`` per task (one thread each on
      CPU; several processes sharing the GPU on CUDA),
  (c) by the population engine, ``train_population()`` of K members, K = 1, 4, 16, 64
      (and 256 on a GPU); on a CPU also the largest K on one lane (its shards one after
      another on all torch threads instead of side by side on one thread each).
Scenarios: a same-shape population (G and D 2×128, noise 8, batch 256) with d_steps 1 and
with d_steps 5, a mixed population (hidden 32..512, noise 2..128, d_steps 1..5), and PacGAN's
architecture and protocol (G 4×400 with batch norm, maxout D 3×200×5 pieces, N(0, 0.02)
init, batch 100 from a fixed pool, simultaneous updates: studies/pacgan.yaml).
Members differ in seed and learning rates, as a sweep's do.

Each row gives aggregate generator iterations per second (all members' G steps over wall
time, model building and one final evaluation on 500 samples included), trials per hour
for a 2000-step trial at that rate, the ratios to (a) and (b), and the share of the
measured matmul peak that the networks' matrix products reach. After the mixed scenario,
a table per bucket shows where its time goes: each bucket's rate one at a time, as a
population, and that of its bare batched product, which bounds what batching can win; and
the same population without noise padding. Then the largest same-shape population with its
forwards compiled (``compile=True``) beside eager: wall and steady rates, and what compiling
costs. Last, the share of a population's wall time that its metrics take under the mog
study's evaluation schedule.

    python benchmarks/population.py [--steps 200] [--device auto] [--quick]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import random
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ganbench import population  # noqa: E402
from ganbench.devices import resolve_device  # noqa: E402
from ganbench.population import (  # noqa: E402
    bucket_key,
    step_flops,
    train_population,
    tune_allocator,
)
from ganbench.train import TrainConfig, train  # noqa: E402

TRIAL_STEPS = 2000  # the trial length "trials per hour" refers to


def matmul_peak(device: torch.device) -> float:
    """Measured FLOP/s of a 1024² (CPU) or 8192² (GPU) fp32 matrix product."""
    n = 8192 if device.type == "cuda" else 1024
    a = torch.randn(n, n, device=device)
    for _ in range(3):
        a @ a
    reps = 10
    return 2 * n**3 * reps / timed(lambda: [a @ a for _ in range(reps)], device)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def configs(kind: str, n: int, steps: int, device: str) -> list[TrainConfig]:
    """``n`` member configs of a scenario, differing in seed and learning rates."""
    rnd = random.Random(0)
    out = []
    for i in range(n):
        lr = 10 ** rnd.uniform(-4, -2.5)
        common = dict(lr_g=lr, lr_d=lr * rnd.choice([1, 2, 4]), steps=steps,
                      eval_every=steps, eval_samples=500, seed=i, device=device)
        if kind == "pacgan":
            out.append(TrainConfig(target="grid", pool=100_000, batch_size=100, beta1=0.8,
                                   update="simultaneous", g_hidden=[400] * 4,
                                   d_hidden=[200] * 3, g_norm="batch", pieces=5,
                                   init_std=0.02, **common))
        elif kind == "mixed":
            out.append(TrainConfig(hidden=rnd.choice([32, 64, 128, 256, 512]),
                                   noise_dim=rnd.choice([2, 8, 32, 128]),
                                   d_steps=rnd.randint(1, 5), **common))
        else:
            out.append(TrainConfig(hidden=128, noise_dim=8, d_steps=int(kind[-1]), **common))
    return out


def _pool_init(threads: int) -> None:
    torch.set_num_threads(threads)
    tune_allocator()


def _pool_train(config: TrainConfig) -> int:
    return train(config).steps


def timed(fn, device: torch.device) -> float:
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def bmm_rate(n: int, batch: int, hidden: int, device: torch.device) -> float:
    """Measured FLOP/s of the hidden-to-hidden batched product ``[n,B,H] @ [n,H,H]``."""
    x = torch.randn(n, batch, hidden, device=device)
    w = torch.randn(n, hidden, hidden, device=device)
    for _ in range(3):
        torch.bmm(x, w)
    reps = 10
    seconds = timed(lambda: [torch.bmm(x, w) for _ in range(reps)], device)
    return 2 * n * batch * hidden**2 * reps / seconds


def bucket_profile(members: list[TrainConfig], seq_seconds: dict[int, float], steps: int,
                   device: torch.device) -> None:
    """Where a mixed population's time goes, bucket by bucket.

    For each bucket: its share of the matmul FLOPs, the rate one-at-a-time training reached
    on its members, the rate of the bucket trained alone as a population, and the rate of
    its hidden layer's batched product by itself. The last line bounds the speed-up: the
    sequential time over the time every bucket would take at its bare bmm rate.
    """
    buckets: dict[tuple, list[TrainConfig]] = {}
    for c in members:
        buckets.setdefault(bucket_key(c), []).append(c)
    total = sum(step_flops(c) for c in members) * steps
    print("\n### the mixed population bucket by bucket (GFLOP/s of the matmuls)")
    print(f"{'hidden':>8}{'members':>9}{'% FLOPs':>9}{'seq':>8}{'population':>12}"
          f"{'bare bmm':>10}")
    ceiling = 0.0
    for grp in sorted(buckets.values(), key=lambda g: g[0].hidden):
        flops = sum(step_flops(c) for c in grp) * steps
        seq = sum(seq_seconds[id(c)] for c in grp)
        pop = timed(lambda grp=grp: train_population(grp), device)
        bare = bmm_rate(len(grp), grp[0].batch_size, grp[0].hidden, device)
        ceiling += flops / bare
        print(f"{grp[0].hidden:>8}{len(grp):>9}{100 * flops / total:>8.1f}%"
              f"{flops / seq / 1e9:>8.0f}{flops / pop / 1e9:>12.0f}{bare / 1e9:>10.0f}")
    print(f"ceiling with every bucket at its bare bmm rate: "
          f"{sum(seq_seconds.values()) / ceiling:.2f}x sequential")


def run_scenario(kind: str, title: str, steps: int, ks: list[int], n_naive: int,
                 device: torch.device, pool: mp.pool.Pool, n_pool: int, peak: float
                 ) -> dict[str, float]:
    dev = str(device)
    members = configs(kind, max(ks), steps, dev)
    flops = {id(c): step_flops(c) for c in members}
    print(f"\n## {title} — {steps} G steps per member")
    # The headline is % of the measured peak and the ratio to the pool: the ratio to naive
    # sequential measures the host (its single-thread speed drifts) as much as the engine.
    print(f"{'mode':<34}{'members':>8}{'G-it/s':>10}{'% peak':>8}{'vs pool':>9}"
          f"{'trials/h':>10}{'vs seq':>9}")
    rows: dict[str, float] = {}

    def row(name: str, batch: list[TrainConfig], seconds: float) -> float:
        rate = len(batch) * steps / seconds
        achieved = sum(flops[id(c)] for c in batch) * steps / seconds
        seq, pl = rows.get("seq", rate), rows.get("pool", rate)
        print(f"{name:<34}{len(batch):>8}{rate:>10.0f}{100 * achieved / peak:>7.1f}%"
              f"{rate / pl:>8.2f}x{3600 * rate / TRIAL_STEPS:>10.0f}{rate / seq:>8.2f}x",
              flush=True)
        return rate

    # The naive modes run the same configs as the largest population (or the first few of
    # them, when all members have one shape: the rate does not depend on which).
    naive = members if kind == "mixed" else members[:n_naive]
    seq_seconds: dict[int, float] = {}

    def sequential() -> None:
        for c in naive:
            seq_seconds[id(c)] = timed(lambda c=c: train(c), device)

    rows["seq"] = row("naive sequential", naive, timed(sequential, device))
    batch = members if kind == "mixed" else members[:max(n_pool, n_naive)]
    rows["pool"] = row(f"naive pool ({n_pool} procs)", batch,
                       timed(lambda: pool.map(_pool_train, batch, chunksize=1), device))
    for k in ks:
        part = members[:k]
        seconds = timed(lambda part=part: train_population(part), device)
        chose = population.last_choice
        rows[f"K={k}"] = row(f"population K={k}" + (f" (kept {chose.kept} lane(s))"
                                                    if chose and chose.kept else ""),
                             part, seconds)
    if device.type == "cpu" and torch.get_num_threads() > 1:
        # The same population in each fixed layout: shards side by side on one intra-op
        # thread each, or one after another on all threads; the engine keeps the faster.
        part = members[:max(ks)]
        lanes = torch.get_num_threads()
        row(f"K={max(ks)}, {lanes} lanes fixed", part,
            timed(lambda: train_population(part, lanes=lanes), device))
        row(f"K={max(ks)}, one lane fixed", part,
            timed(lambda: train_population(part, lanes=1), device))
    if kind == "mixed":
        # The same population without noise padding: one bucket per width *and* noise
        # dimension. Buckets train one after another either way, so training each such
        # group as its own population is exactly the unpadded engine.
        groups: dict[tuple, list[TrainConfig]] = {}
        for c in members:
            groups.setdefault((bucket_key(c), c.noise_dim), []).append(c)
        row(f"K={len(members)}, noise unpadded", members,
            timed(lambda: [train_population(g) for g in groups.values()], device))
        print(f"(buckets: {len({bucket_key(c) for c in members})} with noise padded, "
              f"{len(groups)} without)")
        bucket_profile(members, seq_seconds, steps, device)
    return rows


def headline(device: torch.device, pool: mp.pool.Pool, n_pool: int, steps: int, k: int,
             rounds: int) -> float:
    """The same-shape K=k population against naive sequential and the process pool,
    measured in ``rounds`` interleaved rounds (seq, pool, population, seq, …) so that a
    machine's drift hits all three alike; prints each round and the median ratios with
    their range, returns the median ratio to sequential."""
    members = configs("d1", k, steps, str(device))
    naive, batch = members[:4], members[:max(n_pool, 4)]
    print(f"\n## headline: same shape K={k}, {steps} G steps, {rounds} interleaved rounds")
    print(f"{'round':>6}{'seq G-it/s':>12}{'pool G-it/s':>13}{'K G-it/s':>10}{'vs seq':>9}"
          f"{'vs pool':>9}")
    vs_seq, vs_pool = [], []
    for r in range(1, rounds + 1):
        seq = len(naive) * steps / timed(lambda: [train(c) for c in naive], device)
        pl = len(batch) * steps / timed(
            lambda: pool.map(_pool_train, batch, chunksize=1), device)
        pop = len(members) * steps / timed(lambda: train_population(members), device)
        vs_seq.append(pop / seq)
        vs_pool.append(pop / pl)
        print(f"{r:>6}{seq:>12.0f}{pl:>13.0f}{pop:>10.0f}{pop / seq:>8.2f}x{pop / pl:>8.2f}x",
              flush=True)
    med_seq, med_pool = statistics.median(vs_seq), statistics.median(vs_pool)
    print(f"median: {med_seq:.2f}x sequential (range {min(vs_seq):.2f}–{max(vs_seq):.2f}), "
          f"{med_pool:.2f}x the pool (range {min(vs_pool):.2f}–{max(vs_pool):.2f})")
    return med_seq


def _timeline(fn) -> tuple[float, int, float, float]:
    """Run ``fn(on_step)``; return its wall seconds, its first step report's step and the
    seconds to it (compiling happens in the first step), and the seconds per step after it."""
    marks: list[tuple[int, float]] = []
    start = time.perf_counter()
    fn(lambda step, d_loss, g_loss: marks.append((step, time.perf_counter())))
    wall = time.perf_counter() - start
    (s0, t0), (s1, t1) = marks[0], marks[-1]
    return wall, s0, t0 - start, (t1 - t0) / (s1 - s0)


def compiled(device: torch.device, steps: int, k: int) -> None:
    """The same-shape population with its bucket's forwards compiled (``compile=True``)
    beside eager and one trial at a time: wall rates, steady rates after the first 10 steps
    (where compiling happens) and the steps it takes compiling to pay for itself."""
    members = configs("d1", k, steps, str(device))
    print(f"\n## compiled forwards (torch.compile), same shape K={k}, {steps} G steps")
    seq = [_timeline(lambda cb, c=c: train(c, on_step=cb)) for c in members[:4]]
    first = seq[0][1]  # the step of the first report (the engine's and train's cadence)
    print(f"{'mode':<26}{'members':>8}{'wall G-it/s':>13}{'steady G-it/s':>15}"
          f"{f'first {first} steps':>16}")
    rows = {"naive sequential": (4, sum(w for w, _, _, _ in seq),
                                 sum(f for _, _, f, _ in seq) / 4,
                                 sum(p for _, _, _, p in seq) / 4)}
    for name, flag in (("eager", False), ("compiled", True)):
        wall, _, first_s, per = _timeline(
            lambda cb, flag=flag: train_population(members, on_step=cb, compile=flag))
        rows[f"population K={k} {name}"] = (k, wall, first_s, per / k)
    for name, (n, wall, first_s, per) in rows.items():
        print(f"{name:<26}{n:>8}{n * steps / wall:>13.0f}{1 / per:>15.0f}{first_s:>15.1f}s")
    (_, _, f_e, p_e), (_, _, f_c, p_c) = rows[f"population K={k} eager"], \
        rows[f"population K={k} compiled"]
    cost = (f_c - first * k * p_c) - (f_e - first * k * p_e)  # the first steps' extra time
    seq_per = rows["naive sequential"][3]
    print(f"steady: compiled {p_e / p_c:.2f}x eager, {seq_per / p_c:.2f}x sequential "
          f"(eager {seq_per / p_e:.2f}x); compiling costs {cost:.0f} s, repaid after "
          f"{cost / (k * (p_e - p_c)):.0f} G steps of K={k}" if p_c < p_e else
          f"steady: compiled {p_e / p_c:.2f}x eager: compiling does not pay here")


def metrics_share(device: torch.device, steps: int, every: int) -> None:
    """Share of a population's wall time spent in metrics, with a study's evaluation
    schedule: sliced W1 and modes on 2500 samples every ``every`` steps, exact W1 at the end."""
    members = [replace(c, eval_every=every, eval_samples=2500)
               for c in configs("d1", 16, steps, str(device))]
    import ot  # noqa: F401  POT's import (2-3 s, once per process) is not a per-trial cost

    print(f"\n## metrics cost (H=128), {steps} G steps, evaluated every {every} steps")
    alone = train(members[0])
    print(f"one trial at a time: metrics {alone.eval_seconds:.1f} s of {alone.seconds:.1f} s "
          f"wall: {100 * alone.eval_seconds / alone.seconds:.1f}%")
    start = time.perf_counter()
    results = train_population(members)
    wall = time.perf_counter() - start
    spent = sum(r.eval_seconds for r in results)
    print(f"population of {len(members)}: metrics {spent:.1f} s of {wall:.1f} s wall: "
          f"{100 * spent / wall:.1f}%")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200, help="G steps per member")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--pool", type=int, default=None,
                        help="worker processes of the naive pool (default: CPU cores; 4 "
                             "sharing a GPU)")
    parser.add_argument("--quick", action="store_true", help="fewer steps, K up to 16")
    parser.add_argument("--rounds", type=int, default=3,
                        help="interleaved rounds of the headline measurement")
    parser.add_argument("--only", choices=["d1", "d5", "mixed", "pacgan", "compile",
                                           "metrics"],
                        action="append", help="run only these scenarios (and the headline)")
    args = parser.parse_args()
    only = set(args.only or ["d1", "d5", "mixed", "pacgan", "compile", "metrics"])
    device = resolve_device(args.device)
    tune_allocator()  # for every mode alike: the comparison measures batching alone
    cuda = device.type == "cuda"
    ks = [1, 4, 16] if args.quick else [1, 4, 16, 64] + ([256] if cuda else [])
    steps = 40 if args.quick else args.steps
    n_pool = args.pool or (4 if cuda else os.cpu_count() or 1)
    threads = 1 if not cuda else torch.get_num_threads()
    peak = matmul_peak(device)
    name = torch.cuda.get_device_name(device) if cuda else \
        f"CPU, {torch.get_num_threads()} torch threads"
    print(f"# population engine benchmark on {name}")
    print(f"measured fp32 matmul peak: {peak / 1e9:.0f} GFLOP/s; torch {torch.__version__}")

    ctx = mp.get_context("spawn")
    with ctx.Pool(n_pool, initializer=_pool_init, initargs=(threads,)) as pool:
        warm = configs("d1", n_pool, 5, str(device))
        pool.map(_pool_train, warm, chunksize=1)   # imports and first calls, not timed
        train(warm[0])  # this process's first calls, not timed either
        train_population(warm[:2])
        if "d1" in only:
            run_scenario("d1", "same shape, H=128, noise 8, batch 256, d_steps 1", steps,
                         ks, 4, device, pool, n_pool, peak)
        if "d5" in only:
            run_scenario("d5", "same shape, H=128, noise 8, batch 256, d_steps 5",
                         max(steps // 4, 10), ks, 4, device, pool, n_pool, peak)
        if "mixed" in only:
            # A mixed population's rate depends on its members: every mode trains the same.
            run_scenario("mixed", "mixed, H 32..512, noise 2..128, d_steps 1..5",
                         max(steps // 4, 10), [max(ks)], 0, device, pool, n_pool, peak)
        if "pacgan" in only:
            run_scenario("pacgan", "PacGAN's architecture: G 4×400 batch norm, maxout D "
                         "3×200×5, batch 100", max(steps // 4, 10),
                         [k for k in ks if k <= 16], 4, device, pool, n_pool, peak)
        k = 64 if 64 in ks else max(ks)
        speedup = headline(device, pool, n_pool, steps, k, args.rounds)
    if "compile" in only:  # long enough for the steady rate to show (compiling is per run)
        compiled(device, 3 * steps, k)
    if "metrics" in only:  # the shipped mog study's schedule (1500 steps, every 250)
        metrics_share(device, 250 if args.quick else 1500, 50 if args.quick else 250)
    print(f"\npopulation speedup vs sequential at K={k}: {speedup:.2f}x")


if __name__ == "__main__":
    main()
