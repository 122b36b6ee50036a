"""Synthetic target distributions with known structure.

Each target samples deterministically from a ``torch.Generator`` and knows its mode
centres (or ``None``), its per-mode standard deviation and its mode weights, so the
metrics in :mod:`ganbench.metrics` can score generated samples against it.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ganbench.errors import GanbenchError, lookup


class Target:
    """Base class: a distribution in ``dim`` dimensions.

    Subclasses set ``dim``, ``std``, ``centers`` (``[K, dim]`` or ``None``) and
    ``weights`` (``[K]`` summing to 1, or ``None``) and implement :meth:`sample`.
    """

    name: str = "target"
    dim: int
    std: float
    centers: torch.Tensor | None = None
    weights: torch.Tensor | None = None

    def sample(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """Return ``n`` samples as a float32 tensor on the generator's device."""
        raise NotImplementedError

    def _mixture(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """Sample a Gaussian mixture with isotropic ``std`` around ``centers``."""
        device = generator.device
        centers = self.centers.to(device)
        idx = torch.multinomial(self.weights.to(device), n, replacement=True, generator=generator)
        noise = torch.randn(n, self.dim, generator=generator, device=device)
        return centers[idx] + self.std * noise


class Pool:
    """A fixed training set, as in PacGAN's protocol: ``size`` points of ``target`` drawn
    once from the run's seed, then served in epochs — each epoch a fresh permutation from
    the run's generator, consecutive batches of it, an incomplete last batch dropped."""

    def __init__(self, target: Target, size: int, seed: int) -> None:
        # Its own stream: the run's generator (seeded with ``seed``) draws noise and batches.
        self.points = target.sample(size, torch.Generator().manual_seed(
            (seed + 1) * 0x9E3779B1 % 2 ** 63))
        self.order: torch.Tensor | None = None
        self.cursor = 0

    def sample(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """The next ``n`` points of the current epoch (float32, on the generator's device)."""
        if self.points.device != generator.device:
            self.points = self.points.to(generator.device)
        if self.order is None or self.cursor + n > len(self.points):
            self.order = torch.randperm(len(self.points), generator=generator,
                                        device=generator.device)
            self.cursor = 0
        idx = self.order[self.cursor:self.cursor + n]
        self.cursor += n
        return self.points[idx]


def training_data(target: Target, pool: int | None, seed: int) -> Target | Pool:
    """Where a run draws its real batches: ``target`` itself, or a fixed pool of it."""
    return target if pool is None else Pool(target, pool, seed)


# Bounds that keep a target's tensors small (modes × dim floats) and its numbers finite.
MAX_MODES = 10_000
MAX_SCALE = 1e6


def _positive(name: str, value: float, high: float = MAX_SCALE, integer: bool = False) -> None:
    """``value`` must be in (0, high] (and an integer if asked); else one GanbenchError."""
    kind = "an integer" if integer else "a number"
    if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)) \
            or not 0 < value <= high:
        raise GanbenchError(f"target parameter {name} must be {kind} in (0, {high:g}], "
                            f"got {value!r}", f"target.{name}")


class Ring(Target):
    """K Gaussians at angles 2πk/K on a circle (PacGAN: K=8, radius 1, σ=0.01)."""

    name = "ring"

    def __init__(self, modes: int = 8, radius: float = 1.0, std: float = 0.01) -> None:
        _positive("modes", modes, MAX_MODES, integer=True)
        _positive("radius", radius)
        _positive("std", std)
        # 2πk/K, not linspace(0, 2π, K): the latter repeats the first mode at 2π.
        angles = 2 * math.pi * torch.arange(modes, dtype=torch.float64) / modes
        self.centers = (radius * torch.stack([angles.cos(), angles.sin()], 1)).float()
        self.weights = torch.full((modes,), 1.0 / modes)
        self.dim, self.std = 2, float(std)

    sample = Target._mixture


class Grid(Target):
    """n×n Gaussians on a centred lattice (PacGAN: 5×5, spacing 2, σ=0.05)."""

    name = "grid"

    def __init__(self, n: int = 5, spacing: float = 2.0, std: float = 0.05) -> None:
        _positive("n", n, int(math.isqrt(MAX_MODES)), integer=True)
        _positive("spacing", spacing)
        _positive("std", std)
        axis = (torch.arange(n, dtype=torch.float32) - (n - 1) / 2) * spacing
        xx, yy = torch.meshgrid(axis, axis, indexing="ij")
        self.centers = torch.stack([xx.flatten(), yy.flatten()], 1)
        self.weights = torch.full((n * n,), 1.0 / (n * n))
        self.dim, self.std = 2, float(std)

    sample = Target._mixture


class Spiral(Target):
    """A two-dimensional Archimedean spiral with Gaussian noise; no discrete modes."""

    name = "spiral"

    def __init__(self, turns: float = 2.0, radius: float = 1.0, std: float = 0.02) -> None:
        _positive("turns", turns)
        _positive("radius", radius)
        _positive("std", std)
        self.turns, self.radius, self.dim, self.std = float(turns), float(radius), 2, float(std)

    def sample(self, n: int, generator: torch.Generator) -> torch.Tensor:
        device = generator.device
        t = torch.rand(n, generator=generator, device=device).sqrt()  # uniform along the area
        angle = 2 * math.pi * self.turns * t
        points = self.radius * t[:, None] * torch.stack([angle.cos(), angle.sin()], 1)
        return points + self.std * torch.randn(n, 2, generator=generator, device=device)


class SwissRoll(Target):
    """The 2-D swiss roll (x, y) = t·(cos t, sin t)/scale, t ∈ [1.5π, 4.5π]; no discrete modes."""

    name = "swissroll"

    def __init__(self, std: float = 0.05, scale: float = 7.5) -> None:
        _positive("std", std)
        _positive("scale", scale)
        self.scale, self.dim, self.std = float(scale), 2, float(std)

    def sample(self, n: int, generator: torch.Generator) -> torch.Tensor:
        device = generator.device
        t = 1.5 * math.pi * (1 + 2 * torch.rand(n, generator=generator, device=device))
        points = torch.stack([t * t.cos(), t * t.sin()], 1) / self.scale
        return points + self.std * torch.randn(n, 2, generator=generator, device=device)


class MixtureOfGaussians(Target):
    """K Gaussians in ``dim`` dimensions with seeded random centres ~ U[-spread, spread]^dim."""

    name = "mog"

    def __init__(
        self, dim: int = 2, modes: int = 10, std: float = 0.05, spread: float = 1.0,
        center_seed: int = 0,
    ) -> None:
        _positive("dim", dim, 1000, integer=True)
        _positive("modes", modes, MAX_MODES, integer=True)
        _positive("std", std)
        _positive("spread", spread)
        if isinstance(center_seed, bool) or not isinstance(center_seed, int) \
                or not 0 <= center_seed < 2**63:
            raise GanbenchError(f"target parameter center_seed must be an integer in "
                                f"[0, 2**63), got {center_seed!r}", "target.center_seed")
        g = torch.Generator().manual_seed(center_seed)
        self.centers = (torch.rand(modes, dim, generator=g) * 2 - 1) * spread
        self.weights = torch.full((modes,), 1.0 / modes)
        self.dim, self.std = int(dim), float(std)

    sample = Target._mixture


TARGETS: dict[str, type[Target]] = {
    "ring": Ring,
    "grid": Grid,
    "spiral": Spiral,
    "swissroll": SwissRoll,
    "mog": MixtureOfGaussians,
}


def get_target(name: str, **params: Any) -> Target:
    """Build a registered target by name; unknown names or parameters raise GanbenchError."""
    cls = lookup(TARGETS, name, "target")
    try:
        return cls(**params)
    except (ValueError, OverflowError) as exc:
        raise GanbenchError(f"bad parameters for target {name!r}: {exc}") from None
    except TypeError as exc:
        import inspect

        valid = ", ".join(p for p in inspect.signature(cls).parameters)
        raise GanbenchError(f"bad parameters for target {name!r} ({exc}); valid: {valid}") from None
