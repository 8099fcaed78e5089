"""Training: the run configuration, the loop, checkpoints."""

from .config import DataConfig, RunConfig, TrainConfig, load_config
from .loop import RunError, TrainResult, evaluate, train
from .step import StepResult, train_step

__all__ = ["DataConfig", "RunConfig", "TrainConfig", "load_config", "RunError", "TrainResult",
           "evaluate", "train", "train_step", "StepResult"]
