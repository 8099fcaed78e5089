"""Dropless dispatch → grouped experts → combine: the hot path.

Steps (T tokens, K slots per token, R = routed (non-empty) slots ≤ T·K):
  1. Sort the flat slot list by the row position of its expert (stable), empty slots
     (id −1) last, and cut them off: ``token_R`` is the token of each routed row, rows
     expert-contiguous; ``weight_R`` its combine weight.
  2. SwiGLU layouts (``experts.buckets()``): one hand-written autograd node gathers the rows,
     runs the grouped experts with the weight folded into the activation, and scatter-adds
     into the output (:mod:`divmoe.dispatch.routed_swiglu`), keeping only x, the hidden
     pre-activation and the activation for backward.
     Other layouts: x_RD = x_TD[token_R], y_RD = ``experts.grouped(x_RD, counts)``,
     out_TD = scatter_add(token_R, weight_R · y_RD), under plain autograd.

Gathers are ``index_select`` (backward: ``index_add``) and the combine is ``index_add``
(backward: ``index_select``); on CPU both are single passes over the rows, unlike
``x[idx]``, whose backward is the sorting ``index_put`` with accumulation.
"""

from __future__ import annotations

import torch

from ..routing.plan import RoutingPlan
from .routed_swiglu import routed_swiglu


def dispatch_combine(x_TD: torch.Tensor, plan: RoutingPlan, experts) -> torch.Tensor:
    T, K = plan.expert_ids_TK.shape
    E = plan.num_experts
    if T == 0:
        return torch.zeros_like(x_TD)
    buckets = experts.buckets() if hasattr(experts, "buckets") else None
    # Profiler ranges (cheap when no profiler runs): `divmoe bench` splits the layer's time by them.
    with torch.profiler.record_function("divmoe.dispatch"):
        ids_S = plan.expert_ids_TK.reshape(-1)
        position_E = getattr(experts, "row_position_E", None)  # hetero: buckets in turn
        key_S = ids_S if position_E is None else position_E[ids_S.clamp(min=0)]
        key_S = torch.where(ids_S < 0, E, key_S)  # empty slots last, then cut off
        order_S = torch.argsort(key_S, stable=True)
        counts_P = torch.bincount(key_S, minlength=E + 1)[:E]  # rows per expert, in row order
        counts_B = counts_P.split([w_in.shape[0] for w_in, _ in buckets] if buckets else [E])
        rows_B = torch.stack([c.sum() for c in counts_B]).tolist()  # the one host sync
        routed_R = order_S[:sum(rows_B)]
        token_R = routed_R // K
        weight_R = plan.weights_TK.reshape(-1).index_select(0, routed_R).to(x_TD.dtype)
    if buckets:
        offs_B = [c.cumsum(0).to(torch.int32) for c in counts_B]
        return routed_swiglu(x_TD, token_R, weight_R, buckets, offs_B, rows_B)
    with torch.profiler.record_function("divmoe.dispatch"):
        x_RD = x_TD.index_select(0, token_R)
    with torch.profiler.record_function("divmoe.experts"):
        y_RD = experts.grouped(x_RD, counts_P)
    with torch.profiler.record_function("divmoe.combine"):
        return x_TD.new_zeros(x_TD.shape).index_add(0, token_R, y_RD * weight_R[:, None])
