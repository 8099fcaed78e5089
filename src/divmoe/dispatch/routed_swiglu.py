"""Gather → SwiGLU experts → weighted scatter-add, as one autograd node.

The hot path for SwiGLU layouts (stacked and heterogeneous). Written by hand, not left to
autograd, for memory: autograd of the same ops keeps, per routed row, the gathered input
x_RD, the weighted activation and the expert output (k copies of d-wide rows) on top of the
hidden ones, all of them alive at once at the start of backward. This node keeps

    x_TD (the layer input), h = x_RD @ W_in (the hidden pre-activation),
    a = silu(h_gate)·h_up, the row → token map and the routing weights

(dense SwiGLU autograd keeps x, h, silu(gate) and a: more), recomputes the row gather
x_RD = x_TD[token_R] in backward (a memory-bound copy, against two GEMMs per row), and frees
every temporary, h and a included, as soon as its last use is done. The routing weight
scales the activation before the down projection, ``(w·a) W_out = w·(a W_out)``, so no
[R, d] expert output survives the forward, and the combine is one scatter-add into the
[T, d] output.

Rows are processed in **chunks** of whole experts (:class:`Chunk`, built by
:func:`divmoe.dispatch.grouped.plan_chunks`), not all at once. A chunk's temporaries (the
gathered rows, the expert output, the gradients of h and a) are small, so they stay in cache
between the gather, the GEMM and the scatter, and the allocator hands the same memory back
chunk after chunk instead of mapping fresh pages for every [R, ·] tensor. Backward frees each
chunk's h and a as it finishes with them, which takes them off the memory peak while the
weight gradients fill up. One chunk per bucket is the unchunked computation.

``save_hidden=False`` (``MoEConfig.recompute_hidden``) keeps only x: backward recomputes each
chunk's h = x_c @ W_in and a before using them, one extra GEMM per chunk for a peak memory
without any [R, ·] activation saved across the forward/backward boundary.

Forward, per chunk (rows expert-contiguous, buckets in turn):
    x_c = x_TD[token_c]                    dispatch
    h = x_c @ W_in[e];  a = silu(h_gate) · h_up;  s = w_c · a;  y = s @ W_out[e]
    out_TD += scatter_add(token_c, y)       combine
Backward (g = ∂L/∂out):
    gy = g[token_c];  gs = gy @ W_outᵀ
    ∂W_out = (w·a)ᵀ gy;  ∂w_c = Σ_h gs · a;  ∂a = w · gs;  ∂h = swiglu'(h) ∂a
    ∂W_in = x_cᵀ ∂h;  ∂x_TD += scatter_add(token_c, ∂h @ W_inᵀ)

Profiler ranges name the parts (``divmoe.dispatch`` / ``experts`` / ``combine``) in forward
and backward, so ``divmoe bench`` can split the layer's time.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch.profiler import record_function

from ..experts.grouped_mm import gmm, gmm_wgrad


class Chunk(NamedTuple):
    """Rows [r0, r1) of the routed rows: experts [e0, e1) of bucket ``bucket``, all of them."""

    bucket: int
    e0: int
    e1: int
    r0: int
    r1: int
    offs: torch.Tensor  # int32 [e1 - e0], cumulative row counts inside the chunk
    bounds: list[int]   # [0] + offs as Python ints (the loop kernel needs no host read)


def routed_swiglu(x_TD: torch.Tensor, token_R: torch.Tensor, weight_R: torch.Tensor,
                  buckets: list[tuple[torch.Tensor, torch.Tensor]],
                  chunks: list[Chunk], save_hidden: bool = True) -> torch.Tensor:
    """out_TD[t] = Σ over routed rows r of token t: weight_R[r] · expert_r(x_TD[t]).

    ``token_R``: the token of each routed row, rows expert-contiguous, bucket after bucket;
    ``buckets[b]`` = (w_in [E_b, d, 2·H_b], w_out [E_b, H_b, d]); ``chunks`` cover every
    routed row once, in row order, and every expert of a bucket that has rows.
    ``save_hidden=False``: backward recomputes each chunk's hidden instead of keeping it.
    """
    flat = [w for pair in buckets for w in pair]
    return _RoutedSwiGLU.apply(x_TD, token_R, weight_R, chunks, save_hidden, *flat)


def _swiglu(h: torch.Tensor) -> torch.Tensor:
    gate, up = h.chunk(2, dim=-1)
    return F.silu(gate).mul_(up)


def _swiglu_backward(h: torch.Tensor, grad_a: torch.Tensor) -> torch.Tensor:
    """∂h for a = silu(gate)·up, written straight into the two halves of one tensor."""
    gate, up = h.chunk(2, dim=-1)
    grad_h = torch.empty_like(h)
    grad_gate, grad_up = grad_h.chunk(2, dim=-1)
    torch.mul(grad_a, up, out=grad_up)  # scratch: ∂a·up, consumed on the next line
    torch.ops.aten.silu_backward.grad_input(grad_up, gate, grad_input=grad_gate)
    torch.ops.aten.silu.out(gate, out=grad_up)
    grad_up.mul_(grad_a)
    return grad_h


class _RoutedSwiGLU(torch.autograd.Function):

    @staticmethod
    def forward(ctx, x_TD, token_R, weight_R, chunks, save_hidden, *weights):
        out_TD = x_TD.new_zeros(x_TD.shape)
        acts = []
        save_hidden = save_hidden and any(ctx.needs_input_grad)  # no backward: keep nothing
        for c in chunks:
            w_in, w_out = weights[2 * c.bucket], weights[2 * c.bucket + 1]
            tok = token_R[c.r0:c.r1]
            with record_function("divmoe.dispatch"):
                x_c = x_TD.index_select(0, tok)
            with record_function("divmoe.experts"):
                h = gmm(x_c, w_in[c.e0:c.e1], c.offs, c.bounds)
                del x_c
                a = _swiglu(h)
                y = gmm(a * weight_R[c.r0:c.r1, None], w_out[c.e0:c.e1], c.offs, c.bounds)
            with record_function("divmoe.combine"):
                out_TD.index_add_(0, tok, y)
            acts.append((h, a) if save_hidden else None)
            del h, a, y
        ctx.save_for_backward(x_TD, token_R, weight_R, *weights)
        # Not saved_tensors: backward drops each chunk's (h, a) as soon as it is used up, which
        # takes them off the memory peak. Where it finds None (save_hidden=False, or a second
        # backward through the same graph with retain_graph=True) it recomputes them from x.
        ctx.chunks, ctx.acts = chunks, acts
        return out_TD

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_TD):
        x_TD, token_R, weight_R, *weights = ctx.saved_tensors
        need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[2]
        need_param = ctx.needs_input_grad[5:]
        grad_TD = grad_TD.contiguous()
        grad_x = None
        grad_weight = weight_R.new_empty(weight_R.shape) if need_w else None
        # A bucket with no rows gets no gradient, as in the reference (it is never called).
        grad_params = [None] * len(weights)
        for i, c in enumerate(ctx.chunks):
            b = c.bucket
            w_in, w_out = weights[2 * b][c.e0:c.e1], weights[2 * b + 1][c.e0:c.e1]
            tok, w_col = token_R[c.r0:c.r1], weight_R[c.r0:c.r1, None]
            acts, ctx.acts[i] = ctx.acts[i], None
            x_c = None  # the chunk's gathered rows, when recomputing h needed them anyway
            if acts is None:
                with record_function("divmoe.dispatch"):
                    x_c = x_TD.index_select(0, tok)
                with record_function("divmoe.experts"):
                    h = gmm(x_c, w_in, c.offs, c.bounds)
                    acts = h, _swiglu(h)
            h, a = acts
            del acts
            for j in (2 * b, 2 * b + 1):
                if need_param[j] and grad_params[j] is None:
                    grad_params[j] = torch.empty_like(weights[j])
            with record_function("divmoe.combine"):
                grad_y = grad_TD.index_select(0, tok)
            with record_function("divmoe.experts"):
                grad_s = gmm(grad_y, w_out.transpose(1, 2), c.offs, c.bounds)
                if need_param[2 * b + 1]:  # (w·a)ᵀ gy
                    gmm_wgrad(a, grad_y.mul_(w_col), c.offs,
                              out=grad_params[2 * b + 1][c.e0:c.e1], bounds=c.bounds)
                del grad_y
                if need_w:
                    grad_weight[c.r0:c.r1] = a.mul_(grad_s).sum(-1)
                del a
                grad_h = _swiglu_backward(h, grad_s.mul_(w_col))
                del grad_s, h
                if need_param[2 * b]:
                    if x_c is None:
                        with record_function("divmoe.dispatch"):
                            x_c = x_TD.index_select(0, tok)
                    gmm_wgrad(x_c, grad_h, c.offs, out=grad_params[2 * b][c.e0:c.e1],
                              bounds=c.bounds)
                del x_c
                if need_x:
                    grad_x_c = gmm(grad_h, w_in.transpose(1, 2), c.offs, c.bounds)
                del grad_h
            if need_x:
                with record_function("divmoe.dispatch"):
                    if grad_x is None:
                        grad_x = x_TD.new_zeros(x_TD.shape)
                    grad_x.index_add_(0, tok, grad_x_c)
                del grad_x_c
        return (grad_x, None, grad_weight, None, None, *grad_params)
