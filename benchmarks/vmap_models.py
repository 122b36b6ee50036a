"""The population engine's hand-written batched MLP vs ``torch.func`` over models.py, side by
side in one run.

The engine keeps each bucket's weights stacked as [K, in, out] tensors and applies them with
``bmm`` and an in-place bias add (``population._Bucket.eager_mlp``). The alternative reuses
the ``Generator``/``Discriminator`` modules of ``models.py`` unchanged:
``torch.func.stack_module_state`` stacks K members' parameters and
``vmap(functional_call(model, …))`` runs them as one program. For the same K members (G and
D of the d1 scenario: 2×128, noise 8, batch 256), both compute a generator step's products:
G forward, D on the fake batch, and the backward to G's and D's weights. Printed: the time
of each per step and the ratio (hand-written over vmap; above 1 the hand-written one is
faster), for K = 1, 16, 64.

    python benchmarks/vmap_models.py [--repeats 30] [--device cpu]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
from torch.func import functional_call, stack_module_state, vmap

from ganbench.config import TrainConfig
from ganbench.population import _Bucket, _member
from ganbench.train import build_models


def bucket_step(b: _Bucket, z: torch.Tensor) -> None:
    """G forward, D on it, backward to every G and D weight (the engine's kernels)."""
    loss = b.disc(b.T, b.mlp(b.T, "g", z)).sum()
    torch.autograd.grad(loss, b.params(b.T, "g") + b.params(b.T, "d"))


def vmap_step(g, d, gp, gb, dp, db, z: torch.Tensor) -> None:
    """The same products through models.py's modules, vmapped over stacked parameters."""
    def one(g_params, g_buffers, d_params, d_buffers, noise):
        fake = functional_call(g, (g_params, g_buffers), (noise,))
        return functional_call(d, (d_params, d_buffers), (fake,)).sum()

    loss = vmap(one)(gp, gb, dp, db, z).sum()
    torch.autograd.grad(loss, list(gp.values()) + list(dp.values()))


def timed(fn, args: tuple, repeats: int) -> float:
    fn(*args)  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn(*args)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    print(f"device {args.device}, {torch.get_num_threads()} torch threads; "
          "median seconds per generator step's products (G fwd, D fwd, backward)")
    print(f"{'K':>4} {'hand-written bmm':>17} {'vmap(models.py)':>16} {'ratio':>6}")
    for k in (1, 16, 64):
        configs = [TrainConfig(hidden=128, depth=2, noise_dim=8, batch_size=256, seed=i,
                               lr_g=1e-3 * (1 + i % 3), device=args.device)
                   for i in range(k)]
        members = [_member(i, c) for i, c in enumerate(configs)]
        b = _Bucket(members, "member")
        z = torch.randn(k, 256, 8, device=b.device)
        gs, ds = zip(*(build_models(m.built, m.target) for m in members))
        gs = [g.to(b.device) for g in gs]
        ds = [d.to(b.device) for d in ds]
        gp, gb = stack_module_state(gs)
        dp, db = stack_module_state(ds)
        g0, d0 = copy.deepcopy(gs[0]).to("meta"), copy.deepcopy(ds[0]).to("meta")
        hand = timed(bucket_step, (b, z), args.repeats)
        func = timed(vmap_step, (g0, d0, gp, gb, dp, db, z), args.repeats)
        print(f"{k:>4} {hand:>17.5f} {func:>16.5f} {func / hand:>6.2f}")


if __name__ == "__main__":
    main()
