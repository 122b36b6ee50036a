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
