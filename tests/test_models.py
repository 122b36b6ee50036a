import torch

from ganbench.models import ACTIVATIONS, Discriminator, Generator, mlp
from ganbench.train import TrainConfig


def linear_shapes(module):
    return [tuple(m.weight.shape) for m in module.modules() if isinstance(m, torch.nn.Linear)]


def test_the_original_setup_is_expressible():
    # noise 100, hidden 128 then 64, D:G ratio 5.
    config = TrainConfig(noise_dim=100, hidden=[128, 64], d_steps=5).validate()
    g = Generator(100, config.widths("g"), 2)
    d = Discriminator(2, config.widths("d"))
    assert linear_shapes(g) == [(128, 100), (64, 128), (2, 64)]
    assert linear_shapes(d) == [(128, 2), (64, 128), (1, 64)]


def test_separate_widths_override_hidden():
    config = TrainConfig(hidden=64, depth=3, g_hidden=[32], d_hidden=256)
    assert config.widths("g") == [32] and config.widths("d") == [256, 256, 256]


def test_packing_multiplies_the_discriminator_input():
    d = Discriminator(2, [16], pack=4)
    assert linear_shapes(d)[0] == (16, 8)
    assert d(torch.randn(12, 2)).shape == (3,)


def test_spectral_norm_layers_have_unit_norm():
    torch.manual_seed(0)  # an unseeded init sometimes needs more than 30 iterations
    d = Discriminator(2, [64, 64], spectral_norm=True)
    for _ in range(100):  # power iterations converge during forward passes in train mode
        d(torch.randn(8, 2))
    d.eval()
    for m in d.modules():
        if isinstance(m, torch.nn.Linear):
            assert torch.linalg.matrix_norm(m.weight, ord=2).item() == \
                __import__("pytest").approx(1.0, abs=0.02)


def test_every_activation_builds():
    for name in ACTIVATIONS:
        assert mlp(2, [4], 1, name)(torch.randn(3, 2)).shape == (3, 1)
