"""Tables and plots of results (pandas, scipy, matplotlib). Never imports torch."""

from __future__ import annotations

import html
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import matplotlib
import numpy as np
from matplotlib.figure import Figure

from ganbench.files import atomic, atomic_write_text, write_json
from ganbench.metrics import METRICS, pruning_metric

if TYPE_CHECKING:
    import matplotlib.pyplot as plt
    import pandas as pd


def _subplots(*grid: int, figsize: tuple[float, float], squeeze: bool = True
              ) -> tuple[Figure, Any]:
    """A figure of its own (no pyplot, no backend chosen for the process) and its axes."""
    fig = Figure(figsize=figsize)
    return fig, fig.subplots(*grid, squeeze=squeeze)


def _close(fig: Any = "all") -> None:
    """Close pyplot's figures (Optuna's plots are made through pyplot)."""
    import matplotlib.pyplot as plt

    plt.close(fig)


def plot_samples(
    ax: "plt.Axes", samples: np.ndarray, reference: np.ndarray,
    centers: np.ndarray | None = None, title: str = "",
) -> None:
    """Generated samples over the target's evaluation sample (first two coordinates)."""
    finite = np.isfinite(samples).all(axis=1)
    ax.scatter(samples[finite, 0], samples[finite, 1], s=2, c="#1f77b4", alpha=0.6,
               label="generated", rasterized=True)
    # The target on top, small and dark: under the generated points it would not show.
    ax.scatter(reference[:, 0], reference[:, 1], s=1.5, c="#333333", alpha=0.5,
               label="target", rasterized=True, zorder=3)
    if centers is not None:
        ax.scatter(centers[:, 0], centers[:, 1], marker="x", c="#d62728", s=12,
                   linewidths=0.8, label="modes", zorder=4)
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
    fig, ax = _subplots(figsize=(4.5, 4.5))
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
    fig, axes = _subplots(rows, cols, figsize=(3 * cols, 3 * rows), squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.axis("off")
    for ax, (samples, reference, centers, title) in zip(axes.flat, panels):
        plot_samples(ax, samples, reference, centers, title)
    _save(fig, path)


def _tidy(fig: Any) -> bool:
    """Readable axes on Optuna's plots: log axes label their decades only (minor labels
    ran together), and a colour bar gets a column of its own beside the panels (laid out
    tightly, it overlapped the last one). True when the figure was laid out here."""
    from matplotlib.ticker import NullFormatter

    for ax in fig.axes:
        for axis in (ax.xaxis, ax.yaxis):
            if axis.get_scale() == "log":
                axis.set_minor_formatter(NullFormatter())
    bars = [ax for ax in fig.axes if ax.get_label() == "<colorbar>"]
    if not bars:
        return False
    fig.subplots_adjust(left=0.06, right=0.88, bottom=0.14, top=0.86, wspace=0.35)
    for i, cax in enumerate(bars):
        cax.set_position([0.91 + 0.04 * i, 0.14, 0.012, 0.72])
    return True


def _save(fig: "plt.Figure", path: str | os.PathLike, laid_out: bool = False) -> None:
    import warnings

    if not laid_out:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # colorbar axes cannot be laid out tightly
            fig.tight_layout()
    try:
        with atomic(path) as tmp:
            fig.savefig(tmp, dpi=110)
    finally:
        _close(fig)


# ---------------------------------------------------------------- trial tables
def trials_frame(trials: Sequence[Any], objectives: Sequence[tuple[str, str]],
                 pareto: Sequence[int] = ()) -> "pd.DataFrame":
    """One row per finished trial (COMPLETE, PRUNED, FAIL): COMPLETE trials first, best
    first by the objective, then the others by number.

    ``trials`` are Optuna FrozenTrials; ``objectives`` are (metric, direction) pairs.
    Columns: number, state, the objective values (COMPLETE trials only: a column named for
    a metric holds only that metric), the last intermediate value under its own name (e.g.
    ``last_sliced_w1``: what pruning followed), params (by their trainer names), every
    metric, the objective's spread over seeds, duration, failure reason, MLflow run id.
    """
    import pandas as pd

    last = f"last_{pruning_metric(objectives[0][0])}"
    rows = []
    for t in trials:
        state = t.state.name
        if state in ("RUNNING", "WAITING"):
            continue
        attrs = t.user_attrs
        row: dict[str, Any] = {"number": t.number, "state": state}
        for i, (metric, _) in enumerate(objectives):
            # Optuna stores a pruned trial's last intermediate value as its value: not ours.
            row[f"objective_{metric}"] = t.values[i] if state == "COMPLETE" else None
        if len(objectives) == 1:  # where a trial stopped short of its final score
            steps = sorted(t.intermediate_values)
            row[last] = (t.intermediate_values[steps[-1]] if steps and state != "COMPLETE"
                         else None)
        row |= {k: (v if not isinstance(v, list) else str(v)) for k, v in t.params.items()}
        metrics = attrs.get("metrics", {})
        row |= {m: metrics.get(m) for m in METRICS}
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
    frame["_order"] = (frame["state"] != "COMPLETE").astype(int)
    frame = frame.sort_values(["_order", f"objective_{metric}", "number"],
                              ascending=[True, direction == "minimize", True],
                              na_position="last", kind="stable")
    return frame.drop(columns="_order").reset_index(drop=True)


def study_frame(study: Any, objectives: Sequence[tuple[str, str]]) -> "pd.DataFrame":
    """:func:`trials_frame` of a study, with its Pareto front marked when multi-objective."""
    trials = study.get_trials(deepcopy=False)
    complete = any(t.state.name == "COMPLETE" for t in trials)
    pareto = ([t.number for t in study.best_trials]
              if len(objectives) > 1 and complete else [])
    return trials_frame(trials, objectives, pareto)


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
    """<folder>/leaderboard.csv and .md, written atomically."""
    out = Path(out_dir)
    atomic_write_text(out / "leaderboard.csv", frame.to_csv(index=False))
    atomic_write_text(out / "leaderboard.md", to_markdown(frame))
    return [out / "leaderboard.csv", out / "leaderboard.md"]


# ---------------------------------------------------------------- study report
def _figure(ax_or_axes) -> "plt.Figure":
    first = ax_or_axes.flat[0] if isinstance(ax_or_axes, np.ndarray) else ax_or_axes
    return first.figure


def study_plots(study: Any, objectives: Sequence[tuple[str, str]], params: Sequence[str],
                out: Path) -> dict[str, str]:
    """Optuna's matplotlib plots as PNGs; returns {file name: caption} of those written
    (a plot that needs more trials than the study has is skipped)."""
    import warnings

    import optuna.visualization.matplotlib as ov

    metric = objectives[0][0]
    multi = len(objectives) > 1
    target = (lambda t: t.values[0]) if multi else None
    name = metric
    plots: list[tuple[str, str, Any]] = [
        ("history.png", f"Optimization history ({name})",
         lambda: ov.plot_optimization_history(study, target=target, target_name=name)),
        ("importances.png", f"Parameter importances for {name} (fANOVA)",
         lambda: ov.plot_param_importances(study, target=target, target_name=name)),
        ("parallel.png", "Parallel coordinates of the search space",
         lambda: ov.plot_parallel_coordinate(study, params=list(params) or None, target=target,
                                             target_name=name)),
        ("slices.png", f"{name} against each parameter",
         lambda: ov.plot_slice(study, params=list(params) or None, target=target,
                               target_name=name)),
        ("intermediate.png", f"Intermediate values: {pruning_metric(metric)} at each "
         "evaluation (what pruning follows)", lambda: _labelled(
             ov.plot_intermediate_values(study), pruning_metric(metric))),
    ]
    if multi:
        plots.insert(0, ("pareto.png", "Pareto front",
                         lambda: ov.plot_pareto_front(
                             study, target_names=[m for m, _ in objectives])))
        plots = [p for p in plots if p[0] != "intermediate.png"]
    written = {}
    for filename, caption, make in plots:
        try:
            # Optuna's plots switch the global matplotlib style: keep it to this figure.
            with warnings.catch_warnings(), matplotlib.rc_context():
                warnings.simplefilter("ignore")
                fig = _figure(make())
        except Exception:  # too few trials or no varying parameter: skip this plot
            _close()
            continue
        if not fig.axes or not any(ax.has_data() for ax in fig.axes):
            _close(fig)
            continue
        if filename != "slices.png":
            fig.set_size_inches(8, 5)
        _save(fig, out / filename, laid_out=_tidy(fig))
        written[filename] = caption
    return written


def _labelled(ax: "plt.Axes", ylabel: str) -> "plt.Axes":
    ax.set_ylabel(ylabel)
    return ax


def best_samples_grid(study: Any, frame: "pd.DataFrame", out: Path, top: int = 8) -> bool:
    """Scatter grid of the best trials' generated samples over the target's."""
    ref = study.user_attrs.get("reference")
    if not ref or frame.empty:
        return False
    by_number = {t.number: t for t in study.get_trials(deepcopy=False)}
    panels = []
    for row in frame.itertuples(index=False):
        trial = by_number[row.number]
        if row.state != "COMPLETE" or "samples" not in trial.user_attrs:
            continue
        metrics = trial.user_attrs.get("metrics", {})
        title = f"#{row.number}  " + "  ".join(
            f"{k} {metrics[k]:.3g}" for k in ("w1", "modes") if k in metrics)
        panels.append((np.array(trial.user_attrs["samples"]), np.array(ref["points"]),
                       None if ref["centers"] is None else np.array(ref["centers"]), title))
        if len(panels) == top:
            break
    if not panels:
        return False
    save_samples_grid(out / "samples.png", panels)
    return True


HTML = """<!doctype html>
<html><head><meta charset="utf-8"><title>{title}</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}}
table{{border-collapse:collapse;font-size:13px;max-width:100%}}td,th{{border:1px solid #ccc;
padding:3px 6px;text-align:right;vertical-align:top}}
img{{max-width:100%;border:1px solid #eee;margin:6px 0}}
figcaption{{color:#555;font-size:13px}}</style></head>
<body><h1>{title}</h1><p>{summary}</p>{body}</body></html>
"""


def html_page(title: str, summary: str, sections: Sequence[tuple[str, str]]) -> str:
    """A self-contained page (images by relative path) readable offline. ``title``,
    ``summary`` and the headings are text (escaped here); each section's content is HTML
    whose own text its builder escaped."""
    body = "".join(f"<h2>{html.escape(h)}</h2>\n{content}\n" for h, content in sections)
    return HTML.format(title=html.escape(title), summary=html.escape(summary), body=body)


def figure(path: str, caption: str) -> str:
    """An image with its caption as alternative text, both escaped."""
    return f"<figure><img src='{html.escape(path, quote=True)}' " \
           f"alt='{html.escape(caption, quote=True)}'></figure>"


def write_study_report(study: Any, objectives: Sequence[tuple[str, str]],
                       params: Sequence[str], out_dir: str | os.PathLike,
                       total: int | None = None, rebuild: str = "") -> list[Path]:
    """A study's report folder (runs/<name>/report/ or --out): leaderboard.csv/.md, plots,
    samples grid, provenance.json (the runs
    recorded in the study) and index.html; ``rebuild`` is the command that remakes it."""
    out = Path(out_dir)
    multi = len(objectives) > 1
    frame = study_frame(study, objectives)
    if frame.empty:
        from ganbench.errors import GanbenchError

        raise GanbenchError(f"study {study.study_name!r} has no finished trials to report")
    files = write_leaderboard(frame, out)
    plots = study_plots(study, objectives, params, out)
    if best_samples_grid(study, frame, out):
        plots["samples.png"] = "Generated samples (blue) and the target's (dark grey, on top) "\
            "of the best trials"
    counts = frame["state"].value_counts().to_dict()
    summary = ", ".join(f"{n} {s.lower()}" for s, n in counts.items())
    label = ", ".join(f"{m} ({'lower' if d == 'minimize' else 'higher'} is better)"
                      for m, d in objectives)
    shown = frame.drop(columns=["mlflow_run_id"]).head(30)
    table = shown.to_html(index=False, float_format=lambda v: f"{v:.4g}", na_rep="")
    sections = [("Leaderboard" + (" (Pareto front marked)" if multi else ""),
                 f"<p>Objective: {html.escape(label)}. Full table: "
                 f"<a href='leaderboard.csv'>leaderboard.csv</a>.</p>{table}")]
    sections += [(caption, figure(f, caption)) for f, caption in plots.items()]
    runs = study.user_attrs.get("provenance", [])
    write_json(out / "provenance.json", {"study": study.study_name, "runs": runs})
    sections.append(("How this was made", provenance_html(runs, rebuild)))
    files.append(out / "provenance.json")
    title = f"Study {study.study_name}"
    if total is not None:
        summary += f" (of {total} planned)"
    atomic_write_text(out / "index.html", html_page(title, f"Trials: {summary}.", sections))
    return files + [out / f for f in plots] + [out / "index.html"]


# ---------------------------------------------------------------- provenance
def provenance_html(runs: Sequence[dict[str, Any]], rebuild: str, selected: str = "") -> str:
    """How the report was made: each recorded run's command line, code, libraries, machine,
    workers and wall time, the sampler seeds, and how to rebuild and re-check it."""
    esc = html.escape
    parts = []
    for i, r in enumerate(runs):
        libs = ", ".join(f"{k} {v}" for k, v in r.get("libraries", {}).items() if v)
        dirty = {True: " (with uncommitted changes)", False: "", None: ""}[r.get("dirty")]
        wall = (f"{r['wall_seconds']:.0f} s" if r.get("wall_seconds") is not None
                else "did not finish (interrupted; a later run resumed it)")
        seeds = r.get("sampler_seeds", {})
        shown = ", ".join(f"{k}: {v}" for k, v in list(seeds.items())[:40])
        parts.append(
            f"<p><b>Run {i + 1}</b>: <code>{esc(r.get('command') or '(called from Python)')}"
            f"</code><br>ganbench {esc(str(r.get('ganbench')))}, commit "
            f"<code>{esc(str(r.get('commit')))}</code>{esc(dirty)}; Python "
            f"{esc(str(r.get('python')))}; {esc(libs)}<br>{esc(str(r.get('cpu')))}, "
            f"{esc(str(r.get('cores')))} cores, {esc(str(r.get('platform')))}; "
            f"{esc(str(r.get('workers')))} worker(s) on "
            f"{esc(', '.join(r.get('devices', [])))}, {esc(str(r.get('torch_threads')))} "
            f"torch thread(s) each; started {esc(str(r.get('started')))}, wall {esc(wall)}"
            f"<br>Sampler seeds ({esc(r.get('seed_rule', ''))}): {esc(shown)}</p>")
    if not parts:
        parts.append("<p>No run recorded its provenance (made before ganbench recorded it).</p>")
    parts.append(selected)
    parts.append(f"<p>Machine-readable: <a href='provenance.json'>provenance.json</a> (the spec "
                 "as run, with every override). Rebuild this page without training: "
                 f"<code>{esc(rebuild)}</code> (from the committed "
                 "<a href='storage.json.gz'>storage.json.gz</a> where the study's storage is "
                 "absent). Re-train a subset of its runs and check every metric: "
                 "<code>ganbench verify &lt;this folder&gt;</code>.</p>")
    return "\n".join(parts)


# ---------------------------------------------------------------- comparisons
ALPHA = 0.05  # the level every family is tested at (as ganbench.compare)


def _g(value: float, digits: int = 3) -> str:
    """A number for a table: '—' when missing, '∞' / '-∞' when infinite."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    if isinstance(value, float) and math.isinf(value):
        return "∞" if value > 0 else "-∞"
    return f"{value:.{digits}g}"


def summary(r: Any, se_only: bool = False) -> str:
    """A stats row as 'mean ± std (± s.e.)' ('mean ± s.e.' with ``se_only``); where some
    runs are infinite (a kl without any high-quality sample), how many, and the median."""
    if r["n_inf"]:
        return f"inf in {int(r['n_inf'])}/{int(r['n'])} runs, median {_g(r['median'])}"
    if se_only:
        return f"{_g(r['mean'])} ± {_g(r['se'], 2)}"
    return f"{_g(r['mean'])} ± {_g(r['std'], 2)} (± {_g(r['se'], 2)})"


def _few_hq(r: Any, pair: bool = False) -> str:
    """The warning of a modes or kl value (``pair``: a contrast, either arm) read from too
    few high-quality samples."""
    flagged, least = (r.get("pair_few_hq"), r.get("pair_hq_min")) if pair else (
        r.get("few_hq"), r.get("hq_min"))
    if flagged != flagged or not bool(flagged) or least != least:
        return ""
    return f" ⚠ HQ {int(least)} < {int(r['hq_needed'])}"


def contrast_text(r: Any) -> tuple[str, str]:
    """A contrast cell as text and its mark where it is significant as its family is
    controlled: '**' (confirmatory) or '†' (exploratory), else ''."""
    if r["p_value"] != r["p_value"]:  # not tested: some runs have no value
        return str(r.get("test", "not tested")), ""
    if r["shift"] != r["shift"]:  # undefined (inf − inf in both arms)
        text = f"Δ undefined p={_g(r['p_value'], 2)} adj={_g(r['p_adj'], 2)}{_few_hq(r, True)}"
        return text, ""
    floor = r.get("min_p_adj", 0.0)
    if floor == floor and floor > ALPHA:
        # The design cannot reach significance: an interval here would look decisive
        # without being so; the cell says why instead.
        text = (f"Δ {_g(r['shift'])} (no CI: adj. p ≥ {_g(floor, 2)} here) "
                f"p={_g(r['p_value'], 2)} adj={_g(r['p_adj'], 2)}{_few_hq(r, True)}")
        return text, ""
    text = (f"Δ {_g(r['shift'])} [{_g(r['shift_low'])}, {_g(r['shift_high'])}] "
            f"p={_g(r['p_value'], 2)} adj={_g(r['p_adj'], 2)}{_few_hq(r, True)}")
    if bool(r.get("significant")):
        return text, "**" if r["family"] == "confirmatory" else "†"
    return text, ""


def contrast_cells(sub: "pd.DataFrame", metrics: Sequence[str]
                   ) -> list[tuple[str, str, Any, list[Any]]]:
    """The contrasts of one target's statistics ``sub``: (arm, reference, its first row,
    its row per metric or None), in the table's order."""
    out = []
    tests = sub[sub["p_value"].notna()]
    for (arm, ref), rows in tests.groupby(["arm", "reference"], sort=False):
        cells = [rows[rows["metric"] == m].iloc[0] if (rows["metric"] == m).any() else None
                 for m in metrics]
        out.append((arm, ref, rows.iloc[0], cells))
    return out


def compare_markdown(table: "pd.DataFrame", arms: "pd.DataFrame", baseline: str,
                     power: str = "") -> str:
    """Per target: the arms' values per metric; every contrast with its shift, interval,
    p and adjusted p; the variance components; the tuning and training each arm used."""
    out = []
    for target, sub in table.groupby("target", sort=False):
        metrics = list(dict.fromkeys(sub["metric"]))
        head = " | ".join(f"{m} ({METRICS[m].arrow})" for m in metrics)
        values = [f"### {target}\n", f"| arm | {head} |", "|---|" + "---|" * len(metrics)]
        first = sub.drop_duplicates(["arm", "metric"])
        for arm, rows in first.groupby("arm", sort=False):
            by = {m: rows[rows["metric"] == m].iloc[0] for m in metrics
                  if (rows["metric"] == m).any()}
            name = f"{arm} (baseline)" if arm == baseline else arm
            values.append(f"| {name} | " + " | ".join(
                f"{summary(r, se_only=True)} #{int(r['rank'])}{_few_hq(r)}"
                for r in by.values()) + " |")
        untuned = arms[(arms["target"] == target) & arms["status"].str.startswith("untuned")]
        for row in untuned.drop_duplicates("arm").itertuples(index=False):
            values.append(f"| {row.arm} | {row.status}: left out of the tests |" +
                          " |" * (len(metrics) - 1))
        tests = contrast_cells(sub, metrics)
        effects = ["", f"| contrast | test | {head} |", "|---|---|" + "---|" * len(metrics)]
        for arm, ref, r0, hits in tests:
            cells = []
            for hit in hits:
                text, mark = contrast_text(hit) if hit is not None else ("", "")
                cells.append(f"**{text}**" if mark == "**" else f"{text} {mark}".strip())
            effects.append(f"| {arm} − {ref} | {r0['test']}, {int(r0['units'])} "
                           f"{r0['unit']}s each | " + " | ".join(cells) + " |")
        spread = ["", "Variance components (sd): between replicate means / between seeds "
                  "within a replicate", f"| arm | {head} |", "|---|" + "---|" * len(metrics)]
        for arm, rows in first.groupby("arm", sort=False):
            spread.append(f"| {arm} | " + " | ".join(
                f"{_g(r['sd_between'], 2) or '—'} / {_g(r['sd_within'], 2) or '—'}"
                for _, r in rows.iterrows()) + " |")
        out.append("\n".join(values + (effects if len(tests) else []) + spread) + "\n")
    compute = ["### compute per arm\n", "Tuning: counted trials, their G and D steps and "
               "training seconds; held-out: G and D steps of all seeds and the wall seconds "
               "they took (as populations); summed over replicates.\n", "| target | arm | "
               "status | tuning trials | tuning G steps | tuning D steps | tuning s | held-out "
               "G steps | held-out D steps | held-out wall s |",
               "|---|---|---|---|---|---|---|---|---|---|"]
    totals = arm_totals(arms)
    for r in totals.itertuples(index=False):
        compute.append(f"| {r.target} | {r.arm} | {r.status} | {r.tune_trials:g} | "
                       f"{r.tune_g_steps:g} | {r.tune_d_steps:g} | {r.tune_seconds:.0f} | "
                       f"{r.heldout_g_steps:g} | {r.heldout_d_steps:g} | "
                       f"{r.heldout_wall_seconds:.0f} |")
    return power + "\n\n" + "\n".join(out) + "\n" + "\n".join(compute) + "\n"


def arm_totals(arms: "pd.DataFrame") -> "pd.DataFrame":
    """Per (target, arm): its status(es) and the compute its replicates used, summed."""
    numeric = [c for c in arms.columns if c.startswith(("tune_", "heldout_"))]
    grouped = arms.groupby(["target", "arm"], sort=False)
    out = grouped[numeric].sum()
    out.insert(0, "status", grouped["status"].agg(lambda s: ", ".join(dict.fromkeys(s))))
    return out.reset_index()


def compare_boxplots(runs: "pd.DataFrame", metric: str, path: Path) -> None:
    """Box plot of one metric: one panel per target, one box per arm (points overlaid,
    coloured by tuning replicate)."""
    targets = list(dict.fromkeys(runs["target"]))
    fig, axes = _subplots(1, len(targets), figsize=(5.5 * len(targets), 3.8), squeeze=False)
    for ax, target in zip(axes[0], targets):
        sub = runs[runs["target"] == target]
        arms = list(dict.fromkeys(sub["arm"]))
        data = [sub.loc[sub["arm"] == a, metric].to_numpy(float) for a in arms]
        ax.boxplot([d[np.isfinite(d)] for d in data], tick_labels=arms)
        for i, a in enumerate(arms, start=1):
            rows = sub[sub["arm"] == a]
            vals = rows[metric].to_numpy(float)
            reps = rows["replicate"].to_numpy() if "replicate" in rows else np.zeros(len(rows))
            keep = np.isfinite(vals)
            ax.scatter(np.full(keep.sum(), i), vals[keep], s=10, c=reps[keep], cmap="tab10",
                       vmin=0, vmax=9, zorder=3)
        arrow = "lower" if METRICS[metric].direction == "minimize" else "higher"
        ax.set_title(f"{target}: {metric} ({arrow} is better)", fontsize=10)
        ax.tick_params(axis="x", rotation=35, labelsize=8)
    _save(fig, path)


def expected_best_plot(expected: "pd.DataFrame", metric: str, path: Path) -> None:
    """Expected best objective against the tuning budget, one panel per target, one line
    and ± 1 s.d. band per arm (Dodge et al. 2019)."""
    targets = list(dict.fromkeys(expected["target"]))
    fig, axes = _subplots(1, len(targets), figsize=(5.5 * len(targets), 3.8), squeeze=False)
    for ax, target in zip(axes[0], targets):
        sub = expected[expected["target"] == target]
        for arm, rows in sub.groupby("arm", sort=False):
            line, = ax.plot(rows["budget"], rows["mean"], marker="o", ms=3, label=arm)
            ax.fill_between(rows["budget"], rows["lo"], rows["hi"], alpha=0.15,
                            color=line.get_color())
        ax.set_xlabel("tuning trials (budget)")
        ax.set_ylabel(f"expected best {metric}")
        ax.set_title(target, fontsize=10)
        ax.legend(fontsize=7)
    _save(fig, path)


def compare_html(table: "pd.DataFrame", arms: "pd.DataFrame", baseline: str,
                 power: str = "") -> str:
    """The comparison's results as HTML: the design, then per target the arms' values, every
    contrast (bold and † as the legend states) and the variance components; then the
    compute each arm used."""
    esc = html.escape
    parts = [f"<p>{esc(p)}</p>" for p in power.split("\n\n") if p]
    for target, sub in table.groupby("target", sort=False):
        metrics = list(dict.fromkeys(sub["metric"]))
        head = "".join(f"<th>{esc(m)} {esc(METRICS[m].arrow)}</th>" for m in metrics)
        first = sub.drop_duplicates(["arm", "metric"])
        rows = []
        for arm, group in first.groupby("arm", sort=False):
            cells = "".join(
                f"<td>{esc(summary(r, se_only=True))} #{int(r['rank'])}"
                f"{esc(_few_hq(r))}</td>" for _, r in group.iterrows())
            name = f"{esc(arm)} (baseline)" if arm == baseline else esc(arm)
            rows.append(f"<tr><th>{name}</th>{cells}</tr>")
        untuned = arms[(arms["target"] == target) & arms["status"].str.startswith("untuned")]
        for row in untuned.drop_duplicates("arm").itertuples(index=False):
            rows.append(f"<tr><th>{esc(row.arm)}</th><td colspan='{len(metrics)}'>"
                        f"{esc(row.status)}: left out of the tests</td></tr>")
        contrasts = []
        for arm, ref, r0, hits in contrast_cells(sub, metrics):
            cells = []
            for hit in hits:
                text, mark = contrast_text(hit) if hit is not None else ("", "")
                cell = esc(text)
                cells.append(f"<td><strong>{cell}</strong></td>" if mark == "**" else
                             f"<td>{cell} {mark}</td>")
            contrasts.append(f"<tr><th>{esc(arm)} − {esc(ref)}<br><small>{esc(r0['test'])}, "
                             f"{int(r0['units'])} {esc(r0['unit'])}s each</small></th>"
                             f"{''.join(cells)}</tr>")
        spread = "".join(
            f"<tr><th>{esc(arm)}</th>" + "".join(
                f"<td>{esc(_g(r['sd_between'], 2) or '—')} / "
                f"{esc(_g(r['sd_within'], 2) or '—')}</td>" for _, r in group.iterrows())
            + "</tr>" for arm, group in first.groupby("arm", sort=False))
        parts.append(
            f"<h3>{esc(str(target))}</h3><p>Values: mean ± s.e. #rank.</p>"
            f"<table><tr><th>arm</th>{head}</tr>{''.join(rows)}</table>"
            + (f"<p>Contrasts (arm − reference):</p><table><tr><th>contrast</th>{head}</tr>"
               f"{''.join(contrasts)}</table>" if contrasts else "")
            + "<p>Variance components, sd between replicate means / between seeds within a "
            f"replicate:</p><table><tr><th>arm</th>{head}</tr>{spread}</table>")
    compute = arm_totals(arms).rename(columns=lambda c: c.replace("_", " "))
    parts.append("<h3>compute per arm</h3>" + compute.to_html(
        index=False, float_format=lambda v: f"{v:.4g}", na_rep=""))
    return "\n".join(parts)


def write_compare_report(runs: "pd.DataFrame", table: "pd.DataFrame", arms: "pd.DataFrame",
                         baseline: str, references: dict[str, Any],
                         samples: dict[tuple[str, str], Any], out_dir: str | os.PathLike,
                         title: str, power: str = "", tuning: "pd.DataFrame | None" = None,
                         provenance: dict[str, Any] | None = None,
                         expected: "pd.DataFrame | None" = None,
                         objective: str = "w1") -> list[Path]:
    """compare.csv / compare.md / runs.csv / tuning.csv / expected_best.csv, box plots, the
    expected-best curves, a sample grid, provenance.json and index.html, from the per-seed
    ``runs``, their statistics ``table``, the ``arms``' status, compute and selected
    parameters, every ``tuning`` trial and the ``expected`` best objective (of metric
    ``objective``) per budget (ganbench.compare computes them); ``power`` is the design's
    paragraph and ``provenance`` what ``provenance.json`` holds (``runs``: the recorded
    runs)."""
    out = Path(out_dir)
    atomic_write_text(out / "compare.csv", table.to_csv(index=False))
    markdown = compare_markdown(table, arms, baseline, power)
    atomic_write_text(out / "compare.md", markdown)
    atomic_write_text(out / "runs.csv", runs.to_csv(index=False))
    files = [out / "compare.csv", out / "compare.md", out / "runs.csv"]
    if tuning is not None:
        atomic_write_text(out / "tuning.csv", tuning.to_csv(index=False))
        files.append(out / "tuning.csv")
    figures = []
    if expected is not None and len(expected):
        atomic_write_text(out / "expected_best.csv", expected.to_csv(index=False))
        files.append(out / "expected_best.csv")
        expected_best_plot(expected, objective, out / "expected_best.png")
        figures.append(("expected_best.png", f"Expected best {objective} of k tuning trials "
                        "(Dodge et al. 2019: k draws with replacement from an arm's tuning "
                        "trials, all replicates pooled), ± 1 s.d.; "
                        "<a href='expected_best.csv'>expected_best.csv</a>"))
    if provenance is not None:
        write_json(out / "provenance.json", provenance)
        files.append(out / "provenance.json")
    for metric in table["metric"].unique():
        compare_boxplots(runs, metric, out / f"box_{metric}.png")
        figures.append((f"box_{metric}.png", f"{metric} over held-out runs (colour: tuning "
                        "replicate)"))
    targets = list(dict.fromkeys(runs["target"]))
    arms_frame, arms = arms, list(dict.fromkeys(runs["arm"]))
    panels = []
    for arm in arms:
        for target in targets:
            ref = references.get(target) or {}
            s = samples.get((target, arm))
            pts = np.array(s) if s else np.empty((0, 2))
            panels.append((pts, np.array(ref.get("points", np.empty((0, 2)))),
                           None if not ref.get("centers") else np.array(ref["centers"]),
                           f"{arm} · {target}"))
    if panels:
        save_samples_grid(out / "samples.png", panels, columns=len(targets))
        figures.append(("samples.png", "Generated samples of the first held-out seed: "
                        "one row per arm"))
    sections = [("Results", compare_html(table, arms_frame, baseline, power) +
                 "<p>Full table: <a href='compare.csv'>compare.csv</a>; per-run values: "
                 "<a href='runs.csv'>runs.csv</a>.</p>")]
    sections += [(caption.split(" (")[0].split(";")[0], figure(f, caption))
                 for f, caption in figures]
    if provenance is not None:
        columns = [c for c in ("target", "arm", "replicate", "status", "params")
                   if c in arms_frame]
        chosen = arms_frame[columns].to_html(index=False, na_rep="")
        sections.append(("How this was made", provenance_html(
            provenance.get("runs", []), provenance.get("rebuild", ""),
            "<p>Selected parameters of each arm and replicate (its best tuning trial, or "
            "its source's for a matched arm; every tuning trial is in "
            "<a href='tuning.csv'>tuning.csv</a>):</p>" + chosen)))
    atomic_write_text(out / "index.html", html_page(title, f"Baseline arm: {baseline}.",
                                                    sections))
    return files + [out / f for f, _ in figures] + [out / "index.html"]
