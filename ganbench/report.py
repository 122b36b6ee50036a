"""Tables and plots of results (pandas, scipy, matplotlib). Never imports torch."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

if TYPE_CHECKING:
    import pandas as pd


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file, so a crash never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def json_ready(value: Any) -> Any:
    """Replace non-finite floats by None (JSON has no inf/NaN)."""
    if isinstance(value, dict):
        return {k: json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_json(path: str | os.PathLike, data: Any) -> None:
    atomic_write_text(path, json.dumps(json_ready(data), indent=2) + "\n")


def plot_samples(
    ax: "plt.Axes", samples: np.ndarray, reference: np.ndarray,
    centers: np.ndarray | None = None, title: str = "",
) -> None:
    """Generated samples over the target's evaluation sample (first two coordinates)."""
    ax.scatter(reference[:, 0], reference[:, 1], s=2, c="#bbbbbb", label="target", rasterized=True)
    finite = np.isfinite(samples).all(axis=1)
    ax.scatter(samples[finite, 0], samples[finite, 1], s=2, c="#1f77b4", alpha=0.6,
               label="generated", rasterized=True)
    if centers is not None:
        ax.scatter(centers[:, 0], centers[:, 1], marker="x", c="#d62728", s=30, label="modes")
    lo = np.minimum(reference[:, :2].min(0), samples[finite, :2].min(0, initial=np.inf))
    hi = np.maximum(reference[:, :2].max(0), samples[finite, :2].max(0, initial=-np.inf))
    pad = 0.15 * (reference[:, :2].max(0) - reference[:, :2].min(0)) + 1e-3
    lo, hi = np.maximum(lo, reference[:, :2].min(0) - 4 * pad), np.minimum(
        hi, reference[:, :2].max(0) + 4 * pad)
    ax.set_xlim(lo[0] - pad[0], hi[0] + pad[0])
    ax.set_ylim(lo[1] - pad[1], hi[1] + pad[1])
    ax.set_aspect("equal", adjustable="box")
    ax.set_title(title, fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])


def save_samples_png(
    path: str | os.PathLike, samples: np.ndarray, reference: np.ndarray,
    centers: np.ndarray | None = None, title: str = "",
) -> None:
    """One scatter of generated over target samples, written atomically as PNG."""
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    plot_samples(ax, samples, reference, centers, title)
    ax.legend(loc="upper right", fontsize=7, markerscale=3)
    _save(fig, path)


def save_samples_grid(
    path: str | os.PathLike, panels: Sequence[tuple[np.ndarray, np.ndarray, Any, str]],
    columns: int = 4,
) -> None:
    """A grid of sample scatters, one panel per (samples, reference, centers, title)."""
    n = max(len(panels), 1)
    cols = min(columns, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3 * cols, 3 * rows), squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.axis("off")
    for ax, (samples, reference, centers, title) in zip(axes.flat, panels):
        plot_samples(ax, samples, reference, centers, title)
    _save(fig, path)


def _save(fig: "plt.Figure", path: str | os.PathLike) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.png")
    fig.tight_layout()
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


# ---------------------------------------------------------------- trial tables
METRIC_COLUMNS = ("w1", "sliced_w1", "modes", "hq", "kl")


def trials_frame(trials: Sequence[Any], objectives: Sequence[tuple[str, str]],
                 pareto: Sequence[int] = ()) -> "pd.DataFrame":
    """One row per finished trial (COMPLETE, PRUNED, FAIL), best first.

    ``trials`` are Optuna FrozenTrials; ``objectives`` are (metric, direction) pairs.
    Columns: number, state, the objective values, params (by their trainer names), every
    metric, the objective's spread over seeds, duration, failure reason, MLflow run id.
    """
    import pandas as pd

    rows = []
    for t in trials:
        state = t.state.name
        if state in ("RUNNING", "WAITING"):
            continue
        attrs = t.user_attrs
        row: dict[str, Any] = {"number": t.number, "state": state}
        for (metric, _), value in zip(objectives, t.values or [None] * len(objectives)):
            row[f"objective_{metric}"] = value
        row |= {k: (v if not isinstance(v, list) else str(v)) for k, v in t.params.items()}
        metrics = attrs.get("metrics", {})
        row |= {m: metrics.get(m) for m in METRIC_COLUMNS}
        seed_metrics = attrs.get("seed_metrics")
        if seed_metrics:
            for metric, _ in objectives:
                vals = np.array([s[metric] for s in seed_metrics], dtype=float)
                row[f"{metric}_seed_std"] = float(vals.std(ddof=1)) if len(vals) > 1 else 0.0
        if pareto:
            row["pareto"] = t.number in pareto
        row["duration_s"] = (t.duration.total_seconds() if t.duration else None)
        row["reason"] = attrs.get("fail_reason", "")
        row["mlflow_run_id"] = attrs.get("mlflow_run_id", "")
        rows.append(row)
    frame = pd.DataFrame(rows)
    if frame.empty:
        return frame
    metric, direction = objectives[0]
    frame["_order"] = frame["state"].map({"COMPLETE": 0, "PRUNED": 1, "FAIL": 2})
    frame = frame.sort_values(["_order", f"objective_{metric}", "number"],
                              ascending=[True, direction == "minimize", True])
    return frame.drop(columns="_order").reset_index(drop=True)


def to_markdown(frame: "pd.DataFrame", floatfmt: str = ".4g") -> str:
    """A GitHub-flavoured markdown table (no extra dependency)."""
    def cell(v: Any) -> str:
        if v is None or (isinstance(v, float) and math.isnan(v)):
            return ""
        if isinstance(v, float):
            return format(v, floatfmt)
        return str(v).replace("|", "\\|")

    head = "| " + " | ".join(str(c) for c in frame.columns) + " |"
    sep = "|" + "|".join("---" for _ in frame.columns) + "|"
    body = ["| " + " | ".join(cell(v) for v in row) + " |"
            for row in frame.itertuples(index=False)]
    return "\n".join([head, sep, *body]) + "\n"


def write_leaderboard(frame: "pd.DataFrame", out_dir: str | os.PathLike) -> list[Path]:
    """reports/<name>/leaderboard.csv and .md, written atomically."""
    out = Path(out_dir)
    atomic_write_text(out / "leaderboard.csv", frame.to_csv(index=False))
    atomic_write_text(out / "leaderboard.md", to_markdown(frame))
    return [out / "leaderboard.csv", out / "leaderboard.md"]
