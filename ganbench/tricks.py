"""Stability tricks: small objects with hooks at named points of the training loop.

A trick is configured by ``TrainConfig.tricks = {"gp": {"weight": 10.0}, "ema": {}}``; each
parameter has a default and a valid range (so it can be searched as ``tricks.gp.weight``).
The trainer calls the hooks in this order each step:

    d_inputs → d_loss (override) + d_penalty → before_step(D) → after_d_step
    g_logits (override) → before_step(G) → after_g_step;   eval_generator at evaluations

``configure`` adjusts the model build (spectral norm, packing) before training starts.
TTUR (Heusel et al. 2017) needs no trick: set ``lr_d`` ≠ ``lr_g``.
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


class GradientPenalty(Trick):
    """WGAN-GP (Gulrajani et al. 2017): λ·E[(‖∇D(x̂)‖₂ − 1)²] at x̂ = εx + (1−ε)G(z),
    ε ~ U[0, 1] per sample."""

    name = "gp"
    params = {"weight": Param(10.0, 0.0, 1000.0)}

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


class R1(Trick):
    """R1 penalty (Mescheder et al. 2018): γ/2·E_x[‖∇D(x)‖²] on real data."""

    name = "r1"
    params = {"gamma": Param(1.0, 0.0, 1000.0)}
    on_real = True

    def d_penalty(self, d, real, fake):
        grad = _input_grad(d, real if self.on_real else fake)
        grad = grad.reshape(grad.shape[0] // getattr(d, "pack", 1), -1)
        return 0.5 * self.gamma * grad.pow(2).sum(dim=1).mean()


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


class InstanceNoise(Trick):
    """Instance noise (Sønderby et al. 2017; Arjovsky & Bottou 2017): Gaussian noise of std σ
    on D's real and fake inputs, annealed linearly to 0 over ``anneal`` of the run."""

    name = "noise"
    params = {"std": Param(0.1, 0.0, 10.0), "anneal": Param(1.0, 0.0, 1.0)}

    def current_std(self, step: int) -> float:
        horizon = self.anneal * self.config.steps
        return self.std * max(0.0, 1 - step / horizon) if horizon > 0 else self.std

    def d_inputs(self, real, fake, step):
        std = self.current_std(step)
        def draw(x: torch.Tensor) -> torch.Tensor:
            return torch.randn(x.shape, generator=self.rng, device=x.device, dtype=x.dtype)

        return real + std * draw(real), fake + std * draw(fake)


class LabelSmoothing(Trick):
    """One-sided label smoothing (Salimans et al. 2016): D's target for real data is
    ``real`` (0.9) instead of 1; fake targets stay 0. Only for the BCE losses."""

    name = "smooth"
    params = {"real": Param(0.9, 0.5, 1.0)}

    def d_loss(self, loss, d_real, d_fake):
        target = torch.full_like(d_real, self.real)
        return (F.binary_cross_entropy_with_logits(d_real, target)
                + F.softplus(d_fake).mean())


class EMA(Trick):
    """Exponential moving average of G's weights (Yazıcı et al. 2019): after every G step
    θ_ema ← β·θ_ema + (1−β)·θ; evaluations use the EMA copy, with G's batch-norm running
    statistics copied in."""

    name = "ema"
    params = {"decay": Param(0.999, 0.0, 0.99999)}

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
