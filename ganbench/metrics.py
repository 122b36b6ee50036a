"""Distribution metrics between generated samples and a target, and **the metric registry**.

Definitions (shared with the reports):

- ``w1``: exact Wasserstein-1 between two equal-size point sets: the optimal assignment on
  the Euclidean cost matrix, mean matched distance.
- ``sliced_w1``: mean over random unit directions of the 1-D W1 of the projections
  (Rabin et al. 2011; Deshpande et al. 2018).
- ``mode_metrics``: the mode-collapse metrics of VEEGAN (Srivastava et al. 2017) and
  PacGAN (Lin et al. 2018): high-quality percentage, captured modes and the reverse KL of
  the high-quality samples' mode histogram.

:data:`METRICS` names every metric once: its direction, a line of description with its
source, whether it needs mode centres, when it is computed and how. Spec validation,
objectives, the trainer's results, leaderboard and comparison columns, CLI tables and
MLflow metric names all derive from it. This module imports torch and scipy only inside
the functions that compute, so the registry is cheap to import (the CLI and the reports
read it without loading torch).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    import torch

# Probability mass of a 2-D isotropic Gaussian within 3σ: 1 - e^(-4.5) ≈ 98.9%.
HQ_MASS = 1.0 - math.exp(-4.5)
# Up to this size the assignment solver is fast on any cost matrix.
_LSA_MAX = 512


def _check_pair(x: torch.Tensor, y: torch.Tensor) -> None:
    if x.ndim != 2 or y.ndim != 2 or x.shape != y.shape:
        raise ValueError(f"expected two [n, d] sets of equal shape, got {tuple(x.shape)} and "
                         f"{tuple(y.shape)}")


def w1(x: torch.Tensor, y: torch.Tensor) -> float:
    """Exact Wasserstein-1 distance between two equal-size empirical distributions.

    The optimal assignment on the Euclidean cost matrix, mean matched distance. With equal
    uniform weights the optimal transport plan is a permutation (Birkhoff), so the network
    simplex of POT's ``ot.emd2`` gives the assignment's value; it is used above
    ``_LSA_MAX`` points because ``scipy.optimize.linear_sum_assignment`` slows by 10x on
    the near-degenerate costs of collapsed generators (16 s vs 2 s at n=2500). A set
    shifted by a vector v is at W1 = |v| from itself.
    """
    import numpy as np
    import torch
    from scipy.optimize import linear_sum_assignment

    _check_pair(x, y)
    x, y = x.detach().double().cpu(), y.detach().double().cpu()
    cost = torch.cdist(x, y, compute_mode="donot_use_mm_for_euclid_dist").numpy()
    n = cost.shape[0]
    if n <= _LSA_MAX:
        rows, cols = linear_sum_assignment(cost)
        return float(cost[rows, cols].mean())
    import ot  # POT: imported where used, it is only needed for large sets

    uniform = np.full(n, 1.0 / n)
    return float(ot.emd2(uniform, uniform, cost, numItermax=100 * n * n))


def sliced_w1(
    x: torch.Tensor, y: torch.Tensor, n_projections: int = 128,
    generator: torch.Generator | None = None,
) -> float:
    """Sliced Wasserstein-1: the mean over ``n_projections`` random unit directions of the
    exact 1-D W1 between the projected sets (sorted samples matched in order).

    Pass a seeded ``generator`` so repeated evaluations use the same directions.
    """
    import torch

    _check_pair(x, y)
    x, y = x.detach().double().cpu(), y.detach().double().cpu()
    if generator is None:
        generator = torch.Generator().manual_seed(0)
    dirs = torch.randn(x.shape[1], n_projections, generator=generator, dtype=torch.float64)
    dirs = dirs / dirs.norm(dim=0, keepdim=True)
    px, _ = (x @ dirs).sort(dim=0)
    py, _ = (y @ dirs).sort(dim=0)
    # numpy's pairwise sum: the same value whatever torch's thread count (a parallel
    # reduction's order depends on it, and a reloaded generator must score bit-identically).
    return float((px - py).abs().numpy().mean())


def hq_threshold(dim: int) -> float:
    """σ-scaled radius holding 1 − e^(−4.5) of an isotropic Gaussian in ``dim`` dimensions.

    Equals 3 in 2-D, the PacGAN/VEEGAN "within 3σ" rule; in higher dimensions the same
    probability mass keeps the target's own samples at ≈98.9% high quality.
    """
    from scipy.stats import chi2

    return math.sqrt(chi2.ppf(HQ_MASS, dim))


class Evaluation:
    """What a metric sees: one evaluation's generated ``samples`` against the target's
    fixed ``reference`` sample, its mode ``centers`` (or None), ``std`` and mode
    ``weights``. Pieces that several metrics share (the nearest-mode assignment) are
    computed once, on first use."""

    def __init__(
        self, samples: torch.Tensor, reference: torch.Tensor, centers: torch.Tensor | None,
        std: float, weights: torch.Tensor | None = None,
        generator: torch.Generator | None = None, threshold: float | None = None,
    ) -> None:
        self.samples = samples.detach().double().cpu()
        self.reference = reference.detach().double().cpu()
        self.centers = None if centers is None else centers.detach().double().cpu()
        self.std = std
        self.weights = weights
        self.generator = generator        # seeded: the same projections every evaluation
        self._threshold = threshold

    @cached_property
    def threshold(self) -> float:
        """σ-scaled high-quality radius (3 in 2-D; see :func:`hq_threshold`)."""
        if self._threshold is not None:
            return self._threshold
        return hq_threshold(self.centers.shape[1])

    @cached_property
    def nearest(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(σ-scaled distance to the nearest centre, that centre's index) per sample."""
        import torch

        dist = torch.cdist(self.samples, self.centers, compute_mode="donot_use_mm_for_euclid_dist")
        nearest_dist, index = dist.min(dim=1)
        return nearest_dist / self.std, index

    @cached_property
    def high_quality(self) -> torch.Tensor:
        """True for the samples within :attr:`threshold` of their nearest centre."""
        return self.nearest[0] < self.threshold


def _w1(ev: Evaluation) -> float:
    return w1(ev.samples, ev.reference)


def _sliced_w1(ev: Evaluation) -> float:
    return sliced_w1(ev.samples, ev.reference, generator=ev.generator)


def _modes(ev: Evaluation) -> float:
    import torch

    return int(torch.unique(ev.nearest[1][ev.high_quality]).numel())


def _hq(ev: Evaluation) -> float:
    return 100.0 * float(ev.high_quality.double().mean())


def _kl(ev: Evaluation) -> float:
    """Reverse KL as PacGAN's evaluation code computes it (fjxmlzn/PacGAN, MetricLogger):
    the histogram of the *high-quality* samples over their nearest modes, normalised by
    their number, against the mode weights: KL(p_HQ ‖ w) (= log K − H(p_HQ) for uniform
    weights). Low-quality samples are left out. With no high-quality sample the histogram
    is empty and the divergence undefined (PacGAN's code gives NaN): it is +inf, so such a
    run ranks below every run with at least one high-quality sample."""
    import torch

    k = ev.centers.shape[0]
    counts = torch.bincount(ev.nearest[1][ev.high_quality], minlength=k).double()
    if counts.sum() == 0:
        return math.inf
    p = counts / counts.sum()
    q = (torch.full((k,), 1.0 / k, dtype=torch.float64) if ev.weights is None
         else ev.weights.double())
    nz = p > 0
    return max(float((p[nz] * (p[nz] / q[nz]).log()).sum()), 0.0)


@dataclass(frozen=True)
class Metric:
    """One metric. Its name is its key in :data:`METRICS`."""

    direction: str                          # "minimize" | "maximize"
    description: str                        # one line, citing the source
    compute: Callable[[Evaluation], float]  # the value of one evaluation
    needs_centers: bool = False             # defined only for targets with modes
    final_only: bool = False                # too costly per evaluation: computed at the end
    proxy: str | None = None                # what pruning follows until the end (final_only)
    integer: bool = False                   # a count, shown without decimals
    worst: float | None = field(default=None)  # a diverged run's value (default ±inf)

    @property
    def worst_value(self) -> float:
        if self.worst is not None:
            return self.worst
        return math.inf if self.direction == "minimize" else -math.inf

    @property
    def arrow(self) -> str:
        return "↓" if self.direction == "minimize" else "↑"


METRICS: dict[str, Metric] = {
    "w1": Metric("minimize", "exact Wasserstein-1: optimal assignment, mean matched distance "
                 "(Arjovsky et al. 2017)", _w1, final_only=True, proxy="sliced_w1"),
    "sliced_w1": Metric("minimize", "sliced Wasserstein-1 over 128 random directions "
                        "(Rabin et al. 2011)", _sliced_w1),
    "modes": Metric("maximize", "modes nearest to at least one high-quality sample "
                    "(VEEGAN, Srivastava et al. 2017)", _modes, needs_centers=True,
                    integer=True, worst=0),
    "hq": Metric("maximize", "% of samples within 3σ of their nearest mode "
                 "(VEEGAN; PacGAN, Lin et al. 2018)", _hq, needs_centers=True, worst=0.0),
    "kl": Metric("minimize", "reverse KL of the high-quality samples' mode histogram to the "
                 "mode weights (PacGAN, Lin et al. 2018)", _kl, needs_centers=True),
}


def get_metric(name: str) -> Metric:
    """The registered metric ``name``, or a GanbenchError listing the valid names."""
    from ganbench.errors import lookup

    return lookup(METRICS, name, "metric")


def metric_names(has_centers: bool = True) -> list[str]:
    """Every registered metric, in registry order (those that need modes only if
    ``has_centers``)."""
    return [n for n, m in METRICS.items() if has_centers or not m.needs_centers]


def pruning_metric(name: str) -> str:
    """The metric reported at each evaluation for an objective ``name``: a final-only
    metric (exact W1, an n³ assignment) is followed by its proxy meanwhile."""
    return METRICS[name].proxy or name


def worst_metrics(has_centers: bool) -> dict[str, float]:
    """Every metric's worst value: what a diverged run reports."""
    return {n: METRICS[n].worst_value for n in metric_names(has_centers)}


def format_value(name: str, value: Any) -> str:
    """A metric value for tables: counts as integers, others to 4 significant digits."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    metric = METRICS.get(name)
    if metric is not None and metric.integer and math.isfinite(value) and value == int(value):
        return f"{int(value):d}"
    return f"{value:.4g}"


def mode_metrics(
    samples: torch.Tensor, centers: torch.Tensor, std: float,
    weights: torch.Tensor | None = None, threshold: float | None = None,
) -> dict[str, float]:
    """Mode coverage of ``samples`` against mode ``centers`` with per-mode ``std``.

    Following VEEGAN (Srivastava et al. 2017) and PacGAN (Lin et al. 2018), on one
    nearest-mode assignment:

    - ``hq``: percentage of samples whose σ-scaled distance to the nearest centre is below
      ``threshold`` (3 in 2-D; see :func:`hq_threshold`).
    - ``modes``: number of centres that are the nearest centre of at least one
      high-quality sample.
    - ``kl``: reverse KL(p_HQ ‖ p_target) between the histogram of the high-quality
      samples over their nearest centres and the mode ``weights`` (uniform by default), as
      PacGAN's code computes it; all of them in one of 8 equal modes gives log 8, none at
      all gives +inf.
    """
    ev = Evaluation(samples, samples, centers, std, weights, threshold=threshold)
    return {"modes": _modes(ev), "hq": _hq(ev), "kl": _kl(ev)}


def evaluate(
    samples: torch.Tensor, reference: torch.Tensor, centers: torch.Tensor | None, std: float,
    weights: torch.Tensor | None = None, exact: bool = False,
    generator: torch.Generator | None = None,
) -> dict[str, float]:
    """Every registered metric of one evaluation, in registry order; the final-only ones
    (exact W1) only if ``exact``, those needing modes only if the target has ``centers``.

    Non-finite samples give each metric its worst value instead of raising.
    """
    import torch

    names = [n for n in metric_names(centers is not None) if exact or not METRICS[n].final_only]
    if not torch.isfinite(samples).all():
        return {n: METRICS[n].worst_value for n in names}
    ev = Evaluation(samples, reference, centers, std, weights, generator)
    return {n: METRICS[n].compute(ev) for n in names}
