"""Stability tricks: small objects with hooks at named points of the training loop.

A trick is configured by ``TrainConfig.tricks = {"gp": {"weight": 10.0}, "ema": {}}``; each
parameter has a default and a valid range (so it can be searched as ``tricks.gp.weight``).
The trainer calls the hooks in this order each step:

    d_inputs → d_loss (override) + d_penalty → before_step(D) → after_d_step
    g_logits (override) → before_step(G) → after_g_step;   eval_generator at evaluations

``configure`` adjusts the model build (spectral norm, packing) before training starts.
TTUR (Heusel et al. 2017) needs no trick: set ``lr_d`` ≠ ``lr_g``.

Each trick also carries its **batched form**, for the population engine
(``ganbench.population``), which trains K members as stacked tensors: the ``batched_*``
hooks below mirror the trainer's hooks, at the same points and in the same order, and
draw their random numbers from each member's own stream in ``train``'s order, so a member
trains exactly as ``train`` trains it (a test checks every trick to 1e-10 in float64). The
hooks receive the engine's bucket ``b`` and work on whole batches: ``b.per_member(members,
values)`` (one constant per member, broadcasting over stacked weights), ``b.rand`` /
``b.randn`` / ``b.sample_real`` (per-member draws), ``b.disc(T, x)`` and
``b.input_grad(T, x)`` (D and its input gradient on stacked tensors ``T``),
``b.params(T, net)`` and ``b.keys(net)`` (a net's trained tensors). A trick whose
``batched`` is False trains its members through ``train`` instead.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from ganbench.errors import GanbenchError, lookup

if TYPE_CHECKING:
    from ganbench.config import TrainConfig

BCE_LOSSES = ("minimax", "nonsaturating")


@dataclass(frozen=True)
class Param:
    """A trick parameter: default and inclusive valid range."""

    default: float
    low: float
    high: float
    integer: bool = False


class Trick:
    """Base: every hook is a no-op. Subclasses set ``name``, ``params`` and a docstring
    citing their paper."""

    name = "trick"
    params: dict[str, Param] = {}
    batched = True           # the population engine can train it (its batched hooks)
    double_backward = False  # differentiates through D's input gradients (not compilable)
    bucket_params: tuple[str, ...] = ()  # parameters members of one batch must share
    eval_net: str | None = None          # the batched generator evaluated (None: G's)

    def __init__(self, **values: Any) -> None:
        for key, p in self.params.items():
            setattr(self, key, values.get(key, p.default))

    def configure(self, config: "TrainConfig") -> None:
        """Adjust the (copied) config before models are built."""

    def setup(self, g: nn.Module, d: nn.Module, config: "TrainConfig",
              rng: torch.Generator | None = None) -> None:
        """Called once the models and optimizers exist; ``rng`` is the run's generator
        (random tricks draw from it, so a run is reproducible from its seed)."""
        self.config = config
        self.rng = rng

    def d_inputs(self, real: torch.Tensor, fake: torch.Tensor, step: int
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        return real, fake

    def d_loss(self, loss, d_real: torch.Tensor, d_fake: torch.Tensor) -> torch.Tensor | None:
        """Replace the discriminator loss (None: keep it)."""
        return None

    def d_penalty(self, d: nn.Module, real: torch.Tensor, fake: torch.Tensor
                  ) -> torch.Tensor | None:
        """A term added to the discriminator loss."""
        return None

    def before_step(self, params: list[torch.Tensor]) -> None:
        """After backward, before the optimizer step (of D and of G)."""

    def after_d_step(self, d: nn.Module) -> None:
        pass

    def g_logits(self, d: nn.Module, fake: torch.Tensor,
                 sample_real: Callable[[], torch.Tensor], d_loss_fn) -> torch.Tensor | None:
        """Replace D's logits on G's samples in the generator loss (None: use D)."""
        return None

    def after_g_step(self, g: nn.Module) -> None:
        pass

    def eval_generator(self, g: nn.Module) -> nn.Module | None:
        """The generator to evaluate (None: the trained one)."""
        return None

    # ------------------------------------------------------------ batched forms
    # ``members``: the members the step updates (a D step may update a subset); ``T``:
    # their stacked tensors. Values are per member: [k] losses, [k, …] batches.
    def batched_setup(self, b: Any) -> None:
        """Once the bucket's tensors exist (``setup``)."""

    def batched_d_inputs(self, b: Any, members: list, real: torch.Tensor,
                         fake: torch.Tensor, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        return real, fake

    def batched_d_loss(self, b: Any, members: list, d_real: torch.Tensor,
                       d_fake: torch.Tensor) -> torch.Tensor | None:
        return None

    def batched_d_penalty(self, b: Any, T: dict, members: list, real: torch.Tensor,
                          fake: torch.Tensor) -> torch.Tensor | None:
        return None

    def batched_before_step(self, b: Any, members: list, grads: list[torch.Tensor]) -> None:
        """After the gradients, before the Adam step (of D and of G)."""

    def batched_after_d_step(self, b: Any, T: dict, members: list) -> None:
        pass

    def batched_g_logits(self, b: Any, T: dict, fake: torch.Tensor) -> torch.Tensor | None:
        return None

    def batched_after_g_step(self, b: Any, T: dict) -> None:
        pass


def _values(members: list, name: str, param: str) -> list[float]:
    """Each member's value of trick parameter ``name.param``."""
    return [m.trick(name, param) for m in members]


def _input_grad(d: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """∇_x D(x) per sample, kept in the graph (for penalties)."""
    x = x.detach().requires_grad_(True)
    out = d(x)
    (grad,) = torch.autograd.grad(out.sum(), x, create_graph=True)
    return grad


class WeightClip(Trick):
    """WGAN weight clipping (Arjovsky et al. 2017): clamp every D weight to [-c, c] after
    each D step, a crude bound on the critic's Lipschitz constant."""

    name = "clip"
    params = {"c": Param(0.01, 1e-4, 1.0)}

    def after_d_step(self, d: nn.Module) -> None:
        with torch.no_grad():
            for p in d.parameters():
                p.clamp_(-self.c, self.c)

    def batched_after_d_step(self, b, T, members):
        c = b.per_member(_values(members, self.name, "c"))
        with torch.no_grad():
            for p in b.params(T, "d"):
                p.copy_(torch.clamp(p, -c, c) if isinstance(c, float) else
                        torch.minimum(torch.maximum(p, -c), c))


class GradientPenalty(Trick):
    """WGAN-GP (Gulrajani et al. 2017): λ·E[(‖∇D(x̂)‖₂ − 1)²] at x̂ = εx + (1−ε)G(z),
    ε ~ U[0, 1] per sample."""

    name = "gp"
    params = {"weight": Param(10.0, 0.0, 1000.0)}
    double_backward = True

    def d_penalty(self, d, real, fake):
        eps = torch.rand(real.shape[0], 1, generator=self.rng, device=real.device,
                         dtype=real.dtype)
        mixed = eps * real + (1 - eps) * fake
        return self.penalty(d, mixed)

    def penalty(self, d: nn.Module, x: torch.Tensor) -> torch.Tensor:
        grad = _input_grad(d, x)
        # With packing, D's input is m samples: the norm is over the packed input.
        grad = grad.reshape(grad.shape[0] // getattr(d, "pack", 1), -1)
        return self.weight * ((grad.norm(dim=1) - 1) ** 2).mean()

    def batched_d_penalty(self, b, T, members, real, fake):
        eps = b.rand(members, (real.shape[1], 1))
        grad = b.input_grad(T, eps * real + (1 - eps) * fake)
        weight = b.per_member(_values(members, self.name, "weight"), vector=True)
        return weight * ((grad.norm(dim=-1) - 1) ** 2).mean(-1)


class R1(Trick):
    """R1 penalty (Mescheder et al. 2018): γ/2·E_x[‖∇D(x)‖²] on real data."""

    name = "r1"
    params = {"gamma": Param(1.0, 0.0, 1000.0)}
    on_real = True
    double_backward = True

    def d_penalty(self, d, real, fake):
        grad = _input_grad(d, real if self.on_real else fake)
        grad = grad.reshape(grad.shape[0] // getattr(d, "pack", 1), -1)
        return 0.5 * self.gamma * grad.pow(2).sum(dim=1).mean()

    def batched_d_penalty(self, b, T, members, real, fake):
        grad = b.input_grad(T, real if self.on_real else fake)
        gamma = b.per_member(_values(members, self.name, "gamma"), vector=True)
        return 0.5 * gamma * grad.pow(2).sum(-1).mean(-1)


class R2(R1):
    """R2 penalty (Mescheder et al. 2018): γ/2·E_z[‖∇D(G(z))‖²] on generated data."""

    name = "r2"
    on_real = False


class SpectralNorm(Trick):
    """Spectral normalization (Miyato et al. 2018) of every D layer (and G's if ``g=1``):
    each weight is divided by its largest singular value (power iteration)."""

    name = "sn"
    params = {"g": Param(0, 0, 1, integer=True)}

    def configure(self, config):
        config.spectral_norm = True
        config.g_spectral_norm = bool(self.g)


class GradNormClip(Trick):
    """Gradient-norm clipping (Pascanu et al. 2013) of D's and G's gradients to max_norm."""

    name = "gradclip"
    params = {"max_norm": Param(1.0, 1e-4, 1e4)}

    def before_step(self, params):
        torch.nn.utils.clip_grad_norm_(params, self.max_norm)

    def batched_before_step(self, b, members, grads):
        """Per member, as ``clip_grad_norm_`` does for one net."""
        max_norm = b.per_member(_values(members, self.name, "max_norm"), vector=True)
        norms = torch.stack([g.flatten(1).norm(dim=1) for g in grads], 1).norm(dim=1)
        coef = (max_norm / (norms + 1e-6)).clamp(max=1.0).view(-1, 1, 1)
        for g in grads:
            g.mul_(coef)


class InstanceNoise(Trick):
    """Instance noise (Sønderby et al. 2017; Arjovsky & Bottou 2017): Gaussian noise of std σ
    on D's real and fake inputs, annealed linearly to 0 over ``anneal`` of the run."""

    name = "noise"
    params = {"std": Param(0.1, 0.0, 10.0), "anneal": Param(1.0, 0.0, 1.0)}

    def std_at(self, step: int, steps: int) -> float:
        """σ at generator step ``step`` of a run of ``steps``."""
        horizon = self.anneal * steps
        return self.std * max(0.0, 1 - step / horizon) if horizon > 0 else self.std

    def d_inputs(self, real, fake, step):
        std = self.std_at(step, self.config.steps)

        def draw(x: torch.Tensor) -> torch.Tensor:
            return torch.randn(x.shape, generator=self.rng, device=x.device, dtype=x.dtype)

        return real + std * draw(real), fake + std * draw(fake)

    def batched_d_inputs(self, b, members, real, fake, step):
        std = b.per_member([m.trick_object(self.name).std_at(step, m.config.steps)
                            for m in members])
        noisy_real = real + std * b.randn(members, real.shape[1:])
        return noisy_real, fake + std * b.randn(members, fake.shape[1:])


class LabelSmoothing(Trick):
    """One-sided label smoothing (Salimans et al. 2016): D's target for real data is
    ``real`` (0.9) instead of 1; fake targets stay 0. Only for the BCE losses."""

    name = "smooth"
    params = {"real": Param(0.9, 0.5, 1.0)}

    def d_loss(self, loss, d_real, d_fake):
        target = torch.full_like(d_real, self.real)
        return (F.binary_cross_entropy_with_logits(d_real, target)
                + F.softplus(d_fake).mean())

    def batched_d_loss(self, b, members, d_real, d_fake):
        target = b.per_member(_values(members, self.name, "real"), vector=True)
        target = torch.full_like(d_real, target) if isinstance(target, float) else \
            target.view(-1, 1).expand_as(d_real)
        return F.binary_cross_entropy_with_logits(d_real, target, reduction="none") \
            .mean(-1) + F.softplus(d_fake).mean(-1)


class EMA(Trick):
    """Exponential moving average of G's weights (Yazıcı et al. 2019): after every G step
    θ_ema ← β·θ_ema + (1−β)·θ; evaluations use the EMA copy, with G's batch-norm running
    statistics copied in."""

    name = "ema"
    params = {"decay": Param(0.999, 0.0, 0.99999)}
    eval_net = "ema"

    def setup(self, g, d, config, rng=None):
        super().setup(g, d, config, rng)
        self.shadow = copy.deepcopy(g)
        self.shadow.requires_grad_(False)

    def after_g_step(self, g):
        with torch.no_grad():
            for s, p in zip(self.shadow.parameters(), g.parameters()):
                s.lerp_(p, 1 - self.decay)
            for s, m in zip(self.shadow.modules(), g.modules()):
                if isinstance(m, nn.BatchNorm1d):
                    s.running_mean.copy_(m.running_mean)
                    s.running_var.copy_(m.running_var)

    def eval_generator(self, g):
        return self.shadow

    def batched_setup(self, b):
        """The shadow generator starts as a copy of G (``ema.*`` beside ``g.*``)."""
        for key in [k for k in b.T if k.startswith("g.")]:
            b.T["ema" + key[1:]] = b.T[key].detach().clone()

    def batched_after_g_step(self, b, T):
        weight = b.per_member([1 - v for v in _values(b.members, self.name, "decay")])
        with torch.no_grad():
            for key in b.keys("g"):
                T["ema" + key[1:]].lerp_(T[key], weight)
            for key in [k for k in T if k.startswith(("g.rm.", "g.rv."))]:
                T["ema" + key[1:]].copy_(T[key])  # batch-norm statistics, as after_g_step


class Pack(Trick):
    """PacGAN packing (Lin et al. 2018): D judges m samples at once (concatenated), which
    penalises mode collapse."""

    name = "pack"
    params = {"m": Param(2, 2, 16, integer=True)}

    def configure(self, config):
        config.pack = int(self.m)


class Unrolled(Trick):
    """Unrolled GAN (Metz et al. 2017): G's loss is taken against D unrolled k steps ahead
    (differentiably, via ``torch.func.functional_call``; the unrolled steps are plain SGD
    with lr_d), so G anticipates D's response."""

    name = "unrolled"
    params = {"k": Param(5, 1, 20, integer=True)}
    double_backward = True
    bucket_params = ("k",)   # members of a batch unroll the same number of steps

    def g_logits(self, d, fake, sample_real, d_loss_fn):
        from torch.func import functional_call

        params = {k: v for k, v in d.named_parameters()}
        buffers = dict(d.named_buffers())
        for _ in range(int(self.k)):
            real = sample_real()
            loss = d_loss_fn(functional_call(d, (params, buffers), (real,)),
                             functional_call(d, (params, buffers), (fake.detach(),)))
            grads = torch.autograd.grad(loss, list(params.values()), create_graph=True)
            params = {k: v - self.config.lr_d * gr for (k, v), gr in zip(params.items(), grads)}
        return functional_call(d, (params, buffers), (fake,))

    def batched_g_logits(self, b, T, fake):
        lr = b.per_member([m.config.lr_d for m in b.members])
        keys = b.keys("d")
        unrolled = dict(T)
        for _ in range(int(self.k)):
            real = b.sample_real(b.members)
            loss = b.d_loss_fn(b.disc(unrolled, real), b.disc(unrolled, fake.detach()))
            grads = torch.autograd.grad(loss.sum(), [unrolled[k] for k in keys],
                                        create_graph=True)
            unrolled |= {k: unrolled[k] - lr * g for k, g in zip(keys, grads)}
        return b.disc(unrolled, fake)


TRICKS: dict[str, type[Trick]] = {
    "clip": WeightClip,
    "gp": GradientPenalty,
    "r1": R1,
    "r2": R2,
    "sn": SpectralNorm,
    "gradclip": GradNormClip,
    "noise": InstanceNoise,
    "smooth": LabelSmoothing,
    "ema": EMA,
    "pack": Pack,
    "unrolled": Unrolled,
}


def validate_tricks(tricks: dict[str, dict[str, Any]], loss: str) -> None:
    """Unknown tricks or parameters, out-of-range values and meaningless combinations raise
    GanbenchError with the field path ``tricks.<name>[.<param>]``."""
    if not isinstance(tricks, dict):
        raise GanbenchError("tricks must be a mapping of trick name to parameters", "tricks")
    for name, values in tricks.items():
        cls = lookup(TRICKS, name, "trick", "tricks")
        values = values or {}
        if not isinstance(values, dict):
            raise GanbenchError(f"tricks.{name}: expected a mapping of parameters",
                                f"tricks.{name}")
        for key, value in values.items():
            if key not in cls.params:
                valid = ", ".join(cls.params) or "none"
                raise GanbenchError(f"tricks.{name}: unknown parameter {key!r}; valid: {valid}",
                                    f"tricks.{name}.{key}")
            p = cls.params[key]
            if isinstance(value, bool) or not isinstance(value, (int, float)) or \
                    not math.isfinite(value) or not p.low <= value <= p.high or \
                    (p.integer and value != int(value)):
                kind = "an integer" if p.integer else "a number"
                raise GanbenchError(f"tricks.{name}.{key} must be {kind} in [{p.low:g}, "
                                    f"{p.high:g}], got {value!r}", f"tricks.{name}.{key}")
    if "clip" in tricks and loss != "wasserstein":
        raise GanbenchError(f"tricks.clip bounds a WGAN critic; with loss {loss!r} it only "
                            "cripples D (use loss: wasserstein)", "tricks.clip")
    if "clip" in tricks and "gp" in tricks:
        raise GanbenchError("tricks.clip and tricks.gp are two Lipschitz constraints on the "
                            "same critic; WGAN-GP replaced clipping: choose one", "tricks.clip")
    if "smooth" in tricks and loss not in BCE_LOSSES:
        raise GanbenchError(f"tricks.smooth smooths BCE labels; loss {loss!r} has none (use "
                            f"{' or '.join(BCE_LOSSES)})", "tricks.smooth")


def build_tricks(tricks: dict[str, dict[str, Any]]) -> list[Trick]:
    """Trick objects in registry order (so hooks run in a fixed order)."""
    return [cls(**(tricks[name] or {})) for name, cls in TRICKS.items() if name in tricks]
