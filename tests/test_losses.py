import math

import pytest
import torch

from ganbench.errors import GanbenchError
from ganbench.losses import LOSSES, get_loss

REAL = torch.tensor([2.0, -1.0])
FAKE = torch.tensor([0.5, -3.0])


def sp(x: float) -> float:
    return math.log1p(math.exp(x))


# Hand-computed values: (d_loss, g_loss) on REAL and FAKE.
EXPECTED = {
    "minimax": ((sp(-2) + sp(1)) / 2 + (sp(0.5) + sp(-3)) / 2, -(sp(0.5) + sp(-3)) / 2),
    "nonsaturating": ((sp(-2) + sp(1)) / 2 + (sp(0.5) + sp(-3)) / 2, (sp(-0.5) + sp(3)) / 2),
    "wasserstein": ((0.5 - 3) / 2 - (2 - 1) / 2, -(0.5 - 3) / 2),
    "hinge": ((0 + 2) / 2 + (1.5 + 0) / 2, -(0.5 - 3) / 2),
    "lsgan": (0.5 * (1 + 4) / 2 + 0.5 * (0.25 + 9) / 2, 0.5 * (0.25 + 16) / 2),
}


def test_every_registered_loss_has_known_values():
    assert set(LOSSES) == set(EXPECTED)


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_loss_matches_hand_computed_values(name):
    loss = get_loss(name)
    d_expected, g_expected = EXPECTED[name]
    assert loss.d(REAL, FAKE).item() == pytest.approx(d_expected, rel=1e-6)
    assert loss.g(FAKE).item() == pytest.approx(g_expected, rel=1e-6)


def test_minimax_saturates_where_nonsaturating_does_not():
    # When D confidently rejects fakes (logit -10), log(1 - D) has a vanishing gradient.
    fake = torch.tensor([-10.0], requires_grad=True)
    get_loss("minimax").g(fake).backward()
    saturating = fake.grad.abs().item()
    fake.grad = None
    get_loss("nonsaturating").g(fake).backward()
    assert saturating < 1e-4 < fake.grad.abs().item()


def test_unknown_loss_names_choices():
    with pytest.raises(GanbenchError, match="choose one of: hinge, lsgan, minimax"):
        get_loss("bce")
