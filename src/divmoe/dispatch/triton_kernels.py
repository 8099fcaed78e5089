"""Triton kernels of the routed SwiGLU: grouped GEMMs over expert-contiguous rows that gather
their input rows by index and scatter their output rows by index, so no permuted copy of the
activations is ever made (ScatterMoE's idea: only the index lists are sorted).

Two kernels, each with compile-time switches for what it fuses:

- :func:`rows_gemm` — ``C[rows of e] = A[rows of e] @ B[e]``, one program per (row tile, column
  tile); a tile's expert is found in the kernel from the experts' cumulative row counts, so the
  launch needs the counts only on the host (the grid size), never a tile → expert table.
  ``gather``: A's rows are ``A[index[r]]``; ``scatter``: C's rows go to ``C[index[r]]``;
  ``swiglu_in``: A is computed from a hidden ``h = [gate | up]`` as ``w_r · silu(gate) · up``
  (the activation and the routing-weight scale fused into the load); ``swiglu_grad``: the
  output tile is ∂s and the epilogue turns it into ∂h = [∂gate | ∂up] and per-tile partial
  sums of ∂w (the routing-weight gradient), so ∂s is never written.
- :func:`expert_wgrad` — ``C[e] = A[rows of e]ᵀ @ B[rows of e]``, the weight gradient, one
  program per (expert, output tile); an expert with no rows runs no loop and writes zeros.

Operands are bf16, fp16 or fp32; products accumulate in fp32 (fp32 operands without TF32, as
torch's default matmul). Block sizes are autotuned on the device's first call per shape: a
set for compute capability 9.0 (Hopper), one sane config elsewhere, one small config under
Triton's CPU interpreter (``TRITON_INTERPRET=1``, the tests; configs there are timed by wall
clock). The interpreter's ``tl.dot`` of bf16 operands is wrong (triton 3.9 multiplies their
raw bits), so there bf16 tiles are widened to fp32 before the dot: the interpreter checks the
indexing and the fusion, not bf16 rounding.
"""

from __future__ import annotations

import functools
import os
import time

import torch
import triton
import triton.language as tl


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.lru_cache(maxsize=None)
def _configs(capability: tuple[int, int] | None) -> list:
    """(BLOCK_M, BLOCK_N, BLOCK_K, warps, stages) candidates for this device."""
    if capability is None:  # the interpreter: one config, the smallest tl.dot allows
        shapes = [(16, 16, 16, 1, 1)]
    elif capability == (9, 0):
        shapes = [(128, 128, 64, 8, 3), (128, 64, 64, 4, 4), (64, 128, 64, 4, 4),
                  (128, 256, 64, 8, 3), (64, 64, 64, 4, 4)]
    else:
        shapes = [(64, 64, 32, 4, 3)]
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=s)
            for m, n, k, w, s in shapes]


def _device_configs(device: torch.device) -> list:
    if interpreting():
        return _configs(None)
    return _configs(torch.cuda.get_device_capability(device))


def min_block_n(device: torch.device) -> int:
    """The narrowest column tile any config may pick (sizes the ∂w partial sums)."""
    return min(c.kwargs["BLOCK_N"] for c in _device_configs(device))


@triton.jit
def _mma(a, b, acc, UPCAST: tl.constexpr, IEEE: tl.constexpr):
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    if IEEE:
        acc = tl.dot(a, b, acc, input_precision="ieee")
    else:
        acc = tl.dot(a, b, acc)
    return acc


@triton.jit
def _swiglu_tile(h_ptr, rows, cols, ok, stride_h, H, w):
    """w · silu(gate) · up for rows × cols of h = [gate | up] (row stride ``stride_h``)."""
    gate = tl.load(h_ptr + rows * stride_h + cols, mask=ok, other=0.0).to(tl.float32)
    up = tl.load(h_ptr + rows * stride_h + H + cols, mask=ok, other=0.0).to(tl.float32)
    return gate * tl.sigmoid(gate) * up * w


@triton.jit
def _rows_gemm_kernel(a_ptr, a_idx_ptr, b_ptr, c_ptr, c_idx_ptr, ends_ptr, w_ptr, h_ptr, dw_ptr,
                      E, N, K, stride_a, stride_be, stride_bk, stride_bn, stride_c, stride_h,
                      stride_dw,
                      E_POW2: tl.constexpr, GATHER: tl.constexpr, SCATTER: tl.constexpr,
                      SWIGLU_IN: tl.constexpr, SWIGLU_GRAD: tl.constexpr, ROW_WEIGHT: tl.constexpr,
                      UPCAST: tl.constexpr, IEEE: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    # This row tile's expert: experts' tiles are laid out in turn, cdiv(rows_e, BLOCK_M) each.
    e_i = tl.arange(0, E_POW2)
    ends = tl.load(ends_ptr + e_i, mask=e_i < E, other=0)
    starts = tl.load(ends_ptr + e_i - 1, mask=(e_i > 0) & (e_i < E), other=0)
    tiles = tl.where(e_i < E, tl.cdiv(ends - starts, BLOCK_M), 0)
    tile_end = tl.cumsum(tiles, 0)
    e = tl.sum((tile_end <= pid_m).to(tl.int32), 0)  # the first expert whose tiles pass pid_m
    this = e_i == e
    first_tile = tl.sum(tl.where(this, tile_end - tiles, 0), 0)
    row_end = tl.sum(tl.where(this, ends, 0), 0)
    rm = tl.sum(tl.where(this, starts, 0), 0) + (pid_m - first_tile) * BLOCK_M \
        + tl.arange(0, BLOCK_M)
    row_ok = rm < row_end
    rm64 = rm.to(tl.int64)  # row × width offsets pass 2³¹ at production sizes
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = rn < N
    rk = tl.arange(0, BLOCK_K)
    if GATHER:
        a_rows = tl.load(a_idx_ptr + rm, mask=row_ok, other=0).to(tl.int64)
    else:
        a_rows = rm64
    if ROW_WEIGHT:
        w = tl.load(w_ptr + rm, mask=row_ok, other=0.0).to(tl.float32)
    else:
        w = tl.zeros((BLOCK_M,), dtype=tl.float32)
    b_base = b_ptr + e.to(tl.int64) * stride_be
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rk
        a_ok = row_ok[:, None] & (kk[None, :] < K)
        if SWIGLU_IN:
            a = _swiglu_tile(a_ptr, a_rows[:, None], kk[None, :], a_ok, stride_a, K,
                             w[:, None]).to(b_ptr.dtype.element_ty)
        else:
            a = tl.load(a_ptr + a_rows[:, None] * stride_a + kk[None, :], mask=a_ok, other=0.0)
        b = tl.load(b_base + kk[:, None] * stride_bk + rn[None, :] * stride_bn,
                    mask=(kk[:, None] < K) & col_ok[None, :], other=0.0)
        acc = _mma(a, b, acc, UPCAST, IEEE)
    ok = row_ok[:, None] & col_ok[None, :]
    if SWIGLU_GRAD:
        # acc = ∂s for columns rn of the activation (s = w · a, a = silu(gate) · up).
        gate = tl.load(h_ptr + rm64[:, None] * stride_h + rn[None, :], mask=ok, other=0.0)
        up = tl.load(h_ptr + rm64[:, None] * stride_h + N + rn[None, :], mask=ok, other=0.0)
        gate = gate.to(tl.float32)
        up = up.to(tl.float32)
        sig = tl.sigmoid(gate)
        silu = gate * sig
        tl.store(dw_ptr + rm * stride_dw + pid_n, tl.sum(acc * silu * up, 1), mask=row_ok)
        grad_a = acc * w[:, None]
        out = c_ptr + rm64[:, None] * stride_c + rn[None, :]
        tl.store(out, (grad_a * up * sig * (1.0 + gate * (1.0 - sig))).to(c_ptr.dtype.element_ty),
                 mask=ok)
        tl.store(out + N, (grad_a * silu).to(c_ptr.dtype.element_ty), mask=ok)
    else:
        if SCATTER:
            c_rows = tl.load(c_idx_ptr + rm, mask=row_ok, other=0).to(tl.int64)
        else:
            c_rows = rm64
        tl.store(c_ptr + c_rows[:, None] * stride_c + rn[None, :],
                 acc.to(c_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _wgrad_kernel(a_ptr, a_idx_ptr, b_ptr, b_idx_ptr, c_ptr, ends_ptr, w_ptr,
                  M, N, H, stride_a, stride_b, stride_ce, stride_c,
                  GATHER_A: tl.constexpr, GATHER_B: tl.constexpr, SWIGLU_IN: tl.constexpr,
                  UPCAST: tl.constexpr, IEEE: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid = tl.program_id(0)
    e = tl.program_id(1)
    tiles_n = tl.cdiv(N, BLOCK_N)
    rm = (pid // tiles_n) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = (pid % tiles_n) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = rm < M
    n_ok = rn < N
    start = tl.load(ends_ptr + e - 1, mask=e > 0, other=0)
    end = tl.load(ends_ptr + e)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r0 in range(start, end, BLOCK_K):  # no rows: no iteration, the gradient is zero
        rr = r0 + tl.arange(0, BLOCK_K)
        r_ok = rr < end
        if GATHER_A:
            a_rows = tl.load(a_idx_ptr + rr, mask=r_ok, other=0).to(tl.int64)
        else:
            a_rows = rr.to(tl.int64)
        if GATHER_B:
            b_rows = tl.load(b_idx_ptr + rr, mask=r_ok, other=0).to(tl.int64)
        else:
            b_rows = rr.to(tl.int64)
        a_ok = r_ok[:, None] & m_ok[None, :]
        if SWIGLU_IN:
            w = tl.load(w_ptr + rr, mask=r_ok, other=0.0).to(tl.float32)
            a = _swiglu_tile(a_ptr, a_rows[:, None], rm[None, :], a_ok, stride_a, H,
                             w[:, None]).to(b_ptr.dtype.element_ty)
        else:
            a = tl.load(a_ptr + a_rows[:, None] * stride_a + rm[None, :], mask=a_ok, other=0.0)
        b = tl.load(b_ptr + b_rows[:, None] * stride_b + rn[None, :],
                    mask=r_ok[:, None] & n_ok[None, :], other=0.0)
        acc = _mma(tl.trans(a), b, acc, UPCAST, IEEE)
    tl.store(c_ptr + e.to(tl.int64) * stride_ce + rm[:, None] * stride_c + rn[None, :],
             acc.to(c_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


_ROWS_KEY = ["N", "K", "GATHER", "SCATTER", "SWIGLU_IN", "SWIGLU_GRAD"]
_WGRAD_KEY = ["M", "N", "GATHER_A", "GATHER_B", "SWIGLU_IN"]


def _wall_clock(kernel_call, quantiles):
    """Autotuning's timer under the interpreter, which has no GPU timer: one timed call."""
    t0 = time.perf_counter()
    kernel_call()
    return [(time.perf_counter() - t0) * 1e3] * len(quantiles)


@functools.lru_cache(maxsize=None)
def _tuned(kernel: str, configs: tuple):
    # Autotuning reruns a launch per config: the ∂w partial sums must start at zero each time
    # (a wider BLOCK_N writes fewer of their columns).
    # (do_bench only where needed: older triton, as a GPU machine may have, lacks the argument)
    timer = {"do_bench": _wall_clock} if interpreting() else {}
    if kernel == "rows":
        return triton.autotune(list(configs), key=_ROWS_KEY, reset_to_zero=["dw_ptr"],
                               **timer)(_rows_gemm_kernel)
    return triton.autotune(list(configs), key=_WGRAD_KEY, **timer)(_wgrad_kernel)


def _flags(dtype: torch.dtype) -> dict:
    return {"UPCAST": interpreting() and dtype == torch.bfloat16, "IEEE": dtype == torch.float32}


def rows_gemm(a: torch.Tensor, b_EKN: torch.Tensor, out: torch.Tensor, ends_E: torch.Tensor,
              counts: list[int], *, gather: torch.Tensor | None = None,
              scatter: torch.Tensor | None = None, weight: torch.Tensor | None = None,
              swiglu_in: bool = False, swiglu_grad: torch.Tensor | None = None,
              grad_weight_parts: torch.Tensor | None = None) -> torch.Tensor:
    """``out[rows of e] = A[rows of e] @ b_EKN[e]`` for the R = Σ counts rows of E experts.

    ``ends_E``: int32 cumulative row counts on the device; ``counts``: the same per expert on
    the host (sizes the grid). A: ``a[gather[r]]`` (or ``a[r]``); with ``swiglu_in`` ``a`` is
    the hidden [*, 2K] and A = weight · silu(gate) · up. Output rows ``out[scatter[r]]`` (or
    ``out[r]``). ``swiglu_grad`` = the hidden h [R, 2N]: A @ B is ∂s, and ``out`` [R, 2N]
    receives ∂h with ``grad_weight_parts`` [R, ≥ cdiv(N, BLOCK_N)] (zeros) the partial sums of
    ∂weight over column tiles. ``b_EKN`` may be a transposed view; rows of ``a`` and ``out``
    must be contiguous.
    """
    E, K, N = b_EKN.shape
    if swiglu_in:
        K = a.shape[1] // 2
    h = swiglu_grad if swiglu_grad is not None else a
    # Not ``out``: autotuning zeroes this argument between configs, and ``out`` may hold other
    # buckets' rows.
    dw = grad_weight_parts if grad_weight_parts is not None else \
        torch.empty(1, dtype=torch.float32, device=a.device)
    idx_a = gather if gather is not None else ends_E
    idx_c = scatter if scatter is not None else ends_E
    w = weight if weight is not None else ends_E
    kernel = _tuned("rows", tuple(_device_configs(a.device)))

    def grid(meta):
        return (sum(-(-n // meta["BLOCK_M"]) for n in counts), triton.cdiv(N, meta["BLOCK_N"]))

    kernel[grid](a, idx_a, b_EKN, out, idx_c, ends_E, w, h, dw,
                 E, N, K, a.stride(0), *b_EKN.stride(), out.stride(0), h.stride(0), dw.stride(0),
                 E_POW2=max(16, triton.next_power_of_2(E)), GATHER=gather is not None,
                 SCATTER=scatter is not None, SWIGLU_IN=swiglu_in,
                 SWIGLU_GRAD=swiglu_grad is not None, ROW_WEIGHT=weight is not None,
                 **_flags(b_EKN.dtype))
    return out


def expert_wgrad(a: torch.Tensor, b: torch.Tensor, out_EMN: torch.Tensor, ends_E: torch.Tensor,
                 *, gather_a: torch.Tensor | None = None, gather_b: torch.Tensor | None = None,
                 weight: torch.Tensor | None = None) -> torch.Tensor:
    """``out_EMN[e] = A[rows of e]ᵀ @ B[rows of e]``, zeros for an expert with no rows.

    A: ``a[gather_a[r]]`` (or ``a[r]``), or with ``weight`` the activation weight ·
    silu(gate) · up of the hidden ``a`` [*, 2M]; B: ``b[gather_b[r]]`` (or ``b[r]``).
    """
    E, M, N = out_EMN.shape
    kernel = _tuned("wgrad", tuple(_device_configs(a.device)))

    def grid(meta):
        return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]), E)

    kernel[grid](a, gather_a if gather_a is not None else ends_E, b,
                 gather_b if gather_b is not None else ends_E, out_EMN, ends_E,
                 weight if weight is not None else ends_E,
                 M, N, M, a.stride(0), b.stride(0), out_EMN.stride(0), out_EMN.stride(1),
                 GATHER_A=gather_a is not None, GATHER_B=gather_b is not None,
                 SWIGLU_IN=weight is not None, **_flags(b.dtype))
    return out_EMN
