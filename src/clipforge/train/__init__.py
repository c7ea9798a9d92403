"""clipforge.train: the training program (config, data order, loop, checkpoints).

Depends on the library core; the core never imports it.
"""
from .checkpoint import load_weights, save_checkpoint
from .config import DataConfig, DistributedConfig, TrainConfig, load_config
from .loop import TrainingDiverged, TrainResult, train

__all__ = [
    "DataConfig",
    "DistributedConfig",
    "TrainConfig",
    "load_config",
    "train",
    "TrainResult",
    "TrainingDiverged",
    "save_checkpoint",
    "load_weights",
]
