"""Keep what you trained: every completed trial's generator, reloaded by `ganbench sample`."""

import numpy as np
import optuna
import pytest
from mlflow.tracking import MlflowClient
from optuna.storages.journal import JournalFileBackend

from ganbench.train import load_checkpoint, rescore
from tests.conftest import ganbench, write_spec

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def swept(tmp_path_factory, mlflow_server):
    folder = tmp_path_factory.mktemp("sample")
    spec = write_spec(folder, name="kept", trials=3, tracking={"uri": mlflow_server.url},
                      model={"depth": 1, "tricks": {"ema": {"decay": 0.9}}})
    proc = ganbench("sweep", str(spec), "--workers", "1", cwd=folder)
    assert proc.returncode == 0, proc.stderr
    journal = JournalFileBackend(str(folder / "runs/kept/optuna.log"))
    study = optuna.load_study(study_name="kept", storage=optuna.storages.JournalStorage(journal))
    return folder, spec, study, mlflow_server


def test_every_completed_trial_keeps_its_generator_beside_the_study_and_in_mlflow(swept):
    folder, _, study, server = swept
    client = MlflowClient(server.url)
    for trial in study.get_trials():
        path = folder / "runs/kept/generators" / f"trial-{trial.number}.pt"
        assert trial.user_attrs["checkpoint"] == str(path.resolve())
        config, g, data = load_checkpoint(path)
        assert data["trial"] == trial.number and config.tricks == {"ema": {"decay": 0.9}}
        assert data["online"] is not None  # with EMA: the trained G too
        # Reloaded on CPU, it scores bit-identically to what the trial logged.
        assert rescore(config, g) == trial.user_attrs["metrics"]
        artifacts = {a.path for a in client.list_artifacts(trial.user_attrs["mlflow_run_id"])}
        assert "generator.pt" in artifacts


def test_sample_by_trial_and_by_run_id(swept):
    folder, spec, study, server = swept
    proc = ganbench("sample", str(spec), "--trial", "1", "--n", "300", "--seed", "5",
                    "--metrics", "--out", "a.npy", cwd=folder)
    assert proc.returncode == 0, proc.stderr
    assert "identical to the metrics the run logged" in proc.stdout
    a = np.load(folder / "a.npy")
    assert a.shape == (300, 2) and np.isfinite(a).all()
    run_id = study.trials[1].user_attrs["mlflow_run_id"]
    proc = ganbench("sample", run_id, "--n", "300", "--seed", "5", "--out", "b.csv",
                    "--tracking-uri", server.url, cwd=folder)
    assert proc.returncode == 0, proc.stderr
    b = np.loadtxt(folder / "b.csv", delimiter=",", skiprows=1)
    assert np.allclose(a, b, atol=1e-6)  # the same generator, the same noise
    proc = ganbench("sample", str(spec), "--trial", "0", "--out", "c.png", cwd=folder)
    assert proc.returncode == 0 and (folder / "c.png").read_bytes()[:4] == b"\x89PNG"
    other = ganbench("sample", str(spec), "--trial", "1", "--n", "300", "--seed", "6",
                     "--out", "d.npy", cwd=folder)
    assert other.returncode == 0 and not np.allclose(np.load(folder / "d.npy"), a)


def test_bad_sample_requests_are_one_line_and_write_nothing(swept):
    folder, spec, study, server = swept
    pruned = optuna.trial.create_trial(params=study.trials[0].params,
                                       distributions=study.trials[0].distributions,
                                       state=optuna.trial.TrialState.PRUNED)
    study.add_trial(pruned)
    number = len(study.trials) - 1
    cases = [
        (["0123456789abcdef0123456789abcdef", "--tracking-uri", server.url], "no MLflow run"),
        ([str(spec), "--trial", "99"], "has no trial 99"),
        ([str(spec), "--trial", str(number)], "is PRUNED"),
        ([str(spec), "--trial", "0", "--out", "nowhere/x.csv"], "does not exist"),
        ([str(spec), "--trial", "0", "--out", "x.json"], "expected a .csv, .npy, .png"),
    ]
    for args, needle in cases:
        before = sorted(p.name for p in folder.iterdir())
        proc = ganbench("sample", *args, cwd=folder)
        assert proc.returncode == 2, (args, proc.stderr)
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and needle in lines[0], (args, proc.stderr)
        assert sorted(p.name for p in folder.iterdir()) == before


def test_a_study_without_trial_samples_its_best_trial(swept):
    """`ganbench sample SPEC` draws from the study's best trial, whatever number it drew."""
    folder, spec, study, server = swept
    best = study.best_trial.number
    proc = ganbench("sample", str(spec), "--n", "50", cwd=folder)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"trial {best} of ")


def test_the_best_generator_is_registered_and_loads_from_the_registry(swept):
    """`<study>-generator` in the MLflow model registry, loadable with MLflow's PyTorch
    flavour from `models:/…/latest`; a sweep that does not improve adds no version."""
    import mlflow
    import mlflow.pytorch
    import torch

    folder, spec, study, server = swept
    client = MlflowClient(server.url)
    versions = client.search_model_versions("name='kept-generator'")
    assert len(versions) == 1
    best = study.best_trial
    assert versions[0].tags["trial"] == str(best.number)
    assert float(versions[0].tags["objective"]) == best.values[0]
    mlflow.set_tracking_uri(server.url)
    model = mlflow.pytorch.load_model("models:/kept-generator/latest")
    config, g, _ = load_checkpoint(folder / "runs/kept/generators" / f"trial-{best.number}.pt")
    z = torch.randn(64, config.noise_dim, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.allclose(model(z), g(z), atol=1e-6)
    again = ganbench("sweep", str(spec), "--workers", "1", cwd=folder)  # nothing new
    assert again.returncode == 0, again.stderr
    assert len(client.search_model_versions("name='kept-generator'")) == 1
