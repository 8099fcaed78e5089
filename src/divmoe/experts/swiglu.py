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
    Experts only ever see contiguous groups of tokens (``counts_E`` rows each).
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

    def expert(self, e: int, x_ND: torch.Tensor) -> torch.Tensor:
        """Expert ``e`` on its tokens: the plain form the reference path uses."""
        gate, up = (x_ND @ self.w_in_EDH2[e]).chunk(2, dim=-1)
        return (F.silu(gate) * up) @ self.w_out_EHD[e]

    def grouped(self, x_SD: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        """All experts over expert-contiguous rows: rows [off_e, off_e + counts_e) → expert e."""
        offs_E = counts_E.cumsum(0).to(torch.int32)
        h_SH2 = grouped_mm(x_SD, self.w_in_EDH2, offs_E)
        gate, up = h_SH2.chunk(2, dim=-1)
        return grouped_mm(F.silu(gate) * up, self.w_out_EHD, offs_E)


def grouped_mm(x_SD: torch.Tensor, w_EDH: torch.Tensor, offs_E: torch.Tensor) -> torch.Tensor:
    """Rows [offs[e-1], offs[e]) of ``x_SD`` times ``w_EDH[e]``, for every e.

    Uses ``torch._grouped_mm`` (one kernel, no Python loop) where this build supports the
    dtype and alignment, else a loop over experts on contiguous slices.
    """
    if _NATIVE_GROUPED_MM and x_SD.shape[0] > 0 and _native_ok(x_SD, w_EDH):
        return torch._grouped_mm(x_SD.contiguous(), w_EDH, offs=offs_E)
    return _LoopGroupedMM.apply(x_SD, w_EDH, [0] + offs_E.tolist())


class _LoopGroupedMM(torch.autograd.Function):
    """The loop fallback of :func:`grouped_mm`: per-expert matmuls written into preallocated
    outputs, forward and backward.

    Autograd of the plain loop (``cat([x[a:b] @ w[e] for e])``) would, in backward, build a
    zero tensor as large as all of ``x`` for every slice and one as large as all of ``w`` for
    every ``w[e]`` select, and add them up: O(E) full-size fills and adds per call. Here
    ``grad_x`` rows and ``grad_w[e]`` are each written once by one matmul; only experts with
    no rows get an explicit zero gradient.
    """

    @staticmethod
    def forward(ctx, x_SD, w_EDH, bounds):
        ctx.save_for_backward(x_SD, w_EDH)
        ctx.bounds = bounds
        out_SH = x_SD.new_empty(bounds[-1], w_EDH.shape[2],  # rows past the last offset: none
                                dtype=torch.promote_types(x_SD.dtype, w_EDH.dtype))
        for e in range(w_EDH.shape[0]):
            a, b = bounds[e], bounds[e + 1]
            if b > a:
                torch.mm(x_SD[a:b], w_EDH[e], out=out_SH[a:b])
        return out_SH

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_SH):
        x_SD, w_EDH = ctx.saved_tensors
        bounds = ctx.bounds
        need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_SH = grad_SH.contiguous()
        grad_x = torch.empty_like(x_SD, memory_format=torch.contiguous_format) if need_x else None
        grad_w = torch.empty_like(w_EDH, memory_format=torch.contiguous_format) if need_w else None
        if need_x and bounds[-1] < x_SD.shape[0]:
            grad_x[bounds[-1]:].zero_()
        for e in range(w_EDH.shape[0]):
            a, b = bounds[e], bounds[e + 1]
            if need_w:
                if b > a:
                    torch.mm(x_SD[a:b].t(), grad_SH[a:b], out=grad_w[e])
                else:
                    grad_w[e].zero_()
            if need_x and b > a:
                torch.mm(grad_SH[a:b], w_EDH[e].t(), out=grad_x[a:b])
        return grad_x, grad_w, None


def _native_ok(x_SD: torch.Tensor, w_EDH: torch.Tensor) -> bool:
    # The kernel needs every row stride to be a multiple of 16 bytes.
    per_row = 16 // x_SD.element_size()
    return x_SD.dtype in (torch.float32, torch.bfloat16, torch.float16) \
        and x_SD.shape[1] % per_row == 0 and w_EDH.shape[2] % per_row == 0


def _probe_native_grouped_mm() -> bool:
    if not hasattr(torch, "_grouped_mm"):
        return False
    try:
        x = torch.randn(5, 8, requires_grad=True)
        w = torch.randn(3, 8, 4, requires_grad=True)  # rows of 16 bytes: the kernel's alignment
        y = torch._grouped_mm(x, w, offs=torch.tensor([2, 2, 5], dtype=torch.int32))
        y.backward(torch.ones_like(y))
        ref = torch.cat([x[:2] @ w[0], x[2:] @ w[2]])
        return bool(torch.allclose(y, ref, atol=1e-5))
    except (RuntimeError, TypeError, NotImplementedError):
        return False


_NATIVE_GROUPED_MM = _probe_native_grouped_mm()
