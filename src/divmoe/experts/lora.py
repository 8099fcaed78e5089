"""LoRA experts over one frozen dense SwiGLU (LoRAMoE, Dou et al. 2023; MoLA, Gao et al. 2024).

Storage: the base MLP is one frozen pair ``w_in_DH2`` [d, 2·H] (gate | up fused) and
``w_out_HD`` [H, d] (``requires_grad=False``: no gradient, no optimizer update). Expert e is
the base plus a rank-r adapter on each projection:

    h = x W_in + (x A_in[e]) B_in[e]          A_in  [E, d, r],  B_in  [E, r, 2·H]
    z = silu(h_gate) * h_up
    y = z W_out + (z A_out[e]) B_out[e]       A_out [E, H, r],  B_out [E, r, d]

B is initialised to zero, so at initialisation every expert equals the base MLP exactly
(and so does the MoE output, when the routed weights sum to 1). A is Gaussian.

Compute (``grouped``): the base projections run once over all routed rows as plain matmuls;
the adapters are two grouped matmuls per projection (down to rank r, back up), with
:func:`divmoe.experts.grouped_mm.grouped_mm`. No Python loop over experts or tokens.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .grouped_mm import grouped_mm


class LoRASwiGLU(nn.Module):
    """A frozen dense SwiGLU shared by E experts, each adding its own low-rank adapters."""

    def __init__(self, num_experts: int, d_model: int, hidden: int, rank: int):
        super().__init__()
        if rank < 1:
            raise ValueError(f"lora rank must be >= 1, got {rank}")
        self.num_experts, self.d_model, self.hidden, self.rank = num_experts, d_model, hidden, rank
        self.w_in_DH2 = nn.Parameter(torch.empty(d_model, 2 * hidden), requires_grad=False)
        self.w_out_HD = nn.Parameter(torch.empty(hidden, d_model), requires_grad=False)
        self.a_in_EDR = nn.Parameter(torch.empty(num_experts, d_model, rank))
        self.b_in_ERH2 = nn.Parameter(torch.empty(num_experts, rank, 2 * hidden))
        self.a_out_EHR = nn.Parameter(torch.empty(num_experts, hidden, rank))
        self.b_out_ERD = nn.Parameter(torch.empty(num_experts, rank, d_model))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.w_in_DH2, std=1.0 / math.sqrt(self.d_model))
        nn.init.normal_(self.w_out_HD, std=1.0 / math.sqrt(self.hidden))
        self.reset_adapters()

    def reset_adapters(self) -> None:
        nn.init.normal_(self.a_in_EDR, std=1.0 / math.sqrt(self.d_model))
        nn.init.normal_(self.a_out_EHR, std=1.0 / math.sqrt(self.hidden))
        nn.init.zeros_(self.b_in_ERH2)
        nn.init.zeros_(self.b_out_ERD)

    @classmethod
    def from_dense(cls, dense: nn.Module, num_experts: int, rank: int) -> "LoRASwiGLU":
        """Experts over a copy of a dense :class:`divmoe.experts.SwiGLU` (``w_in``: Linear(d, 2H),
        ``w_out``: Linear(H, d)); the copy is frozen, ``dense`` itself is left untouched."""
        w_in, w_out = dense.w_in.weight, dense.w_out.weight   # [2H, d], [d, H]
        hidden, d_model = w_out.shape[1], w_out.shape[0]
        if tuple(w_in.shape) != (2 * hidden, d_model):
            raise ValueError(f"dense w_in has shape {tuple(w_in.shape)}, expected "
                             f"{(2 * hidden, d_model)} for hidden={hidden}, d_model={d_model}")
        self = cls(num_experts, d_model, hidden, rank).to(device=w_in.device, dtype=w_in.dtype)
        with torch.no_grad():
            self.w_in_DH2.copy_(w_in.t())
            self.w_out_HD.copy_(w_out.t())
        return self

    @torch.no_grad()
    def select(self, expert_ids: list[int]) -> "LoRASwiGLU":
        out = LoRASwiGLU(len(expert_ids), self.d_model, self.hidden, self.rank)
        out = out.to(device=self.w_in_DH2.device, dtype=self.w_in_DH2.dtype)
        out.w_in_DH2.copy_(self.w_in_DH2)
        out.w_out_HD.copy_(self.w_out_HD)
        for name in ("a_in_EDR", "b_in_ERH2", "a_out_EHR", "b_out_ERD"):
            getattr(out, name).copy_(getattr(self, name)[expert_ids])
        return out

    def base_params(self) -> int:
        """Parameters of the frozen base, run again inside every expert a token is routed to
        (activated-parameter accounting counts them per expert)."""
        return 3 * self.d_model * self.hidden

    def expert_sizes(self) -> list[int]:
        """Adapter parameters of each expert (without the base, see base_params)."""
        r, d, h = self.rank, self.d_model, self.hidden
        return [r * (d + 2 * h) + r * (h + d)] * self.num_experts

    def base(self, x_ND: torch.Tensor) -> torch.Tensor:
        """The frozen dense MLP alone."""
        gate, up = (x_ND @ self.w_in_DH2).chunk(2, dim=-1)
        return (F.silu(gate) * up) @ self.w_out_HD

    def expert(self, e: int, x_ND: torch.Tensor) -> torch.Tensor:
        """Expert ``e`` on its tokens: the plain form the reference path uses."""
        h = x_ND @ self.w_in_DH2 + (x_ND @ self.a_in_EDR[e]) @ self.b_in_ERH2[e]
        gate, up = h.chunk(2, dim=-1)
        z = F.silu(gate) * up
        return z @ self.w_out_HD + (z @ self.a_out_EHR[e]) @ self.b_out_ERD[e]

    def grouped(self, x_SD: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        """All experts over expert-contiguous rows: rows [off_e, off_e + counts_e) → expert e."""
        offs_E = counts_E.cumsum(0).to(torch.int32)
        h = x_SD @ self.w_in_DH2 + grouped_mm(grouped_mm(x_SD, self.a_in_EDR, offs_E),
                                              self.b_in_ERH2, offs_E)
        gate, up = h.chunk(2, dim=-1)
        z = F.silu(gate) * up
        return z @ self.w_out_HD + grouped_mm(grouped_mm(z, self.a_out_EHR, offs_E),
                                              self.b_out_ERD, offs_E)
