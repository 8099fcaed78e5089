"""Dropless dispatch → grouped experts → combine: the hot path.

Steps (T tokens, K slots, S = number of non-empty slots):
  1. Sort the flat slot list by expert id (stable), empty slots (id −1) last.
  2. Gather token rows into expert-contiguous order: x_SD = x_TD[token_of_slot].
  3. One grouped computation over all experts (``experts.grouped``).
  4. Scale each row by its combine weight and scatter-add back to its token.
"""

from __future__ import annotations

import torch

from ..routing.plan import RoutingPlan


def dispatch_combine(x_TD: torch.Tensor, plan: RoutingPlan, experts) -> torch.Tensor:
    T, K = plan.expert_ids_TK.shape
    E = plan.num_experts
    ids_S = plan.expert_ids_TK.reshape(-1)
    # Empty slots sort after every real expert and are cut off below.
    sort_key_S = torch.where(ids_S < 0, E, ids_S)
    order_S = torch.argsort(sort_key_S, stable=True)
    counts_E = torch.bincount(sort_key_S, minlength=E + 1)[:E]
    num_routed = int(counts_E.sum())
    order_S = order_S[:num_routed]
    token_S = order_S // K

    y_SD = experts.grouped(x_TD[token_S], counts_E)
    y_SD = y_SD * plan.weights_TK.reshape(-1)[order_S].unsqueeze(-1).to(y_SD.dtype)
    out_TD = torch.zeros_like(x_TD)
    return out_TD.index_add(0, token_S, y_SD.to(x_TD.dtype))
