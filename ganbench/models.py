"""MLP generator and discriminator."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from ganbench.errors import lookup

ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "leaky_relu": nn.LeakyReLU,
    "tanh": nn.Tanh,
    "elu": nn.ELU,
    "gelu": nn.GELU,
    "silu": nn.SiLU,
}


def mlp(
    in_dim: int, widths: Sequence[int], out_dim: int, activation: str = "relu",
    spectral_norm: bool = False,
) -> nn.Sequential:
    """A multilayer perceptron ``in_dim → widths… → out_dim`` with ``activation`` between
    layers and, optionally, spectral normalization (Miyato et al. 2018) on every linear layer.
    """
    act = lookup(ACTIVATIONS, activation, "activation")
    dims = [in_dim, *widths, out_dim]
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
        linear = nn.Linear(a, b)
        if spectral_norm:
            linear = nn.utils.parametrizations.spectral_norm(linear)
        layers.append(linear)
        if i < len(dims) - 2:
            layers.append(act())
    return nn.Sequential(*layers)


class Generator(nn.Module):
    """Maps noise ``z ∈ R^noise_dim`` to a sample ``x ∈ R^data_dim``."""

    def __init__(self, noise_dim: int, widths: Sequence[int], data_dim: int,
                 activation: str = "relu", spectral_norm: bool = False) -> None:
        super().__init__()
        self.noise_dim = noise_dim
        self.net = mlp(noise_dim, widths, data_dim, activation, spectral_norm)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z)


class Discriminator(nn.Module):
    """Scores ``pack`` samples at once (PacGAN, Lin et al. 2018) with one raw logit.

    Input ``[B, data_dim]`` with B divisible by ``pack`` is reshaped to
    ``[B / pack, data_dim · pack]``: consecutive samples form one packed input.
    """

    def __init__(self, data_dim: int, widths: Sequence[int], activation: str = "relu",
                 spectral_norm: bool = False, pack: int = 1) -> None:
        super().__init__()
        self.pack = pack
        self.net = mlp(data_dim * pack, widths, 1, activation, spectral_norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.reshape(x.shape[0] // self.pack, -1)).squeeze(-1)
