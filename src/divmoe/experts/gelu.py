"""Stacked GELU experts: E independent two-layer MLPs (ALGORITHMS.md §3, "SwiGLU or GELU
MLP"; the GShard / Switch Transformer expert) stored as 3-D weights."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .grouped_mm import grouped_mm


class StackedGELU(nn.Module):
    """E MLPs, ``y = gelu(x W_in) W_out`` (exact, erf GELU).

    Weights: ``w_in_EDH`` [E, d, H], ``w_out_EHD`` [E, H, d]; an expert has 2·d·H
    parameters (a SwiGLU expert of the same width has 3·d·H). The fast form is
    :meth:`grouped` (two grouped matmuls over expert-contiguous rows, under autograd);
    :meth:`expert` is the plain form for the reference dispatch.
    """

    def __init__(self, num_experts: int, d_model: int, hidden: int):
        super().__init__()
        self.num_experts, self.d_model, self.hidden = num_experts, d_model, hidden
        self.w_in_EDH = nn.Parameter(torch.empty(num_experts, d_model, hidden))
        self.w_out_EHD = nn.Parameter(torch.empty(num_experts, hidden, d_model))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.w_in_EDH, std=1.0 / math.sqrt(self.d_model))
        nn.init.normal_(self.w_out_EHD, std=1.0 / math.sqrt(self.hidden))

    def expert_sizes(self) -> list[int]:
        """Parameters of each expert."""
        return [2 * self.d_model * self.hidden] * self.num_experts

    def base_params(self) -> int:
        return 0  # nothing shared between experts

    def expert(self, e: int, x_ND: torch.Tensor) -> torch.Tensor:
        """Expert ``e`` on its tokens: the plain form the reference path uses."""
        return F.gelu(x_ND @ self.w_in_EDH[e]) @ self.w_out_EHD[e]

    def grouped(self, x_SD: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        """All experts over expert-contiguous rows: rows [off_e, off_e + counts_e) → expert e."""
        offs_E = counts_E.cumsum(0).to(torch.int32)
        return grouped_mm(F.gelu(grouped_mm(x_SD, self.w_in_EDH, offs_E)), self.w_out_EHD,
                          offs_E)

    @torch.no_grad()
    def select(self, expert_ids: list[int]) -> "StackedGELU":
        out = StackedGELU(len(expert_ids), self.d_model, self.hidden)
        out = out.to(device=self.w_in_EDH.device, dtype=self.w_in_EDH.dtype)
        out.w_in_EDH.copy_(self.w_in_EDH[expert_ids])
        out.w_out_EHD.copy_(self.w_out_EHD[expert_ids])
        return out
