"""Models built from MoE layers."""

from .transformer import ModelConfig, MoETransformer

__all__ = ["ModelConfig", "MoETransformer"]
