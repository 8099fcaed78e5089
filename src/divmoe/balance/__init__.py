"""Balancers: losses on the router's probabilities/loads, and controllers with state."""

from .loss_free import update_selection_bias
from .losses import BALANCE_LOSSES, aux_loss, z_loss

# Controllers keep state in module buffers instead of adding a loss term.
BALANCE_CONTROLLERS = {"loss_free_bias": update_selection_bias}
BALANCERS = sorted({*BALANCE_LOSSES, *BALANCE_CONTROLLERS})

__all__ = ["BALANCE_LOSSES", "BALANCE_CONTROLLERS", "BALANCERS", "aux_loss", "z_loss",
           "update_selection_bias"]
