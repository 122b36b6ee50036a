"""The ``ganbench`` command: a thin layer over train, sweep, tracking and report."""

from __future__ import annotations

import sys
import traceback
from pathlib import Path
from typing import Optional

import click
import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from ganbench.errors import GanbenchError

app = typer.Typer(
    help="Hyperparameter sweeps and benchmarks for GANs on synthetic targets.",
    no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
)
console = Console(stderr=False)


@app.callback()
def _root(debug: bool = typer.Option(False, "--debug", help="Show tracebacks of errors.")) -> None:
    """Hyperparameter sweeps and benchmarks for GANs on synthetic targets."""


def _parse_hidden(value: str) -> int | list[int]:
    try:
        widths = [int(v) for v in value.split(",")]
    except ValueError:
        raise GanbenchError(f"--hidden: expected an int or comma-separated ints, got {value!r}")
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


def _progress() -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.completed}/"
        "{task.total}"), TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("{task.fields[info]}"),
        console=console, transient=False,
    )


def main(argv: Optional[list[str]] = None) -> None:
    """Entry point: user errors become one line on stderr and exit 2."""
    args = sys.argv[1:] if argv is None else argv
    debug = "--debug" in args
    command = typer.main.get_command(app)
    try:
        command.main(args=args, prog_name="ganbench", standalone_mode=False)
    except GanbenchError as exc:
        if debug:
            traceback.print_exc()
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except (KeyboardInterrupt, click.exceptions.Abort):
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(0)
