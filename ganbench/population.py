"""The population engine: K training runs as one batched program.

Small GANs leave a machine idle: a 128-unit MLP at batch 256 is a small matrix product.
``train_population(configs)`` trains many configurations together: members of equal shape
(a *bucket*) keep their weights stacked as ``[K, in, out]`` tensors applied with
``torch.bmm`` and an in-place bias add, one batched Adam with per-member learning rates and
betas updates them, and per-member D:G ratios are honoured by running a D step only on the
members that still take it. Members of different widths go to different buckets; only a
narrower noise is padded, with zeros that stay exactly zero, so every member computes what
``train`` computes.

Each member keeps its own random stream by default (``streams="member"``): it draws its
real batches, noise and penalty mixing weights from ``torch.Generator().manual_seed(seed)``
in the same order as ``train``, so a member's losses and metrics equal those of
``train(config)`` up to rounding (to 1e-10 in float64, which a test checks). On a GPU,
drawing K small batches costs K kernel launches per draw; ``streams="shared"`` (the default
there) draws one ``[K, B, …]`` batch from a bucket generator instead: members still see
independent data, but a member's run then depends on its bucket.

With ``compile=True`` each bucket's network forwards (and, through AOTAutograd, their
backwards) are compiled by ``torch.compile``: element-wise work fuses into the products'
loops. Compiling costs tens of seconds per bucket shape on a CPU, so it pays off on long
runs only; where it cannot work (no C++ compiler, D's double backward of the gradient
penalties) the bucket trains eagerly and one line says why.

Tricks are defined once, in ``ganbench.tricks``: each carries its batched form (the
``batched_*`` hooks) beside its trainer hooks, and the engine applies whatever hooks the
bucket's tricks define, at the points and in the order ``train`` calls them. What the engine
cannot batch (``unbatchable`` says why: an optimizer other than Adam, a trick with
``batched = False``) runs through ``train``, said once per population.
"""

from __future__ import annotations

import ctypes
import logging
import math
import os
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import vmap

from ganbench.config import TrainConfig
from ganbench.devices import resolve_device
from ganbench.errors import GanbenchError
from ganbench.losses import get_loss
from ganbench.models import ACTIVATIONS, BN_EPS, BN_MOMENTUM
from ganbench.targets import Pool, Target, get_target, training_data
from ganbench.train import (
    DTYPES,
    STEP_REPORT_EVERY,
    TrainResult,
    build_models,
    built_config,
    cpu_state,
    diverged_metrics,
    eval_sample,
    score,
    train,
)
from ganbench.tricks import TRICKS, Trick, build_tricks

log = logging.getLogger(__name__)

# Tricks with a batched form (each defines it beside its train hooks, in tricks.py).
BATCHED_TRICKS = tuple(name for name, cls in TRICKS.items() if cls.batched)
STREAMS = ("auto", "member", "shared")
ADAM_EPS = 1e-8  # torch.optim.Adam's default, as train uses
# Penalties on D's input gradients (and unrolled D) differentiate D's backward again:
# compiled graphs' own backwards cannot be differentiated, so such buckets train eagerly.
UNCOMPILED_TRICKS = tuple(name for name, cls in TRICKS.items() if cls.double_backward)
# Compiled programs are cached per function; every bucket, net and grad mode is one entry.
RECOMPILE_LIMIT = 256

# on_eval(member, step, row) -> True to stop that member (pruning); member = index in configs.
PopOnEval = Callable[[int, int, dict[str, float]], "bool | None"]
# on_step(step, d_loss, g_loss): mean losses of the running bucket, every few steps.
PopOnStep = Callable[[int, float, float], None]


def tune_allocator() -> None:
    """Keep freed activation buffers in the heap (glibc): a population step allocates
    tens of MB-sized tensors, and by default each is mmap'ed, page-faulted and returned to
    the system again — measured at about a fifth of a CPU step. No-op elsewhere."""
    global _TUNED
    if _TUNED or sys.platform != "linux":
        return
    _TUNED = True
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    libc.mallopt(-1, 1 << 30)   # M_TRIM_THRESHOLD: keep up to 1 GiB of free heap
    libc.mallopt(-3, 32 << 20)  # M_MMAP_THRESHOLD: heap-allocate blocks up to 32 MiB


_TUNED = False


def unbatchable(config: TrainConfig) -> str | None:
    """Why the engine cannot batch ``config`` (None when it can)."""
    if config.optimizer != "adam":
        return f"optimizer {config.optimizer!r} has no batched form (only adam)"
    other = sorted(set(config.tricks) - set(BATCHED_TRICKS))
    if other:
        return f"trick {', '.join(other)} has no batched form"
    return None


@dataclass
class _Member:
    """One run of the population: its config, random stream and running record."""

    index: int                    # position in the caller's list
    config: TrainConfig           # as given (the result's config)
    built: TrainConfig            # after the tricks' configure (spectral norm, packing)
    target: Target
    data: Target | Pool           # where real batches come from (the target or a fixed pool)
    rng: torch.Generator
    reference: torch.Tensor       # fixed evaluation sample of the target (float64, CPU)
    z_eval: torch.Tensor          # fixed evaluation noise (device, dtype)
    d_count: int = 0              # Adam steps taken by D (differs when d_steps differ)
    g_count: int = 0
    n_since: int = 0              # steps since the last evaluation (loss averages)
    history: list[dict[str, float]] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)
    samples: torch.Tensor | None = None
    eval_seconds: float = 0.0
    cost: float = 0.0             # relative cost of one of its generator steps

    def trick_object(self, name: str) -> Trick:
        """This member's trick ``name`` (with its own parameter values)."""
        if not hasattr(self, "_tricks"):
            self._tricks = {t.name: t for t in build_tricks(self.built.tricks)}
        return self._tricks[name]

    def trick(self, name: str, param: str) -> float:
        """The value of a trick parameter (its default when the config leaves it out)."""
        return float(getattr(self.trick_object(name), param))


def bucket_key(config: TrainConfig) -> tuple:
    """Members with equal keys have equal shapes and programs: they share a bucket."""
    c = built_config(config)
    # The noise dimension is not part of the shape: narrower noise is padded with zeros
    # (exact: see _Bucket), which lets a sweep over noise_dim still batch.
    return (str(resolve_device(c.device)), c.dtype, c.target, repr(sorted(c.target_params.items())),
            c.loss, c.activation, tuple(c.widths("g")), tuple(c.widths("d")),
            c.batch_size, c.eval_samples, c.pack, c.spectral_norm, c.g_spectral_norm,
            c.g_norm, c.pieces, c.update, tuple(sorted(c.tricks)),
            tuple((t.name, p, getattr(t, p)) for t in build_tricks(c.tricks)
                  for p in t.bucket_params))


def _layers(module: nn.Module) -> list[tuple[nn.Linear, nn.BatchNorm1d | None]]:
    """Each linear layer with the batch norm that follows it (None where none does)."""
    out: list[tuple[nn.Linear, nn.BatchNorm1d | None]] = []
    for m in module.modules():
        if isinstance(m, nn.Linear):
            out.append((m, None))
        elif isinstance(m, nn.BatchNorm1d):
            out[-1] = (out[-1][0], m)
    return out


TRAINED = ("w", "b", "a")  # stacked tensors that are trained: weight, bias, batch-norm scale


def bmm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``torch.bmm`` whose every member is computed by the same kernel whatever the batch:
    with one member, torch takes a matrix-vector path for products one wide or one tall
    (D's output, spectral norm's power iteration), which rounds differently in float32
    from the batched kernel used for two or more. A lone member is computed as a pair,
    so a member's run is bit-identical alone and in any group (the pair's second half
    gets no gradient, and its cost is one member's)."""
    if a.shape[0] == 1:
        return torch.bmm(torch.cat([a, a]), torch.cat([b, b]))[:1]
    return torch.bmm(a, b)


class _Bucket:
    """Members of one shape, their weights and optimizer states stacked on dim 0.

    ``self.T`` maps names to stacked tensors: ``g.w.i`` ([K, in, out], the transposed
    weight of layer i), ``g.b.i`` ([K, 1, out]), ``g.u.i``/``g.v.i`` (spectral-norm power
    iteration vectors), with generator batch norm ``g.a.i``/``g.b.i`` (its scale and shift;
    the linear layer has no bias) and ``g.rm.i``/``g.rv.i`` (running statistics), the same
    for ``d``, Adam moments ``m.g.w.i``/``s.g.w.i``, EMA
    weights ``ema.*`` and running loss sums. Removing or selecting members indexes every
    tensor the same way.
    """

    def __init__(self, members: list[_Member], streams: str, compile: bool = False) -> None:
        c = members[0].built
        self.members = members
        self.device, self.dtype = resolve_device(c.device), DTYPES[c.dtype]
        self.c = c
        self.loss = get_loss(c.loss)
        # In place where autograd keeps the output, not the input (saves a pass over memory).
        self.act = ACTIVATIONS[c.activation](**({"inplace": True} if c.activation in
                                                 ("relu", "leaky_relu") else {}))
        self.layers = {"g": len(c.widths("g")) + 1, "d": len(c.widths("d")) + 1}
        self.sn = {"g": c.g_spectral_norm, "d": c.spectral_norm, "ema": c.g_spectral_norm}
        self.bn = {"g": c.g_norm == "batch", "d": False, "ema": c.g_norm == "batch"}
        self.pieces = {"g": 1, "d": c.pieces, "ema": 1}
        self.simultaneous = c.update == "simultaneous"
        self.step = 0  # the generator step being taken (learning-rate schedules)
        self.tricks = set(c.tricks)
        # The bucket's trick objects apply the tricks' batched hooks (in registry order, as
        # train); per-member values come from each member's own.
        self.trick_list = build_tricks(c.tricks)
        self.eval_net = next((t.eval_net for t in self.trick_list if t.eval_net), "g")
        self.shared = streams == "shared" or (streams == "auto" and self.device.type == "cuda")
        self.compiled = _compiled_mlp(self) if compile else None
        if self.shared:
            self.rng = torch.Generator(self.device).manual_seed(members[0].config.seed)
        self.d_loss_fn = vmap(self.loss.d)
        self.g_loss_fn = vmap(self.loss.g)
        # Noise is padded with zeros to the widest member's: the padded input columns and
        # G's first-layer weight rows they meet are zero, so those rows' gradients, Adam
        # moments and updates are exactly zero and stay so (and spectral norm is unchanged).
        self.nz = max(m.config.noise_dim for m in members)
        self.T: dict[str, torch.Tensor] = {}
        per: dict[str, list[torch.Tensor]] = {}
        for m in members:
            g, d = build_models(m.built, m.target)
            for net, module in (("g", g.to(self.device, self.dtype)),
                                ("d", d.to(self.device, self.dtype))):
                for i, (lin, bn) in enumerate(_layers(module)):
                    if self.sn[net]:
                        p = lin.parametrizations.weight
                        per.setdefault(f"{net}.w.{i}", []).append(p.original.detach().t())
                        per.setdefault(f"{net}.u.{i}", []).append(p[0]._u.detach())
                        per.setdefault(f"{net}.v.{i}", []).append(p[0]._v.detach())
                    else:
                        per.setdefault(f"{net}.w.{i}", []).append(lin.weight.detach().t())
                    if bn is None:
                        per.setdefault(f"{net}.b.{i}", []).append(lin.bias.detach()[None])
                        continue
                    for kind, t in (("a", bn.weight), ("b", bn.bias), ("rm", bn.running_mean),
                                    ("rv", bn.running_var)):
                        per.setdefault(f"{net}.{kind}.{i}", []).append(t.detach()[None])
        for key in ("g.w.0", "g.v.0"):
            if key in per:
                per[key] = [F.pad(t, (0, 0, 0, self.nz - t.shape[0]) if t.dim() == 2 else
                                  (0, self.nz - t.shape[0])) for t in per[key]]
        for key, tensors in per.items():
            self.T[key] = torch.stack(tensors).contiguous()
        for key in list(self.T):
            if key.split(".")[1] in TRAINED:
                self.T[key].requires_grad_(True)
                self.T["m." + key] = torch.zeros_like(self.T[key], requires_grad=False)
                self.T["s." + key] = torch.zeros_like(self.T[key], requires_grad=False)
        for t in self.trick_list:
            t.batched_setup(self)
        K = len(members)
        self.T["d_sum"] = torch.zeros(K, device=self.device, dtype=self.dtype)
        self.T["g_sum"] = torch.zeros(K, device=self.device, dtype=self.dtype)
        self.T["d_last"] = torch.zeros(K, device=self.device, dtype=self.dtype)
        self.T["g_last"] = torch.zeros(K, device=self.device, dtype=self.dtype)

    # ------------------------------------------------------------ per-member values
    def per_member(self, values: Sequence[float], vector: bool = False
                   ) -> float | torch.Tensor:
        """One constant per member: a Python number when all members agree, else a
        [k, 1, 1] tensor for stacked weights (``vector``: [k], for per-member losses)."""
        return self.member_vector(values) if vector else self.member_scalar(values)

    def member_scalar(self, values: Sequence[float]) -> float | torch.Tensor:
        """One per-member constant: a Python number when all members agree (scalar kernels),
        else a [K, 1, 1] tensor that broadcasts over a stacked weight."""
        if all(v == values[0] for v in values):
            return float(values[0])
        return torch.tensor(values, device=self.device, dtype=self.dtype).view(-1, 1, 1)

    def keys(self, net: str) -> list[str]:
        """Names of ``net``'s trained tensors (weight, bias and batch-norm scale per layer)."""
        return [key for i in range(self.layers[net]) for kind in TRAINED
                if (key := f"{net}.{kind}.{i}") in self.T]

    def params(self, T: dict[str, torch.Tensor], net: str) -> list[torch.Tensor]:
        return [T[key] for key in self.keys(net)]

    # ------------------------------------------------------------ networks
    def _weight(self, T: dict[str, torch.Tensor], net: str, i: int,
                training: bool = True) -> torch.Tensor:
        """Layer i's weight; with spectral norm, one power iteration per call in training
        (as ``torch.nn.utils.parametrizations.spectral_norm`` does), none in evaluation."""
        w = T[f"{net}.w.{i}"]
        if not self.sn[net]:
            return w
        u, v = T[f"{net}.u.{i}"], T[f"{net}.v.{i}"]
        if training:
            with torch.no_grad():
                wd = w.detach()
                u.copy_(F.normalize(bmm(v.unsqueeze(1), wd).squeeze(1), dim=-1,
                                    eps=1e-12))
                v.copy_(F.normalize(bmm(wd, u.unsqueeze(-1)).squeeze(-1), dim=-1,
                                    eps=1e-12))
            u, v = u.clone(), v.clone()  # later calls update the buffers in place
        sigma = (u * bmm(v.unsqueeze(1), w).squeeze(1)).sum(-1)
        return w / sigma.view(-1, 1, 1)

    def mlp(self, T: dict[str, torch.Tensor], net: str, x: torch.Tensor,
            training: bool = True) -> torch.Tensor:
        """K MLPs at once: x [K, n, in] → [K, n, out]. ``training``: batch norm normalises
        with the batch's statistics and updates its running ones (as nn.BatchNorm1d).
        Training forwards run compiled when the bucket is (evaluations are rare: eager)."""
        if self.compiled is not None and training and _compile_broken is None:
            try:
                return self.compiled(T, net, x)
            except Exception as exc:  # compiling failed before running: train eagerly
                _compile_failed(exc)
                self.compiled = None
        return self.eager_mlp(T, net, x, training)

    def eager_mlp(self, T: dict[str, torch.Tensor], net: str, x: torch.Tensor,
                  training: bool = True) -> torch.Tensor:
        """``mlp`` in eager mode."""
        n = self.layers["g" if net == "ema" else net]
        for i in range(n):
            # bmm then an in-place bias add is faster on CPU than baddbmm; the activation
            # runs in place on the fresh product (autograd saves its output, not its input).
            x = bmm(x, self._weight(T, net, i, training))
            hidden = i < n - 1
            x = self.batch_norm(T, net, i, x, training) if hidden and self.bn[net] else \
                x.add_(T[f"{net}.b.{i}"])
            if hidden:
                x = x.unflatten(-1, (-1, self.pieces[net])).amax(-1) if self.pieces[net] > 1 \
                    else self.act(x)
        return x

    @staticmethod
    def batch_norm(T: dict[str, torch.Tensor], net: str, i: int, x: torch.Tensor,
                   training: bool) -> torch.Tensor:
        """nn.BatchNorm1d over each member's batch: x [K, n, h]."""
        rm, rv = T[f"{net}.rm.{i}"], T[f"{net}.rv.{i}"]
        if training:
            mean, var = x.mean(1, keepdim=True), x.var(1, unbiased=False, keepdim=True)
            with torch.no_grad():  # running variance is unbiased, as torch keeps it
                rm.mul_(1 - BN_MOMENTUM).add_(mean.detach(), alpha=BN_MOMENTUM)
                rv.mul_(1 - BN_MOMENTUM).add_(var.detach() * (x.shape[1] / (x.shape[1] - 1)),
                                              alpha=BN_MOMENTUM)
        else:
            mean, var = rm, rv
        return (x - mean) * torch.rsqrt(var + BN_EPS) * T[f"{net}.a.{i}"] + T[f"{net}.b.{i}"]

    def disc(self, T: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """D's logits: [K, n, dim] → [K, n / pack] (packed inputs, as Discriminator)."""
        k, n, dim = x.shape
        return self.mlp(T, "d", x.reshape(k, n // self.c.pack, dim * self.c.pack)).squeeze(-1)

    def input_grad(self, T: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """∇_x D(x) per sample, in the graph, per packed input: [K, n / pack, dim · pack]."""
        x = x.detach().requires_grad_(True)
        (grad,) = torch.autograd.grad(self.disc(T, x).sum(), x, create_graph=True)
        return grad.reshape(grad.shape[0], grad.shape[1] // self.c.pack, -1)

    # ------------------------------------------------------------ data
    def draw(self, members: list[_Member], d_step: bool
             ) -> tuple[torch.Tensor | None, torch.Tensor]:
        """Real batch (on D steps) and noise for ``members``, in ``train``'s order (tricks
        draw theirs after, through ``rand``/``randn``/``sample_real``)."""
        B = self.c.batch_size
        kw = {"device": self.device, "dtype": self.dtype}
        if self.shared:
            k = len(members)
            real = self.sample_real(members) if d_step else None
            z = torch.randn(k, B, self.nz, generator=self.rng, **kw)
            if any(m.config.noise_dim < self.nz for m in members):
                z = z * (torch.arange(self.nz, device=self.device)
                         < torch.tensor([m.config.noise_dim for m in members],
                                        device=self.device)[:, None])[:, None, :]
            return real, z
        reals, zs = [], []
        for m in members:
            if d_step:
                reals.append(m.data.sample(B, m.rng).to(self.dtype))
            zs.append(self.pad(torch.randn(B, m.config.noise_dim, generator=m.rng, **kw)))
        return (torch.stack(reals) if d_step else None, torch.stack(zs))

    def sample_real(self, members: list[_Member]) -> torch.Tensor:
        """A real batch per member, as ``train`` draws one: [k, B, dim]."""
        B = self.c.batch_size
        if not self.shared:
            return torch.stack([m.data.sample(B, m.rng).to(self.dtype) for m in members])
        if any(m.data is not m.target for m in members):  # fixed pools: one per member
            return torch.stack([m.data.sample(B, self.rng) for m in members]).to(self.dtype)
        k = len(members)
        return members[0].target.sample(k * B, self.rng).to(self.dtype).view(k, B, -1)

    def _draw(self, fn: Callable, members: list[_Member], shape: Sequence[int]
              ) -> torch.Tensor:
        kw = {"device": self.device, "dtype": self.dtype}
        if self.shared:
            return fn(len(members), *shape, generator=self.rng, **kw)
        return torch.stack([fn(*shape, generator=m.rng, **kw) for m in members])

    def rand(self, members: list[_Member], shape: Sequence[int]) -> torch.Tensor:
        """U[0, 1) draws of ``shape`` per member, from its stream: [k, *shape]."""
        return self._draw(torch.rand, members, shape)

    def randn(self, members: list[_Member], shape: Sequence[int]) -> torch.Tensor:
        """N(0, 1) draws of ``shape`` per member, from its stream: [k, *shape]."""
        return self._draw(torch.randn, members, shape)

    def pad(self, z: torch.Tensor) -> torch.Tensor:
        """Noise [n, noise_dim] padded with zero columns to the bucket's width."""
        return F.pad(z, (0, self.nz - z.shape[-1])) if z.shape[-1] < self.nz else z

    # ------------------------------------------------------------ optimizer
    def adam(self, T: dict[str, torch.Tensor], net: str, grads: list[torch.Tensor],
             members: list[_Member]) -> None:
        """One Adam step of ``net`` for ``members`` — torch.optim.Adam's arithmetic, with
        per-member learning rates, betas and step counts."""
        counts = [m.g_count if net == "g" else m.d_count for m in members]
        lr = [(m.config.lr_g if net == "g" else m.config.lr_d) * m.config.lr_factor(self.step)
              for m in members]
        b1 = [m.config.beta1 for m in members]
        b2 = [m.config.beta2 for m in members]
        step_size = self.member_scalar([-(r / (1 - b ** t)) for r, b, t in zip(lr, b1, counts)])
        bc2_sqrt = self.member_scalar([(1 - b ** t) ** 0.5 for b, t in zip(b2, counts)])
        w1, beta2 = self.member_scalar([1 - b for b in b1]), self.member_scalar(b2)
        one_minus_b2 = self.member_scalar([1 - b for b in b2])
        with torch.no_grad():
            for key, g in zip(self.keys(net), grads):
                p, m, s = T[key], T[f"m.{key}"], T[f"s.{key}"]
                m.lerp_(g, w1)
                if isinstance(one_minus_b2, float):
                    s.mul_(beta2).addcmul_(g, g, value=one_minus_b2)
                else:  # addcmul's order: (value · g) · g
                    s.mul_(beta2).add_((one_minus_b2 * g).mul_(g))
                denom = (s.sqrt() / bc2_sqrt).add_(ADAM_EPS)
                if isinstance(step_size, float):
                    p.addcdiv_(m, denom, value=step_size)
                else:  # addcdiv's order: (value · m) / denom
                    p.add_((step_size * m).div_(denom))

    # ------------------------------------------------------------ steps
    def d_step(self, T: dict[str, torch.Tensor], members: list[_Member]) -> torch.Tensor:
        """One discriminator update of ``members`` (whose tensors ``T`` holds); returns
        each member's D loss (penalties included) [k]."""
        real, z = self.draw(members, d_step=True)
        with torch.no_grad():
            fake = self.mlp(T, "g", z)
        loss = self.d_loss(T, members, real, fake)
        self.d_update(T, members, list(torch.autograd.grad(loss.sum(), self.params(T, "d"))))
        return loss.detach()

    def d_loss(self, T: dict[str, torch.Tensor], members: list[_Member], real: torch.Tensor,
               fake: torch.Tensor) -> torch.Tensor:
        """Each member's D loss on a real and a (detached) generated batch [k]: the tricks'
        inputs, D, the tricks' loss (or the GAN loss) and their penalties, as train."""
        for t in self.trick_list:
            real, fake = t.batched_d_inputs(self, members, real, fake, self.step)
        if self.sn["d"]:  # one power iteration per D call, as train calls D twice
            d_real, d_fake = self.disc(T, real), self.disc(T, fake)
        else:
            out = self.disc(T, torch.cat([real, fake], 1))
            d_real, d_fake = out.split(out.shape[1] // 2, 1)
        loss = next((v for t in self.trick_list
                     if (v := t.batched_d_loss(self, members, d_real, d_fake)) is not None),
                    None)
        loss = self.d_loss_fn(d_real, d_fake) if loss is None else loss
        for t in self.trick_list:
            penalty = t.batched_d_penalty(self, T, members, real, fake)
            if penalty is not None:
                loss = loss + penalty
        return loss

    def d_update(self, T: dict[str, torch.Tensor], members: list[_Member],
                 grads: list[torch.Tensor]) -> None:
        """Apply D's gradients: the tricks' before_step, Adam, their after_d_step."""
        for t in self.trick_list:
            t.batched_before_step(self, members, grads)
        for m in members:
            m.d_count += 1
        self.adam(T, "d", grads, members)
        for t in self.trick_list:
            t.batched_after_d_step(self, T, members)

    def g_step(self) -> torch.Tensor:
        """One generator update of every member; returns each member's G loss [K]."""
        T, members = self.T, self.members
        _, z = self.draw(members, d_step=False)
        fake = self.mlp(T, "g", z)
        logits = next((v for t in self.trick_list
                       if (v := t.batched_g_logits(self, T, fake)) is not None), None)
        loss = self.g_loss_fn(self.disc(T, fake) if logits is None else logits)
        self.g_update(list(torch.autograd.grad(loss.sum(), self.params(T, "g"))))
        return loss.detach()

    def joint_step(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Simultaneous updates of every member: D and G from one batch and the same
        weights; returns each member's D and G losses ([K] each)."""
        T, members = self.T, self.members
        real, z = self.draw(members, d_step=True)
        fake = self.mlp(T, "g", z)
        d_loss = self.d_loss(T, members, real, fake.detach())
        d_grads = list(torch.autograd.grad(d_loss.sum(), self.params(T, "d")))
        g_loss = self.g_loss_fn(self.disc(T, fake))
        g_grads = list(torch.autograd.grad(g_loss.sum(), self.params(T, "g")))
        self.d_update(T, members, d_grads)
        self.g_update(g_grads)
        return d_loss.detach(), g_loss.detach()

    def g_update(self, grads: list[torch.Tensor]) -> None:
        """Apply G's gradients (every member): the tricks' before_step, Adam, their
        after_g_step (the EMA copy)."""
        T, members = self.T, self.members
        for t in self.trick_list:
            t.batched_before_step(self, members, grads)
        for m in members:
            m.g_count += 1
        self.adam(T, "g", grads, members)
        for t in self.trick_list:
            t.batched_after_g_step(self, T)

    def member_vector(self, values: Sequence[float]) -> torch.Tensor | float:
        """A per-member constant for [K]-shaped tensors (per-member losses): a Python number
        when all members agree, else a [K] tensor."""
        v = self.member_scalar(values)
        return v if isinstance(v, float) else v.view(-1)

    # ------------------------------------------------------------ members
    def subset(self, idx: torch.Tensor | None, prefixes: tuple[str, ...]
               ) -> dict[str, torch.Tensor]:
        """The tensors of the members at ``idx`` (all members: the bucket's own)."""
        if idx is None:
            return self.T
        out = {}
        for key, t in self.T.items():
            if key.startswith(prefixes):
                out[key] = t.detach()[idx]
                if t.requires_grad:
                    out[key].requires_grad_(True)
        return out

    def write_back(self, idx: torch.Tensor | None, sub: dict[str, torch.Tensor]) -> None:
        if idx is None:
            return
        with torch.no_grad():
            for key, t in sub.items():
                self.T[key].index_copy_(0, idx, t)

    def generator_state(self, pos: int, net: str) -> dict[str, torch.Tensor]:
        """Member ``pos``'s generator (``net`` "g", or "ema" for its EMA copy) as the state
        dict of the ``Generator`` that ``train`` builds (CPU)."""
        m = self.members[pos]
        g, _ = build_models(m.built, m.target)
        g.to(dtype=self.dtype)
        nz = m.config.noise_dim  # the padded noise rows are not the member's
        with torch.no_grad():
            for i, (lin, bn) in enumerate(_layers(g)):
                w = self.T[f"{net}.w.{i}"][pos]
                w = (w[:nz] if i == 0 else w).t()
                if self.sn["g"]:
                    p = lin.parametrizations.weight
                    p.original.copy_(w)
                    v = self.T[f"{net}.v.{i}"][pos]
                    p[0]._u.copy_(self.T[f"{net}.u.{i}"][pos])
                    p[0]._v.copy_(v[:nz] if i == 0 else v)
                else:
                    lin.weight.copy_(w)
                if bn is None:
                    lin.bias.copy_(self.T[f"{net}.b.{i}"][pos][0])
                    continue
                bn.weight.copy_(self.T[f"{net}.a.{i}"][pos][0])
                bn.bias.copy_(self.T[f"{net}.b.{i}"][pos][0])
                bn.running_mean.copy_(self.T[f"{net}.rm.{i}"][pos][0])
                bn.running_var.copy_(self.T[f"{net}.rv.{i}"][pos][0])
                if net == "g":  # training-mode forwards of G: every D step's and G step's
                    bn.num_batches_tracked.fill_(m.d_count + (0 if self.simultaneous
                                                              else m.g_count))
        return cpu_state(g)

    def keep(self, keep: list[int]) -> None:
        """Drop every member not in ``keep`` (finished, pruned or diverged)."""
        idx = torch.tensor(keep, device=self.device, dtype=torch.long)
        for key, t in self.T.items():
            self.T[key] = t.detach()[idx].requires_grad_(t.requires_grad)
        self.members = [self.members[i] for i in keep]

    # ------------------------------------------------------------ running
    def cost(self) -> float:
        """Relative cost of this shard's next generator step (for balancing lanes)."""
        return sum(m.cost for m in self.members)

    def train_step(self, step: int) -> None:
        """Generator step ``step`` of every member, with the D steps before it: sub-step j
        updates the members whose d_steps exceed j (with simultaneous updates, the last D
        step is taken together with G's)."""
        self.step = step
        sim = int(self.simultaneous)
        for j in range(max(m.config.d_steps for m in self.members) - sim):
            active = [i for i, m in enumerate(self.members) if m.config.d_steps - sim > j]
            if len(active) == len(self.members):
                self.T["d_last"] = self.d_step(self.T, self.members)
            else:
                idx = torch.tensor(active, device=self.device)
                sub = self.subset(idx, ("g.", "d.", "m.d.", "s.d."))
                loss = self.d_step(sub, [self.members[i] for i in active])
                self.write_back(idx, sub)
                self.T["d_last"][idx] = loss
        if sim:
            self.T["d_last"], self.T["g_last"] = self.joint_step()
        else:
            self.T["g_last"] = self.g_step()
        self.T["d_sum"] += self.T["d_last"]
        self.T["g_sum"] += self.T["g_last"]
        for m in self.members:
            m.n_since += 1

    def after_step(self, step: int, on_eval: PopOnEval | None, start: float,
                   results: dict[int, TrainResult]) -> None:
        """Members that diverged at ``step`` leave; those due are evaluated (and leave when
        finished or stopped)."""

        def finish(m: _Member, status: str, reason: str, at: int) -> None:
            metrics = diverged_metrics(m.target) if status == "diverged" else m.metrics
            samples = m.samples if m.samples is not None else torch.empty(0, m.target.dim)
            generator = online = None
            if status == "completed":  # its final generator, as train returns it
                pos = self.members.index(m)
                kept = self.eval_net != "g"  # a trick's copy (EMA): G is kept beside it
                generator = self.generator_state(pos, self.eval_net)
                online = self.generator_state(pos, "g") if kept else None
            results[m.index] = TrainResult(
                config=m.config, status=status, steps=at, metrics=metrics,
                history=m.history, samples=samples, reference=m.reference.float(),
                reason=reason, seconds=time.perf_counter() - start,
                eval_seconds=m.eval_seconds, generator=generator, online=online)

        # Divergence: a member with a non-finite loss leaves with the step it happened at.
        finite = torch.isfinite(self.T["d_last"] + self.T["g_last"]).tolist()
        gone = set()
        for i, m in enumerate(self.members):
            if not finite[i]:
                finish(m, "diverged", f"diverged at step {step} (non-finite loss)", step)
                gone.add(i)
        # Evaluation of the members due (every eval_every steps and at their last step).
        due = [i for i, m in enumerate(self.members) if i not in gone and
               (step % m.config.eval_every == 0 or step == m.config.steps)]
        if due:
            gone |= _evaluate(self, due, step, on_eval, finish,
                              lambda m, exc: results.__setitem__(
                                  m.index, _error_result(m, exc, start)))
        if gone:
            self.keep([i for i in range(len(self.members)) if i not in gone])


_compile_broken: str | None = None  # why compiling failed in this process (tried once)
_said: set[str] = set()


def _say_once(message: str) -> None:
    if message not in _said:
        _said.add(message)
        log.warning(message)


def _compiled_mlp(b: _Bucket) -> Callable[[dict[str, torch.Tensor], str, torch.Tensor],
                                         torch.Tensor] | None:
    """Bucket ``b``'s training forward, compiled by ``torch.compile``; None (said once)
    where it cannot be."""
    if _compile_broken is not None:
        return None
    excluded = sorted(b.tricks & set(UNCOMPILED_TRICKS))
    if excluded:
        _say_once(f"buckets with {', '.join(excluded)} train eagerly: a compiled graph's "
                  "backward cannot be differentiated again")
        return None
    program = torch.compile(b.eager_mlp)
    limits = torch._dynamo.config

    def run(T: dict[str, torch.Tensor], net: str, x: torch.Tensor) -> torch.Tensor:
        if limits.recompile_limit < RECOMPILE_LIMIT:  # the setting is per thread (lanes)
            limits.recompile_limit = RECOMPILE_LIMIT
        return program(T, net, x, True)

    return run


def _compile_failed(exc: Exception) -> None:
    """Compiling failed (e.g. no C++ compiler): every bucket of this process trains eagerly."""
    global _compile_broken
    first = (str(exc).strip().splitlines() or [""])[0][:200]
    _compile_broken = f"{type(exc).__name__}: {first}"
    _say_once(f"torch.compile failed here ({_compile_broken}); populations train eagerly")


def _member(index: int, config: TrainConfig) -> _Member:
    config.validate()
    built = built_config(config)
    device, dtype = resolve_device(config.device), DTYPES[config.dtype]
    target = get_target(config.target, **config.target_params)
    reference, z_eval = eval_sample(config, target, device, dtype)
    return _Member(index=index, config=config, built=built, target=target,
                   data=training_data(target, config.pool, config.seed),
                   rng=torch.Generator(device).manual_seed(config.seed),
                   reference=reference, z_eval=z_eval, cost=step_flops(built, target.dim))


def train_population(
    configs: Sequence[TrainConfig], on_eval: PopOnEval | None = None,
    on_step: PopOnStep | None = None, streams: str = "auto", lanes: int | None = None,
    compile: bool = False,
) -> list[TrainResult]:
    """Train every config in ``configs``; results in the same order.

    Members are grouped into buckets of equal shape; big buckets are cut into shards, and
    every shard takes one generator step per round. On a CPU the shards of a round train
    side by side on ``lanes`` threads of one intra-op thread each: small products then keep
    a core each busy instead of waiting on each other, and small buckets run beside big
    ones. By default (``lanes=None``) the engine measures, on the host it runs on, whether
    that beats one lane (the shards one after another on all of torch's intra-op threads)
    and keeps the faster (``choose_lanes``): it is never slower than one lane by more than
    its short measurement. The choice changes no number: a member's run is the same bits
    on any lanes and thread count. Everything else — divergence checks,
    evaluations, callbacks — runs on the calling thread, in member order, so a run does
    not depend on thread timing.
    ``on_eval(member, step, row)`` is called after each of a member's evaluations, exactly
    as ``train`` calls its ``on_eval``; returning True stops that member alone (it leaves
    the batch). A member that diverges leaves it too, with ``status="diverged"``.
    ``compile``: compile each bucket's training forwards (see the module's docstring).
    """
    if streams not in STREAMS:
        raise GanbenchError(f"streams must be one of {', '.join(STREAMS)}, got {streams!r}",
                            "streams")
    tune_allocator()
    _said.clear()  # each population says once what it cannot do
    start = time.perf_counter()
    results: dict[int, TrainResult] = {}
    buckets: dict[tuple, list[_Member]] = {}
    alone: list[int] = []
    reasons: dict[str, list[int]] = {}
    for i, config in enumerate(configs):
        reason = unbatchable(config.validate())
        if reason is not None:
            reasons.setdefault(reason, []).append(i)
            alone.append(i)
            continue
        buckets.setdefault(bucket_key(config), []).append(_member(i, config))
    for reason, which in reasons.items():  # once per reason, naming the members
        log.warning("%d member(s) (%s) train one at a time through train: %s", len(which),
                    ", ".join(map(str, which)), reason)
    measure = lanes is None
    lanes = lanes or torch.get_num_threads()
    shards: list[_Bucket] = []
    for group in shard_groups(list(buckets.values()), lanes):
        try:
            shards.append(_Bucket(group, streams, compile))
        except Exception as exc:  # the bucket's program failed: its unfinished members
            _fail_shard(group, exc, start, results)
    _run_shards(shards, lanes, on_eval, on_step, start, results, measure)
    for i in alone:
        results[i] = train(configs[i], None if on_eval is None else
                           (lambda step, row, i=i: on_eval(i, step, row)), on_step)
    return [results[i] for i in range(len(configs))]


MIN_SHARD = 4  # members: smaller shards lose more to per-operation overhead than they gain


def step_flops(c: TrainConfig, dim: int | None = None) -> float:
    """Matrix-product FLOPs of one generator iteration (``d_steps`` D steps and one G step)
    of a member whose config is ``c`` on data of ``dim`` dimensions (default: its target's):
    what balances lanes, and what benchmarks divide by."""
    if dim is None:
        dim = get_target(c.target, **c.target_params).dim
    dims_g = [c.noise_dim, *c.widths("g"), dim]
    dims_d = [dim * c.pack, *c.widths("d"), 1]
    outs_d = [w * c.pieces for w in c.widths("d")] + [1]  # maxout: pieces outputs per unit
    fg = 2 * c.batch_size * sum(a * b for a, b in zip(dims_g, dims_g[1:]))
    fd = 2 * c.batch_size // c.pack * sum(a * b for a, b in zip(dims_d, outs_d))
    d_step = fg + 2 * fd + 4 * fd          # fake batch, D on real+fake, D backward
    g_step = fg + fd + fd + 2 * fg         # G and D forward, D input grads, G backward
    if c.update == "simultaneous":  # the last D step reuses G's fake batch
        return c.d_steps * d_step + g_step - fg
    return c.d_steps * d_step + g_step


def shard_groups(groups: list[list[_Member]], lanes: int) -> list[list[_Member]]:
    """Cut buckets whose share of the work exceeds half a lane's into shards (contiguous,
    at least ``MIN_SHARD`` members), so that lanes can be balanced; one lane cuts nothing."""
    def on_cpu(group: list[_Member]) -> bool:
        return resolve_device(group[0].built.device).type == "cpu"

    total = sum(m.cost * m.config.steps for g in groups if on_cpu(g) for m in g)
    out = []
    for group in groups:
        cost = sum(m.cost * m.config.steps for m in group)
        pieces = 1
        if lanes > 1 and on_cpu(group) and total > 0:
            pieces = min(len(group) // MIN_SHARD, math.ceil(cost / (total / lanes / 2)))
        pieces = max(1, pieces)
        size = math.ceil(len(group) / pieces)
        out.extend(group[i:i + size] for i in range(0, len(group), size))
    return out


def _lane_pool(lanes: int) -> ThreadPoolExecutor:
    """``lanes`` threads that run torch operations on one intra-op thread each, leaving the
    calling thread's setting (and the one later threads start with) as it was."""
    before = torch.get_num_threads()
    ready = threading.Barrier(lanes + 1)

    def one_thread() -> None:
        torch.set_num_threads(1)
        torch.get_num_threads()  # this thread's thread count is fixed now, at 1
        ready.wait()

    pool = ThreadPoolExecutor(lanes, thread_name_prefix="ganbench-lane")
    for _ in range(lanes):  # each blocks until all have started: ``lanes`` distinct threads
        pool.submit(one_thread)
    ready.wait()
    torch.set_num_threads(before)
    return pool


def _plan_round(shards: list[_Bucket], lanes: int) -> list[list[_Bucket]]:
    """Shards spread over lanes, longest first onto the least loaded lane."""
    plan: list[list[_Bucket]] = [[] for _ in range(lanes)]
    load = [0.0] * lanes
    for b in sorted(shards, key=lambda b: -b.cost()):
        i = load.index(min(load))
        plan[i].append(b)
        load[i] += b.cost()
    return [lane for lane in plan if lane]


def _fail_shard(members: list[_Member], exc: Exception, start: float,
                results: dict[int, TrainResult]) -> None:
    log.warning("a bucket of %d member(s) failed: %s: %s", len(members),
                type(exc).__name__, exc)
    for m in members:
        if m.index not in results:
            results[m.index] = _error_result(m, exc, start)


PROBE_ROUNDS = 8  # rounds timed in each layout before the engine keeps the faster


@dataclass
class LaneChoice:
    """What ``choose_lanes`` measured: seconds per round side by side on ``lanes`` lanes
    and on one lane, and which it kept (None until both are measured)."""

    lanes: int
    side_by_side: list[float] = field(default_factory=list)
    one_lane: list[float] = field(default_factory=list)
    kept: int | None = None

    def next_layout(self) -> int:
        """The lanes of the next round: the kept ones, or the layout still to be timed
        (alternating, after a first round of warm-up that is not timed)."""
        if self.kept is not None:
            return self.kept
        return self.lanes if len(self.side_by_side) <= len(self.one_lane) else 1

    def record(self, lanes: int, seconds: float) -> None:
        (self.side_by_side if lanes > 1 else self.one_lane).append(seconds)
        if self.kept is None and min(len(self.side_by_side), len(self.one_lane)) >= \
                PROBE_ROUNDS:
            fast = statistics.median(self.side_by_side) < statistics.median(self.one_lane)
            self.kept = self.lanes if fast else 1
            log.info("lanes: %d side by side %.3g ms/round, one lane %.3g ms/round: kept %d",
                     self.lanes, 1e3 * statistics.median(self.side_by_side),
                     1e3 * statistics.median(self.one_lane), self.kept)


last_choice: LaneChoice | None = None  # the latest population's, for benchmarks and logs


def _run_shards(shards: list[_Bucket], lanes: int, on_eval: PopOnEval | None,
                on_step: PopOnStep | None, start: float,
                results: dict[int, TrainResult], measure: bool = False) -> None:
    """Train every shard until each member has finished, stopped or diverged: rounds of
    one generator step per live shard, then each shard's checks and evaluations. With
    ``measure``, the first rounds time both layouts and the faster is kept."""
    global last_choice
    cpu = [b for b in shards if b.device.type == "cpu"]
    pool = _lane_pool(lanes) if lanes > 1 and len(cpu) > 1 else None
    choice = LaneChoice(lanes) if pool is not None and measure else None
    last_choice = choice
    errors: dict[int, Exception] = {}

    def train_lane(lane: list[_Bucket], step: int) -> None:
        for b in lane:
            try:
                b.train_step(step)
            except Exception as exc:  # that shard's program failed, not the others'
                errors[id(b)] = exc

    try:
        step = 0
        while live := [b for b in shards if b.members]:
            step += 1
            layout = lanes if choice is None else choice.next_layout()
            parallel = [b for b in live if b.device.type == "cpu"] \
                if pool and layout > 1 else []
            began = time.perf_counter()
            if len(parallel) > 1:
                list(pool.map(train_lane, _plan_round(parallel, lanes),
                              [step] * lanes))
            else:
                parallel = []
            train_lane([b for b in live if b not in parallel], step)
            if choice is not None and choice.kept is None and step > 1:  # 1: warm-up
                choice.record(layout, time.perf_counter() - began)
            for b in live:
                if id(b) in errors:
                    _fail_shard(b.members, errors.pop(id(b)), start, results)
                    b.members = []
            live = [b for b in live if b.members]
            if on_step is not None and step % STEP_REPORT_EVERY == 0 and live:
                k = sum(len(b.members) for b in live)
                on_step(step, sum(float(b.T["d_last"].sum()) for b in live) / k,
                        sum(float(b.T["g_last"].sum()) for b in live) / k)
            for b in live:
                try:
                    b.after_step(step, on_eval, start, results)
                except Exception as exc:  # e.g. saving a finished member's generator
                    _fail_shard(b.members, exc, start, results)
                    b.members = []
    finally:
        if pool is not None:
            pool.shutdown()


def _error_result(m: _Member, exc: Exception, start: float) -> TrainResult:
    """A member whose own work raised (its callback, its metrics, its bucket's program)."""
    return TrainResult(config=m.config, status="error", steps=m.g_count, metrics={},
                       history=m.history, samples=torch.empty(0, m.target.dim),
                       reference=m.reference.float(),
                       reason=f"error: {type(exc).__name__}: {exc}",
                       seconds=time.perf_counter() - start, eval_seconds=m.eval_seconds,
                       error=exc)


def _evaluate(b: _Bucket, due: list[int], step: int, on_eval: PopOnEval | None,
              finish: Callable[[_Member, str, str, int], None],
              fail: Callable[[_Member, Exception], None]) -> set[int]:
    """Evaluate the members at positions ``due``; return the positions that leave (a
    member whose metrics or callback raised leaves through ``fail``, alone)."""
    idx = None if len(due) == len(b.members) else torch.tensor(due, device=b.device)
    net = b.eval_net
    sub = b.subset(idx, ("g.", "d.", f"{net}."))
    members = [b.members[i] for i in due]
    finite = torch.stack([torch.isfinite(p.detach()).flatten(1).all(1)
                          for p in b.params(sub, "g") + b.params(sub, "d")], 1).all(1).tolist()
    with torch.no_grad():
        samples = b.mlp(sub, net, torch.stack([b.pad(m.z_eval) for m in members]),
                        training=False)
    b.write_back(idx, {k: v for k, v in sub.items() if k.startswith(f"{net}.")})
    samples = samples.to("cpu", torch.float64)
    d_avg = (b.T["d_sum"][due] if idx is not None else b.T["d_sum"]).tolist()
    g_avg = (b.T["g_sum"][due] if idx is not None else b.T["g_sum"]).tolist()
    b.T["d_sum"][due] = 0
    b.T["g_sum"][due] = 0
    def metrics(m: _Member, x: torch.Tensor) -> dict[str, float] | Exception:
        try:  # one member's failure is that member's alone
            return score(x, m.reference, m.target, m.config, exact=step == m.config.steps)
        except Exception as exc:
            return exc

    # Members' metrics in threads: the exact W1 solver (POT) and torch release the GIL.
    t0 = time.perf_counter()
    healthy = [(m, x) for m, x, ok in zip(members, samples, finite) if ok]
    with ThreadPoolExecutor(max(1, min(len(healthy), os.cpu_count() or 1))) as pool:
        computed = iter(list(pool.map(metrics, *zip(*healthy))) if healthy else [])
    share = (time.perf_counter() - t0) / max(1, len(healthy))  # wall time per member
    gone = set()
    for pos, m, x, ok, d_sum, g_sum in zip(due, members, samples, finite, d_avg, g_avg):
        if not ok:
            finish(m, "diverged", f"diverged at step {step} (non-finite weights)", step)
            gone.add(pos)
            continue
        final = step == m.config.steps
        out = next(computed)
        m.eval_seconds += share
        if isinstance(out, Exception):
            fail(m, out)
            gone.add(pos)
            continue
        m.metrics = out
        m.samples = x
        row = {"step": step, "d_loss": d_sum / m.n_since, "g_loss": g_sum / m.n_since} \
            | m.metrics
        m.n_since = 0
        m.history.append(row)
        try:
            stop = on_eval is not None and on_eval(m.index, step, row)
        except Exception as exc:  # e.g. its tracking run failed: this member alone
            fail(m, exc)
            gone.add(pos)
            continue
        if final:
            finish(m, "completed", "", step)
            gone.add(pos)
        elif stop:
            finish(m, "stopped", f"stopped at step {step}", step)
            gone.add(pos)
    return gone
