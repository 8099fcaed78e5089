"""The obviously-correct dispatch: loop over experts, pick their tokens by mask.

Every fast path is tested against this one (outputs and gradients).
"""

from __future__ import annotations

import torch

from ..routing.plan import RoutingPlan


def reference_dispatch_combine(x_TD: torch.Tensor, plan: RoutingPlan, experts) -> torch.Tensor:
    out_TD = torch.zeros_like(x_TD)
    for e in range(plan.num_experts):
        token_N, slot_N = torch.nonzero(plan.expert_ids_TK == e, as_tuple=True)
        if token_N.numel() == 0:
            continue
        y_ND = experts.expert(e, x_TD[token_N])
        out_TD = out_TD.index_add(0, token_N, y_ND * plan.weights_TK[token_N, slot_N].unsqueeze(-1))
    return out_TD
