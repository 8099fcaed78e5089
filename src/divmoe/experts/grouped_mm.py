"""Grouped matrix multiplies over expert-contiguous rows: the expert kernel.

Rows [offs[e-1], offs[e]) of the input belong to expert e. Three forms:

- :func:`grouped_mm` — ``out[rows of e] = x[rows of e] @ w[e]`` with autograd;
- :func:`gmm` — the same without autograd, for code that writes its own backward;
- :func:`gmm_wgrad` — ``out[e] = x[rows of e]ᵀ @ g[rows of e]``, the weight gradient,
  optionally written into a slice of a larger gradient.

Each uses ``torch._grouped_mm`` (one kernel, no Python loop) where this build supports the
dtype and the 16-byte row alignment, else a loop of ``torch.mm`` over experts writing into
preallocated outputs. ``_NATIVE_GROUPED_MM`` switches the kernel off (tests, ``divmoe bench
--extra``).
"""

from __future__ import annotations

import torch


def grouped_mm(x_SD: torch.Tensor, w_EDH: torch.Tensor, offs_E: torch.Tensor) -> torch.Tensor:
    """Rows [offs[e-1], offs[e]) of ``x_SD`` times ``w_EDH[e]``, for every e (differentiable)."""
    if _native(x_SD, w_EDH):
        return torch._grouped_mm(x_SD.contiguous(), w_EDH, offs=offs_E)
    return _LoopGroupedMM.apply(x_SD, w_EDH, [0] + offs_E.tolist())


def gmm(x_SD: torch.Tensor, w_EDH: torch.Tensor, offs_E: torch.Tensor,
        bounds: list[int] | None = None) -> torch.Tensor:
    """:func:`grouped_mm` outside autograd; ``w_EDH`` may be a transposed view. ``bounds``
    (``[0] + offs`` as Python ints, when the caller has them) spares the loop a host read."""
    if _native(x_SD, w_EDH):
        return torch._grouped_mm(x_SD, w_EDH, offs=offs_E)
    return _loop_mm(x_SD, w_EDH, bounds or [0] + offs_E.tolist())


def gmm_wgrad(x_SD: torch.Tensor, g_SH: torch.Tensor, offs_E: torch.Tensor,
              out: torch.Tensor | None = None, bounds: list[int] | None = None) -> torch.Tensor:
    """``out[e] = x[rows of e]ᵀ @ g[rows of e]`` [E, D, H]; zero for experts with no rows.

    ``out``: write into this [E, D, H] tensor (a slice of a larger weight gradient) instead
    of a new one; ``bounds`` as in :func:`gmm`.
    """
    # On CPU the kernel is itself a loop of one GEMM per expert, so the loop writing each
    # block in place is as fast and saves copying the result into ``out``.
    if _native(x_SD, g_SH) and (out is None or x_SD.device.type != "cpu"):
        grad = torch._grouped_mm(x_SD.t(), g_SH, offs=offs_E)
        return grad if out is None else out.copy_(grad)
    return _loop_wgrad(x_SD, g_SH, bounds or [0] + offs_E.tolist(), out)


def _loop_mm(x_SD, w_EDH, bounds, out_SH=None):
    if out_SH is None:
        out_SH = x_SD.new_empty(bounds[-1], w_EDH.shape[2],  # rows past the last offset: none
                                dtype=torch.promote_types(x_SD.dtype, w_EDH.dtype))
    for e in range(w_EDH.shape[0]):
        a, b = bounds[e], bounds[e + 1]
        if b > a:
            torch.mm(x_SD[a:b], w_EDH[e], out=out_SH[a:b])
    return out_SH


def _loop_wgrad(x_SD, g_SH, bounds, out_EDH=None):
    E = len(bounds) - 1
    if out_EDH is None:
        out_EDH = x_SD.new_empty(E, x_SD.shape[1], g_SH.shape[1])
    for e in range(E):
        a, b = bounds[e], bounds[e + 1]
        if b > a:
            torch.mm(x_SD[a:b].t(), g_SH[a:b], out=out_EDH[e])
        else:
            out_EDH[e].zero_()
    return out_EDH


class _LoopGroupedMM(torch.autograd.Function):
    """The loop fallback of :func:`grouped_mm`, forward and backward.

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
        return _loop_mm(x_SD, w_EDH, bounds)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_SH):
        x_SD, w_EDH = ctx.saved_tensors
        bounds = ctx.bounds
        grad_SH = grad_SH.contiguous()
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.empty_like(x_SD, memory_format=torch.contiguous_format)
            grad_x[bounds[-1]:].zero_()  # rows past the last offset: no expert, no gradient
            _loop_mm(grad_SH, w_EDH.transpose(1, 2), bounds, out_SH=grad_x)
        if ctx.needs_input_grad[1]:
            grad_w = _loop_wgrad(x_SD, grad_SH, bounds)
        return grad_x, grad_w, None


def _native(x_SD: torch.Tensor, w: torch.Tensor) -> bool:
    # The kernel needs every row stride to be a multiple of 16 bytes.
    if not (_NATIVE_GROUPED_MM and x_SD.shape[0] > 0
            and x_SD.dtype in (torch.float32, torch.bfloat16, torch.float16)):
        return False
    per_row = 16 // x_SD.element_size()
    return x_SD.shape[1] % per_row == 0 and w.shape[-1] % per_row == 0


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
