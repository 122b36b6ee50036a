"""The ``ganbench`` command: a thin layer over train, sweep, tracking and report."""

from __future__ import annotations

import sys
import time
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
)
console = Console(width=None if sys.stdout.isatty() else 120)


@app.callback()
def _root(debug: bool = typer.Option(False, "--debug", help="Show tracebacks of errors.")) -> None:
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
    table = Table(title=title)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key in ("w1", "sliced_w1", "modes", "hq", "kl"):
        if key in metrics:
            value = metrics[key]
            table.add_row(key, f"{value:d}" if isinstance(value, int) else f"{value:.4g}")
    return table


@app.command("train")
def train_cmd(
    target: str = typer.Option("ring", help="Target: ring, grid, spiral, swissroll, mog."),
    target_param: list[str] = typer.Option(
        [], "--target-param", "-p", help="Target parameter KEY=VALUE, e.g. -p modes=25."),
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
) -> None:
    """Train one GAN and write DIR/metrics.json and DIR/samples.png."""
    from ganbench.report import save_samples_png, write_json
    from ganbench.targets import get_target
    from ganbench.train import TrainConfig, train

    config = TrainConfig(
        target=target, target_params=_parse_params(target_param), loss=loss,
        noise_dim=noise_dim, hidden=_parse_hidden(hidden), depth=depth, activation=activation,
        optimizer=optimizer, lr_g=lr_g, lr_d=lr_d, d_steps=d_steps, batch_size=batch_size,
        steps=steps, eval_every=eval_every, seed=seed, device=device,
    ).validate()
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


# ---------------------------------------------------------------- study commands
SpecArg = typer.Argument(..., help="Study YAML, e.g. studies/mog.yaml.", show_default=False)
SetOpt = typer.Option([], "--set", help="Override a field: dotted.key=value (YAML scalar). "
                      "Repeatable.")
TrialsOpt = typer.Option(None, "--trials", help="Total counted trials (spec: trials).")
StorageOpt = typer.Option(None, "--storage", help="sqlite:///… or postgresql://… "
                          "(default: journal file runs/<name>/optuna.log).")
TrackingOpt = typer.Option(None, "--tracking-uri", help="MLflow tracking URI (default: "
                           "sqlite:///mlflow.db).")


PopulationOpt = typer.Option(None, "--population", help="Train K members (trials × seeds) "
                             "at once as one batched population (spec: execution).")


def _load(spec_path: Path, sets: list[str], trials: int | None = None,
          storage: str | None = None, tracking_uri: str | None = None,
          workers: int | None = None, population: int | None = None):
    """Load a spec with --set and the shortcut options applied, checked before anything runs."""
    from ganbench.spec import load_spec
    from ganbench.sweep import check_spec

    overrides = list(sets)
    if population is not None:
        overrides += ["execution.mode=population", f"execution.size={population}"]
    for key, value in (("trials", trials), ("storage", storage), ("tracking.uri", tracking_uri),
                       ("workers", workers)):
        if value is not None:
            overrides.append(f"{key}={value}")
    spec = load_spec(spec_path, overrides)
    check_spec(spec, str(spec_path))
    return spec


def _objective_label(spec) -> str:
    return ", ".join(f"{o.metric} {'↓' if o.direction == 'minimize' else '↑'}"
                     for o in spec.objectives)


def _print_leaderboard(spec, study, top: int = 10) -> None:
    from ganbench.report import study_frame, write_leaderboard

    objectives = [(o.metric, o.direction) for o in spec.objectives]
    frame = study_frame(study, objectives)
    pareto = "pareto" in frame
    if frame.empty:
        console.print("no finished trials yet")
        return
    out = Path("reports") / spec.name
    files = write_leaderboard(frame, out)
    shown = frame[frame["pareto"]] if pareto else frame[frame["state"] == "COMPLETE"].head(top)
    title = ("Pareto front" if pareto else "best trials") + f" ({_objective_label(spec)})"
    table = Table(title=title)
    cols = ["number"] + [f"objective_{m}" for m, _ in objectives] + list(spec.search) + [
        c for c in ("w1", "modes", "hq", "kl") if c in frame and f"objective_{c}" not in frame]
    cols = [c for c in dict.fromkeys(cols) if c in frame]
    for c in cols:
        table.add_column(c.removeprefix("objective_").replace("number", "#"), justify="right",
                         no_wrap=True)
    for row in shown[cols].itertuples(index=False):
        table.add_row(*[_fmt(v) for v in row])
    console.print(table)
    console.print(f"wrote {files[0]} and {files[1]}")


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3g}"
    return "" if v is None else str(v)


def _status_line(spec, snap, by_worker: bool = True) -> str:
    best = f"best {snap.best[0]:.4g}" if snap.best else "best –"
    running = ", ".join(f"#{t.number}@{t.user_attrs.get('device', '?')}" for t in snap.running)
    return f"{best}  running: {running or '–'}"


@app.command("sweep")
def sweep_cmd(
    spec_path: Path = SpecArg, sets: list[str] = SetOpt, trials: Optional[int] = TrialsOpt,
    workers: Optional[int] = typer.Option(None, "--workers", help="Worker processes (default: "
                                          "one per GPU, or one per CPU core)."),
    devices: Optional[str] = typer.Option(None, "--devices", help="Comma-separated devices, "
                                          "e.g. cuda:0,cuda:2 or cpu."),
    storage: Optional[str] = StorageOpt, tracking_uri: Optional[str] = TrackingOpt,
    population: Optional[int] = PopulationOpt,
) -> None:
    """Search hyperparameters: run the study to its total of trials, then print the leaderboard.

    Rerunning continues where it stopped; raising --trials tops up.
    """
    from ganbench import sweep

    spec = _load(spec_path, sets, trials, storage, tracking_uri, workers, population)
    pop = spec.execution.mode == "population"
    device_list = sweep.default_devices(spec.workers, devices.split(",") if devices else None,
                                        population=pop)
    for d in set(device_list):
        from ganbench.train import resolve_device

        resolve_device(d)
    study, tracking = _open(spec)
    done, _ = sweep.count_trials(study.get_trials(deepcopy=False))
    device_list = sweep.needed_workers(device_list, spec.trials, done)
    how = (f"populations of {spec.execution.size} member(s)" if pop else "one trial at a time")
    console.print(f"study [bold]{spec.name}[/] · {spec.target.name} · {_objective_label(spec)} · "
                  f"{spec.trials} trials · {len(device_list)} worker(s) on "
                  f"{', '.join(sorted(set(device_list)))} · {how}")
    with _progress() as progress:
        task = progress.add_task("trials", total=spec.trials, info="")

        def on_poll(snap) -> None:
            progress.update(task, completed=min(snap.done, snap.total),
                            info=_status_line(spec, snap))

        try:
            if tracking is not None:
                tracking.close_orphans(study)
            sweep.run_sweep(spec, device_list, tracking and tracking.handle, on_poll,
                            on_lost=tracking and tracking.end_lost)
        except KeyboardInterrupt:
            if tracking is not None:
                tracking.close_orphans(study)
            progress.stop()
            _print_leaderboard(spec, study)
            console.print("[yellow]interrupted: running trials were marked; rerun the same "
                          "command to continue[/]")
            raise
        finally:
            if tracking is not None:
                tracking.finish(study)
    _print_leaderboard(spec, study)


def _open(spec):
    """Check the tracking server, open the storage and study, then the study's parent run.

    The order makes every unreachable service a one-line error before anything is created.
    """
    from ganbench import sweep

    tracker = None
    if spec.tracking is not False:
        from ganbench.tracking import check_reachable, resolve_uri

        check_reachable(resolve_uri(spec.tracking.uri))
    study = sweep.open_study(spec)
    if spec.tracking is not False:
        from ganbench.tracking import Tracker

        tracker = Tracker.for_study(spec, spec.model_dump(exclude_none=True, mode="json"),
                                    spec.storage or str(sweep.run_dir(spec) / "optuna.log"))
    return study, tracker


@app.command("worker")
def worker_cmd(
    spec_path: Path = SpecArg, sets: list[str] = SetOpt, trials: Optional[int] = TrialsOpt,
    device: str = typer.Option("auto", "--device", help="Device of this worker."),
    storage: Optional[str] = StorageOpt, tracking_uri: Optional[str] = TrackingOpt,
    population: Optional[int] = PopulationOpt,
) -> None:
    """Join a study as one worker (e.g. from another machine, with a shared --storage)."""
    import torch

    from ganbench import sweep
    from ganbench.train import resolve_device

    spec = _load(spec_path, sets, trials, storage, tracking_uri, population=population)
    dev = str(resolve_device(device))
    if dev == "cpu":
        torch.set_num_threads(sweep.cpu_threads(spec, 1))
    study, tracking = _open(spec)
    sweep.recover_dead_workers(study, tracking and tracking.end_lost)
    deadline = time.time() + spec.timeout if spec.timeout else None
    where = (f"journal {sweep.run_dir(spec) / 'optuna.log'}" if spec.storage is None
             else "RDB storage")
    console.print(f"worker on {dev} joined study [bold]{spec.name}[/] ({where})")

    def on_trial(o) -> None:
        vals = ", ".join(f"{v:.4g}" for v in o.values) if o.values else o.reason
        console.print(f"trial {o.number}: {o.state.name} {vals}")

    try:
        ran = sweep.worker_loop(spec, dev, spec.trials, deadline, tracking, on_trial)
    finally:
        if tracking is not None:
            tracking.finish(study)
    console.print(f"worker done: ran {ran} trial(s)")


@app.command("status")
def status_cmd(
    spec_path: Path = SpecArg, sets: list[str] = SetOpt, storage: Optional[str] = StorageOpt,
) -> None:
    """Counts of trials by state and the best trials, read from the storage."""
    from ganbench import sweep

    spec = _load(spec_path, sets, storage=storage)
    study = sweep.open_study(spec, create=False)
    trials = study.get_trials(deepcopy=False)
    done, running = sweep.count_trials(trials)
    table = Table(title=f"study {spec.name}: {done}/{spec.trials} counted trials")
    table.add_column("state")
    table.add_column("trials", justify="right")
    for state in ("COMPLETE", "PRUNED", "FAIL", "RUNNING", "WAITING"):
        n = sum(1 for t in trials if t.state.name == state)
        if n:
            table.add_row(state, str(n))
    console.print(table)
    _print_leaderboard(spec, study)


@app.command("report")
def report_cmd(
    spec_path: Path = SpecArg, sets: list[str] = SetOpt, storage: Optional[str] = StorageOpt,
    out: Optional[Path] = typer.Option(None, "--out", help="Output folder (default: "
                                       "reports/<name>)."),
) -> None:
    """Write tables and plots of a study from its storage: reports/<name>/index.html."""
    from ganbench import sweep
    from ganbench.report import write_study_report

    spec = _load(spec_path, sets, storage=storage)
    study = sweep.open_study(spec, create=False)
    out = out or Path("reports") / spec.name
    files = write_study_report(study, [(o.metric, o.direction) for o in spec.objectives],
                               list(spec.search), out, spec.trials)
    for f in files:
        console.print(f"wrote {f}")


@app.command("compare")
def compare_cmd(
    spec_path: Path = typer.Argument(..., help="Comparison YAML, e.g. studies/tricks.yaml.",
                                     show_default=False),
    quick: bool = typer.Option(False, "--quick", help="Smoke-sized run of the same pipeline "
                               "(2 trials per arm, 2 seeds, 200 steps), as <name>-quick."),
    sets: list[str] = SetOpt,
    workers: Optional[int] = typer.Option(None, "--workers", help="Worker processes."),
    devices: Optional[str] = typer.Option(None, "--devices", help="Comma-separated devices."),
    storage: Optional[str] = StorageOpt, tracking_uri: Optional[str] = TrackingOpt,
) -> None:
    """Compare arms (loss + tricks) budget-fairly: tune each with the same budget, retrain
    each best configuration on held-out seeds, test against the baseline arm."""
    import pandas as pd

    from ganbench import compare, sweep
    from ganbench.report import compare_stats, write_compare_report
    from ganbench.spec import load_compare, read_yaml

    overrides = []
    if quick:
        overrides = compare.QUICK + [f"name={read_yaml(spec_path).get('name', 'compare')}-quick"]
    for key, value in (("storage", storage), ("tracking.uri", tracking_uri),
                       ("workers", workers)):
        if value is not None:
            overrides.append(f"{key}={value}")
    spec = load_compare(spec_path, overrides + list(sets))
    first = spec.arm_study(spec.targets[0], spec.baseline)
    sweep.check_spec(first, str(spec_path))
    device_list = sweep.default_devices(spec.workers, devices.split(",") if devices else None)
    root = None
    if spec.tracking is not False:
        from ganbench.tracking import Tracker, check_reachable, resolve_uri

        check_reachable(resolve_uri(spec.tracking.uri))
    sweep.get_storage(first)  # an unreachable storage fails here, before any training
    if spec.tracking is not False:
        root = Tracker.for_compare(spec, spec.model_dump(exclude_none=True, mode="json"))

    def tracker_for(target: str, arm: str):
        return root.nested(f"{target}__{arm}", {"ganbench.role": "arm",
                                                "ganbench.study": spec.name, "arm": arm,
                                                "target": target})

    n = len(spec.targets) * len(spec.arms)
    console.print(f"comparison [bold]{spec.name}[/] · {len(spec.arms)} arms × "
                  f"{len(spec.targets)} target(s) · {spec.mode}: budget {spec.budget} trials "
                  f"per arm · {spec.eval_seeds} held-out seeds · {len(device_list)} worker(s)")
    step = iter(range(1, 2 * n + 1))
    results = compare.run_compare(spec, device_list, tracker_for if root else None,
                                  lambda msg: console.print(f"[{next(step, '…')}] {msg}"))
    rows, samples, references = [], {}, {}
    for r in results:
        study = sweep.open_study(spec.arm_study(
            next(t for t in spec.targets if t.name == r.target), r.arm))
        references[r.target] = study.user_attrs.get("reference")
        for seed, out in r.seeds.items():
            rows.append({"target": r.target, "arm": r.arm, "seed": seed} | {
                k: v for k, v in out.items() if k not in ("samples",)})
        first_seed = min(r.seeds)
        samples[(r.target, r.arm)] = r.seeds[first_seed].get("samples")
    runs = pd.DataFrame(rows)
    out = Path("reports") / spec.name
    files = write_compare_report(runs, spec.baseline, references, samples, out,
                                 f"Comparison {spec.name}")
    table = compare_stats(runs, spec.baseline)
    for target, sub in table.groupby("target", sort=False):
        t = Table(title=f"{target}: mean ± std over {spec.eval_seeds} held-out seeds "
                        f"(p: Mann-Whitney U vs {spec.baseline}, Holm)")
        metrics = list(dict.fromkeys(sub["metric"]))
        t.add_column("arm")
        for m in metrics:
            t.add_column(m, justify="right")
        for arm, g in sub.groupby("arm", sort=False):
            cells = []
            for m in metrics:
                r = g[g["metric"] == m].iloc[0]
                p = "" if arm == spec.baseline else f" p={r['p_holm']:.2g}"
                cells.append(f"{r['mean']:.3g} ± {r['std']:.2g}{p}")
            t.add_row(arm, *cells)
        console.print(t)
    if root is not None:
        root.client.set_terminated(root.handle.parent_run_id, "FINISHED")
    console.print(f"wrote {files[0]}, {files[1]} and {out / 'index.html'}")


def _progress() -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(),
        TextColumn("{task.completed}/{task.total}"), TimeElapsedColumn(), TimeRemainingColumn(),
        TextColumn("{task.fields[info]}"), console=console, transient=False,
    )


def main(argv: Optional[list[str]] = None) -> None:
    """Entry point: user errors become one line on stderr and exit 2."""
    args = sys.argv[1:] if argv is None else argv
    debug = "--debug" in args
    command = typer.main.get_command(app)
    try:
        code = command.main(args=args, prog_name="ganbench", standalone_mode=False)
        if isinstance(code, int) and code:  # typer returns 130 for Ctrl-C here
            if code == 130:
                print("interrupted", file=sys.stderr)
            sys.exit(code)
    except GanbenchError as exc:
        if debug:
            traceback.print_exc()
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except (KeyboardInterrupt, typer.Abort):
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except Exception as exc:
        if hasattr(exc, "exit_code"):  # typer's usage errors and exits (its own click)
            if hasattr(exc, "show"):
                exc.show()
            sys.exit(exc.exit_code)
        raise
    sys.exit(0)
