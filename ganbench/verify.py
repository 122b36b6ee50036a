"""Re-check a committed report: re-train a subset of its runs from its recorded provenance
and compare every metric with the committed value, bit for bit.

A comparison's held-out runs are re-trained from the spec as run (``provenance.json``) and
each arm's selected parameters; a study's complete trials from the spec and the trial's
parameters in the committed export (``storage.json.gz``). Both are compared with the values
a reader sees: ``runs.csv`` and ``leaderboard.csv``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from ganbench import provenance
from ganbench.errors import GanbenchError
from ganbench.metrics import METRICS

DEFAULT_RUNS = 4  # runs re-trained by default: spread over arms and seeds (or best trials)


@dataclass
class RunCheck:
    """One re-trained run: which, and each metric's committed and re-trained value."""

    run: str
    values: dict[str, tuple[float, float]]  # metric → (committed, re-trained)

    @property
    def mismatches(self) -> list[str]:
        return [m for m, (a, b) in self.values.items() if not _same(a, b)]


def _same(a: float, b: float) -> bool:
    """Bitwise equal floats (NaN equals NaN; inf equals inf)."""
    return a == b or (math.isnan(a) and math.isnan(b))


def load_provenance(folder: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(provenance.json, its last recorded run with a spec); one-line errors when the report
    does not say how it was made, or was made where its numbers cannot be re-obtained."""
    path = folder / "provenance.json"
    if not path.is_file():
        raise GanbenchError(f"{folder}: no provenance.json: the report does not record how it "
                            "was made; regenerate it with the command that made it")
    try:
        data = json.loads(path.read_text())
    except ValueError as exc:
        raise GanbenchError(f"{path}: not valid JSON ({exc})") from None
    runs = [r for r in data.get("runs", []) if isinstance(r, dict) and r.get("spec")]
    if not runs:
        raise GanbenchError(f"{path}: no recorded run with its spec (made before ganbench "
                            "recorded provenance); regenerate the report")
    entry = runs[-1]
    differ = provenance.rounding_differences(entry)
    if differ:
        raise GanbenchError(f"{folder}: recorded with other library versions "
                            f"({'; '.join(differ)}): they may round differently, so the runs "
                            "cannot be re-checked bit for bit; install the recorded versions")
    devices = entry.get("devices") or ["cpu"]
    if any(d != "cpu" for d in devices):
        raise GanbenchError(f"{folder}: trained on {', '.join(devices)}; verify re-trains on "
                            "this machine's CPU, which does not reproduce a GPU's rounding")
    return data, entry


def _spec_data(entry: dict[str, Any]) -> dict[str, Any]:
    """The spec as run, without where it was stored or logged (not needed to re-train)."""
    return {k: v for k, v in entry["spec"].items() if k not in ("storage", "tracking")} | {
        "tracking": False}


def _floats(row: Any, metrics: list[str]) -> dict[str, float]:
    return {m: float(row[m]) for m in metrics}


def verify(folder: Path, runs: int | None = DEFAULT_RUNS,
           on_run: Callable[[RunCheck], None] | None = None) -> list[RunCheck]:
    """Re-train ``runs`` of the report in ``folder`` (None: all) and compare each metric."""
    data, entry = load_provenance(Path(folder))
    if "comparison" in data:
        checks = _verify_comparison(Path(folder), data, entry, runs)
    else:
        checks = _verify_study(Path(folder), entry, runs)
    for check in checks:
        if on_run is not None:
            on_run(check)
    return checks


def _verify_comparison(folder: Path, data: dict[str, Any], entry: dict[str, Any],
                       runs: int | None) -> list[RunCheck]:
    import pandas as pd
    import torch

    from ganbench.compare import heldout_configs, heldout_groups, heldout_seeds
    from ganbench.population import train_population
    from ganbench.spec import CompareSpec

    spec = CompareSpec.model_validate(_spec_data(entry))
    frame = pd.read_csv(folder / "runs.csv", keep_default_na=False,
                        na_values=[""])
    if "replicate" not in frame:  # made before tuning replicates
        frame["replicate"] = 0
    selected = {(s["target"], s["arm"], s.get("replicate", 0)): s["params"]
                for s in data.get("selected", [])}
    metrics = [m for m in METRICS if m in frame]
    # Spread over arms and seeds: the i-th unit (target, arm, replicate) with its i-th seed.
    pairs = list(dict.fromkeys(zip(frame["target"], frame["arm"], frame["replicate"])))
    order = []
    for i in range(len(frame)):
        target, arm, rep = pairs[i % len(pairs)]
        rows = frame[(frame["target"] == target) & (frame["arm"] == arm)
                     & (frame["replicate"] == rep)]
        k = i // len(pairs)
        if k < len(rows):
            order.append(rows.iloc[k])
    chosen = order if runs is None else order[:runs]
    # Each run re-trained in the population it was trained in (its fixed held-out group),
    # each group once, with the workers' torch threads.
    torch.set_num_threads(int(entry.get("torch_threads") or 1))
    trained: dict[tuple[str, str, int, tuple[int, ...]], dict[int, Any]] = {}
    checks = []
    for row in chosen:
        seed, rep = int(row["seed"]), int(row["replicate"])
        group = next(g for g in heldout_groups(heldout_seeds(spec, rep)) if seed in g)
        key = (row["target"], row["arm"], rep, tuple(group))
        if key not in trained:
            target = next(t for t in spec.targets if t.name == row["target"])
            study = spec.arm_study(target, row["arm"], rep)
            configs = heldout_configs(spec, study, selected[key[:3]], "cpu", group)
            trained[key] = dict(zip(group, train_population(configs, streams="member")))
        result = trained[key][seed]
        where = f" · r{rep}" if rep else ""
        checks.append(RunCheck(f"{row['target']} · {row['arm']}{where} · seed {seed}",
                               {m: (float(row[m]), float(result.metrics.get(m, math.nan)))
                                for m in metrics}))
    return checks


def _verify_study(folder: Path, entry: dict[str, Any], runs: int | None) -> list[RunCheck]:
    import pandas as pd
    import torch

    from ganbench.population import train_population
    from ganbench.spec import StudySpec
    from ganbench.study import EXPORT, import_studies
    from ganbench.train import train
    from ganbench.trial import seed_configs

    spec = StudySpec.model_validate(_spec_data(entry))
    if not (folder / EXPORT).is_file():
        raise GanbenchError(f"{folder}: no {EXPORT}: the trials' parameters are not committed")
    import optuna

    study = optuna.load_study(study_name=spec.name, storage=import_studies(folder / EXPORT))
    board = pd.read_csv(folder / "leaderboard.csv")
    complete = board[board["state"] == "COMPLETE"]
    numbers = [int(n) for n in complete["number"]]
    chosen = numbers if runs is None else numbers[:runs]
    trials = {t.number: t for t in study.get_trials(deepcopy=False)}
    metrics = [m for m in METRICS if m in board]
    torch.set_num_threads(int(entry.get("torch_threads") or 1))  # as the workers trained
    checks = []
    for number in chosen:
        configs = seed_configs(spec, trials[number].params, "cpu")
        if spec.execution.mode == "population":
            results = train_population(configs, streams=spec.execution.streams)
        else:
            results = [train(c) for c in configs]
        got = {k: sum(r.metrics[k] for r in results) / len(results) for k in metrics}
        row = complete[complete["number"] == number].iloc[0]
        checks.append(RunCheck(f"trial {number}",
                               {m: (float(row[m]), float(got[m])) for m in metrics}))
    return checks
