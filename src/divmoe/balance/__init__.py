"""Balancers: losses on the router's probabilities/loads, controllers with state, and plan
transforms between the router and dispatch."""

from .aux_scope import SCOPES as AUX_LOSS_SCOPES
from .capacity import OVERFLOW as CAPACITY_OVERFLOW
from .capacity import apply_capacity, expert_capacity
from .context import BalanceContext
from .dirichlet import dirichlet_prior
from .loss_free import update_selection_bias
from .losses import BALANCE_LOSSES, aux_loss, z_loss
from .small_expert import small_expert_bias

# Controllers keep state in module buffers instead of adding a loss term.
BALANCE_CONTROLLERS = {"loss_free_bias": update_selection_bias}
# Plan transforms rewrite the router's plan before dispatch.
PLAN_TRANSFORMS = {"capacity": apply_capacity}
BALANCERS = sorted({*BALANCE_LOSSES, *BALANCE_CONTROLLERS, *PLAN_TRANSFORMS})

__all__ = ["BALANCE_LOSSES", "BALANCE_CONTROLLERS", "PLAN_TRANSFORMS", "BALANCERS",
           "AUX_LOSS_SCOPES", "CAPACITY_OVERFLOW", "BalanceContext", "aux_loss", "z_loss",
           "small_expert_bias", "dirichlet_prior", "apply_capacity", "expert_capacity",
           "update_selection_bias"]
