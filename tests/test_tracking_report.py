"""A real `mlflow server`, a real two-worker sweep, and the report read back from storage."""


import optuna
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from ganbench.config import MODEL_FIELDS, TRAIN_FIELDS
from tests.conftest import cli_env, ganbench, write_spec

pytestmark = pytest.mark.slow




@pytest.fixture(scope="module")
def tracked_sweep(tmp_path_factory, mlflow_server):
    """One sweep of 4 trials with 2 workers logged to the server; a diverging region included."""
    folder = tmp_path_factory.mktemp("tracked")
    spec_path = write_spec(folder, name="tracked", tracking={"uri": mlflow_server.url})
    proc = ganbench("sweep", str(spec_path), "--workers", "2", cwd=folder)
    assert proc.returncode == 0, proc.stderr
    from optuna.storages.journal import JournalFileBackend

    journal = JournalFileBackend(str(folder / "runs/tracked/optuna.log"))
    study = optuna.load_study(study_name="tracked",
                              storage=optuna.storages.JournalStorage(journal))
    return folder, spec_path, study, MlflowClient(mlflow_server.url)


def runs_of(client, name):
    exp = client.get_experiment_by_name(name)
    return client.search_runs([exp.experiment_id])


def test_one_parent_and_one_child_per_trial(tracked_sweep):
    folder, _, study, client = tracked_sweep
    runs = runs_of(client, "tracked")
    parents = [r for r in runs if r.data.tags.get("ganbench.role") == "study"]
    children = [r for r in runs if r.data.tags.get("ganbench.role") == "trial"]
    assert len(parents) == 1 and len(children) == 4
    # MLflow's UI opens the experiment on its runs, not on an empty GenAI traces page.
    assert client.get_experiment_by_name("tracked").tags["mlflow.experimentKind"] == \
        "custom_model_development"
    parent = parents[0]
    assert parent.info.status == "FINISHED" and parent.data.tags["sampler"] == "random"
    assert "best.w1" in parent.data.metrics and parent.data.params["train.steps"] == "40"
    by_id = {r.info.run_id: r for r in children}
    for trial in study.get_trials():
        run = by_id[trial.user_attrs["mlflow_run_id"]]
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert run.data.tags["trial_number"] == str(trial.number)
        assert run.info.status == "FINISHED" and run.data.tags["state"] == "COMPLETE"
        assert float(run.data.params["train.lr_g"]) == pytest.approx(trial.params["lr_g"])
        assert run.data.params["model.hidden"] == str(trial.params["hidden"])
        # Every trainer field is a param under its YAML section (the list is config's own).
        assert {f"train.{f}" for f in TRAIN_FIELDS} | {f"model.{f}" for f in MODEL_FIELDS} \
            <= set(run.data.params)
        assert run.data.params["train.eval_seed"] == "1234"
        curve = client.get_metric_history(run.info.run_id, "sliced_w1")
        assert sorted(m.step for m in curve) == [20, 40]
        assert run.data.metrics["w1"] == pytest.approx(trial.values[0])
        artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert {"samples.png", "config.json"} <= artifacts


def test_report_matches_the_storage_value_for_value(tracked_sweep):
    folder, spec_path, study, _ = tracked_sweep
    proc = ganbench("report", str(spec_path), cwd=folder)
    assert proc.returncode == 0, proc.stderr
    out = folder / "runs" / "tracked" / "report"
    for name in ("leaderboard.csv", "leaderboard.md", "index.html", "history.png",
                 "parallel.png", "slices.png", "samples.png"):
        assert (out / name).stat().st_size > 0, name
    frame = pd.read_csv(out / "leaderboard.csv")
    trials = {t.number: t for t in study.get_trials()}
    assert sorted(frame["number"]) == sorted(trials)
    for row in frame.itertuples(index=False):
        t = trials[row.number]
        assert row.state == t.state.name
        assert row.objective_w1 == pytest.approx(t.values[0], rel=1e-12)
        assert row.lr_g == pytest.approx(t.params["lr_g"], rel=1e-12)
        assert row.hidden == t.params["hidden"]
        for m in ("w1", "sliced_w1", "modes", "hq", "kl"):
            assert getattr(row, m) == pytest.approx(t.user_attrs["metrics"][m], rel=1e-12)
        assert row.mlflow_run_id == t.user_attrs["mlflow_run_id"]
    assert list(frame["objective_w1"]) == sorted(frame["objective_w1"])  # best first
    html = (out / "index.html").read_text()
    assert "<img src='samples.png'" in html and "leaderboard.csv" in html


def test_diverged_trial_is_a_failed_run_with_its_reason(tmp_path, mlflow_server):
    spec_path = write_spec(
        tmp_path, name="diverging", trials=1, tracking={"uri": mlflow_server.url},
        model={"loss": "wasserstein"},
        train={"steps": 40, "eval_every": 20, "eval_samples": 256, "optimizer": "sgd"},
        search={"lr_g": {"type": "float", "low": 1e5, "high": 1e6, "log": True}})
    proc = ganbench("sweep", str(spec_path), "--workers", "1", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    client = MlflowClient(mlflow_server.url)
    (child,) = [r for r in runs_of(client, "diverging")
                if r.data.tags.get("ganbench.role") == "trial"]
    assert child.info.status == "FAILED"
    assert child.data.tags["fail_reason"].startswith("seed 0 diverged at step")
    board = pd.read_csv(tmp_path / "runs/diverging/report/leaderboard.csv")
    assert board.loc[0, "state"] == "FAIL" and "diverged" in board.loc[0, "reason"]


def test_tracking_off_and_env_uri(tmp_path, mlflow_server):
    spec_path = write_spec(tmp_path, name="envuri", trials=1, tracking={})
    env = cli_env() | {"MLFLOW_TRACKING_URI": mlflow_server.url}
    proc = ganbench("sweep", str(spec_path), "--workers", "1", cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr
    assert len(runs_of(MlflowClient(mlflow_server.url), "envuri")) == 2
    assert not (tmp_path / "mlflow.db").exists()


def test_user_strings_are_escaped_in_html_reports(tmp_path):
    """A fail reason, a parameter value and a title carrying markup reach the page as
    text, never as markup."""
    import optuna
    from optuna.distributions import CategoricalDistribution, FloatDistribution

    from ganbench.report import html_page, write_study_report

    study = optuna.create_study(study_name="escaped")
    attack = "<script>alert(1)</script>"
    dists = {"lr_g": FloatDistribution(1e-4, 1e-2, log=True),
             "activation": CategoricalDistribution(["relu", attack])}
    study.add_trial(optuna.trial.create_trial(
        params={"lr_g": 1e-3, "activation": attack}, distributions=dists, values=[0.5],
        user_attrs={"metrics": {"w1": 0.5}}))
    study.add_trial(optuna.trial.create_trial(
        params={"lr_g": 2e-3, "activation": "relu"}, distributions=dists,
        state=optuna.trial.TrialState.FAIL,
        user_attrs={"fail_kind": "trial", "fail_reason": attack}))
    write_study_report(study, [("w1", "minimize")], ["lr_g", "activation"], tmp_path)
    page = (tmp_path / "index.html").read_text()
    assert "<script" not in page and "&lt;script&gt;" in page
    page = html_page(attack, attack, [(attack, "<p>ok</p>")])
    assert "<script" not in page and page.count("&lt;script&gt;") == 4  # title twice


def test_slice_plots_keep_their_colour_bar_beside_the_panels_and_label_decades_only():
    """Optuna's slice plot, laid out tightly, put its colour bar over the last panel and
    ran the minor labels of log axes together."""
    import random
    import warnings

    import matplotlib
    import optuna
    import optuna.visualization.matplotlib as ov
    from matplotlib.ticker import NullFormatter

    from ganbench.report import _figure, _tidy

    dists = {"lr_g": optuna.distributions.FloatDistribution(1e-4, 3e-3, log=True),
             "lr_d": optuna.distributions.FloatDistribution(1e-4, 3e-3, log=True),
             "hidden": optuna.distributions.CategoricalDistribution([64, 128, 256])}
    study = optuna.create_study()
    rng = random.Random(0)
    for _ in range(12):
        params = {"lr_g": 10 ** rng.uniform(-4, -2.6), "lr_d": 10 ** rng.uniform(-4, -2.6),
                  "hidden": rng.choice([64, 128, 256])}
        study.add_trial(optuna.trial.create_trial(params=params, distributions=dists,
                                                  value=rng.random()))
    with warnings.catch_warnings(), matplotlib.rc_context():
        warnings.simplefilter("ignore")
        fig = _figure(ov.plot_slice(study))
        fig.tight_layout()  # what every figure got before
    bar = next(ax for ax in fig.axes if ax.get_label() == "<colorbar>")
    panels = [ax for ax in fig.axes if ax is not bar]

    def overlapped() -> bool:
        fig.canvas.draw()
        return any(bar.get_window_extent().overlaps(ax.get_window_extent()) for ax in panels)

    assert overlapped()
    assert _tidy(fig) and not overlapped()
    logs = [ax for ax in panels if ax.get_xscale() == "log"]
    assert len(logs) == 2
    assert all(isinstance(ax.xaxis.get_minor_formatter(), NullFormatter) for ax in logs)
