"""Stacked SwiGLU experts: E independent MLPs stored as 3-D weights."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class StackedSwiGLU(nn.Module):
    """E SwiGLU MLPs, ``y = (silu(x W_gate) * (x W_up)) W_down``.

    Weights: ``w_in_EDH2`` [E, d, 2·H] holds gate (first H columns) and up fused, so one
    matmul serves both; ``w_out_EHD`` [E, H, d].
    The fast path (:mod:`divmoe.dispatch.routed_swiglu`) runs them from :meth:`buckets` on
    expert-contiguous rows; :meth:`expert` is the plain form for the reference.
    """

    def __init__(self, num_experts: int, d_model: int, hidden: int):
        super().__init__()
        self.num_experts, self.d_model, self.hidden = num_experts, d_model, hidden
        self.w_in_EDH2 = nn.Parameter(torch.empty(num_experts, d_model, 2 * hidden))
        self.w_out_EHD = nn.Parameter(torch.empty(num_experts, hidden, d_model))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.w_in_EDH2, std=1.0 / math.sqrt(self.d_model))
        nn.init.normal_(self.w_out_EHD, std=1.0 / math.sqrt(self.hidden))

    def params_per_expert(self) -> int:
        return 3 * self.d_model * self.hidden

    def expert_sizes(self) -> list[int]:
        """Parameters of each expert."""
        return [self.params_per_expert()] * self.num_experts

    def base_params(self) -> int:
        return 0  # nothing shared between experts

    def expert(self, e: int, x_ND: torch.Tensor) -> torch.Tensor:
        """Expert ``e`` on its tokens: the plain form the reference path uses."""
        gate, up = (x_ND @ self.w_in_EDH2[e]).chunk(2, dim=-1)
        return (F.silu(gate) * up) @ self.w_out_EHD[e]

    @torch.no_grad()
    def select(self, expert_ids: list[int]) -> "StackedSwiGLU":
        out = StackedSwiGLU(len(expert_ids), self.d_model, self.hidden)
        out = out.to(device=self.w_in_EDH2.device, dtype=self.w_in_EDH2.dtype)
        out.w_in_EDH2.copy_(self.w_in_EDH2[expert_ids])
        out.w_out_EHD.copy_(self.w_out_EHD[expert_ids])
        return out

    def row_order(self) -> None:
        return None  # rows are ordered by expert id

    def buckets(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(w_in, w_out) per group of equal-width experts: one group, all E experts."""
        return [(self.w_in_EDH2, self.w_out_EHD)]
