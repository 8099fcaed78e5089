"""What every router declares about itself, and the checks that follow from it.

A router is an ``nn.Module`` built as ``Router(d_model, moe_config)`` whose forward maps
the layer's tokens x_TD to a :class:`~divmoe.routing.plan.RoutingPlan`::

    router(x_TD, selection_bias_E=None, token_ids_T=None, seq_len=None) -> RoutingPlan

``selection_bias_E`` is the Balancer's selection-only bias (None unless loss-free balancing
is on), ``token_ids_T`` the token ids (routers that route on ids), ``seq_len`` the length S of
the input's sequences (None for 2-D input). A router names the ``MoEConfig`` settings it
reads in ``settings`` (``divmoe list`` prints them) and checks its cross-field rules in
:meth:`Router.check`, which ``MoEConfig.check`` calls for the router it names.
"""

from __future__ import annotations

from contextlib import contextmanager

from torch import nn

from ..config import ConfigError


class Router(nn.Module):
    settings: tuple[str, ...] = ()
    # Whether selection can take the Balancer's bias (loss-free balancing).
    uses_selection_bias: bool = False
    # How the layer runs the plan: "dispatch" (token slots → experts) or "soft_merge"
    # (one merged expert per group of tokens); see divmoe.dispatch.EXECUTIONS.
    execution: str = "dispatch"
    # Whether selection looks at the other tokens of the batch (expert choice, Sinkhorn, soft
    # merging): then a token's routing, and a causal LM's loss, depends on later tokens. Such a
    # router also has a causal rule, used while ``route_causally`` is set (:func:`causal_routing`).
    batch_dependent: bool = False
    route_causally: bool = False

    @classmethod
    def check(cls, cfg, prefix: str = "") -> None:
        """Rules every router shares, then its own (:meth:`check_settings`); called by
        ``MoEConfig.check`` for the router it names."""
        if "top_k" in cls.settings and cfg.top_k > cls.max_top_k(cfg):
            raise ConfigError(f"{prefix}top_k={cfg.top_k} is not allowed: must be <= "
                              f"{cls.max_top_k_text(cfg, prefix)}")
        if cfg.score_func != "softmax" and "score_func" not in cls.settings:
            raise ConfigError(f"{prefix}score_func={cfg.score_func!r} is not allowed with "
                              f"{prefix}router={cfg.router!r}: only router=topk supports "
                              f"sigmoid scores")
        cls.check_settings(cfg, prefix)

    @classmethod
    def check_settings(cls, cfg, prefix: str = "") -> None:
        """This router's own cross-field rules (none by default)."""

    @classmethod
    def max_top_k(cls, cfg) -> int:
        return cfg.num_experts

    @classmethod
    def max_top_k_text(cls, cfg, prefix: str) -> str:
        return f"{prefix}num_experts={cfg.num_experts}"

    def experts_per_token(self) -> int:
        """Experts whose parameters one token touches at most (for activated-parameter counts)."""
        return self.top_k


def check_groups_divide_experts(cfg, prefix: str) -> None:
    """Expert groups (group-limited top-k, MoGE) split the experts evenly."""
    if cfg.num_experts % cfg.n_groups:
        raise ConfigError(f"{prefix}n_groups={cfg.n_groups} is not allowed: must divide "
                          f"{prefix}num_experts={cfg.num_experts}")


@contextmanager
def causal_routing(model: nn.Module):
    """Inside, every batch-dependent router of ``model`` routes each token from that token
    and the tokens before it in its sequence (each router's docstring gives its causal rule),
    so a causal LM's loss is a true next-token loss; routers that route per token are
    unchanged. Used for evaluation (``val_bpb_causal``)."""
    routers = [m for m in model.modules() if isinstance(m, Router) and m.batch_dependent]
    for r in routers:
        r.route_causally = True
    try:
        yield
    finally:
        for r in routers:
            r.route_causally = False
