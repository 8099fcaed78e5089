"""Balancers: losses on the router's probabilities/loads, and controllers with state."""

from .losses import BALANCE_LOSSES, aux_loss, z_loss

__all__ = ["BALANCE_LOSSES", "aux_loss", "z_loss"]
