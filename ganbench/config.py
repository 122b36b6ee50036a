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

# Which TrainConfig fields live in which YAML section (one name per knob everywhere: the
# study file, MLflow params ``train.lr_g`` / ``model.hidden``, report columns).
TRAIN_FIELDS = ("steps", "batch_size", "eval_every", "eval_samples", "eval_seed", "optimizer",
                "lr_g", "lr_d", "beta1", "beta2", "momentum", "d_steps", "device", "dtype")
MODEL_FIELDS = ("loss", "noise_dim", "hidden", "depth", "g_hidden", "d_hidden", "activation",
                "spectral_norm", "g_spectral_norm", "pack", "tricks")


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
    batch_size: int = 256                     # samples per step (for G and for D)
    steps: int = 2000                         # generator steps
    eval_every: int = 250                     # generator steps between evaluations
    eval_samples: int = 2500                  # PacGAN protocol: 2500 samples per evaluation
    eval_seed: int = 1234                     # fixes the evaluation sample across trials
    seed: int = 0                             # model init, data and noise
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
        for name in ("noise_dim", "depth", "pack", "d_steps", "batch_size", "steps",
                     "eval_every", "eval_samples"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise GanbenchError(f"{name} must be a positive integer, got {value!r}", name)
        for name in ("lr_g", "lr_d"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not value > 0 or not math.isfinite(value):
                raise GanbenchError(f"{name} must be a positive number, got {value!r}", name)
        for name in ("beta1", "beta2", "momentum"):
            if not 0 <= getattr(self, name) < 1:
                raise GanbenchError(f"{name} must be in [0, 1), got {getattr(self, name)!r}",
                                    name)
        for which in ("g", "d"):
            if any(w <= 0 for w in self.widths(which)):
                raise GanbenchError(f"hidden widths must be positive, got {self.widths(which)}",
                                    "hidden")
        if self.batch_size % self.pack:
            raise GanbenchError(f"batch_size ({self.batch_size}) must be divisible by pack "
                                f"({self.pack})", "pack")
        if self.eval_samples % self.pack:
            raise GanbenchError(f"eval_samples ({self.eval_samples}) must be divisible by pack",
                                "pack")
        resolve_device(self.device)
        validate_tricks(self.tricks, self.loss)
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
