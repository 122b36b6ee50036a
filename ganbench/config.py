"""The trainer's configuration: plain data, importable without torch.

Field names are the knob names everywhere: study YAML, Optuna parameters, MLflow params,
report columns. ``validate()`` checks a config against the registries (which load torch).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from ganbench.errors import GanbenchError, lookup

OPTIMIZERS = ("adam", "rmsprop", "sgd")
DTYPES = ("float32", "float64")
G_NORMS = ("none", "batch")                          # generator normalisation
UPDATES = ("alternating", "simultaneous")            # order of the D and G updates
LR_SCHEDULES = ("constant", "linear", "cosine")      # decay of both learning rates
# Upper bounds of the integer fields: far above any sensible run, low enough that a typo
# is one line here instead of an allocation of terabytes or an overflow in torch.
SIZE_LIMITS = {"noise_dim": 65536, "depth": 64, "pack": 64, "d_steps": 100,
               "batch_size": 1 << 20, "steps": 10**9, "eval_every": 10**9,
               "eval_samples": 10**6, "pieces": 64}
MAX_WIDTH = 65536
MAX_POOL = 10**8
MAX_SEED = 2**63 - 1

# Which TrainConfig fields live in which YAML section (one name per knob everywhere: the
# study file, MLflow params ``train.lr_g`` / ``model.hidden``, report columns).
TRAIN_FIELDS = ("steps", "batch_size", "eval_every", "eval_samples", "eval_seed", "optimizer",
                "lr_g", "lr_d", "beta1", "beta2", "momentum", "d_steps", "update",
                "lr_schedule", "lr_floor", "warmup", "device", "dtype")
MODEL_FIELDS = ("loss", "noise_dim", "hidden", "depth", "g_hidden", "d_hidden", "activation",
                "g_norm", "pieces", "init_std", "spectral_norm", "g_spectral_norm", "pack",
                "tricks")


@dataclass
class TrainConfig:
    """Everything one training run needs. Field names are the knob names everywhere
    (study YAML, Optuna parameters, MLflow params, report columns)."""

    target: str = "ring"                      # registry name in ganbench.targets
    target_params: dict[str, Any] = field(default_factory=dict)  # e.g. {"modes": 8}
    loss: str = "nonsaturating"               # registry name in ganbench.losses
    noise_dim: int = 2                        # dimension of G's input noise
    hidden: int | list[int] = 128             # width of G and D (int) or per-layer widths
    depth: int = 2                            # hidden layers when a width is an int
    g_hidden: int | list[int] | None = None   # overrides `hidden` for G
    d_hidden: int | list[int] | None = None   # overrides `hidden` for D
    activation: str = "relu"                  # hidden activation of both networks
    g_norm: str = "none"                      # none | batch (G: Linear → BatchNorm → act)
    pieces: int = 1                           # maxout pieces per D hidden unit (1: activation)
    init_std: float | None = None             # weights N(0, init_std), biases 0; None: torch's
    spectral_norm: bool = False               # spectral norm on every layer of D
    g_spectral_norm: bool = False             # spectral norm on every layer of G
    pack: int = 1                             # PacGAN packing: samples per D input
    optimizer: str = "adam"                   # adam | rmsprop | sgd (momentum)
    lr_g: float = 1e-3                        # generator learning rate
    lr_d: float = 1e-3                        # discriminator learning rate
    beta1: float = 0.5                        # Adam β1 (DCGAN's 0.5)
    beta2: float = 0.999                      # Adam β2
    momentum: float = 0.9                     # SGD momentum
    d_steps: int = 1                          # D steps per G step
    update: str = "alternating"               # alternating | simultaneous (last D step and
                                              # the G step from one batch, one set of weights)
    lr_schedule: str = "constant"             # constant | linear | cosine decay of both lrs
    lr_floor: float = 0.0                     # final lr as a fraction of the initial one
    warmup: int = 0                           # G steps of linear warmup from 0
    batch_size: int = 256                     # samples per step (for G and for D)
    steps: int = 2000                         # generator steps
    eval_every: int = 250                     # generator steps between evaluations
    eval_samples: int = 2500                  # PacGAN protocol: 2500 samples per evaluation
    eval_seed: int = 1234                     # fixes the evaluation sample across trials
    seed: int = 0                             # model init, data and noise
    pool: int | None = None                   # a fixed training set of this many target
                                              # points, drawn once from the seed (None: fresh)
    device: str = "auto"                      # auto | cpu | cuda | cuda:N
    dtype: str = "float32"                    # float32 | float64
    tricks: dict[str, dict[str, Any]] = field(default_factory=dict)  # {"gp": {"weight": 10}}

    def widths(self, which: str) -> list[int]:
        """Hidden widths of ``which`` ("g" or "d")."""
        h = (self.g_hidden if which == "g" else self.d_hidden)
        h = self.hidden if h is None else h
        return [int(h)] * self.depth if isinstance(h, int) else [int(w) for w in h]

    def validate(self) -> "TrainConfig":
        """Raise GanbenchError naming the first invalid field; return self."""
        # The registries live in torch modules: imported here, not when the spec is read.
        from ganbench.devices import resolve_device
        from ganbench.losses import LOSSES
        from ganbench.models import ACTIVATIONS
        from ganbench.tricks import validate_tricks

        lookup(LOSSES, self.loss, "loss")
        lookup(ACTIVATIONS, self.activation, "activation")
        lookup({o: o for o in OPTIMIZERS}, self.optimizer, "optimizer")
        lookup({d: d for d in DTYPES}, self.dtype, "dtype")
        for name, choices in (("g_norm", G_NORMS), ("update", UPDATES),
                              ("lr_schedule", LR_SCHEDULES)):
            lookup({c: c for c in choices}, getattr(self, name), name)
        for name, high in SIZE_LIMITS.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= high:
                raise GanbenchError(f"{name} must be an integer in 1..{high}, got {value!r}",
                                    name)
        for name in ("seed", "eval_seed"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or \
                    not 0 <= value <= MAX_SEED:
                raise GanbenchError(f"{name} must be an integer in 0..2**63-1, got {value!r}",
                                    name)
        for name in ("lr_g", "lr_d"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not value > 0 or not math.isfinite(value):
                raise GanbenchError(f"{name} must be a positive number, got {value!r}", name)
        for name in ("beta1", "beta2", "momentum"):
            if not 0 <= getattr(self, name) < 1:
                raise GanbenchError(f"{name} must be in [0, 1), got {getattr(self, name)!r}",
                                    name)
        if self.init_std is not None and not (isinstance(self.init_std, (int, float))
                                              and 0 < self.init_std < math.inf):
            raise GanbenchError(f"init_std must be a positive number or null, got "
                                f"{self.init_std!r}", "init_std")
        if not 0 <= self.lr_floor <= 1:
            raise GanbenchError(f"lr_floor must be in [0, 1], got {self.lr_floor!r}", "lr_floor")
        if isinstance(self.warmup, bool) or not isinstance(self.warmup, int) \
                or not 0 <= self.warmup < self.steps:
            raise GanbenchError(f"warmup must be an integer in [0, steps), got "
                                f"{self.warmup!r}", "warmup")
        if self.pool is not None and (isinstance(self.pool, bool) or not isinstance(
                self.pool, int) or not self.batch_size <= self.pool <= MAX_POOL):
            raise GanbenchError(f"pool must be an integer in batch_size ({self.batch_size})"
                                f"..{MAX_POOL}, got {self.pool!r}", "pool")
        for which in ("g", "d"):
            if any(isinstance(w, bool) or not isinstance(w, int) or not 0 < w <= MAX_WIDTH
                   for w in self.widths(which)):
                raise GanbenchError(f"hidden widths must be integers in 1..{MAX_WIDTH}, got "
                                    f"{self.widths(which)}", "hidden")
        if self.batch_size % self.pack:
            raise GanbenchError(f"batch_size ({self.batch_size}) must be divisible by pack "
                                f"({self.pack})", "pack")
        resolve_device(self.device)
        validate_tricks(self.tricks, self.loss)
        if self.update == "simultaneous" and "unrolled" in self.tricks:
            raise GanbenchError("update: simultaneous steps G against the D of the same "
                                "step; tricks.unrolled looks ahead of it: choose one", "update")
        return self

    def lr_factor(self, step: int) -> float:
        """The learning-rate multiplier at generator step ``step`` (1-based; the D steps of
        that step share it): linear warmup from 0 over ``warmup`` steps, then constant, or
        a linear or cosine decay reaching ``lr_floor`` at the last step."""
        if step <= self.warmup:
            return step / self.warmup
        if self.lr_schedule == "constant":
            return 1.0
        progress = (step - self.warmup) / max(1, self.steps - self.warmup)
        decay = 1 - progress if self.lr_schedule == "linear" else \
            0.5 * (1 + math.cos(math.pi * progress))
        return self.lr_floor + (1 - self.lr_floor) * decay

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
