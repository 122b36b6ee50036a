import math

import pytest
import torch

from ganbench.errors import GanbenchError
from ganbench.targets import TARGETS, get_target


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_sampling_is_seeded_and_shaped(name):
    target = get_target(name)
    a = target.sample(500, torch.Generator().manual_seed(3))
    b = target.sample(500, torch.Generator().manual_seed(3))
    c = target.sample(500, torch.Generator().manual_seed(4))
    assert a.shape == (500, target.dim) and a.dtype == torch.float32
    assert torch.equal(a, b) and not torch.equal(a, c)
    if target.centers is not None:
        assert target.centers.shape[1] == target.dim
        assert target.weights.sum().item() == pytest.approx(1.0)
        # Samples sit near their nearest centre: within a few std.
        nearest = torch.cdist(a, target.centers).min(1).values
        assert nearest.median().item() < 3 * target.std * math.sqrt(target.dim)


def test_ring_modes_are_distinct_at_2pi_k_over_k():
    ring = get_target("ring")
    assert ring.centers.shape == (8, 2) and ring.std == 0.01
    angles = torch.atan2(ring.centers[:, 1], ring.centers[:, 0]) % (2 * math.pi)
    expected = torch.arange(8) * 2 * math.pi / 8
    assert torch.allclose(angles.sort().values, expected, atol=1e-6)
    assert torch.allclose(ring.centers.norm(dim=1), torch.ones(8))


def test_grid_is_centred_lattice():
    grid = get_target("grid")
    assert grid.centers.shape == (25, 2) and grid.std == 0.05
    assert sorted(set(grid.centers[:, 0].tolist())) == [-4.0, -2.0, 0.0, 2.0, 4.0]


def test_modeless_targets_have_no_centres():
    assert get_target("spiral").centers is None
    assert get_target("swissroll").centers is None


def test_mog_high_dim_centres_are_seeded():
    a, b = get_target("mog", dim=64, modes=5), get_target("mog", dim=64, modes=5)
    assert a.centers.shape == (5, 64) and torch.equal(a.centers, b.centers)
    assert not torch.equal(a.centers, get_target("mog", dim=64, modes=5, center_seed=1).centers)


@pytest.mark.parametrize("name,params,needle", [
    ("nope", {}, "choose one of: grid, mog, ring, spiral, swissroll"),
    ("ring", {"modes": 0}, "modes must be an integer in "),
    ("ring", {"colour": 1}, "valid: modes, radius, std"),
    ("mog", {"dim": 2000}, "dim must be an integer in "),
])
def test_bad_target_input(name, params, needle):
    with pytest.raises(GanbenchError, match=needle):
        get_target(name, **params)
