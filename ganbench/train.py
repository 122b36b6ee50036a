"""The GAN training loop: k discriminator steps per generator step, periodic evaluation.

``train(config, on_eval)`` knows nothing of Optuna or MLflow: callers observe and stop a
run through the ``on_eval(step, metrics) -> bool | None`` callback (True = stop now).
A diverging GAN is a result (``status="diverged"``), not an exception.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from ganbench import metrics as M
from ganbench.config import DTYPES as CONFIG_DTYPES
from ganbench.config import TrainConfig
from ganbench.devices import resolve_device
from ganbench.errors import GanbenchError
from ganbench.losses import get_loss
from ganbench.models import Discriminator, Generator, init_normal
from ganbench.targets import Target, get_target, training_data
from ganbench.tricks import build_tricks

DTYPES = {name: getattr(torch, name) for name in CONFIG_DTYPES}  # name → torch dtype


@dataclass
class TrainResult:
    """The outcome of one run. ``status``: completed | diverged | stopped (by on_eval) |
    error (an exception in a population member's own work, kept in ``error``)."""

    config: TrainConfig
    status: str
    steps: int                                # generator steps done
    metrics: dict[str, float]                 # last evaluation (final: with exact w1)
    history: list[dict[str, float]]           # one row per evaluation, with "step" and losses
    samples: torch.Tensor                     # last evaluation's generated samples (CPU)
    reference: torch.Tensor                   # the fixed target evaluation sample (CPU)
    reason: str = ""                          # e.g. "diverged at step 812"
    seconds: float = 0.0                      # wall time of the run
    eval_seconds: float = 0.0                 # part of it spent in metrics
    error: Exception | None = None            # status "error": what was raised
    generator: dict[str, torch.Tensor] | None = None  # the evaluated G's final state (CPU;
                                              # the EMA copy when that trick is on)
    online: dict[str, torch.Tensor] | None = None     # with EMA: the trained G's state

    def summary(self) -> dict[str, Any]:
        """JSON-ready final metrics with status and steps."""
        out: dict[str, Any] = {k: float(v) for k, v in self.metrics.items()}
        if "modes" in out:
            out["modes"] = int(out["modes"])
        return out | {"status": self.status, "steps": self.steps, "reason": self.reason}


def build_models(config: TrainConfig, target: Target) -> tuple[Generator, Discriminator]:
    """Generator and discriminator for ``config``, initialised from ``config.seed``."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        g = Generator(config.noise_dim, config.widths("g"), target.dim, config.activation,
                      config.g_spectral_norm, config.g_norm == "batch")
        d = Discriminator(target.dim, config.widths("d"), config.activation,
                          config.spectral_norm, config.pack, config.pieces)
        if config.init_std is not None:
            init_normal(g, config.init_std)
            init_normal(d, config.init_std)
    return g, d


def make_optimizer(config: TrainConfig, params, lr: float) -> torch.optim.Optimizer:
    """Adam (β1, β2), RMSprop (as the original WGAN) or SGD with momentum (as the original GAN)."""
    if config.optimizer == "adam":
        return torch.optim.Adam(params, lr=lr, betas=(config.beta1, config.beta2))
    if config.optimizer == "rmsprop":
        return torch.optim.RMSprop(params, lr=lr)
    return torch.optim.SGD(params, lr=lr, momentum=config.momentum)


def built_config(config: TrainConfig) -> TrainConfig:
    """The config the models are built from: tricks may switch on spectral norm or packing
    (on a copy; the caller's config stays as given)."""
    built = dataclasses.replace(config, tricks=dict(config.tricks))
    for t in build_tricks(config.tricks):
        t.configure(built)
    return built


def eval_sample(config: TrainConfig, target: Target, device: torch.device,
                dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The fixed evaluation sample: target points (float64, CPU) and generator noise, the
    same for every trial with this ``eval_seed``."""
    eval_gen = torch.Generator().manual_seed(config.eval_seed)
    reference = target.sample(config.eval_samples, eval_gen).to(torch.float64)
    z_eval = torch.randn(config.eval_samples, config.noise_dim, generator=eval_gen)
    return reference, z_eval.to(device, dtype)


def score(samples: torch.Tensor, reference: torch.Tensor, target: Target,
          config: TrainConfig, exact: bool) -> dict[str, float]:
    """The metrics of a run's evaluation samples against its fixed reference, with the
    projections of its ``eval_seed`` (exact W1 when ``exact``): one definition for the
    trainer, the population engine and a reloaded generator."""
    return M.evaluate(samples, reference, target.centers, target.std, target.weights,
                      exact=exact, generator=torch.Generator().manual_seed(config.eval_seed))


def diverged_metrics(target: Target) -> dict[str, float]:
    """The metrics a diverged run reports: the worst value of each."""
    return M.worst_metrics(target.centers is not None)


OnEval = Callable[[int, dict[str, float]], "bool | None"]
OnStep = Callable[[int, float, float], None]
STEP_REPORT_EVERY = 10  # on_step cadence: live losses for progress bars, cheap enough


def train(
    config: TrainConfig, on_eval: OnEval | None = None, on_step: OnStep | None = None,
) -> TrainResult:
    """Train a GAN on ``config``; call ``on_eval(step, metrics)`` after every evaluation
    and ``on_step(step, d_loss, g_loss)`` every few steps (for progress display).

    Deterministic on CPU for a given config (same seed → identical metrics).
    """
    config.validate()
    start = time.perf_counter()
    device, dtype = resolve_device(config.device), DTYPES[config.dtype]
    target = get_target(config.target, **config.target_params)
    data = training_data(target, config.pool, config.seed)
    loss = get_loss(config.loss)
    # Tricks may change how the models are built (spectral norm, packing): on a copy.
    tricks = build_tricks(config.tricks)
    built = built_config(config)
    g, d = build_models(built, target)
    g.to(device, dtype)
    d.to(device, dtype)
    opt_g = make_optimizer(config, g.parameters(), config.lr_g)
    opt_d = make_optimizer(config, d.parameters(), config.lr_d)
    rng = torch.Generator(device).manual_seed(config.seed)
    for t in tricks:
        t.setup(g, d, built, rng)

    # The fixed evaluation sample: the same target points and noise for every trial.
    reference, z_eval = eval_sample(config, target, device, dtype)

    def noise(n: int) -> torch.Tensor:
        return torch.randn(n, config.noise_dim, generator=rng, device=device, dtype=dtype)

    # The generator that is evaluated and kept: G, or the copy a trick keeps (EMA).
    g_eval = next((m for t in tricks if (m := t.eval_generator(g)) is not None), g)

    def evaluate(exact: bool) -> tuple[dict[str, float], torch.Tensor]:
        g_eval.eval()  # batch norm: the running statistics, not the evaluation batch's
        with torch.no_grad():
            samples = g_eval(z_eval).to("cpu", torch.float64)
        g_eval.train()
        return score(samples, reference, target, config, exact), samples

    history: list[dict[str, float]] = []
    status, reason, step, eval_seconds = "completed", "", 0, 0.0
    last: dict[str, float] = {}
    samples = torch.empty(0, target.dim)
    d_sum = g_sum = torch.zeros((), device=device, dtype=dtype)
    n_since = 0
    B = config.batch_size
    simultaneous = config.update == "simultaneous"

    def d_backward(real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
        """D's loss on a real and a (detached) generated batch, its gradients set."""
        for t in tricks:
            real, fake = t.d_inputs(real, fake, step)
        d_real, d_fake = d(real), d(fake)
        d_loss = next((v for t in tricks if (v := t.d_loss(loss, d_real, d_fake))
                       is not None), None)
        d_loss = loss.d(d_real, d_fake) if d_loss is None else d_loss
        for t in tricks:
            penalty = t.d_penalty(d, real, fake)
            if penalty is not None:
                d_loss = d_loss + penalty
        opt_d.zero_grad(set_to_none=True)
        d_loss.backward()
        return d_loss

    def apply(net: torch.nn.Module, opt: torch.optim.Optimizer, which: str) -> None:
        for t in tricks:
            t.before_step(list(net.parameters()))
        opt.step()
        for t in tricks:
            (t.after_d_step if which == "d" else t.after_g_step)(net)

    for step in range(1, config.steps + 1):
        factor = config.lr_factor(step)  # 1.0 unless a schedule or warmup is set
        for opt, lr in ((opt_d, config.lr_d), (opt_g, config.lr_g)):
            for group in opt.param_groups:
                group["lr"] = lr * factor
        # Discriminator: d_steps updates on fresh real and generated batches (with
        # simultaneous updates, the last one shares its batch and weights with G's update).
        for _ in range(config.d_steps - simultaneous):
            real = data.sample(B, rng).to(dtype)
            with torch.no_grad():
                fake = g(noise(B))
            d_loss = d_backward(real, fake)
            apply(d, opt_d, "d")
        if simultaneous:
            real = data.sample(B, rng).to(dtype)
            fake = g(noise(B))
            d_loss = d_backward(real, fake.detach())
            g_loss = loss.g(d(fake))
            opt_g.zero_grad(set_to_none=True)
            g_loss.backward(inputs=list(g.parameters()))
            apply(d, opt_d, "d")
            apply(g, opt_g, "g")
        else:
            # Generator: one update through the current (or an unrolled) discriminator.
            fake = g(noise(B))
            logits = next((v for t in tricks if (v := t.g_logits(
                d, fake, lambda: data.sample(B, rng).to(dtype), loss.d)) is not None), None)
            g_loss = loss.g(d(fake) if logits is None else logits)
            opt_g.zero_grad(set_to_none=True)
            g_loss.backward()
            apply(g, opt_g, "g")

        # Divergence: a non-finite loss stops the run with the step it happened at.
        d_sum, g_sum, n_since = d_sum + d_loss.detach(), g_sum + g_loss.detach(), n_since + 1
        if not bool(torch.isfinite(d_loss + g_loss)):
            status, reason = "diverged", f"diverged at step {step} (non-finite loss)"
            break
        if on_step is not None and step % STEP_REPORT_EVERY == 0:
            on_step(step, float(d_loss.detach()), float(g_loss.detach()))

        # Evaluation on the fixed sample; the callback may stop the run (pruning).
        final = step == config.steps
        if step % config.eval_every == 0 or final:
            if not all(bool(torch.isfinite(p).all()) for p in (*g.parameters(),
                                                              *d.parameters())):
                status, reason = "diverged", f"diverged at step {step} (non-finite weights)"
                break
            t0 = time.perf_counter()
            last, samples = evaluate(exact=final)
            eval_seconds += time.perf_counter() - t0
            row = {"step": step, "d_loss": float(d_sum) / n_since,
                   "g_loss": float(g_sum) / n_since} | last
            d_sum = g_sum = torch.zeros((), device=device, dtype=dtype)
            n_since = 0
            history.append(row)
            if on_eval is not None and on_eval(step, row) and not final:
                status, reason = "stopped", f"stopped at step {step}"
                break

    if status == "diverged":
        last = diverged_metrics(target)
    return TrainResult(
        config=config, status=status, steps=step, metrics=last, history=history,
        samples=samples, reference=reference.float(), reason=reason,
        seconds=time.perf_counter() - start, eval_seconds=eval_seconds,
        generator=cpu_state(g_eval) if status == "completed" else None,
        online=cpu_state(g) if status == "completed" and g_eval is not g else None,
    )


def cpu_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A module's state dict, copied to the CPU."""
    return {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()}


# ---------------------------------------------------------------- checkpoints
CHECKPOINT_VERSION = 1


def save_checkpoint(path: str | Path, result: TrainResult, **extra: Any) -> Path:
    """The final generator of a completed run, with everything needed to rebuild and
    score it: the trainer config and the metrics it reached (and ``extra``, e.g. the trial
    number). Written whole or not at all."""
    if result.generator is None:
        raise GanbenchError(f"no generator to save: the run {result.status}")
    from ganbench.files import atomic

    path = Path(path)
    with atomic(path) as tmp:
        torch.save({"version": CHECKPOINT_VERSION, "config": result.config.to_dict(),
                    "generator": result.generator, "online": result.online,
                    "metrics": dict(result.metrics), "steps": result.steps} | extra, tmp)
    return path


def load_checkpoint(path: str | Path) -> tuple[TrainConfig, Generator, dict[str, Any]]:
    """The config, the generator (CPU, eval mode) and the whole checkpoint of ``path``."""
    try:
        data = torch.load(path, map_location="cpu", weights_only=False)
        config = TrainConfig(**data["config"])
    except (OSError, KeyError, TypeError, RuntimeError, EOFError) as exc:
        raise GanbenchError(f"{path}: not a ganbench generator checkpoint ({exc})") from None
    target = get_target(config.target, **config.target_params)
    g, _ = build_models(built_config(config), target)
    g.to(DTYPES[config.dtype]).load_state_dict(data["generator"])
    return config, g.eval(), data


def sample_generator(config: TrainConfig, g: Generator, n: int, seed: int) -> torch.Tensor:
    """``n`` samples of ``g`` from N(0, I) noise drawn with ``seed`` (CPU, float64)."""
    z = torch.randn(n, config.noise_dim, generator=torch.Generator().manual_seed(seed))
    dtype = next(g.parameters()).dtype
    with torch.no_grad():
        return g.eval()(z.to(dtype)).to(torch.float64)


def rescore(config: TrainConfig, g: Generator) -> dict[str, float]:
    """The final metrics of a saved generator, recomputed exactly as its run computed them
    (the same evaluation sample, noise and projections)."""
    target = get_target(config.target, **config.target_params)
    dtype = next(g.parameters()).dtype
    reference, z_eval = eval_sample(config, target, torch.device("cpu"), dtype)
    with torch.no_grad():
        samples = g.eval()(z_eval).to("cpu", torch.float64)
    return score(samples, reference, target, config, exact=True)
