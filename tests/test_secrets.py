"""Credentials never leave the user's command line: not in MLflow, not on the console."""

import json
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mlflow.tracking import MlflowClient

from ganbench.errors import GanbenchError, SpecError, redact
from tests.conftest import TINY, ganbench
from tests.services import Postgres

SECRET = "hunter2-p@ss:w/rd"  # '@', ':' and '/' percent-encoded in the URL


@pytest.mark.parametrize("url,shown", [
    ("postgresql://bob:s3cr@t@127.0.0.1:5432/db", "postgresql://bob:***@127.0.0.1:5432/db"),
    ("postgresql+psycopg://bob:pw@h/db?sslmode=require&password=zz",
     "postgresql+psycopg://bob:***@h/db?sslmode=require&password=***"),
    ("http://user:tok3n@mlflow.example:5000/", "http://user:***@mlflow.example:5000/"),
    ("sqlite:///runs/x.db", "sqlite:///runs/x.db"),
    ("postgresql://bob@h/db", "postgresql://bob@h/db"),
])
def test_redact_hides_every_password_form(url, shown):
    assert redact(url) == shown
    assert redact(f"cannot reach '{url}' now") == f"cannot reach '{shown}' now"


def test_errors_carry_no_password():
    assert "s3cr" not in str(GanbenchError("storage postgresql://b:s3cr@t@h/db: refused"))
    assert "s3cr" not in str(SpecError("f.yaml", "storage", "got 'mysql://b:s3cr@h/db'"))


@pytest.fixture(scope="module")
def secured_postgres():
    server = Postgres(password=SECRET).start()
    yield server
    server.stop()


def _assert_clean(text: str, where: str) -> None:
    for needle in ("hunter2", "p%40ss"):
        assert needle not in text, f"password in {where}"


@pytest.mark.slow
def test_a_sweep_and_a_compare_leak_no_password(tmp_path, secured_postgres, mlflow_server):
    url = secured_postgres.url
    study = tmp_path / "tiny.yaml"
    study.write_text(yaml.safe_dump(TINY | {"trials": 2, "storage": url,
                                            "tracking": {"uri": mlflow_server.url}}))
    compare = tmp_path / "cmp.yaml"
    compare.write_text(yaml.safe_dump({
        "name": "cmp", "targets": [{"name": "ring"}], "train": TINY["train"],
        "model": {"hidden": 16, "depth": 1}, "search": {"lr_g": TINY["search"]["lr_g"]},
        "arms": {"plain": {}, "ema": {"tricks": {"ema": {"decay": 0.9}}}},
        "baseline": "plain", "budget": 1, "eval_seeds": 2, "storage": url,
        "tracking": {"uri": mlflow_server.url}}))
    console = []
    for args in (["sweep", str(study), "--workers", "1"], ["status", str(study)],
                 ["report", str(study)], ["compare", str(compare)],
                 ["status", str(compare)],
                 # a wrong password and an unsupported URL: the errors name the URL, hidden
                 ["sweep", str(study), "--storage", url.replace("hunter2", "hunter3")],
                 ["sweep", str(study), "--storage", url.replace("postgresql", "mysql")]):
        proc = ganbench(*args, cwd=tmp_path)
        console.append(proc.stdout + proc.stderr)
        assert proc.returncode == (0 if "--storage" not in args else 2), proc.stderr
    _assert_clean("\n".join(console), "console output")
    assert "ganbench:***@127.0.0.1" in console[1]  # the storage is named, hidden

    client = MlflowClient(tracking_uri=mlflow_server.url)
    runs = [r for e in client.search_experiments() for r in client.search_runs(
        [e.experiment_id], max_results=1000)]
    assert len(runs) >= 2 + 1 + 2 * 2  # parents, trials, arm runs, held-out runs
    # Every run of the sweep and of the comparison ended.
    assert not [r.info.run_name for r in runs if r.info.status == "RUNNING"]
    for run in runs:
        _assert_clean(json.dumps(run.data.params) + json.dumps(run.data.tags),
                      f"run {run.info.run_id} params/tags")
        for path in _artifact_files(client, run.info.run_id, tmp_path / run.info.run_id):
            _assert_clean(path.read_bytes().decode("utf-8", "replace"), f"artifact {path}")
    for path in (tmp_path / "runs").glob("*/report/**/*"):
        if path.is_file():
            _assert_clean(path.read_bytes().decode("utf-8", "replace"), f"report {path}")


def _artifact_files(client, run_id: str, dest: Path) -> list[Path]:
    if not client.list_artifacts(run_id):
        return []
    local = Path(client.download_artifacts(run_id, "", str(dest.mkdir(parents=True) or dest)))
    return [p for p in local.rglob("*") if p.is_file()]


passwords = st.text(st.characters(blacklist_categories=("Cs",),
                                  blacklist_characters="\x00\n\r"),
                    min_size=1, max_size=16).map(lambda t: f"Zq{t}9x")


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(password=passwords, encoded=st.booleans(), kind=st.sampled_from(["storage", "tracking"]))
def test_no_password_of_any_shape_is_shown(tmp_path_factory, password, encoded, kind):
    """Any password (quotes, spaces, @ : / %, unicode; percent-encoded in the URL or not),
    in a storage or a tracking URL that cannot be reached, through the real paths: the
    spec's validation, opening the storage or checking the tracking server, and what is
    logged to MLflow. Neither the password nor its encoded form is in any message."""
    from urllib.parse import quote

    from ganbench.spec import load_spec, logged
    from ganbench.study import get_storage
    from ganbench.tracking import check_reachable, resolve_uri
    from tests.services import free_port

    secret = quote(password, safe="") if encoded else password
    port = free_port()  # nothing listens there
    url = (f"postgresql://ganbench:{secret}@127.0.0.1:{port}/db" if kind == "storage"
           else f"http://user:{secret}@127.0.0.1:{port}")
    folder = tmp_path_factory.mktemp("pw")
    path = folder / "s.yaml"
    data = TINY | ({"storage": url} if kind == "storage" else {"tracking": {"uri": url}})
    path.write_text(yaml.safe_dump(data, allow_unicode=True))
    shown = []
    try:
        spec = load_spec(path)
        shown.append(json.dumps(logged(spec), ensure_ascii=False))
        if kind == "storage":
            get_storage(spec)
        else:
            check_reachable(resolve_uri(spec.tracking.uri))
    except GanbenchError as exc:
        shown.append(str(exc))
    assert shown
    for text in shown:
        assert password not in text and quote(password, safe="") not in text, text


@pytest.mark.slow
def test_a_tracking_uri_with_credentials_works_and_hides_them(tmp_path, mlflow_server):
    """``http://user:password@host:port``, as MLflow users write it (and the same server
    with MLFLOW_TRACKING_USERNAME / PASSWORD): the reachability check passes, the sweep
    logs its runs there, and the password is nowhere in the output or the runs."""
    import os

    from tests.conftest import cli_env

    host = mlflow_server.url.removeprefix("http://")
    from urllib.parse import quote

    uri = f"http://alice:{quote(SECRET, safe='')}@{host}"
    spec = tmp_path / "cred.yaml"
    spec.write_text(yaml.safe_dump(TINY | {"name": "cred", "trials": 1,
                                            "tracking": {"uri": uri}}))
    proc = ganbench("sweep", str(spec), "--workers", "1", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    _assert_clean(proc.stdout + proc.stderr, "console output")
    env = cli_env() | {"MLFLOW_TRACKING_USERNAME": "alice",
                       "MLFLOW_TRACKING_PASSWORD": SECRET}
    by_env = ganbench("sweep", str(spec), "--set", "name=cred-env", "--tracking-uri",
                      mlflow_server.url, "--workers", "1", cwd=tmp_path, env=env)
    assert by_env.returncode == 0, by_env.stderr
    _assert_clean(by_env.stdout + by_env.stderr, "console output")
    client = MlflowClient(tracking_uri=mlflow_server.url)
    for name in ("cred", "cred-env"):
        exp = client.get_experiment_by_name(name)
        runs = client.search_runs([exp.experiment_id])
        assert {r.data.tags.get("ganbench.role") for r in runs} == {"study", "trial"}
        for run in runs:
            _assert_clean(json.dumps(run.data.params) + json.dumps(run.data.tags), name)
    assert "MLFLOW_TRACKING_PASSWORD" not in os.environ
