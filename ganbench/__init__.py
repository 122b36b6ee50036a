"""ganbench: hyperparameter sweeps and benchmarks for GANs on synthetic targets.

The public API is what this module lists; everything else is internal.
"""

from ganbench.errors import GanbenchError, SpecError
from ganbench.metrics import mode_metrics, sliced_w1, w1
from ganbench.targets import TARGETS, get_target
from ganbench.train import TrainConfig, TrainResult, train

__all__ = [
    "GanbenchError", "SpecError", "TARGETS", "TrainConfig", "TrainResult", "get_target",
    "mode_metrics", "sliced_w1", "train", "w1",
]
__version__ = "0.1.0"
