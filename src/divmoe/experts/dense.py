"""The dense SwiGLU MLP: shared experts, and the dense baseline of equal active FLOPs."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SwiGLU(nn.Module):
    """``y = (silu(x W_gate) * (x W_up)) W_down`` with gate and up fused in ``w_in``."""

    def __init__(self, d_model: int, hidden: int):
        super().__init__()
        self.w_in = nn.Linear(d_model, 2 * hidden, bias=False)
        self.w_out = nn.Linear(hidden, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.w_in(x).chunk(2, dim=-1)
        return self.w_out(F.silu(gate) * up)
