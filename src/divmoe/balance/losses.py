"""Balancing losses computed from a RoutingPlan.

Each takes the plan and returns an *unweighted* scalar; the layer multiplies by the
configured weight, so the stats can report both.
"""

from __future__ import annotations

import torch

from ..routing.plan import RoutingPlan


def aux_loss(plan: RoutingPlan) -> torch.Tensor:
    """Switch/GShard load-balancing loss, micro-batch scope: E · Σ_i f_i · P_i.

    f_i = fraction of routed token-slots given to expert i (empty slots excluded;
    no gradient), P_i = mean router probability of expert i. Equals 1 exactly when
    routing is perfectly uniform (f_i = P_i = 1/E), so the weighted loss equals α.
    """
    E = plan.num_experts
    counts_E = plan.tokens_per_expert().to(plan.probs_TE.dtype)
    f_E = counts_E / counts_E.sum().clamp_min(1)
    P_E = plan.probs_TE.mean(dim=0)
    return E * (f_E * P_E).sum()


def z_loss(plan: RoutingPlan) -> torch.Tensor:
    """ST-MoE router z-loss: mean over tokens of logsumexp(logits)²."""
    return torch.logsumexp(plan.logits_TE.float(), dim=-1).square().mean()


BALANCE_LOSSES = {"aux_loss": aux_loss, "z_loss": z_loss}

# AdaMoE null-expert usage (router=null_experts); defined next to its router.
from ..routing.null_experts import null_usage_loss  # noqa: E402

BALANCE_LOSSES["null_usage"] = null_usage_loss
