import math

import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment

from ganbench import metrics as M
from ganbench.targets import get_target


def points(n: int, dim: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("n", [200, 800])  # the assignment solver and the simplex path
def test_w1_of_a_shift_is_its_length(n):
    x = points(n)
    v = torch.tensor([0.3, -0.4], dtype=torch.float64)
    # W1(x, x + v) = |v|: translation is the optimal plan (Brenier).
    assert M.w1(x, x + v) == pytest.approx(0.5, rel=1e-9)


def test_w1_large_sets_agree_with_the_assignment():
    x, y = points(700, seed=1), points(700, seed=2) * 1.5
    cost = torch.cdist(x, y).numpy()
    r, c = linear_sum_assignment(cost)
    assert M.w1(x, y) == pytest.approx(cost[r, c].mean(), rel=1e-9)


def test_w1_is_zero_on_identical_sets_and_symmetric():
    x, y = points(300, seed=1), points(300, seed=2)
    assert M.w1(x, x) == pytest.approx(0.0, abs=1e-12)
    assert M.w1(x, y) == pytest.approx(M.w1(y, x), rel=1e-9)


def test_sliced_w1_of_a_shift_in_1d_and_seeded_directions():
    x = points(500, dim=1)
    assert M.sliced_w1(x, x + 2.0) == pytest.approx(2.0, rel=1e-9)
    x, y = points(500, dim=5, seed=1), points(500, dim=5, seed=2)
    g = lambda: torch.Generator().manual_seed(7)  # noqa: E731
    assert M.sliced_w1(x, y, generator=g()) == M.sliced_w1(x, y, generator=g())
    # Sliced W1 never exceeds W1 (each projection is 1-Lipschitz).
    assert M.sliced_w1(x, y) <= M.w1(x, y) + 1e-12


def test_unequal_sets_are_rejected():
    with pytest.raises(ValueError, match="equal shape"):
        M.w1(points(10), points(11))


@pytest.mark.parametrize("name", ["ring", "grid"])
def test_target_samples_capture_every_mode(name):
    target = get_target(name)
    samples = target.sample(20000, torch.Generator().manual_seed(0))
    out = M.mode_metrics(samples, target.centers, target.std)
    assert out["modes"] == target.centers.shape[0]
    assert out["hq"] == pytest.approx(100 * (1 - math.exp(-4.5)), abs=0.3)  # 98.9%
    assert out["kl"] == pytest.approx(0.0, abs=0.01)


def test_high_dim_hq_threshold_keeps_own_samples_high_quality():
    target = get_target("mog", dim=64, modes=5, std=0.01)
    samples = target.sample(5000, torch.Generator().manual_seed(0))
    out = M.mode_metrics(samples, target.centers, target.std)
    assert M.hq_threshold(2) == pytest.approx(3.0)
    assert out["modes"] == 5 and out["hq"] == pytest.approx(98.9, abs=0.6)


def test_collapse_to_one_mode():
    ring = get_target("ring")
    samples = ring.centers[3].repeat(2500, 1) + 0.001
    out = M.mode_metrics(samples, ring.centers, ring.std)
    assert out == {"modes": 1, "hq": 100.0, "kl": pytest.approx(math.log(8))}


def pacgan_metrics(samples: np.ndarray, centers: np.ndarray, std: float,
                   threshold: float = 3.0) -> dict:
    """PacGAN's definitions (Lin et al. 2018; their MetricLogger), written independently in
    numpy/scipy: each sample goes to the mode of smallest σ-scaled distance; it is high
    quality if that distance is below 3; a mode is covered if it holds a high-quality
    sample; reverse KL = log K − H(histogram of the high-quality samples)."""
    from scipy.stats import entropy

    dist = np.sqrt((((samples[:, None, :] - centers[None]) / std) ** 2).sum(-1))
    nearest, good = dist.argmin(1), dist.min(1) < threshold
    detail = np.bincount(nearest[good], minlength=len(centers)).astype(float)
    kl = (math.log(len(centers)) - entropy(detail / detail.sum())) if detail.sum() else math.inf
    return {"modes": int((detail > 0).sum()), "hq": 100.0 * good.mean(), "kl": kl}


def hand_built(seed: int = 0) -> list[tuple[str, torch.Tensor]]:
    """Sample sets with known answers on the ring of 8 (σ 0.01)."""
    ring = get_target("ring")
    c, g = ring.centers.double(), torch.Generator().manual_seed(seed)
    near = lambda k, n: c[k] + 0.01 * torch.randn(n, 2, generator=g, dtype=torch.float64)  # noqa: E731
    far = 1.5 * c[torch.arange(800) % 8] + 0.05 * torch.randn(800, 2, generator=g,
                                                               dtype=torch.float64)
    return [
        ("one mode", near(3, 400)),
        ("all modes evenly", torch.cat([near(k, 50) for k in range(8)])),
        ("two modes 3:1", torch.cat([near(0, 300), near(5, 100)])),
        # 2% high quality, all in one mode, the rest spread evenly over the 8 directions:
        # binning every sample (as before) gave a KL near 0; PacGAN's gives log 8.
        ("few HQ in one mode, the rest far", torch.cat([near(2, 16), far])),
        ("nothing high quality", far),
    ]


@pytest.mark.parametrize("case", range(5))
def test_mode_metrics_reproduce_pacgans_definitions(case):
    ring = get_target("ring")
    name, samples = hand_built()[case]
    ours = M.mode_metrics(samples, ring.centers, ring.std)
    theirs = pacgan_metrics(samples.numpy(), ring.centers.double().numpy(), ring.std)
    assert ours["modes"] == theirs["modes"], name
    assert ours["hq"] == pytest.approx(theirs["hq"], rel=1e-12), name
    assert ours["kl"] == pytest.approx(theirs["kl"], rel=1e-9, abs=1e-12), name


def test_kl_counts_high_quality_samples_only():
    ring = get_target("ring")
    cases = dict(hand_built())
    kl = {k: M.mode_metrics(v, ring.centers, ring.std)["kl"] for k, v in cases.items()}
    assert kl["one mode"] == pytest.approx(math.log(8))
    assert kl["all modes evenly"] < 1e-3  # a few of the 400 fall beyond 3σ
    assert kl["two modes 3:1"] == pytest.approx(  # log 8 − H(3/4, 1/4), up to the few
        math.log(8) + 0.75 * math.log(0.75) + 0.25 * math.log(0.25), abs=2e-3)
    assert kl["few HQ in one mode, the rest far"] == pytest.approx(math.log(8))
    assert kl["nothing high quality"] == math.inf  # ranks below any run with an HQ sample
    assert M.METRICS["kl"].direction == "minimize"


def test_far_samples_are_not_high_quality_nor_in_kl():
    ring = get_target("ring")
    samples = torch.cat([ring.centers * 1.5, ring.centers[:4]])  # 8 far, 4 on modes 0-3
    out = M.mode_metrics(samples, ring.centers, ring.std)
    assert out["hq"] == pytest.approx(100 * 4 / 12) and out["modes"] == 4
    assert out["kl"] == pytest.approx(math.log(2))  # 4 equal modes of 8


def test_evaluate_handles_non_finite_samples():
    ring = get_target("ring")
    bad = torch.full((100, 2), float("nan"))
    out = M.evaluate(bad, points(100), ring.centers, ring.std, exact=True)
    assert out["w1"] == math.inf and out["modes"] == 0 and np.isinf(out["kl"])
