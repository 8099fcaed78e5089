"""Routing diagnostics: plain functions over recorded routing statistics."""

from .load import coefficient_of_variation, load_entropy, max_vio

__all__ = ["max_vio", "coefficient_of_variation", "load_entropy"]
