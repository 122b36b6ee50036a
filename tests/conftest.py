import os

import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    """Run a test with the working directory in a fresh temp folder."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


def cli_env() -> dict:
    """Environment for subprocess CLI runs: one torch thread, no MLflow variables leaking in."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env["OMP_NUM_THREADS"] = "1"
    return env


@pytest.fixture(scope="session")
def postgres():
    """A real PostgreSQL server on a loopback port for the whole session."""
    from tests.services import Postgres

    server = Postgres().start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """A real `mlflow server` subprocess with a sqlite backend in a temp dir."""
    from tests.services import MlflowServer

    server = MlflowServer(tmp_path_factory.mktemp("mlflow")).start()
    yield server
    server.stop()


TINY = {
    "name": "tiny",
    "target": {"name": "ring"},
    "train": {"steps": 40, "eval_every": 20, "eval_samples": 256, "batch_size": 64},
    "model": {"depth": 1},
    "search": {
        "lr_g": {"type": "float", "low": 1.0e-4, "high": 1.0e-2, "log": True},
        "lr_d": {"type": "float", "low": 1.0e-4, "high": 1.0e-2, "log": True},
        "hidden": {"type": "categorical", "choices": [16, 32]},
    },
    "sampler": {"name": "random", "seed": 0},
    "pruner": {"name": "none"},
    "trials": 4,
    "tracking": False,
}


def write_spec(folder, **changes) -> "os.PathLike":
    """A tiny, fast study file in ``folder`` with top-level ``changes``."""
    import copy

    import yaml

    data = copy.deepcopy(TINY) | changes
    path = folder / f"{data['name']}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def ganbench(*args, cwd, env=None, timeout=900):
    """Run the CLI as a user would, in a subprocess; returns the CompletedProcess."""
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "ganbench", *args], cwd=cwd,
                          env=env or cli_env(), capture_output=True, text=True,
                          timeout=timeout)
