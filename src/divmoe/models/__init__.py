"""Models built from MoE layers."""

from .transformer import LMOutput, ModelConfig, MoETransformer

__all__ = ["LMOutput", "ModelConfig", "MoETransformer"]
