"""Heterogeneous-width SwiGLU experts (HMoE, Wang et al. 2024), stored without padding.

Storage choice: **per-width buckets**. Experts of equal hidden width H_b are stacked into
``w_in[b]`` [E_b, d, 2·H_b] (gate | up fused, as in :class:`StackedSwiGLU`) and
``w_out[b]`` [E_b, H_b, d]; bucket b holds experts ``members[b]`` in ascending id order.
Each expert owns exactly 3·d·H_e parameters, nothing is padded to the widest expert.

Why buckets rather than one concatenated [d, Σ 2·H_e] matrix with column offsets: a
concatenated matrix has a different N per expert, which no grouped GEMM here supports, so
it would need a Python loop over experts (E matmuls, small and badly shaped). Buckets keep
the fast path of :func:`divmoe.experts.swiglu.grouped_mm` — one grouped matmul pair per
bucket — and HMoE configurations use a handful of distinct widths, so the Python loop runs
over a few buckets, never over experts or tokens. With one width this is exactly
``StackedSwiGLU.grouped``.

Rows arrive expert-contiguous in expert-id order. If the bucket of each expert is
non-decreasing in expert id (e.g. widths sorted), every bucket's rows are already one
contiguous block and no data moves. Otherwise one stable sort by bucket, one gather before
and one scatter (``index_copy``) after group the rows by bucket; inside a bucket the rows stay
expert-contiguous in ascending id order, which is what ``grouped_mm`` needs.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .swiglu import grouped_mm


class HeteroSwiGLU(nn.Module):
    """E SwiGLU experts, expert e of hidden width ``widths[e]``; interface of StackedSwiGLU."""

    def __init__(self, widths: list[int], d_model: int):
        super().__init__()
        widths = [int(w) for w in widths]
        if not widths or min(widths) < 1:
            raise ValueError(f"expert widths must be a non-empty list of ints >= 1, got {widths}")
        self.widths, self.num_experts, self.d_model = widths, len(widths), d_model
        self.bucket_widths = sorted(set(widths))
        self.bucket_of = [self.bucket_widths.index(w) for w in widths]        # expert → bucket
        self.members = [[e for e, b in enumerate(self.bucket_of) if b == k]   # bucket → experts
                        for k in range(len(self.bucket_widths))]
        self.local_of = [self.members[b].index(e) for e, b in enumerate(self.bucket_of)]
        self.w_in = nn.ParameterList(
            nn.Parameter(torch.empty(len(m), d_model, 2 * h))
            for m, h in zip(self.members, self.bucket_widths))
        self.w_out = nn.ParameterList(
            nn.Parameter(torch.empty(len(m), h, d_model))
            for m, h in zip(self.members, self.bucket_widths))
        # Experts ordered by (bucket, id): counts_E[order] lists each bucket's counts in turn.
        self.register_buffer("_order_E", torch.tensor([e for m in self.members for e in m]),
                             persistent=False)
        self.register_buffer("_bucket_E", torch.tensor(self.bucket_of), persistent=False)
        self._contiguous = all(a <= b for a, b in zip(self.bucket_of, self.bucket_of[1:]))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for w_in, w_out, h in zip(self.w_in, self.w_out, self.bucket_widths):
            nn.init.normal_(w_in, std=1.0 / math.sqrt(self.d_model))
            nn.init.normal_(w_out, std=1.0 / math.sqrt(h))

    def expert_sizes(self) -> list[int]:
        return [3 * self.d_model * h for h in self.widths]

    def expert(self, e: int, x_ND: torch.Tensor) -> torch.Tensor:
        """Expert ``e`` on its tokens: the plain form the reference path uses."""
        b, j = self.bucket_of[e], self.local_of[e]
        gate, up = (x_ND @ self.w_in[b][j]).chunk(2, dim=-1)
        return (F.silu(gate) * up) @ self.w_out[b][j]

    def grouped(self, x_SD: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        """All experts over expert-contiguous rows: rows [off_e, off_e + counts_e) → expert e."""
        counts_E = counts_E.to(x_SD.device)
        perm_S = None
        if not self._contiguous:
            expert_S = torch.repeat_interleave(torch.arange(self.num_experts, device=x_SD.device),
                                               counts_E, output_size=x_SD.shape[0])
            perm_S = torch.argsort(self._bucket_E[expert_S], stable=True)
            x_SD = x_SD[perm_S]
        counts_B = counts_E[self._order_E].split([len(m) for m in self.members])
        rows_B = torch.stack([c.sum() for c in counts_B]).tolist()  # one host sync
        ys, lo = [], 0
        for b, (c_b, n_b) in enumerate(zip(counts_B, rows_B)):
            if n_b == 0:  # no rows: skip, so an unused bucket gets no gradient (as in reference)
                continue
            offs = c_b.cumsum(0).to(torch.int32)
            gate, up = grouped_mm(x_SD[lo:lo + n_b], self.w_in[b], offs).chunk(2, dim=-1)
            ys.append(grouped_mm(F.silu(gate) * up, self.w_out[b], offs))
            lo += n_b
        if not ys:
            return x_SD.new_zeros(x_SD.shape)
        y_SD = ys[0] if len(ys) == 1 else torch.cat(ys)
        if perm_S is not None:
            y_SD = y_SD.new_empty(y_SD.shape).index_copy(0, perm_S, y_SD)
        return y_SD
