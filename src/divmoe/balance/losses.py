"""Balancing losses computed from a RoutingPlan.

Each takes the plan (and an optional :class:`BalanceContext`) and returns an *unweighted*
scalar; the layer multiplies by the configured weight, so the stats can report both.
"""

from __future__ import annotations

import torch

from ..routing.plan import RoutingPlan
from .aux_scope import aux_loss_global, aux_loss_micro_batch, aux_loss_sequence
from .context import BalanceContext


def aux_loss(plan: RoutingPlan, ctx: BalanceContext | None = None) -> torch.Tensor:
    """Switch/GShard load-balancing loss E · Σ_i f_i · P_i, in the scope ``ctx`` names.

    f_i = fraction of routed token-slots given to expert i (empty slots excluded;
    no gradient), P_i = mean router probability of expert i. Equals 1 exactly when
    routing is perfectly uniform (f_i = P_i = 1/E), so the weighted loss equals α.
    Scope micro_batch (the default; ``ctx`` None) counts both over this forward's tokens;
    sequence and global_batch are defined in :mod:`divmoe.balance.aux_scope`.
    """
    scope = ctx.aux_loss_scope if ctx is not None else "micro_batch"
    if scope == "sequence":
        if ctx.seq_shape is None:
            raise ValueError("aux_loss_scope=sequence needs the sequence shape (N, S)")
        return aux_loss_sequence(plan, *ctx.seq_shape)
    if scope == "global_batch" and ctx.step_counts_E is not None:
        return aux_loss_global(plan, ctx.step_counts_E)
    return aux_loss_micro_batch(plan)


def z_loss(plan: RoutingPlan, ctx: BalanceContext | None = None) -> torch.Tensor:
    """ST-MoE router z-loss: mean over tokens of logsumexp(logits)²."""
    return torch.logsumexp(plan.logits_TE.float(), dim=-1).square().mean()



def routing_entropy(plan: RoutingPlan, ctx: BalanceContext | None = None) -> torch.Tensor:
    """The dynamic loss of dynamic top-p routing (Huang et al. 2024, "Harder Tasks Need More
    Experts", arXiv 2403.07652): mean over tokens of the entropy of the router's distribution,
    L = −(1/T) Σ_t Σ_e p_te log p_te. Minimising it sharpens each token's distribution, so
    the top-p rule keeps fewer experts: without it a router can spread its mass and activate
    many experts for every token (the paper adds it for that reason, beside the
    load-balancing loss; the default weight 1e-4 is our recollection of its setting, not
    checked against its text). 0 for one-hot routing, log E for uniform routing."""
    p_TE = plan.probs_TE.float()
    return -(p_TE * p_TE.clamp_min(1e-20).log()).sum(dim=-1).mean()
