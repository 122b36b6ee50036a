"""GAN objectives as functions of the discriminator's raw outputs (logits / critic values).

Each loss is a pair ``(d_loss(real, fake), g_loss(fake))`` of scalar tensors to minimize.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F

from ganbench.errors import lookup


class Loss(NamedTuple):
    """A GAN objective: what D minimizes and what G minimizes."""

    d: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    g: Callable[[torch.Tensor], torch.Tensor]


def _bce_d(real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    # -log D(x) - log(1 - D(G(z))) with D = sigmoid(logit), written stably with softplus.
    return F.softplus(-real).mean() + F.softplus(fake).mean()


# Goodfellow et al. 2014, V(D, G): G minimizes log(1 - D(G(z))) = -softplus(logit) (saturates).
minimax = Loss(d=_bce_d, g=lambda fake: -F.softplus(fake).mean())
# Goodfellow et al. 2014, the practical variant: G minimizes -log D(G(z)) = softplus(-logit).
nonsaturating = Loss(d=_bce_d, g=lambda fake: F.softplus(-fake).mean())
# Arjovsky et al. 2017, WGAN: the critic maximizes E[D(x)] - E[D(G(z))].
wasserstein = Loss(d=lambda real, fake: fake.mean() - real.mean(), g=lambda fake: -fake.mean())
# Lim & Ye 2017 / Miyato et al. 2018: hinge loss for D, -E[D(G(z))] for G.
hinge = Loss(
    d=lambda real, fake: F.relu(1 - real).mean() + F.relu(1 + fake).mean(),
    g=lambda fake: -fake.mean(),
)
# Mao et al. 2017, LSGAN with targets a=0 (fake), b=1 (real), c=1 (G's target).
lsgan = Loss(
    d=lambda real, fake: 0.5 * ((real - 1) ** 2).mean() + 0.5 * (fake**2).mean(),
    g=lambda fake: 0.5 * ((fake - 1) ** 2).mean(),
)

LOSSES: dict[str, Loss] = {
    "minimax": minimax,
    "nonsaturating": nonsaturating,
    "wasserstein": wasserstein,
    "hinge": hinge,
    "lsgan": lsgan,
}


def get_loss(name: str) -> Loss:
    """Return the registered loss ``name`` or raise GanbenchError listing the choices."""
    return lookup(LOSSES, name, "loss")
