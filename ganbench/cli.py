"""The ``ganbench`` command: a thin layer over train, sweep, tracking and report."""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import signal
import sys
import traceback
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from ganbench.errors import GanbenchError

app = typer.Typer(
    help="Hyperparameter sweeps and benchmarks for GANs on synthetic targets.",
    no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
    rich_markup_mode=None,  # plain help: flags as flags, whole sentences, fast
)
console = Console(width=None if sys.stdout.isatty() else 120)


def _version(value: bool) -> None:
    if value:
        from ganbench import __version__

        print(f"ganbench {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks of errors."),
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                 help="Print the version and exit."),
) -> None:
    """Hyperparameter sweeps and benchmarks for GANs on synthetic targets."""


def _parse_hidden(value: str) -> int | list[int]:
    try:
        widths = [int(v) for v in value.split(",")]
    except ValueError:
        raise GanbenchError(
            f"--hidden: expected an int or comma-separated ints, got {value!r}") from None
    return widths[0] if len(widths) == 1 else widths


def _parse_params(items: list[str]) -> dict:
    import yaml

    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise GanbenchError(f"--target-param: expected KEY=VALUE, got {item!r}")
        out[key] = yaml.safe_load(value)
    return out


def _metrics_table(metrics: dict, title: str) -> Table:
    from ganbench.metrics import METRICS, format_value

    table = Table(title=title)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key in METRICS:
        if key in metrics:
            table.add_row(key, format_value(key, metrics[key]))
    return table


@app.command(
    "train", short_help='Train one GAN; write its metrics and a scatter of its samples.',
    epilog="Example: ganbench train --target grid --set tricks.r1.gamma=0.1 --out runs/one")
def train_cmd(
    ctx: typer.Context,
    target: str = typer.Option("ring", help="Target: ring, grid, spiral, swissroll, mog."),
    target_param: list[str] = typer.Option(
        [], "--target-param", "-p", metavar="KEY=VALUE",
        help="Target parameter, e.g. -p modes=25."),
    loss: str = typer.Option("nonsaturating", help="minimax, nonsaturating, wasserstein, "
                             "hinge, lsgan."),
    noise_dim: int = typer.Option(2, help="Dimension of the generator's noise."),
    hidden: str = typer.Option("128", help="Hidden width, or per-layer widths like 128,64."),
    depth: int = typer.Option(2, help="Hidden layers when --hidden is one width."),
    activation: str = typer.Option("relu", help="relu, leaky_relu, tanh, elu, gelu, silu."),
    optimizer: str = typer.Option("adam", help="adam, rmsprop or sgd."),
    lr_g: float = typer.Option(1e-3, help="Generator learning rate."),
    lr_d: float = typer.Option(1e-3, help="Discriminator learning rate."),
    d_steps: int = typer.Option(1, help="Discriminator steps per generator step."),
    batch_size: int = typer.Option(256, help="Batch size."),
    steps: int = typer.Option(2000, help="Generator steps."),
    eval_every: int = typer.Option(250, help="Steps between evaluations."),
    seed: int = typer.Option(0, help="Random seed (init, data, noise)."),
    device: str = typer.Option("auto", help="auto, cpu, cuda or cuda:N."),
    out: Path = typer.Option(Path("runs/train"), help="Output folder for metrics.json and "
                             "samples.png."),
    sets: list[str] = typer.Option([], "--set", metavar="KEY=VALUE", help="Any trainer "
                                   "field (YAML value), tricks included, e.g. --set "
                                   "lr_schedule=cosine --set tricks.gp.weight=10. Repeatable."),
    from_spec: Optional[Path] = typer.Option(None, "--from", metavar="SPEC", help="Start "
                                             "from a study's fixed values (and, with "
                                             "--trial, that trial's parameters)."),
    trial: Optional[int] = typer.Option(None, "--trial", metavar="N", help="With --from: "
                                        "the trial whose parameters to train again."),
) -> None:
    """Train one GAN and write DIR/metrics.json and DIR/samples.png.

    Options given on the command line win over --from's values; --set wins over both.
    """
    from ganbench.files import write_json
    from ganbench.report import save_samples_png
    from ganbench.targets import get_target
    from ganbench.train import train

    given = {"target": target, "target_params": _parse_params(target_param), "loss": loss,
             "noise_dim": noise_dim, "hidden": _parse_hidden(hidden), "depth": depth,
             "activation": activation, "optimizer": optimizer, "lr_g": lr_g, "lr_d": lr_d,
             "d_steps": d_steps, "batch_size": batch_size, "steps": steps,
             "eval_every": eval_every, "seed": seed, "device": device}
    if from_spec is not None:  # only what was typed overrides the study's values
        typed = {"target_params": "target_param"}
        given = {k: v for k, v in given.items() if ctx.get_parameter_source(
            typed.get(k, k)).name not in ("DEFAULT", "DEFAULT_MAP")}
    config = _train_config(given, sets, from_spec, trial)
    target, loss, seed, steps = config.target, config.loss, config.seed, config.steps
    tgt = get_target(target, **config.target_params)  # bad target params fail before training
    with _progress() as progress:
        task = progress.add_task("training", total=steps, info="")

        def on_step(step: int, d_loss: float, g_loss: float) -> None:
            progress.update(task, completed=step, info=f"D {d_loss:.3f}  G {g_loss:.3f}")

        result = train(config, on_step=on_step)
        progress.update(task, completed=result.steps)
    summary = result.summary()
    console.print(f"{target} · {loss} · seed {seed}: {result.status} after {result.steps} "
                  f"steps ({result.seconds:.1f} s)")
    console.print(_metrics_table(result.metrics, "final metrics"))
    if result.reason:
        console.print(f"[yellow]{result.reason}[/]")
    write_json(out / "metrics.json", summary)
    centers = None if tgt.centers is None else tgt.centers.numpy()
    save_samples_png(out / "samples.png", result.samples.numpy(), result.reference.numpy(),
                     centers, f"{target} · {loss} · seed {seed} · {result.steps} steps")
    console.print(f"wrote {out / 'metrics.json'} and {out / 'samples.png'}")


def _train_config(given: dict, sets: list[str], from_spec: Path | None,
                  trial: int | None):
    """The trainer config of ``ganbench train``: a study's fixed values and a trial's
    parameters (``--from``, ``--trial``), then the options given, then ``--set``."""
    from ganbench.config import TrainConfig
    from ganbench.spec import merge_params, parse_yaml

    values: dict = {}
    if trial is not None and from_spec is None:
        raise GanbenchError("--trial goes with --from SPEC (the study it belongs to)")
    if from_spec is not None:
        from ganbench.spec import load_spec

        spec = load_spec(from_spec)
        params: dict = {}
        if trial is not None:
            from ganbench.study import open_study

            trials = {t.number: t for t in open_study(spec, create=False).get_trials(
                deepcopy=False)}
            if trial not in trials or not trials[trial].params:
                raise GanbenchError(f"study {spec.name} has no trial {trial} with parameters")
            params = trials[trial].params
        values = merge_params(spec.fixed(), params)
    values |= given
    overrides = {}
    for item in sets:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise GanbenchError(f"--set: expected KEY=VALUE, got {item!r}")
        overrides[key] = parse_yaml(text, f"--set {key}") if text else None
    values = merge_params(values, overrides)
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        close = difflib.get_close_matches(unknown[0], known, n=1)
        hint = f"; did you mean `{close[0]}`?" if close else ""
        raise GanbenchError(f"--set {unknown[0]}: not a trainer field{hint}")
    return TrainConfig(**values).validate()


# ---------------------------------------------------------------- study commands
SpecArg = typer.Argument(..., help="Study YAML, e.g. studies/mog.yaml.", show_default=False,
                         metavar="SPEC")
SetOpt = typer.Option([], "--set", metavar="KEY=VALUE", help="Override a field: "
                      "dotted.key=value (YAML scalar). Repeatable.")
TrialsOpt = typer.Option(None, "--trials", metavar="N",
                         help="Total counted trials (spec: trials).")
StorageOpt = typer.Option(None, "--storage", metavar="URL", help="sqlite:///… or "
                          "postgresql://… (default: journal file runs/<name>/optuna.log).")
OutOpt = typer.Option(None, "--out", metavar="DIR", help="Report folder (default: "
                      "runs/<name>/report; the committed results are written with --out "
                      "reports/<name>).")
TrackingOpt = typer.Option(None, "--tracking-uri", metavar="URI", help="MLflow tracking URI "
                           "(default: sqlite:///mlflow.db).")


PopulationOpt = typer.Option(None, "--population", metavar="K", help="Train K members "
                             "(trials × seeds) at once as one batched population (spec: "
                             "execution).")
RayOpt = typer.Option(None, "--ray", metavar="ADDRESS", help="Run the workers as Ray "
                      "tasks on the cluster at ADDRESS (host:port, ray://…, auto); needs "
                      "the ray extra, a postgresql:// storage and an http:// MLflow server "
                      "(spec: execution.backend, execution.address).")
CompileOpt = typer.Option(False, "--compile", help="Compile populations' forwards with "
                          "torch.compile, once per bucket shape; pays only where fusing "
                          "element-wise work matters (spec: execution.compile).")


def _overrides(sets: list[str], **shortcuts) -> list[str]:
    """--set items plus the shortcut options given (as dotted.key=value overrides)."""
    out = list(sets)
    population = shortcuts.pop("population", None)
    if population is not None:
        out += ["execution.mode=population", f"execution.size={population}"]
    if shortcuts.pop("compile", False):
        out += ["execution.compile=true"]
    ray = shortcuts.pop("ray", None)
    if ray is not None:
        out += ["execution.backend=ray", f"execution.address={ray}"]
    out += [f"{key.replace('__', '.')}={value}" for key, value in shortcuts.items()
            if value is not None]
    return out


def _load(spec_path: Path, sets: list[str], **shortcuts):
    """Load a study with --set and the shortcut options applied, checked before anything runs."""
    from ganbench.spec import load_spec

    spec = load_spec(spec_path, _overrides(sets, **shortcuts))
    from ganbench.study import check_spec  # loads Optuna: after the spec is read

    check_spec(spec, str(spec_path))
    return spec


def _objective_label(spec) -> str:
    from ganbench.metrics import METRICS

    return ", ".join(f"{o.metric} {'↓' if o.direction == 'minimize' else '↑'}"
                     for o in spec.objectives if o.metric in METRICS)


def _leaderboard(spec, study, write: Path | None, top: int = 10) -> None:
    """Print the best trials (the Pareto front when multi-objective); with ``write`` (a
    folder), also its leaderboard.csv and .md."""
    from ganbench.metrics import METRICS
    from ganbench.report import study_frame, write_leaderboard

    objectives = [(o.metric, o.direction) for o in spec.objectives]
    frame = study_frame(study, objectives)
    if frame.empty:
        console.print("no finished trials yet")
        return
    pareto = "pareto" in frame
    shown = frame[frame["pareto"]] if pareto else frame[frame["state"] == "COMPLETE"].head(top)
    table = Table(title=("Pareto front" if pareto else "best trials") +
                  f" ({_objective_label(spec)})")
    cols = ["number"] + [f"objective_{m}" for m, _ in objectives] + list(spec.search) + [
        m for m in METRICS if f"objective_{m}" not in frame]
    cols = [c for c in dict.fromkeys(cols) if c in frame]
    for c in cols:
        table.add_column(c.removeprefix("objective_").replace("number", "#"), justify="right",
                         no_wrap=True)
    for row in shown[cols].itertuples(index=False):
        table.add_row(*[_fmt(v) for v in row])
    console.print(table)
    if write is not None:
        files = write_leaderboard(frame, write)
        console.print(f"wrote {files[0]} and {files[1]}")


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3g}"
    return "" if v is None else str(v)


def _finished_lines(trials, seen: set[int], spec) -> None:
    """One line per trial of ``trials`` finished since the last call: number, state, the
    metric its value is (a pruned trial's is the last value pruning saw, named so),
    duration (for logs, where a progress bar shows nothing until the end)."""
    from ganbench.accounting import count_trials
    from ganbench.metrics import pruning_metric

    names = [o.metric for o in spec.objectives]
    for t in trials:
        if t.number in seen or not t.state.is_finished():
            continue
        seen.add(t.number)
        took = (t.datetime_complete - t.datetime_start).total_seconds() \
            if t.datetime_complete and t.datetime_start else 0.0
        if t.state.name == "COMPLETE" and t.values:
            what = ", ".join(f"{n} {v:.4g}" for n, v in zip(names, t.values))
        elif t.state.name == "PRUNED" and t.values:
            step = max(t.intermediate_values, default="?")
            what = f"at step {step}: last {pruning_metric(names[0])} {t.values[0]:.4g}"
        else:
            what = t.user_attrs.get("fail_reason", "")
        console.print(f"trial {t.number} {t.state.name} {what} ({took:.1f} s) · "
                      f"{count_trials(trials)[0]}/{spec.trials} counted", highlight=False)


def _status_line(snap, metric: str) -> str:
    best = f"best {metric} {snap.best[0]:.4g}" if snap.best else "best –"
    running = ", ".join(f"#{t.number}@{t.user_attrs.get('device', '?')}" for t in snap.running)
    return f"{best}  running: {running or '–'}"


def _where(spec) -> str:
    """Where the workers run, when not on this machine."""
    ex = spec.execution
    return f" of the Ray cluster at {ex.address or 'auto'}" if ex.backend == "ray" else ""


def _devices(devices: str | None) -> list[str] | None:
    return devices.split(",") if devices else None


@app.command(
    "sweep", short_help='Search hyperparameters: run a study to its total of trials.',
    epilog="Example: ganbench sweep studies/mog.yaml --trials 8 --workers 2")
def sweep_cmd(
    spec_path: Path = SpecArg, sets: list[str] = SetOpt, trials: Optional[int] = TrialsOpt,
    workers: Optional[int] = typer.Option(None, "--workers", metavar="N", help="Worker "
                                          "processes (default: one per GPU, or one per CPU "
                                          "core)."),
    devices: Optional[str] = typer.Option(None, "--devices", metavar="LIST", help="Comma-"
                                          "separated devices, e.g. cuda:0,cuda:2 or cpu."),
    storage: Optional[str] = StorageOpt, tracking_uri: Optional[str] = TrackingOpt,
    population: Optional[int] = PopulationOpt, compile: bool = CompileOpt,
    out: Optional[Path] = OutOpt, ray: Optional[str] = RayOpt,
) -> None:
    """Search hyperparameters: run the study to its total of trials, then print the leaderboard.

    Rerunning continues where it stopped; raising --trials tops up.
    """
    spec = _load(spec_path, sets, trials=trials, storage=storage, tracking__uri=tracking_uri,
                 workers=workers, population=population, compile=compile, ray=ray)
    from ganbench.files import check_writable_folder
    from ganbench.study import report_dir
    from ganbench.sweep import plan_sweep, run_sweep

    folder = out or report_dir(spec)
    check_writable_folder(folder)  # before trials, not after
    plan = plan_sweep(spec, _devices(devices))
    how = (f"populations of {spec.execution.size} member(s)"
           if spec.execution.mode == "population" else "one trial at a time")
    if spec.execution.compile:
        how += (", compiled" if spec.execution.mode == "population" else
                " (execution.compile applies to populations: these train eagerly)")
    console.print(f"study [bold]{spec.name}[/] · {spec.target.name} · {_objective_label(spec)} · "
                  f"{spec.trials} trials · {len(plan.devices)} worker(s) on "
                  f"{', '.join(sorted(set(plan.devices)))}{_where(spec)} · {how}")
    seen = {t.number for t in plan.study.get_trials(deepcopy=False) if t.state.is_finished()}
    with _progress() as progress:
        task = progress.add_task("trials", total=spec.trials, info="")

        def on_poll(snap) -> None:
            progress.update(task, completed=min(snap.done, snap.total),
                            info=_status_line(snap, spec.objectives[0].metric))
            if not console.is_terminal:  # a log file: one line per finished trial instead
                _finished_lines(snap.trials, seen, spec)

        try:
            run_sweep(plan, on_poll, lambda line: console.print(line, highlight=False))
        except KeyboardInterrupt:
            progress.stop()
            _leaderboard(spec, plan.study, write=folder)
            console.print("[yellow]interrupted: running trials were marked; rerun the same "
                          "command to continue[/]")
            raise
    _leaderboard(spec, plan.study, write=folder)
    _mlflow_link(spec)


def _mlflow_link(spec) -> None:
    """Where the runs open in MLflow's UI (its runs table, not its GenAI view)."""
    if spec.tracking is False:
        return
    from ganbench.tracking import resolve_uri, runs_url

    found = runs_url(resolve_uri(spec.tracking.uri), spec.name)
    if found is not None:
        url, serve = found
        console.print(f"MLflow runs: {url}" + (f"  (after `{serve}`)" if serve else ""),
                      highlight=False, soft_wrap=True)


@app.command(
    "worker", short_help='Join a running study as one more worker (another machine, another GPU).',
    epilog="Example: ganbench worker studies/mog.yaml --storage postgresql://user@db/ganbench")
def worker_cmd(
    spec_path: Path = SpecArg, sets: list[str] = SetOpt, trials: Optional[int] = TrialsOpt,
    device: str = typer.Option("auto", "--device", help="Device of this worker."),
    storage: Optional[str] = StorageOpt, tracking_uri: Optional[str] = TrackingOpt,
    population: Optional[int] = PopulationOpt, compile: bool = CompileOpt,
) -> None:
    """Join a study as one worker (e.g. from another machine, with a shared --storage)."""
    spec = _load(spec_path, sets, trials=trials, storage=storage, tracking__uri=tracking_uri,
                 population=population, compile=compile)
    from ganbench.study import storage_label
    from ganbench.sweep import join_study

    def on_join(dev: str) -> None:
        console.print(f"worker on {dev} joined study [bold]{spec.name}[/] "
                      f"({storage_label(spec)})")

    def on_trial(o) -> None:
        vals = ", ".join(f"{v:.4g}" for v in o.values) if o.values else o.reason
        console.print(f"trial {o.number}: {o.state.name} {vals}")

    ran = join_study(spec, device, on_join, on_trial)
    console.print(f"worker done: ran {ran} trial(s)")


SAMPLE_FORMATS = (".csv", ".npy", ".png")


# What one `sample` call may draw: 10 million samples, about 2 GB of activations.
MAX_SAMPLES = 10**7
MAX_SAMPLE_VALUES = 2.5e8


@app.command(
    "sample", short_help='Draw samples from a trained generator.',
    epilog="Example: ganbench sample studies/mog.yaml --n 5000 --out runs/mog/samples.png")
def sample_cmd(
    source: str = typer.Argument(..., metavar="SOURCE", help="An MLflow run id, a study "
                                 "file or a generator checkpoint (.pt).",
                                 show_default=False),
    trial: Optional[int] = typer.Option(None, "--trial", metavar="N", help="Trial number "
                                        "of the study (default: its best trial)."),
    n: int = typer.Option(1000, "--n", min=1, max=MAX_SAMPLES, help="Samples to draw."),
    seed: int = typer.Option(0, "--seed", min=0, max=2**63 - 1, help="Seed of the noise."),
    out: Optional[Path] = typer.Option(None, "--out", help="Write the samples: .csv, .npy, "
                                       "or .png (a scatter over the target)."),
    metrics: bool = typer.Option(False, "--metrics", help="Recompute the trial's final "
                                 "metrics from the reloaded generator."),
    sets: list[str] = SetOpt, storage: Optional[str] = StorageOpt,
    tracking_uri: Optional[str] = TrackingOpt,
) -> None:
    """Draw samples from a trained generator (a completed trial's, kept by every sweep)."""
    import tempfile

    from ganbench.errors import GanbenchError

    if out is not None:  # a bad destination fails before anything is loaded
        if out.suffix.lower() not in SAMPLE_FORMATS:
            raise GanbenchError(f"--out {out}: expected a {', '.join(SAMPLE_FORMATS)} file")
        if out.is_dir():
            raise GanbenchError(f"--out {out}: is a folder; expected a file name in it")
        parent = out.resolve().parent
        if not parent.is_dir() or not os.access(parent, os.W_OK):
            raise GanbenchError(f"--out {out}: folder {parent} does not exist or is not "
                                "writable")
    import numpy as np

    with tempfile.TemporaryDirectory() as tmp:
        path = _generator_file(source, trial, sets, storage, tracking_uri, Path(tmp))
        from ganbench.train import load_checkpoint, rescore, sample_generator

        config, g, data = load_checkpoint(path)
    width = max(config.noise_dim, *config.widths("g"))  # the widest layer's activations
    if n * width > MAX_SAMPLE_VALUES:
        raise GanbenchError(f"--n {n}: {n} samples through layers {width} wide exceed "
                            f"{MAX_SAMPLE_VALUES:.1e} values in memory; draw fewer")
    label = f"trial {data['trial']} of {data['study']}" if "trial" in data else str(source)
    x = sample_generator(config, g, n, seed).numpy()
    console.print(f"{label}: {n} samples of {config.target} (seed {seed}), mean "
                  f"{np.array2string(x.mean(0), precision=3)}")
    if metrics:
        again = rescore(config, g)
        console.print(_metrics_table(again, "metrics recomputed from the saved generator"))
        logged = {k: v for k, v in data["metrics"].items() if k in again}
        gap = max((abs(again[k] - v) / max(abs(v), 1e-12) for k, v in logged.items()
                   if math.isfinite(v) and again[k] != v), default=0.0)
        console.print(
            "identical to the metrics the run logged" if all(
                again[k] == v for k, v in logged.items()) else
            f"equal to the metrics the run logged up to float rounding (relative {gap:.1g}: "
            "it trained in a population's batched products)" if gap < 1e-5 else
            "[yellow]differs from the metrics the run logged (another device or library "
            "version?)[/]")
    if out is not None:
        _write_samples(out, x, config)
        console.print(f"wrote {out}")


def _generator_file(source: str, trial: int | None, sets: list[str], storage: str | None,
                    tracking_uri: str | None, tmp: Path) -> Path:
    """The checkpoint file ``source`` names: a .pt file, a study's trial (kept beside the
    study, or in its MLflow run), or an MLflow run id."""
    from ganbench.errors import GanbenchError
    from ganbench.tracking import download_generator, resolve_uri

    path = Path(source)
    if path.suffix == ".pt":
        if not path.is_file():
            raise GanbenchError(f"{source}: no such checkpoint file")
        return path
    if path.suffix in (".yaml", ".yml"):
        from ganbench.spec import load_spec
        from ganbench.study import open_study

        spec = load_spec(path, _overrides(sets, storage=storage, tracking__uri=tracking_uri))
        study = open_study(spec, create=False)
        trials = {t.number: t for t in study.get_trials(deepcopy=False)}
        if trial is None:  # the study's best trial, whatever number it drew
            complete = [t for t in trials.values() if t.state.name == "COMPLETE"]
            if spec.multi_objective or not complete:
                raise GanbenchError(f"{source}: name a trial with --trial N (the study has "
                                    f"{'a Pareto front' if complete else 'no completed trial'}"
                                    ")")
            pick = min if spec.directions[0] == "minimize" else max
            trial = pick(complete, key=lambda t: t.values[0]).number
        if trial not in trials:
            raise GanbenchError(f"study {spec.name} has no trial {trial} (it has "
                                f"{len(trials)}: 0–{len(trials) - 1})")
        t = trials[trial]
        if t.state.name != "COMPLETE":
            raise GanbenchError(f"trial {trial} of {spec.name} is {t.state.name}: only "
                                "completed trials keep a generator")
        kept = t.user_attrs.get("checkpoint")
        if kept and Path(kept).is_file():
            return Path(kept)
        if "mlflow_run_id" not in t.user_attrs or spec.tracking is False:
            raise GanbenchError(f"trial {trial} of {spec.name} kept no generator (trained "
                                "before generators were kept, or its file was removed)")
        return download_generator(resolve_uri(spec.tracking.uri), t.user_attrs["mlflow_run_id"],
                                  tmp)
    if trial is not None:
        raise GanbenchError("--trial goes with a study file, not an MLflow run id")
    return download_generator(resolve_uri(tracking_uri), source, tmp)


def _write_samples(out: Path, x, config) -> None:
    """Samples ``x`` (a numpy array) to .csv / .npy / .png, whole or not at all."""
    import numpy as np

    from ganbench.files import atomic

    suffix = out.suffix.lower()
    with atomic(out) as tmp:
        if suffix == ".csv":
            header = ",".join(f"x{i}" for i in range(x.shape[1]))
            np.savetxt(tmp, x, delimiter=",", header=header, comments="")
        elif suffix == ".npy":
            with open(tmp, "wb") as fh:
                np.save(fh, x)
        else:
            import torch

            from ganbench.report import save_samples_png
            from ganbench.targets import get_target

            target = get_target(config.target, **config.target_params)
            reference = target.sample(2000, torch.Generator().manual_seed(config.eval_seed))
            save_samples_png(tmp, x, reference.numpy(),
                             None if target.centers is None else target.centers.numpy(),
                             f"{config.target}: generated (blue) over target (grey)")


@app.command(
    "status", short_help="Show a study's or comparison's progress and best trials.",
    epilog="Example: ganbench status studies/mog.yaml")
def status_cmd(
    spec_path: Path = SpecArg, sets: list[str] = SetOpt, storage: Optional[str] = StorageOpt,
) -> None:
    """Counts of trials by state and the best trials, read from the storage (a comparison:
    each arm's progress). Writes nothing."""
    from ganbench.spec import CompareSpec, load_any

    spec = load_any(spec_path, _overrides(sets, storage=storage))
    if isinstance(spec, CompareSpec):
        _compare_status(spec)
        return
    from ganbench.accounting import count_trials
    from ganbench.study import open_study, storage_label

    study = open_study(spec, create=False)
    trials = study.get_trials(deepcopy=False)
    done, _ = count_trials(trials)
    total = spec.trials
    given = any(item.partition("=")[0] == "trials" for item in sets)
    runs = study.user_attrs.get("provenance", [])
    if not given and runs and isinstance(runs[-1].get("spec", {}).get("trials"), int):
        total = runs[-1]["spec"]["trials"]  # what the last sweep ran to (its --trials)
    console.print(f"storage: {storage_label(spec)}")
    if spec.storage is None:
        from rich.markup import escape

        from ganbench.study import journal_notes, journal_path

        for note in journal_notes(journal_path(spec)):
            console.print(f"[yellow]{escape(note)}[/]")
    from ganbench.accounting import is_counted

    table = Table(title=f"study {spec.name}: {done}/{total} counted trials")
    table.add_column("state")
    table.add_column("trials", justify="right")
    table.add_column("counted", justify="right")
    for state in ("COMPLETE", "PRUNED", "FAIL", "RUNNING", "WAITING"):
        of_state = [t for t in trials if t.state.name == state]
        if of_state:
            counted = sum(1 for t in of_state if is_counted(t))
            table.add_row(state, str(len(of_state)), str(counted))
    console.print(table)
    console.print("counted: COMPLETE, PRUNED, and FAIL by the trial's own fault (a lost "
                  "worker's, an interrupted or a surplus trial is re-run or dropped)",
                  highlight=False)
    _leaderboard(spec, study, write=None)


@app.command(
    "repair", short_help='Repair the journal of a study that a crash or a full disk damaged.',
    epilog="Example: ganbench repair studies/mog.yaml")
def repair_cmd(
    spec_path: Path = SpecArg, sets: list[str] = SetOpt,
) -> None:
    """Repair the journal of a study (or of every study of a comparison) that a crash or a
    full disk damaged: keep its records before the first damaged one and set the rest
    aside; the original file is kept beside it. Finished trials set aside run again."""
    from ganbench.spec import CompareSpec, load_any
    from ganbench.study import journal_path, repair_journal

    spec = load_any(spec_path, _overrides(sets))
    if spec.storage is not None:
        raise GanbenchError(f"{spec_path}: storage {spec.storage.split(':', 1)[0]}: a database "
                            "keeps its own records whole; repair mends journal files only")
    studies = [spec] if not isinstance(spec, CompareSpec) else [
        spec.arm_study(t, a, r) for t in spec.targets for a in spec.arms
        for r in spec.replicates]
    found = 0
    for study in studies:
        path = journal_path(study)
        if not path.exists():
            continue
        found += 1
        done = repair_journal(path)
        if done.original is None:
            console.print(f"{path}: {done.kept} records, none damaged")
            continue
        console.print(f"{path}: kept {done.kept} records, set aside {done.dropped} from the "
                      f"first damaged one ({done.finished_dropped} finished trials among them "
                      f"will run again); the original is kept in {done.original.name}",
                      soft_wrap=True)
    if not found:
        raise GanbenchError(f"{spec_path}: no journal found under runs/ (nothing to repair)")


def _compare_status(spec) -> None:
    from ganbench.compare import progress

    table = Table(title=f"comparison {spec.name}: " + (
        "fixed configurations" if spec.mode == "fixed" else
        f"tune, budget {spec.budget.label()} per arm"))
    columns = ["target", "arm"] + (["replicate"] if spec.tuning_replicates > 1 else [])
    for col in columns + ["tuning", "held-out seeds"]:
        table.add_column(col, justify="left" if col in ("target", "arm") else "right")
    for p in progress(spec):
        table.add_row(p.target, p.arm, *([str(p.replicate)] if len(columns) > 2 else []),
                      p.tuning, f"{p.heldout}/{p.seeds}")
    console.print(table)


@app.command(
    "report", short_help='Write the tables and plots of a study or comparison.',
    epilog="Example: ganbench report studies/mog.yaml --out reports/mog")
def report_cmd(
    spec_path: Path = SpecArg, sets: list[str] = SetOpt, storage: Optional[str] = StorageOpt,
    out: Optional[Path] = OutOpt,
    quick: bool = typer.Option(False, "--quick", help="The report of `compare --quick`."),
) -> None:
    """Write tables and plots of a study or a comparison from its storage:
    runs/<name>/report/index.html, or --out DIR. Without the storage (a fresh clone), from
    the export in that folder or the committed reports/<name>/storage.json.gz."""
    from ganbench.spec import CompareSpec, load_any, quick_overrides

    spec = load_any(spec_path, (quick_overrides(spec_path) if quick else []) +
                    _overrides(sets, storage=storage))
    from ganbench.files import check_writable_folder
    from ganbench.study import (
        COMMITTED,
        EXPORT,
        export_studies,
        import_studies,
        report_dir,
        stored_storage,
    )

    folder = out or report_dir(spec)
    check_writable_folder(folder)
    exported = next((f for f in (folder / EXPORT, COMMITTED / spec.name / EXPORT)
                     if f.is_file()), COMMITTED / spec.name / EXPORT)
    source = None  # the spec's own storage
    if stored_storage(spec) is None:
        if not exported.is_file():
            kind, command = ("comparison", "compare") if isinstance(spec, CompareSpec) \
                else ("study", "sweep")
            raise GanbenchError(f"{kind} {spec.name!r} has not run; run `ganbench {command}` "
                                f"first (nor is there a {exported} to rebuild from)")
        console.print(f"no storage for {spec.name}: rebuilding from {exported}")
        source = import_studies(exported)
    if isinstance(spec, CompareSpec):
        from ganbench.compare import rebuild

        files = rebuild(spec, out, source).files
    else:
        from ganbench import provenance
        from ganbench.report import write_study_report
        from ganbench.study import open_study

        study = open_study(spec, storage=source, create=False)
        files = write_study_report(
            study, [(o.metric, o.direction) for o in spec.objectives], list(spec.search),
            folder, spec.trials,
            provenance.report_command(study.user_attrs.get("provenance", []), out))
        files.append(export_studies([study], folder / EXPORT,
                                    lambda key, value: None if key == "checkpoint" else value))
    for f in files:
        console.print(f"wrote {f}")


@app.command(
    "verify", short_help='Re-train runs of a committed report and check them bit for bit.',
    epilog="Example: ganbench verify reports/tricks --runs 2")
def verify_cmd(
    report_dir: Path = typer.Argument(..., metavar="REPORT_DIR",
                                      help="A report folder, e.g. reports/tricks.",
                                      show_default=False),
    runs: int = typer.Option(4, "--runs", min=1, help="Runs to re-train: held-out runs "
                             "spread over arms and seeds, or a study's best trials."),
    all_runs: bool = typer.Option(False, "--all", help="Re-train every run."),
) -> None:
    """Re-train runs of a committed report from its provenance and check every metric
    against the committed value, bit for bit; exit 1 naming each mismatch."""
    from ganbench.verify import load_provenance, verify

    load_provenance(report_dir)  # a report that cannot be checked: one line, before anything
    bad = []

    def on_run(check) -> None:
        if check.mismatches:
            bad.append(check)
            diffs = "; ".join(f"{m}: committed {check.values[m][0]!r}, re-trained "
                              f"{check.values[m][1]!r}" for m in check.mismatches)
            console.print(f"[red]MISMATCH[/] {check.run}: {diffs}", highlight=False)
        else:
            console.print(f"ok {check.run}: {len(check.values)} metrics equal "
                          f"({', '.join(f'{m} {v[0]:.6g}' for m, v in check.values.items())})",
                          highlight=False)

    console.print(f"verifying {report_dir}: re-training "
                  f"{'every run' if all_runs else f'up to {runs} run(s)'} on this CPU")
    checks = verify(report_dir, None if all_runs else runs, on_run)
    if bad:
        console.print(f"[red]{len(bad)} of {len(checks)} run(s) differ from the committed "
                      "values[/]")
        raise typer.Exit(1)
    console.print(f"all {len(checks)} re-trained run(s) equal the committed values, bit for "
                  "bit")


@app.command(
    "compare", short_help='Compare stability tricks budget-fairly, over tunings and seeds.',
    epilog="Example: ganbench compare studies/tricks.yaml --quick")
def compare_cmd(
    spec_path: Path = typer.Argument(..., metavar="SPEC",
                                     help="Comparison YAML, e.g. studies/tricks.yaml.",
                                     show_default=False),
    quick: bool = typer.Option(False, "--quick", help="Smoke-sized run of the same pipeline "
                               "(2 trials per arm, 2 seeds, 200 steps), as <name>-quick."),
    sets: list[str] = SetOpt,
    workers: Optional[int] = typer.Option(None, "--workers", metavar="N",
                                          help="Worker processes."),
    devices: Optional[str] = typer.Option(None, "--devices", metavar="LIST",
                                          help="Comma-separated devices."),
    storage: Optional[str] = StorageOpt, tracking_uri: Optional[str] = TrackingOpt,
    compile: bool = CompileOpt, out: Optional[Path] = OutOpt, ray: Optional[str] = RayOpt,
) -> None:
    """Compare arms (loss + tricks) budget-fairly: tune each with the same budget in every
    tuning replicate, retrain each selection on held-out seeds, test the contrasts (every
    arm against the baseline by default) with exact tests and declared families."""
    from rich.markup import escape

    from ganbench.report import contrast_cells, contrast_text, summary
    from ganbench.spec import load_compare, quick_overrides

    overrides = quick_overrides(spec_path) if quick else []
    spec = load_compare(spec_path, overrides + _overrides(
        sets, storage=storage, tracking__uri=tracking_uri, workers=workers, compile=compile,
        ray=ray))
    from ganbench import compare
    from ganbench.files import check_writable_folder
    from ganbench.study import report_dir

    check_writable_folder(out or report_dir(spec))  # before training, not after

    from ganbench.cluster import plan_workers

    device_list = plan_workers(spec, _devices(devices))
    n = len(spec.targets) * len(spec.arms) * spec.tuning_replicates
    console.print(f"comparison [bold]{spec.name}[/] · {len(spec.arms)} arms × "
                  f"{len(spec.targets)} target(s) · "
                  + ("fixed configurations" if spec.mode == "fixed" else
                     f"tune: budget {spec.budget.label()} per arm")
                  + f" · {spec.eval_seeds} held-out seeds · {len(device_list)} worker(s)"
                  + _where(spec))
    # Each arm: a line per tuning batch, the tuning's end, held-out runs, their end.
    batches = -(-(spec.budget.trials or 0) // spec.batch) if spec.mode == "tune" else 0
    step = iter(range(1, (3 + batches) * n + 1))
    result = compare.run(spec, device_list,
                         lambda msg: console.print(f"[{next(step, '…')}] {msg}"), out)
    units = (f"{spec.tuning_replicates} replicate means" if spec.tuning_replicates > 1
             else f"{spec.eval_seeds} held-out seeds")
    for target, sub in result.table.groupby("target", sort=False):
        metrics = list(dict.fromkeys(sub["metric"]))
        t = Table(title=escape(f"{target}: mean ± s.e. over {units}; contrasts: Δ [exact "
                               "95% CI] p, adjusted p (bold: significant as its family is "
                               "controlled)"))
        t.add_column("arm")
        for m in metrics:
            t.add_column(m, justify="right")
        first = sub.drop_duplicates(["arm", "metric"])
        for arm, g in first.groupby("arm", sort=False):
            t.add_row(arm, *[summary(r, se_only=True) + ("[yellow]⚠[/]" if r["few_hq"] else "")
                             for _, r in g.iterrows()])
        arms = result.arms[result.arms["target"] == target]
        untuned = arms[arms["status"].str.startswith("untuned")].drop_duplicates("arm")
        for row in untuned.itertuples(index=False):
            t.add_row(row.arm, f"{row.status}: left out of the tests",
                      *[""] * (len(metrics) - 1))
        for arm, ref, _, hits in contrast_cells(sub, metrics):
            cells = [contrast_text(r) if r is not None else ("", "") for r in hits]
            t.add_row(f"{arm} − {ref}", *[f"[bold]{escape(text)}[/]" if mark == "**" else
                                          escape(f"{text} {mark}".strip())
                                          for text, mark in cells])
        console.print(t)
    for line in result.design():
        console.print(f"[yellow]{line}[/]" if line.startswith("warning") else line)
    files = result.files
    console.print(f"wrote {files[0]}, {files[1]} and {files[0].parent / 'index.html'}")
    _mlflow_link(spec)


@app.command(
    "schema", short_help='Print the JSON Schema of study or comparison files.',
    epilog="Example: ganbench schema compare > compare.schema.json")
def schema_cmd(
    kind: str = typer.Argument("study", metavar="[study|compare]",
                               help="Which file's schema."),
    markdown: bool = typer.Option(False, "--markdown", help="Every field as Markdown "
                                  "tables (the docs' reference) instead of JSON Schema."),
) -> None:
    """Print the JSON Schema of study (or comparison) files, for editors and checks."""
    import json

    from ganbench.schema import KINDS, field_table, json_schema

    if kind not in KINDS:
        raise GanbenchError(f"schema: expected one of {', '.join(KINDS)}, got {kind!r}")
    print(field_table(kind) if markdown else json.dumps(json_schema(kind), indent=2))


def _progress() -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(),
        TextColumn("{task.completed}/{task.total}"), TimeElapsedColumn(), TimeRemainingColumn(),
        TextColumn("{task.fields[info]}"), console=console, transient=False,
    )


# Commands that open Optuna studies (their help does not).
STUDY_COMMANDS = {"sweep", "worker", "status", "repair", "report", "compare", "sample",
                  "verify"}


def _own_process(args: list[str]) -> None:
    """Process-wide settings of the ``ganbench`` command, which owns its process (the
    package itself changes none on import): plots without a display, Optuna's INFO lines
    off the console."""
    os.environ.setdefault("MPLBACKEND", "Agg")
    command = next((a for a in args if not a.startswith("-")), None)
    if command in STUDY_COMMANDS and not {"--help", "-h"} & set(args):
        from ganbench.study import quiet_optuna

        quiet_optuna()


def main(argv: Optional[list[str]] = None) -> None:
    """Entry point: user errors become one line on stderr and exit 2."""
    if argv is None:  # the command line: a SIGTERM while starting up is said, like later
        from ganbench.signals import Interrupted

        def starting_up(signum: int, frame) -> None:
            raise Interrupted(signum)

        signal.signal(signal.SIGTERM, starting_up)
    args = sys.argv[1:] if argv is None else argv
    from ganbench import provenance

    provenance.COMMAND = ["ganbench", *args]  # recorded with what the command makes
    _own_process(args)
    debug = "--debug" in args
    command = typer.main.get_command(app)
    try:
        code = command.main(args=args, prog_name="ganbench", standalone_mode=False)
        if isinstance(code, int) and code:  # typer returns 130 for any interrupt here
            if code == 130:
                from ganbench.signals import Interrupted

                signum = Interrupted.last or signal.SIGINT  # 143 when it was a SIGTERM
                print(f"interrupted ({signal.Signals(signum).name})", file=sys.stderr)
                code = 128 + signum
                if argv is None:  # stopping already: a late signal must not break the exit
                    signal.signal(signal.SIGINT, signal.SIG_IGN)
                    signal.signal(signal.SIGTERM, signal.SIG_IGN)
            sys.exit(code)
    except GanbenchError as exc:
        if debug:
            traceback.print_exc()
        print("\n".join(f"error: {line}" for line in str(exc).split("\n")),
              file=sys.stderr)  # one line per problem (a spec file may have several)
        if argv is None and not debug and "multiprocessing.synchronize" not in sys.modules:
            # From the command line, a user error found before any worker pool (whose
            # semaphores want a clean exit) ends the process at once: unloading torch and
            # scipy at interpreter exit takes a third of a second, and nothing else is open.
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(2)
        sys.exit(2)
    except (KeyboardInterrupt, typer.Abort) as exc:
        from ganbench.signals import exit_code

        cause = exc.__cause__ or exc  # click turns a KeyboardInterrupt into Abort
        print(f"interrupted ({cause})" if str(cause) else "interrupted", file=sys.stderr)
        if argv is None:  # stopping already: a late signal must not break the exit
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        sys.exit(exit_code(cause))
    except OSError as exc:
        if exc.filename is None or debug:  # not a file the user named or we write: a bug
            raise
        # A folder that is a file, not writable, a full disk: the file and the reason.
        print(f"error: {exc.filename}: {exc.strerror or exc}", file=sys.stderr)
        sys.exit(2)
    except Exception as exc:
        if hasattr(exc, "exit_code"):  # typer's usage errors and exits (its own click)
            if hasattr(exc, "show"):
                exc.show()
            sys.exit(exc.exit_code)
        raise
    sys.exit(0)
