"""Balancers: losses on the router's probabilities/loads, controllers with state, and plan
transforms between the router and dispatch — each declared once in :data:`BALANCERS`
(what kind it is, the ``MoEConfig`` field that weights it, the settings it reads, its
cross-field check) and run by the layer's :class:`~divmoe.balance.balancer.Balancer`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from ..config import ConfigError, check_per_expert
from ..routing.null_experts import null_usage_loss
from .aux_scope import GLOBAL_COUNTS
from .aux_scope import SCOPES as AUX_LOSS_SCOPES
from .capacity import OVERFLOW as CAPACITY_OVERFLOW
from .capacity import PRIORITY as CAPACITY_PRIORITY
from .capacity import Capacity, apply_capacity, slot_capacity, tokens_per_expert_choice
from .context import BalanceContext
from .dirichlet import dirichlet_prior
from .loss_free import update_selection_bias
from .losses import aux_loss, routing_entropy, z_loss
from .skip import DynamicSkip
from .small_expert import small_expert_bias


@dataclass(frozen=True)
class BalanceTerm:
    """One entry of ``moe.balance``.

    ``kind``: ``loss`` (a term of aux_loss, ``impl(plan, ctx)`` unweighted, times the config
    field named by ``weight``), ``controller`` (state updated after the optimizer step,
    ``impl`` the update rule) or ``transform`` (``impl(cfg)`` rewrites the plan before
    dispatch). ``settings``: the ``MoEConfig`` fields it reads; ``check(cfg, prefix)``: its
    cross-field rules; ``doc``: whose docstring describes it.
    """

    kind: str
    impl: Callable
    weight: str | None = None
    settings: tuple[str, ...] = ()
    check: Callable[[Any, str], None] | None = None
    doc: Any = None


def _check_dirichlet(cfg, prefix: str) -> None:
    check_per_expert(cfg, "dirichlet_alpha_per_expert", prefix, 0, True, "concentration")


def _check_null_usage(cfg, prefix: str) -> None:
    if cfg.router != "null_experts":
        raise ConfigError(f"{prefix}balance={cfg.balance!r} is not allowed with {prefix}router="
                          f"{cfg.router!r}: null_usage needs router=null_experts")


def _check_loss_free(cfg, prefix: str) -> None:
    from ..routing import ROUTERS  # routing imports balance.capacity: resolve at check time

    if not ROUTERS[cfg.router].uses_selection_bias:
        ok = sorted(n for n, c in ROUTERS.items() if c.uses_selection_bias)
        raise ConfigError(f"{prefix}balance={cfg.balance!r} is not allowed with {prefix}router="
                          f"{cfg.router!r}: loss_free_bias needs a router that selects with a "
                          f"bias ({', '.join(ok)})")


BALANCERS: dict[str, BalanceTerm] = {
    "aux_loss": BalanceTerm("loss", aux_loss, "aux_loss_weight",
                            ("aux_loss_weight", "aux_loss_scope", "aux_loss_global_counts"),
                            doc=aux_loss),
    "z_loss": BalanceTerm("loss", z_loss, "z_loss_weight", ("z_loss_weight",), doc=z_loss),
    "routing_entropy": BalanceTerm("loss", routing_entropy, "routing_entropy_weight",
                                   ("routing_entropy_weight",), doc=routing_entropy),
    "small_expert_bias": BalanceTerm("loss", small_expert_bias, "small_expert_bias_weight",
                                     ("small_expert_bias_weight", "expert_widths")),
    "dirichlet_prior": BalanceTerm("loss", dirichlet_prior, "dirichlet_prior_weight",
                                   ("dirichlet_prior_weight", "dirichlet_alpha",
                                    "dirichlet_alpha_per_expert"), _check_dirichlet),
    "null_usage": BalanceTerm("loss", null_usage_loss, "null_usage_weight",
                              ("null_usage_weight", "null_target"), _check_null_usage,
                              doc=null_usage_loss),
    "loss_free_bias": BalanceTerm("controller", update_selection_bias, None,
                                  ("bias_update_rate",), _check_loss_free),
    "capacity": BalanceTerm("transform", Capacity, None, Capacity.settings, doc=Capacity),
    "dynamic_skip": BalanceTerm("transform", DynamicSkip, None, DynamicSkip.settings,
                                doc=DynamicSkip),
}
BALANCE_LOSSES = {n: t.impl for n, t in BALANCERS.items() if t.kind == "loss"}
PLAN_TRANSFORMS = {n: t.impl for n, t in BALANCERS.items() if t.kind == "transform"}

from .balancer import Balancer  # noqa: E402  (it reads BALANCERS)

__all__ = ["BALANCERS", "BALANCE_LOSSES", "PLAN_TRANSFORMS", "BalanceTerm", "Balancer",
           "AUX_LOSS_SCOPES", "GLOBAL_COUNTS", "CAPACITY_OVERFLOW",
           "CAPACITY_PRIORITY", "BalanceContext", "aux_loss",
           "z_loss", "routing_entropy",
           "small_expert_bias", "dirichlet_prior", "apply_capacity", "slot_capacity",
           "tokens_per_expert_choice", "update_selection_bias", "null_usage_loss"]
