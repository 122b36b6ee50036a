"""ganbench: hyperparameter sweeps and benchmarks for GANs on synthetic targets.

The public API is what this module lists; everything else is internal. Names are loaded
on first use, so ``import ganbench`` (and the CLI's ``--help``) does not load torch.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name → the module that owns it
_PUBLIC = {
    "GanbenchError": "ganbench.errors", "SpecError": "ganbench.errors",
    "METRICS": "ganbench.metrics", "Metric": "ganbench.metrics",
    "mode_metrics": "ganbench.metrics", "sliced_w1": "ganbench.metrics",
    "w1": "ganbench.metrics",
    "TARGETS": "ganbench.targets", "get_target": "ganbench.targets",
    "TrainConfig": "ganbench.config", "TrainResult": "ganbench.train",
    "train": "ganbench.train",
}
__all__ = sorted(_PUBLIC)


def __getattr__(name: str) -> Any:
    if name in _PUBLIC:
        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'ganbench' has no attribute {name!r}")
