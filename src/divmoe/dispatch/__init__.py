"""Permute tokens into expert-contiguous order, run experts, combine."""

from .grouped import dispatch_combine
from .reference import reference_dispatch_combine

DISPATCHERS = {"grouped": dispatch_combine, "reference": reference_dispatch_combine}

__all__ = ["dispatch_combine", "reference_dispatch_combine", "DISPATCHERS"]
