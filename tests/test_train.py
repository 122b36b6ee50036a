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
    ("steps", 0, "steps must be a positive integer"),
    ("batch_size", -5, "batch_size must be a positive integer"),
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
    assert result.eval_seconds < 0.25 * result.seconds
