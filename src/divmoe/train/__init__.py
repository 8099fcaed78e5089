"""Training: the run configuration, the loop, checkpoints."""

from .checkpoint import CheckpointError
from .config import DataConfig, RunConfig, TrainConfig, load_config
from .loop import TrainResult, evaluate, train
from .run_folder import RunError
from .step import StepResult, train_step

__all__ = ["DataConfig", "RunConfig", "TrainConfig", "load_config", "RunError",
           "CheckpointError", "TrainResult", "evaluate", "train", "train_step", "StepResult"]
