import math

import pytest

from ganbench.errors import GanbenchError
from ganbench.losses import LOSSES
from ganbench.targets import TARGETS
from ganbench.train import TrainConfig, train

SMALL = dict(steps=60, eval_every=20, eval_samples=300, batch_size=64, hidden=32)


def test_same_seed_gives_identical_metrics_and_other_seed_differs():
    a, b = train(TrainConfig(**SMALL, seed=1)), train(TrainConfig(**SMALL, seed=1))
    c = train(TrainConfig(**SMALL, seed=2))
    assert a.history == b.history and a.metrics == b.metrics
    assert a.metrics != c.metrics


@pytest.mark.parametrize("target", sorted(TARGETS))
def test_every_target_trains_and_scores(target):
    result = train(TrainConfig(**SMALL, target=target))
    assert result.status == "completed" and result.steps == 60
    assert [row["step"] for row in result.history] == [20, 40, 60]
    assert math.isfinite(result.metrics["w1"]) and result.metrics["w1"] > 0
    has_modes = TARGETS[target]().centers is not None
    assert ("modes" in result.metrics) == has_modes
    assert "w1" not in result.history[0]  # exact W1 only in the final evaluation


@pytest.mark.parametrize("loss", sorted(LOSSES))
@pytest.mark.parametrize("optimizer", ["adam", "rmsprop", "sgd"])
def test_every_loss_and_optimizer_runs(loss, optimizer):
    result = train(TrainConfig(**SMALL, loss=loss, optimizer=optimizer, d_steps=2))
    assert result.status == "completed"
    assert all(math.isfinite(row["d_loss"]) for row in result.history)


def test_on_eval_can_stop_the_run():
    seen = []

    def on_eval(step, metrics):
        seen.append((step, set(metrics)))
        return step >= 40

    result = train(TrainConfig(**SMALL), on_eval=on_eval)
    assert result.status == "stopped" and result.steps == 40 and result.reason
    assert [s for s, _ in seen] == [20, 40]
    assert {"d_loss", "g_loss", "sliced_w1", "modes", "hq", "kl"} <= seen[0][1]


def test_divergence_is_a_result_not_an_exception():
    config = TrainConfig(**SMALL, loss="wasserstein", optimizer="sgd", lr_g=1e6, lr_d=1e6)
    result = train(config)
    assert result.status == "diverged"
    assert result.reason.startswith(f"diverged at step {result.steps}")
    assert result.metrics["w1"] == math.inf and result.metrics["modes"] == 0


@pytest.mark.parametrize("field,value,needle", [
    ("steps", 0, "steps must be an integer in 1..1000000000"),
    ("batch_size", -5, "batch_size must be an integer in 1..1048576"),
    ("lr_d", 0.0, "lr_d must be a positive number"),
    ("loss", "bce", "unknown loss 'bce'; choose one of"),
    ("activation", "swish", "unknown activation"),
    ("optimizer", "adamw", "unknown optimizer"),
    ("device", "tpu", "unknown device"),
    ("pack", 3, "divisible by pack"),
])
def test_invalid_config_names_the_field(field, value, needle):
    with pytest.raises(GanbenchError, match=needle):
        TrainConfig(**{field: value}).validate()


@pytest.mark.slow
def test_default_config_learns_the_ring():
    result = train(TrainConfig(seed=0))
    assert result.status == "completed"
    assert result.metrics["modes"] >= 6
    # Evaluation time is part of the run's time (its share is measured in benchmarks/).
    assert 0 < result.eval_seconds < result.seconds


# ----------------------------------------------------------------- PacGAN's protocol options
def test_learning_rate_schedules_follow_their_definitions():
    def expected(step, steps, warmup, kind, floor):  # written from the definitions
        if step <= warmup:
            return step / warmup
        t = (step - warmup) / (steps - warmup)
        shape = {"constant": 1.0, "linear": 1.0 - t,
                 "cosine": (1.0 + math.cos(math.pi * t)) / 2.0}[kind]
        return 1.0 if kind == "constant" else floor + (1.0 - floor) * shape

    for kind in ("constant", "linear", "cosine"):
        config = TrainConfig(steps=100, warmup=10, lr_schedule=kind, lr_floor=0.2)
        for step in (1, 5, 10, 11, 37, 55, 99, 100):
            assert config.lr_factor(step) == pytest.approx(
                expected(step, 100, 10, kind, 0.2), abs=1e-12), (kind, step)
    assert TrainConfig(steps=10, lr_schedule="cosine", lr_floor=0.1).lr_factor(10) == \
        pytest.approx(0.1)  # the floor is reached at the last step
    a = train(TrainConfig(**SMALL))
    b = train(TrainConfig(**SMALL, lr_schedule="cosine", lr_floor=0.1))
    assert a.history[0] != b.history[0]  # the schedule reaches the optimizer


def test_a_fixed_pool_is_drawn_once_from_the_seed_and_served_in_epochs():
    import torch

    from ganbench.targets import Pool, Ring

    ring = Ring()
    pool, again, other = Pool(ring, 640, 0), Pool(ring, 640, 0), Pool(ring, 640, 1)
    assert torch.equal(pool.points, again.points) and not torch.equal(pool.points, other.points)
    # Every point lies on the target (within 6σ of a mode centre).
    assert torch.cdist(pool.points, ring.centers).min(1).values.max() < 6 * ring.std
    gen = torch.Generator().manual_seed(5)
    epoch = torch.cat([pool.sample(64, gen) for _ in range(10)])
    key = lambda x: sorted(map(tuple, x.tolist()))  # noqa: E731
    assert key(epoch) == key(pool.points)  # each point exactly once per epoch
    nxt = torch.cat([pool.sample(64, gen) for _ in range(10)])
    assert key(nxt) == key(pool.points) and not torch.equal(nxt, epoch)  # reshuffled
    small = train(TrainConfig(**SMALL, pool=64))  # a pool of one batch: the same points
    assert small.status == "completed" and small.history != train(TrainConfig(**SMALL)).history


def test_simultaneous_updates_step_g_against_the_discriminator_before_its_update():
    """One simultaneous step, recomputed independently: G's gradient is taken through the
    initial D, on the batch D used; one Adam step is p − lr·g/(|g| + ε)."""
    import torch
    import torch.nn.functional as F

    from ganbench.targets import get_target
    from ganbench.train import build_models, eval_sample

    config = TrainConfig(hidden=16, steps=1, eval_every=1, eval_samples=64, batch_size=32,
                         dtype="float64", update="simultaneous", seed=3, lr_g=0.01)
    target = get_target("ring")
    g, d = build_models(config, target)
    g.double(), d.double()
    rng = torch.Generator().manual_seed(3)
    real = target.sample(32, rng).double()  # noqa: F841 (drawn first, as D's batch)
    fake = g(torch.randn(32, 2, generator=rng, dtype=torch.float64))
    grads = torch.autograd.grad(F.softplus(-d(fake)).mean(), list(g.parameters()))
    with torch.no_grad():
        for p, grad in zip(g.parameters(), grads):
            p -= 0.01 * grad / (grad.abs() + 1e-8)
        expected = g(eval_sample(config, target, torch.device("cpu"), torch.float64)[1])
    simultaneous = train(config)
    alternating = train(TrainConfig(**{**config.to_dict(), "update": "alternating"}))
    assert torch.allclose(simultaneous.samples.double(), expected, atol=1e-10, rtol=0)
    assert not torch.allclose(alternating.samples.double(), expected, atol=1e-6, rtol=0)


def test_pacgans_architecture_is_built_as_specified():
    import torch
    from torch import nn

    from ganbench.models import Maxout
    from ganbench.targets import get_target
    from ganbench.train import build_models

    config = TrainConfig(g_hidden=[400] * 4, d_hidden=[200] * 3, g_norm="batch", pieces=5,
                         init_std=0.02, pack=2)
    g, d = build_models(config, get_target("grid"))
    g_linear = [m for m in g.modules() if isinstance(m, nn.Linear)]
    assert [m.bias is None for m in g_linear] == [True] * 4 + [False]
    norms = [m for m in g.modules() if isinstance(m, nn.BatchNorm1d)]
    assert len(norms) == 4 and all(n.eps == 1e-4 and n.momentum == 0.05 for n in norms)
    d_linear = [m for m in d.modules() if isinstance(m, nn.Linear)]
    assert [tuple(m.weight.shape) for m in d_linear] == [(1000, 4), (1000, 200), (1000, 200),
                                                         (1, 200)]
    assert sum(isinstance(m, Maxout) for m in d.modules()) == 3
    weights = torch.cat([m.weight.detach().flatten() for m in g_linear + d_linear])
    assert abs(float(weights.std()) - 0.02) < 0.001 and abs(float(weights.mean())) < 0.001
    assert all(float(m.bias.detach().abs().max()) == 0 for m in d_linear)
    # A maxout unit is the largest of its pieces.
    x = torch.randn(7, 4)
    first = d_linear[0](x).view(7, 200, 5)
    assert torch.equal(d.net[1](d_linear[0](x)), first.max(-1).values)


@pytest.mark.parametrize("field,value,needle", [
    ("g_norm", "layer", "unknown g_norm 'layer'"),
    ("update", "together", "unknown update"),
    ("lr_schedule", "step", "unknown lr_schedule"),
    ("pieces", 0, "pieces must be an integer in 1..64"),
    ("init_std", -0.1, "init_std must be a positive number"),
    ("lr_floor", 1.5, "lr_floor must be in"),
    ("warmup", 5000, "warmup must be an integer in"),
    ("pool", 10, "pool must be an integer in batch_size"),
])
def test_invalid_protocol_options_name_the_field(field, value, needle):
    with pytest.raises(GanbenchError, match=needle):
        TrainConfig(**{field: value}).validate()


def test_simultaneous_updates_and_an_unrolled_discriminator_are_refused():
    with pytest.raises(GanbenchError, match="choose one"):
        TrainConfig(update="simultaneous", tricks={"unrolled": {}}).validate()
