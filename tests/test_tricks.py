import math

import pytest
import torch

from ganbench.errors import GanbenchError
from ganbench.losses import get_loss
from ganbench.models import Discriminator, Generator
from ganbench.train import TrainConfig, train
from ganbench.tricks import TRICKS, build_tricks, validate_tricks


def linear_d(w=(3.0, 4.0), b=0.5, pack=1):
    d = Discriminator(2 * 1, [], pack=pack) if pack == 1 else Discriminator(2, [], pack=pack)
    with torch.no_grad():
        d.net[0].weight.copy_(torch.tensor([list(w)]))
        d.net[0].bias.fill_(b)
    return d


def make(name, **params):
    (trick,) = build_tricks({name: params})
    config = TrainConfig(steps=100)
    trick.setup(Generator(2, [8], 2), linear_d(), config)
    return trick


def effect_clip():
    d = linear_d((3.0, -4.0))
    make("clip", c=0.05).after_d_step(d)
    assert d.net[0].weight.abs().max().item() == pytest.approx(0.05)


def effect_gp():
    # D(x) = w·x + b has ∇D = w everywhere: penalty = λ(‖w‖ − 1)² = 10·(5 − 1)² = 160.
    real, fake = torch.randn(64, 2), torch.randn(64, 2)
    assert make("gp", weight=10.0).d_penalty(linear_d(), real, fake).item() == \
        pytest.approx(160.0)


def effect_r1():
    # γ/2·‖w‖² = 0.5·2·25 = 25 on real data.
    assert make("r1", gamma=2.0).d_penalty(linear_d(), torch.randn(8, 2), None).item() == \
        pytest.approx(25.0)


def effect_r2():
    assert make("r2", gamma=2.0).d_penalty(linear_d(), None, torch.randn(8, 2)).item() == \
        pytest.approx(25.0)


def effect_sn():
    config = TrainConfig(hidden=32)
    make("sn", g=1).configure(config)
    assert config.spectral_norm and config.g_spectral_norm
    result = train(TrainConfig(steps=30, eval_every=30, eval_samples=200, hidden=32,
                               tricks={"sn": {}}))
    assert result.status == "completed"
    d = Discriminator(2, [32, 32], spectral_norm=True)
    for _ in range(50):
        d(torch.randn(16, 2))
    d.eval()
    norms = [torch.linalg.matrix_norm(m.weight, ord=2).item() for m in d.modules()
             if isinstance(m, torch.nn.Linear)]
    assert norms == pytest.approx([1.0] * 3, abs=0.02)


def effect_gradclip():
    p = torch.nn.Parameter(torch.zeros(4))
    p.grad = torch.full((4,), 10.0)  # norm 20
    make("gradclip", max_norm=2.0).before_step([p])
    assert p.grad.norm().item() == pytest.approx(2.0)


def effect_noise():
    trick = make("noise", std=0.4, anneal=0.5)  # reaches 0 at half of 100 steps
    assert [trick.std_at(s, 100) for s in (0, 25, 50, 80)] == pytest.approx([0.4, 0.2, 0, 0])
    real = torch.zeros(20000, 2)
    noisy, _ = trick.d_inputs(real, real, 0)
    assert noisy.std().item() == pytest.approx(0.4, rel=0.03)


def effect_smooth():
    # Logits 0: -(0.9·log σ(0) + 0.1·log(1 − σ(0))) + log 2 = 2·log 2, whatever the target.
    zeros = torch.zeros(5)
    trick = make("smooth", real=0.9)
    assert trick.d_loss(None, zeros, zeros).item() == pytest.approx(2 * math.log(2))
    # At logit 3, smoothing penalises over-confidence that the 1-target rewards.
    three = torch.full((5,), 3.0)
    smoothed = trick.d_loss(None, three, -three).item()
    assert smoothed > get_loss("nonsaturating").d(three, -three).item()


def effect_ema():
    g = Generator(2, [4], 2)
    trick = build_tricks({"ema": {"decay": 0.9}})[0]
    trick.setup(g, None, TrainConfig())
    before = [p.detach().clone() for p in g.parameters()]
    with torch.no_grad():
        for p in g.parameters():
            p.add_(1.0)
    trick.after_g_step(g)
    for s, b in zip(trick.eval_generator(g).parameters(), before):
        assert torch.allclose(s, b + 0.1, atol=1e-6)  # lags by decay: moved (1 − 0.9) of 1


def effect_pack():
    config = TrainConfig()
    make("pack", m=4).configure(config)
    assert config.pack == 4
    assert Discriminator(2, [8], pack=config.pack).net[0].weight.shape == (8, 8)


def effect_unrolled():
    torch.manual_seed(0)
    d = Discriminator(2, [8])
    trick = make("unrolled", k=2)
    trick.config = TrainConfig(lr_d=0.1)
    fake = torch.randn(16, 2, requires_grad=True)
    reals = [torch.randn(16, 2) for _ in range(2)]
    it = iter(reals)
    loss = get_loss("nonsaturating")
    logits = trick.g_logits(d, fake, lambda: next(it), loss.d)
    # The same two SGD steps done by hand on a copy of D.
    import copy

    d2 = copy.deepcopy(d)
    for real in reals:
        d2.zero_grad()
        loss.d(d2(real), d2(fake.detach())).backward()
        with torch.no_grad():
            for p in d2.parameters():
                p -= 0.1 * p.grad
    assert torch.allclose(logits, d2(fake), atol=1e-6)
    assert not torch.allclose(logits, d(fake))
    (grad,) = torch.autograd.grad(logits.sum(), fake)
    assert grad.abs().sum() > 0


EFFECTS = {name.removeprefix("effect_"): fn for name, fn in globals().items()
           if name.startswith("effect_")}


def test_every_trick_has_an_effect_test():
    assert set(EFFECTS) == set(TRICKS)


@pytest.mark.parametrize("name", sorted(TRICKS))
def test_trick_effect(name):
    assert TRICKS[name].__doc__ and any(str(y) in TRICKS[name].__doc__
                                        for y in range(2013, 2020))  # cites its paper
    EFFECTS[name]()


@pytest.mark.parametrize("name", sorted(TRICKS))
def test_every_trick_trains(name):
    loss = "wasserstein" if name == "clip" else "nonsaturating"
    params = {"k": 1} if name == "unrolled" else {}
    result = train(TrainConfig(steps=20, eval_every=10, eval_samples=200, hidden=16,
                               batch_size=32, loss=loss, tricks={name: params}))
    assert result.status == "completed" and math.isfinite(result.metrics["w1"])


@pytest.mark.parametrize("tricks,loss,needle", [
    ({"dropout": {}}, "hinge", "unknown trick 'dropout'; choose one of: clip, ema"),
    ({"gp": {"lambda": 1}}, "wasserstein", "unknown parameter 'lambda'; valid: weight"),
    ({"ema": {"decay": 1.5}}, "hinge", "tricks.ema.decay must be a number in [0, 0.99999]"),
    ({"pack": {"m": 2.5}}, "hinge", "tricks.pack.m must be an integer"),
    ({"clip": {}}, "nonsaturating", "tricks.clip bounds a WGAN critic"),
    ({"clip": {}, "gp": {}}, "wasserstein", "choose one"),
    ({"smooth": {}}, "hinge", "tricks.smooth smooths BCE labels"),
])
def test_bad_tricks_are_refused_with_the_reason(tricks, loss, needle):
    with pytest.raises(GanbenchError, match=needle.replace("[", r"\[").replace("(", r"\(")):
        validate_tricks(tricks, loss)
