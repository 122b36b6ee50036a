"""MLP generator and discriminator."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from ganbench.errors import lookup

# Generator batch norm as in PacGAN's (ALI's) 2-d experiments: eps 1e-4, momentum 0.05.
BN_EPS, BN_MOMENTUM = 1e-4, 0.05

ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "leaky_relu": nn.LeakyReLU,
    "tanh": nn.Tanh,
    "elu": nn.ELU,
    "gelu": nn.GELU,
    "silu": nn.SiLU,
}


class Maxout(nn.Module):
    """Maxout units (Goodfellow et al. 2013): the input's last dimension holds ``pieces``
    consecutive values per unit; each unit outputs their maximum."""

    def __init__(self, pieces: int) -> None:
        super().__init__()
        self.pieces = pieces

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.unflatten(-1, (-1, self.pieces)).amax(-1)


def mlp(
    in_dim: int, widths: Sequence[int], out_dim: int, activation: str = "relu",
    spectral_norm: bool = False, batch_norm: bool = False, pieces: int = 1,
) -> nn.Sequential:
    """A multilayer perceptron ``in_dim → widths… → out_dim`` with ``activation`` between
    layers and, optionally, spectral normalization (Miyato et al. 2018) on every linear layer.

    ``batch_norm``: each hidden layer is Linear without bias → BatchNorm (eps 1e-4,
    momentum 0.05, as PacGAN's generator) → activation. ``pieces`` > 1: each hidden layer
    is a maxout layer of that many pieces per unit, in place of the activation.
    """
    act = lookup(ACTIVATIONS, activation, "activation")
    dims = [in_dim, *widths, out_dim]
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
        hidden = i < len(dims) - 2
        linear = nn.Linear(a, b * pieces if hidden else b, bias=not (hidden and batch_norm))
        if spectral_norm:
            linear = nn.utils.parametrizations.spectral_norm(linear)
        layers.append(linear)
        if hidden and batch_norm:
            layers.append(nn.BatchNorm1d(b, eps=BN_EPS, momentum=BN_MOMENTUM))
        if hidden:
            layers.append(Maxout(pieces) if pieces > 1 else act())
    return nn.Sequential(*layers)


def init_normal(module: nn.Module, std: float) -> None:
    """Every linear weight drawn from N(0, std²), every linear bias 0 (DCGAN's and ALI's
    initialisation, with std 0.02); batch norm keeps scale 1 and shift 0."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            weight = m.parametrizations.weight.original if hasattr(m, "parametrizations") \
                else m.weight
            nn.init.normal_(weight, 0.0, std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


class Generator(nn.Module):
    """Maps noise ``z ∈ R^noise_dim`` to a sample ``x ∈ R^data_dim``."""

    def __init__(self, noise_dim: int, widths: Sequence[int], data_dim: int,
                 activation: str = "relu", spectral_norm: bool = False,
                 batch_norm: bool = False) -> None:
        super().__init__()
        self.noise_dim = noise_dim
        self.net = mlp(noise_dim, widths, data_dim, activation, spectral_norm, batch_norm)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z)


class Discriminator(nn.Module):
    """Scores ``pack`` samples at once (PacGAN, Lin et al. 2018) with one raw logit.

    Input ``[B, data_dim]`` with B divisible by ``pack`` is reshaped to
    ``[B / pack, data_dim · pack]``: consecutive samples form one packed input.
    """

    def __init__(self, data_dim: int, widths: Sequence[int], activation: str = "relu",
                 spectral_norm: bool = False, pack: int = 1, pieces: int = 1) -> None:
        super().__init__()
        self.pack = pack
        self.net = mlp(data_dim * pack, widths, 1, activation, spectral_norm, pieces=pieces)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.reshape(x.shape[0] // self.pack, -1)).squeeze(-1)
