"""Training: the run configuration, the loop, checkpoints."""

from .config import DataConfig, RunConfig, TrainConfig, load_config
from .checkpoint import CheckpointError
from .loop import TrainResult, evaluate, train
from .run_folder import RunError

__all__ = ["DataConfig", "RunConfig", "TrainConfig", "load_config", "RunError", "CheckpointError", "TrainResult",
           "evaluate", "train"]
