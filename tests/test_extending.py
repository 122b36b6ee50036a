"""The "Extending" recipes (docs/extending.md), followed as written: each registers a new
entry the way the recipe says, at run time, and checks that the rest of the package picks it up."""

import math

import pandas as pd
import pytest
import torch
from mlflow.tracking import MlflowClient

import tests.test_losses as loss_tests
import tests.test_targets as target_tests
import tests.test_train as train_tests
import tests.test_tricks as trick_tests
from ganbench import cli, metrics, tricks
from ganbench.losses import LOSSES, Loss
from ganbench.metrics import METRICS, Evaluation, Metric
from ganbench.spec import load_spec
from ganbench.targets import TARGETS, Target
from ganbench.train import TrainConfig, train
from tests.conftest import write_spec


def run_cli(*args: str) -> int:
    """Run the CLI in this process (so run-time registrations are seen); its exit code."""
    with pytest.raises(SystemExit) as info:
        cli.main(list(args))
    return info.value.code


# ---------------------------------------------------------------- a loss
def test_a_loss_following_the_recipe(monkeypatch, tmp_path):
    def d(real, fake):  # a least-absolute-deviation objective, for the recipe's sake
        return (real - 1).abs().mean() + (fake + 1).abs().mean()

    def g(fake):
        return (fake - 1).abs().mean()

    monkeypatch.setitem(LOSSES, "lad", Loss(d=d, g=g))
    # The registry test fails until the hand-computed values are in EXPECTED ...
    with pytest.raises(AssertionError):
        loss_tests.test_every_registered_loss_has_known_values()
    real, fake = loss_tests.REAL, loss_tests.FAKE
    monkeypatch.setitem(loss_tests.EXPECTED, "lad", ((1 + 2) / 2 + (1.5 + 2) / 2,
                                                     (0.5 + 4) / 2))
    loss_tests.test_every_registered_loss_has_known_values()
    loss_tests.test_loss_matches_hand_computed_values("lad")
    assert float(d(real, fake)) == pytest.approx(loss_tests.EXPECTED["lad"][0])
    # ... and the loss is usable by name in a study and in training.
    spec = load_spec(write_spec(tmp_path, model={"depth": 1, "loss": "lad"}))
    assert spec.trial_config({}).loss == "lad"
    assert train(TrainConfig(**train_tests.SMALL, loss="lad")).status == "completed"


# ---------------------------------------------------------------- a target
class Square(Target):
    """Four modes at the corners of the unit square (a recipe example)."""

    name = "square"

    def __init__(self, std: float = 0.05) -> None:
        self.dim, self.std = 2, std
        self.centers = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
        self.weights = torch.full((4,), 0.25)

    def sample(self, n: int, generator: torch.Generator) -> torch.Tensor:
        return self._mixture(n, generator)


def test_a_target_following_the_recipe(monkeypatch, tmp_path):
    monkeypatch.setitem(TARGETS, "square", Square)
    # The parametrized tests of targets and training, run on the new name.
    target_tests.test_sampling_is_seeded_and_shaped("square")
    train_tests.test_every_target_trains_and_scores("square")
    spec = load_spec(write_spec(tmp_path, target={"name": "square", "std": 0.1},
                                objectives=[{"metric": "modes"}]))
    assert spec.target.params() == {"std": 0.1}


# ---------------------------------------------------------------- a trick
class WeightDecay(tricks.Trick):
    """L2 weight decay of D's weights (Krogh & Hertz 1992; as used by Roth et al. 2017)."""

    name = "wd"
    params = {"decay": tricks.Param(1e-2, 0.0, 1.0)}

    def before_step(self, params: list[torch.Tensor]) -> None:
        for p in params:
            if p.grad is not None:
                p.grad.add_(p.detach(), alpha=self.decay)


def effect_wd() -> None:
    w = torch.ones(3, requires_grad=True)
    w.grad = torch.zeros(3)
    WeightDecay(decay=0.5).before_step([w])
    assert torch.equal(w.grad, torch.full((3,), 0.5))


def test_a_trick_following_the_recipe(monkeypatch):
    monkeypatch.setitem(tricks.TRICKS, "wd", WeightDecay)
    # The registry test fails until the effect test exists ...
    with pytest.raises(AssertionError):
        trick_tests.test_every_trick_has_an_effect_test()
    monkeypatch.setitem(trick_tests.EFFECTS, "wd", effect_wd)
    trick_tests.test_every_trick_has_an_effect_test()
    trick_tests.test_trick_effect("wd")
    trick_tests.test_every_trick_trains("wd")


# ---------------------------------------------------------------- a metric
def spread(ev: Evaluation) -> float:
    """|std of the generated samples − std of the target's reference sample|."""
    return abs(float(ev.samples.std()) - float(ev.reference.std()))


@pytest.mark.slow
def test_a_metric_following_the_recipe(monkeypatch, in_tmp, mlflow_server):
    monkeypatch.setitem(METRICS, "spread", Metric(
        "minimize", "difference of sample and target standard deviation (a recipe example)",
        spread))
    # Computed at every evaluation, with the others.
    result = train(TrainConfig(**train_tests.SMALL))
    assert all("spread" in row for row in result.history)
    assert metrics.worst_metrics(True)["spread"] == math.inf
    # An objective of a study, run by a real worker, scored, reported and logged.
    path = write_spec(in_tmp, name="toy", trials=2, objectives=[{"metric": "spread"}],
                      tracking={"uri": mlflow_server.url})
    assert run_cli("worker", str(path)) == 0
    assert run_cli("report", str(path)) == 0
    board = pd.read_csv(in_tmp / "runs/toy/report/leaderboard.csv")
    assert {"objective_spread", "spread"} <= set(board)
    assert board["objective_spread"].notna().all()
    assert (board["objective_spread"] == board["spread"]).all()
    assert "objective_spread" in (in_tmp / "runs/toy/report/index.html").read_text()
    client = MlflowClient(mlflow_server.url)
    exp = client.get_experiment_by_name("toy")
    trials = [r for r in client.search_runs([exp.experiment_id])
              if r.data.tags.get("ganbench.role") == "trial"]
    assert len(trials) == 2
    for run in trials:
        assert {"spread", "objective.spread"} <= set(run.data.metrics)
        history = client.get_metric_history(run.info.run_id, "spread")
        assert len(history) == 2  # one value per evaluation (steps 20 and 40)
