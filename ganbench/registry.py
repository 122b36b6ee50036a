"""Model registration: a study's best generator into the MLflow model registry, through
the tracker (``ganbench.tracking`` is the one module that talks to MLflow)."""

from __future__ import annotations

import os

import optuna
from optuna.trial import TrialState

from ganbench.spec import StudySpec


def register_best(spec: StudySpec, study: optuna.Study, tracker) -> str | None:
    """Register the study's best generator in the MLflow model registry as
    ``<study>-generator`` when it beats the registered one (single objective, a completed
    trial with a kept generator). Returns what happened, in one line."""
    import tempfile

    import torch

    from ganbench.tracking import download_generator
    from ganbench.train import load_checkpoint

    if tracker is None or spec.multi_objective or not any(
            t.state == TrialState.COMPLETE for t in study.get_trials(deepcopy=False)):
        return None
    best = study.best_trial
    with tempfile.TemporaryDirectory() as tmp:
        path = best.user_attrs.get("checkpoint")
        if not path or not os.path.isfile(path):
            if "mlflow_run_id" not in best.user_attrs:
                return None
            path = download_generator(tracker.handle.uri, best.user_attrs["mlflow_run_id"],
                                      tmp)
        config, g, _ = load_checkpoint(path)
    example = torch.randn(5, config.noise_dim, generator=torch.Generator().manual_seed(0),
                          dtype=next(g.parameters()).dtype)
    return tracker.register_generator(
        f"{spec.name}-generator", g, example, best.values[0], spec.directions[0],
        {"study": spec.name, "trial": str(best.number)})
