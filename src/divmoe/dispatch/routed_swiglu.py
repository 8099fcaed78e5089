"""Gather → SwiGLU experts → weighted scatter-add, as one autograd node.

The hot path for SwiGLU layouts (stacked and heterogeneous). Written by hand, not left to
autograd, for memory: autograd of the same ops keeps, per routed row, the gathered input
x_RD, the weighted activation and the expert output (k copies of d-wide rows) on top of the
hidden ones, all of them alive at once at the start of backward. This node keeps

    x_TD (the layer input), h_RH2 = x_RD @ W_in (the hidden pre-activation),
    a_RH = silu(h_gate)·h_up, the row → token map and the routing weights

(dense SwiGLU autograd keeps x, h, silu(gate) and a: more), recomputes the row gather
x_RD = x_TD[token_R] in backward (a memory-bound copy, against two GEMMs per row), and frees
every temporary, h and a included, as soon as its last use is done. The routing weight
scales the activation before the down projection, ``(w·a) W_out = w·(a W_out)``, so no
[R, d] expert output survives the forward, and the combine is one scatter-add into the
[T, d] output.

Forward, per bucket of equal-width experts (rows are expert-contiguous, buckets in turn):
    x_RD = x_TD[token_R]                   dispatch
    h = x_RD @ W_in[e];  a = silu(h_gate) · h_up;  s = w_R · a;  y = s @ W_out[e]
    out_TD += scatter_add(token_R, y)       combine
Backward (g = ∂L/∂out):
    gy = g[token_R];  gs = gy @ W_outᵀ
    ∂W_out = (w·a)ᵀ gy;  ∂w_R = Σ_h gs · a;  ∂a = w · gs;  ∂h = swiglu'(h) ∂a
    ∂W_in = x_RDᵀ ∂h;  ∂x_TD = scatter_add(token_R, ∂h @ W_inᵀ)

Profiler ranges name the parts (``divmoe.dispatch`` / ``experts`` / ``combine``) in forward
and backward, so ``divmoe bench`` can split the layer's time.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.profiler import record_function

from ..experts.grouped_mm import gmm, gmm_wgrad


def routed_swiglu(x_TD: torch.Tensor, token_R: torch.Tensor, weight_R: torch.Tensor,
                  buckets: list[tuple[torch.Tensor, torch.Tensor]],
                  offs: list[torch.Tensor], rows: list[int]) -> torch.Tensor:
    """out_TD[t] = Σ over routed rows r of token t: weight_R[r] · expert_r(x_TD[t]).

    ``token_R``: the token of each routed row, rows expert-contiguous, bucket after bucket;
    ``buckets[b]`` = (w_in [E_b, d, 2·H_b], w_out [E_b, H_b, d]); ``offs[b]``: int32 cumulative
    row counts of bucket b's experts; ``rows[b]``: its number of rows (Python int).
    """
    flat = [w for pair in buckets for w in pair]
    return _RoutedSwiGLU.apply(x_TD, token_R, weight_R, offs, rows, *flat)


def _swiglu(h_RH2: torch.Tensor) -> torch.Tensor:
    gate, up = h_RH2.chunk(2, dim=-1)
    return F.silu(gate).mul_(up)


def _swiglu_backward(h_RH2: torch.Tensor, grad_a: torch.Tensor) -> torch.Tensor:
    """∂h for a = silu(gate)·up, written straight into the two halves of one tensor."""
    gate, up = h_RH2.chunk(2, dim=-1)
    grad_h = torch.empty_like(h_RH2)
    grad_gate, grad_up = grad_h.chunk(2, dim=-1)
    torch.mul(grad_a, up, out=grad_up)  # scratch: ∂a·up, consumed on the next line
    torch.ops.aten.silu_backward.grad_input(grad_up, gate, grad_input=grad_gate)
    torch.ops.aten.silu.out(gate, out=grad_up)
    grad_up.mul_(grad_a)
    return grad_h


class _RoutedSwiGLU(torch.autograd.Function):

    @staticmethod
    def forward(ctx, x_TD, token_R, weight_R, offs, rows, *weights):
        out_TD = x_TD.new_zeros(x_TD.shape)
        acts, lo = [], 0
        for b, n in enumerate(rows):
            if n == 0:
                acts.append(None)
                continue
            w_in, w_out = weights[2 * b], weights[2 * b + 1]
            tok = token_R[lo:lo + n]
            with record_function("divmoe.dispatch"):
                x_RD = x_TD.index_select(0, tok)
            with record_function("divmoe.experts"):
                h = gmm(x_RD, w_in, offs[b])
                del x_RD
                a = _swiglu(h)
                y = gmm(a * weight_R[lo:lo + n, None], w_out, offs[b])
            with record_function("divmoe.combine"):
                out_TD.index_add_(0, tok, y)
            acts.append((h, a))
            lo += n
        ctx.save_for_backward(x_TD, token_R, weight_R, *offs, *weights)
        # Not saved_tensors: backward drops each (h, a) as soon as it is used up, which takes
        # them off the memory peak (the x-side GEMMs come after). A second backward through
        # the same graph (retain_graph=True) finds None and recomputes them from x.
        ctx.rows, ctx.acts = rows, acts
        return out_TD

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_TD):
        rows, B = ctx.rows, len(ctx.rows)
        x_TD, token_R, weight_R, *rest = ctx.saved_tensors
        offs, weights = rest[:B], rest[B:]
        need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[2]
        grad_TD = grad_TD.contiguous()
        grad_x = None
        grad_weight = weight_R.new_empty(weight_R.shape) if need_w else None
        grad_params = [None] * len(weights)
        lo = 0
        for b, n in enumerate(rows):
            if n == 0:  # no rows: no gradient, as in the reference (the bucket is never called)
                continue
            w_in, w_out, o = weights[2 * b], weights[2 * b + 1], offs[b]
            tok, w_col = token_R[lo:lo + n], weight_R[lo:lo + n, None]
            acts, ctx.acts[b] = ctx.acts[b], None
            if acts is None:
                h = gmm(x_TD.index_select(0, tok), w_in, o)
                acts = h, _swiglu(h)
            h, a = acts
            del acts
            with record_function("divmoe.combine"):
                grad_y = grad_TD.index_select(0, tok)
            with record_function("divmoe.experts"):
                grad_s = gmm(grad_y, w_out.transpose(1, 2), o)
                if ctx.needs_input_grad[5 + 2 * b + 1]:
                    grad_params[2 * b + 1] = gmm_wgrad(a, grad_y.mul_(w_col), o)  # (w·a)ᵀ gy
                del grad_y
                if need_w:
                    grad_weight[lo:lo + n] = a.mul_(grad_s).sum(-1)
                del a
                grad_h = _swiglu_backward(h, grad_s.mul_(w_col))
                del grad_s, h
                if ctx.needs_input_grad[5 + 2 * b]:
                    with record_function("divmoe.dispatch"):
                        x_RD = x_TD.index_select(0, tok)
                    grad_params[2 * b] = gmm_wgrad(x_RD, grad_h, o)
                    del x_RD
                if need_x:
                    grad_x_RD = gmm(grad_h, w_in.transpose(1, 2), o)
                del grad_h
            if need_x:
                with record_function("divmoe.dispatch"):
                    if grad_x is None:
                        grad_x = x_TD.new_zeros(x_TD.shape)
                    grad_x.index_add_(0, tok, grad_x_RD)
                del grad_x_RD
            lo += n
        return (grad_x, None, grad_weight, None, None, *grad_params)
