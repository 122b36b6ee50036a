"""Studies on a real Ray cluster: a head node and a second node on this machine, a real
PostgreSQL storage and a real ``mlflow server``. Sweeps and a comparison run to their exact
count with trials on both nodes; a node lost mid-sweep loses no trial and counts none
twice; Ctrl-C stops the cluster's tasks as it stops local workers. Skipped where Ray is not
installed (``pip install -e '.[ray]'``); CI installs it."""

import signal
import subprocess
import sys
import time

import mlflow
import optuna
import pandas as pd
import pytest
import yaml
from optuna.trial import TrialState

from tests.conftest import cli_env, ganbench, write_spec
from tests.test_compare import COMPARE

pytest.importorskip("ray", reason="Ray is not installed (pip install -e '.[ray]')")
pytestmark = pytest.mark.slow

def env() -> dict:
    from tests.services import RayCluster

    return cli_env() | RayCluster.ENV


SLOWER = {"steps": 400, "eval_every": 200, "eval_samples": 256, "batch_size": 64}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    from tests.services import RayCluster

    server = RayCluster(tmp_path_factory.mktemp("ray")).start()
    yield server
    server.stop()


def storage_url(postgres) -> str:
    return postgres.url.replace("postgresql://", "postgresql+psycopg://")


def trials(postgres, name):
    return optuna.load_study(study_name=name, storage=storage_url(postgres)).get_trials()


def counted(ts) -> list:
    return [t for t in ts if t.state in (TrialState.COMPLETE, TrialState.PRUNED)
            or (t.state == TrialState.FAIL and t.user_attrs.get("fail_kind") == "trial")]


def test_a_sweep_runs_to_its_count_on_both_nodes_logged_to_mlflow(
        tmp_path, cluster, postgres, mlflow_server):
    spec = write_spec(tmp_path, name="ray-sweep", trials=6, storage=postgres.url,
                      tracking={"uri": mlflow_server.url})
    proc = ganbench("sweep", str(spec), "--ray", cluster.address, cwd=tmp_path, env=env())
    assert proc.returncode == 0, proc.stderr
    said = " ".join(proc.stdout.split())  # the console wraps long lines
    assert "2 worker(s) on cpu of the Ray cluster at " + cluster.address in said
    ts = trials(postgres, "ray-sweep")
    assert len(ts) == 6 and all(t.state == TrialState.COMPLETE for t in ts)
    assert len({t.user_attrs["node"] for t in ts}) == 2  # both nodes trained trials
    assert all(t.user_attrs["worker"].startswith("ray:") for t in ts)
    # MLflow as on one machine: the study's parent run, one child run per trial.
    client = mlflow.MlflowClient(mlflow_server.url)
    experiment = client.get_experiment_by_name("ray-sweep")
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == 1 and len(children) == 6
    assert {r.data.tags["mlflow.parentRunId"] for r in children} == {parents[0].info.run_id}
    assert all(r.info.status == "FINISHED" for r in runs)
    board = pd.read_csv(tmp_path / "runs/ray-sweep/report/leaderboard.csv")
    assert len(board) == 6
    study = optuna.load_study(study_name="ray-sweep", storage=storage_url(postgres))
    run = study.user_attrs["provenance"][-1]
    assert run["cluster"]["nodes"] == 2 and run["cluster"]["cpus"] == 2
    assert run["spec"]["execution"]["backend"] == "ray"


def test_populations_run_as_ray_tasks_to_the_exact_count(tmp_path, cluster, postgres):
    spec = write_spec(tmp_path, name="ray-pop", trials=6, storage=postgres.url)
    proc = ganbench("sweep", str(spec), "--ray", cluster.address, "--population", "2",
                    cwd=tmp_path, env=env())
    assert proc.returncode == 0, proc.stderr
    assert "populations of 2 member(s)" in " ".join(proc.stdout.split())
    ts = trials(postgres, "ray-pop")
    assert len(counted(ts)) == 6 and all(t.user_attrs["execution"] == "population"
                                         for t in ts)
    assert all(t.user_attrs["worker"].startswith("ray:") for t in ts)


def test_a_comparison_runs_to_its_count_on_both_nodes(tmp_path, cluster, postgres,
                                                      mlflow_server):
    (tmp_path / "cmp.yaml").write_text(yaml.safe_dump(
        COMPARE | {"name": "ray-cmp", "storage": postgres.url,
                   "tracking": {"uri": mlflow_server.url}}))
    proc = ganbench("compare", "cmp.yaml", "--ray", cluster.address, cwd=tmp_path, env=env())
    assert proc.returncode == 0, proc.stderr
    runs = pd.read_csv(tmp_path / "runs/ray-cmp/report/runs.csv")
    local = tmp_path / "local"
    local.mkdir()
    (local / "cmp.yaml").write_text(yaml.safe_dump(COMPARE | {"name": "ray-cmp"}))
    alone = ganbench("compare", "cmp.yaml", "--workers", "2", cwd=local)
    assert alone.returncode == 0, alone.stderr
    mine = pd.read_csv(local / "runs/ray-cmp/report/runs.csv")
    # The same held-out runs, the same numbers: where a job runs changes nothing.
    keys = ["target", "arm", "replicate", "seed"]
    assert len(runs) == len(mine) > 0
    pd.testing.assert_frame_equal(runs.sort_values(keys).reset_index(drop=True)[keys + ["w1"]],
                                  mine.sort_values(keys).reset_index(drop=True)[keys + ["w1"]])
    nodes = set()
    storage = storage_url(postgres)
    for name in optuna.get_all_study_names(storage):
        if name.startswith("ray-cmp__"):
            ts = optuna.load_study(study_name=name, storage=storage).get_trials()
            assert len(counted(ts)) == COMPARE["budget"]
            nodes |= {t.user_attrs.get("node") for t in ts}
    assert len(nodes - {None}) == 2


def test_ctrl_c_stops_the_clusters_tasks_and_a_rerun_ends_exact(tmp_path, cluster, postgres):
    spec = write_spec(tmp_path, name="ray-stop", trials=6, train=SLOWER, storage=postgres.url)
    proc = subprocess.Popen([sys.executable, "-m", "ganbench", "sweep", str(spec), "--ray",
                             cluster.address], cwd=tmp_path, env=env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 180
    while time.time() < deadline:
        try:
            if any(t.state == TrialState.RUNNING for t in trials(postgres, "ray-stop")):
                break
        except KeyError:  # the study is not created yet
            pass
        time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    ts = trials(postgres, "ray-stop")
    assert not [t for t in ts if t.state == TrialState.RUNNING]
    stopped = [t for t in ts if t.user_attrs.get("fail_kind") == "interrupted"]
    assert stopped  # marked, not counted, re-queued
    again = ganbench("sweep", str(spec), "--ray", cluster.address, cwd=tmp_path, env=env())
    assert again.returncode == 0, again.stderr
    assert len(counted(trials(postgres, "ray-stop"))) == 6


def test_a_node_lost_mid_sweep_loses_nothing_and_counts_nothing_twice(
        tmp_path, cluster, postgres):
    spec = write_spec(tmp_path, name="ray-kill", trials=6, train=SLOWER,
                      storage=postgres.url)
    proc = subprocess.Popen([sys.executable, "-m", "ganbench", "sweep", str(spec), "--ray",
                             cluster.address], cwd=tmp_path, env=env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 180
    second = None
    while time.time() < deadline and second is None:
        try:
            nodes = [t.user_attrs.get("node") for t in trials(postgres, "ray-kill")
                     if t.state == TrialState.RUNNING]
        except KeyError:
            nodes = []
        if len(set(nodes)) == 2:  # a trial running on each node: lose one of them
            second = nodes
        time.sleep(0.3)
    assert second, "no trial ran on both nodes at once"
    cluster.kill_node()
    out, err = proc.communicate(timeout=300)
    try:
        assert proc.returncode == 0, err
        assert "died (its node died)" in out or "died (its process died)" in out, out
        ts = trials(postgres, "ray-kill")
        assert len(counted(ts)) == 6  # exactly the count
        lost = [t for t in ts if t.user_attrs.get("fail_kind") == "worker_died"]
        assert len(lost) == 1 and lost[0].user_attrs["fail_reason"].startswith("worker died")
        retried = [t for t in ts if t.user_attrs.get("retry_of") == lost[0].number]
        assert len(retried) == 1 and retried[0].params == lost[0].params
        assert retried[0].state == TrialState.COMPLETE
        params = [tuple(sorted(t.params.items())) for t in counted(ts)]
        assert len(params) == len(set(params))  # no configuration counted twice
    finally:
        cluster.add_node()


def test_what_the_nodes_cannot_share_is_refused_in_one_line(tmp_path):
    spec = write_spec(tmp_path, name="shared")
    cases = [
        ([], "the nodes cannot share the journal file runs/<name>/optuna.log; give "
             "--storage postgresql://…"),
        (["--storage", f"sqlite:///{tmp_path}/s.db"], "the nodes cannot share sqlite:///"),
        (["--storage", "postgresql://u@127.0.0.1:1/x", "--set", "tracking={uri: "
          "sqlite:///mlflow.db}"], "the nodes cannot share the MLflow store "
                                   "sqlite:///mlflow.db"),
    ]
    for args, message in cases:
        proc = ganbench("sweep", str(spec), "--ray", "127.0.0.1:1", *args, cwd=tmp_path)
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.count("\n") == 1 and message in proc.stderr, proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.db", "shared.yaml"] or \
        sorted(p.name for p in tmp_path.iterdir()) == ["shared.yaml"]
