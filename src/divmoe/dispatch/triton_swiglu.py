"""``dispatch=triton``: the routed SwiGLU as Triton kernels that gather and scatter rows by index.

Steps (T tokens, K slots, R routed rows sorted by expert as in :mod:`divmoe.dispatch.grouped`,
per bucket of equal-width experts; :mod:`divmoe.dispatch.triton_kernels` has the kernels):

Forward
  1. h_R = x_TD[token_R] @ W_in[e]                        gather fused into the GEMM's loads
  2. y_S[slot_R] = (w_R · silu(h_gate) · h_up) @ W_out[e]  SwiGLU and routing weight fused
                                                          into the loads, rows scattered to
                                                          their slot (t·K + k)
  3. out_TD = y_S.view(T, K, D).sum(1)                    empty slots stay zero
Backward (g = ∂L/∂out)
  4. ∂h_R, ∂w partials = g[token_R] @ W_out[e]ᵀ, then the SwiGLU backward in the epilogue
  5. ∂W_out[e] = (w · a)ᵀ g[token]   ∂W_in[e] = x[token]ᵀ ∂h   one program per (expert, tile),
                                                             zeros for an expert with no rows
  6. ∂x_S[slot_R] = ∂h_R @ W_in[e]ᵀ;  ∂x_TD = ∂x_S.view(T, K, D).sum(1)

Only h (the hidden pre-activation, [R, 2H]) is kept for backward (none with
``recompute_hidden``: step 1 runs again); the gathered rows x_TD[token_R] and g[token_R] are
never materialised, in forward or backward. Combining through the [T·K, D] slot tensor
instead of atomic adds into [T, D] keeps the result deterministic (ScatterMoE does the same).
The host reads only the row counts (:func:`~divmoe.dispatch.grouped.routed_rows`): they size
the grids; the kernels find each tile's expert from the counts on the device.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ..experts.layout import layout_kind
from ..routing.plan import RoutingPlan
from . import TRITON_DTYPES
from .grouped import routed_rows
from .triton_kernels import expert_wgrad, interpreting, min_block_n, rows_gemm


class _Span(NamedTuple):
    """Rows [r0, r1) of the routed rows: every expert of bucket ``bucket``."""

    bucket: int
    r0: int
    r1: int
    counts: list[int]      # rows per expert of the bucket (host)
    ends: torch.Tensor     # int32 cumulative row counts (device)


@torch.compiler.disable(reason="dropless dispatch: data-dependent row counts")
def triton_dispatch_combine(x_TD: torch.Tensor, plan: RoutingPlan, experts,
                            recompute_hidden: bool = False) -> torch.Tensor:
    """out_TD: every token's routed experts, weighted by the plan (SwiGLU layouts)."""
    if not (x_TD.is_cuda or interpreting()):
        raise ValueError(f"moe.dispatch='triton' runs on CUDA tensors, got a {x_TD.device.type} "
                         f"input (TRITON_INTERPRET=1 runs it on CPU, slowly, for tests): use "
                         f"moe.dispatch='auto' or 'grouped' for CPU")
    if layout_kind(type(experts)) != "bucketed":
        raise ValueError(f"moe.dispatch='triton' runs SwiGLU expert layouts, got "
                         f"{type(experts).__name__}: use moe.dispatch='grouped'")
    if x_TD.dtype not in TRITON_DTYPES:
        raise ValueError(f"moe.dispatch='triton' runs float32, bfloat16 and float16 (it "
                         f"accumulates in float32), got {x_TD.dtype}: use moe.dispatch='grouped'")
    if plan.num_tokens == 0:
        return torch.zeros_like(x_TD)
    rows = routed_rows(x_TD, plan, experts.row_order())
    buckets = experts.buckets()
    spans, lo, r = [], 0, 0
    for b, (w_in, _) in enumerate(buckets):
        E_b = w_in.shape[0]
        counts, n = rows.counts[lo:lo + E_b], sum(rows.counts[lo:lo + E_b])
        if n:  # a bucket nobody chose is never called, as in the reference loop
            ends = rows.counts_E[lo:lo + E_b].cumsum(0).to(torch.int32)
            spans.append(_Span(b, r, r + n, counts, ends))
        lo, r = lo + E_b, r + n
    if not spans:
        return torch.zeros_like(x_TD)
    flat = [w for pair in buckets for w in pair]
    return _TritonRoutedSwiGLU.apply(x_TD.contiguous(), rows.slot_R, rows.weight_R, spans,
                                     plan.expert_ids_TK.shape[1], not recompute_hidden, *flat)


def _up(x_TD, w_in, span, token):
    """h = x_TD[token] @ W_in[e] for the span's rows."""
    h = x_TD.new_empty(span.r1 - span.r0, w_in.shape[2])
    return rows_gemm(x_TD, w_in, h, span.ends, span.counts, gather=token)


class _TritonRoutedSwiGLU(torch.autograd.Function):

    @staticmethod
    def forward(ctx, x_TD, slot_R, weight_R, spans, K, save_hidden, *weights):
        T, D = x_TD.shape
        token_R = slot_R // K
        y_SD = x_TD.new_zeros(T * K, D)
        hidden = []
        save_hidden = save_hidden and any(ctx.needs_input_grad)
        for s in spans:
            w_in, w_out = weights[2 * s.bucket], weights[2 * s.bucket + 1]
            h = _up(x_TD, w_in, s, token_R[s.r0:s.r1])
            rows_gemm(h, w_out, y_SD, s.ends, s.counts, scatter=slot_R[s.r0:s.r1],
                      weight=weight_R[s.r0:s.r1], swiglu_in=True)
            hidden.append(h if save_hidden else None)
            del h
        ctx.save_for_backward(x_TD, token_R, slot_R, weight_R, *weights)
        # Not saved_tensors, so backward can drop each bucket's h once used; where it finds
        # None (recompute_hidden, or a second backward with retain_graph) it recomputes it.
        ctx.spans, ctx.hidden, ctx.K = spans, hidden, K
        return y_SD.view(T, K, D).sum(1)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_TD):
        x_TD, token_R, slot_R, weight_R, *weights = ctx.saved_tensors
        need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[2]
        need_param = ctx.needs_input_grad[6:]
        T, D = x_TD.shape
        K = ctx.K
        g_TD = grad_TD.contiguous()
        grad_x_SD = x_TD.new_zeros(T * K, D) if need_x else None
        grad_weight = weight_R.new_empty(weight_R.shape) if need_w else None
        grad_params = [None] * len(weights)
        block_n = min_block_n(x_TD.device)
        for i, s in enumerate(ctx.spans):
            w_in, w_out = weights[2 * s.bucket], weights[2 * s.bucket + 1]
            token, w_r = token_R[s.r0:s.r1], weight_R[s.r0:s.r1]
            h, ctx.hidden[i] = ctx.hidden[i], None
            if h is None:
                h = _up(x_TD, w_in, s, token)
            H = w_out.shape[1]
            grad_h = torch.empty_like(h)
            parts = torch.zeros(h.shape[0], -(-H // block_n), dtype=torch.float32,
                                device=h.device)
            rows_gemm(g_TD, w_out.transpose(1, 2), grad_h, s.ends, s.counts, gather=token,
                      weight=w_r, swiglu_grad=h, grad_weight_parts=parts)
            if need_w:
                grad_weight[s.r0:s.r1] = parts.sum(1)
            del parts
            if need_param[2 * s.bucket + 1]:
                grad_params[2 * s.bucket + 1] = expert_wgrad(
                    h, g_TD, torch.empty_like(w_out, memory_format=torch.contiguous_format),
                    s.ends, gather_b=token, weight=w_r)
            del h
            if need_param[2 * s.bucket]:
                grad_params[2 * s.bucket] = expert_wgrad(
                    x_TD, grad_h, torch.empty_like(w_in, memory_format=torch.contiguous_format),
                    s.ends, gather_a=token)
            if need_x:
                rows_gemm(grad_h, w_in.transpose(1, 2), grad_x_SD, s.ends, s.counts,
                          scatter=slot_R[s.r0:s.r1])
            del grad_h
        grad_x = grad_x_SD.view(T, K, D).sum(1) if need_x else None
        return (grad_x, None, grad_weight, None, None, None, *grad_params)
