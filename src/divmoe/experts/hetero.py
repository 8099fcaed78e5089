"""Heterogeneous-width SwiGLU experts (HMoE, Wang et al. 2024), stored without padding.

Storage choice: **per-width buckets**. Experts of equal hidden width H_b are stacked into
``w_in[b]`` [E_b, d, 2·H_b] (gate | up fused, as in :class:`StackedSwiGLU`) and
``w_out[b]`` [E_b, H_b, d]; bucket b holds experts ``members[b]`` in ascending id order.
Each expert owns exactly 3·d·H_e parameters, nothing is padded to the widest expert.

Why buckets rather than one concatenated [d, Σ 2·H_e] matrix with column offsets: a
concatenated matrix has a different N per expert, which no grouped GEMM here supports, so
it would need a Python loop over experts (E matmuls, small and badly shaped). Buckets keep
the fast path (:mod:`divmoe.dispatch.routed_swiglu`): grouped matmul pairs per bucket (per
chunk of a bucket's experts on CPU), and HMoE configurations use a handful of distinct widths,
so its Python loop runs over a few buckets and their chunks (a chunk is whole experts and
megabytes of rows, so an expert too small to matter never costs an iteration of its own).
With one width this is exactly :class:`StackedSwiGLU`.

Dispatch sorts rows by :attr:`row_position_E` (each expert's rank in (bucket, id) order)
instead of by expert id, so every bucket's rows are one contiguous block, experts
contiguous and ascending inside it: no extra permutation, whatever the order of widths.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


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
        # Rank of each expert in (bucket, id) order: where its rows go in the dispatch sort.
        order = [e for m in self.members for e in m]
        position = [order.index(e) for e in range(len(widths))]
        self.register_buffer("row_position_E", torch.tensor(position), persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for w_in, w_out, h in zip(self.w_in, self.w_out, self.bucket_widths):
            nn.init.normal_(w_in, std=1.0 / math.sqrt(self.d_model))
            nn.init.normal_(w_out, std=1.0 / math.sqrt(h))

    def expert_sizes(self) -> list[int]:
        return [3 * self.d_model * h for h in self.widths]

    def base_params(self) -> int:
        return 0  # nothing shared between experts

    def expert(self, e: int, x_ND: torch.Tensor) -> torch.Tensor:
        """Expert ``e`` on its tokens: the plain form the reference path uses."""
        b, j = self.bucket_of[e], self.local_of[e]
        gate, up = (x_ND @ self.w_in[b][j]).chunk(2, dim=-1)
        return (F.silu(gate) * up) @ self.w_out[b][j]

    @torch.no_grad()
    def select(self, expert_ids: list[int]) -> "HeteroSwiGLU":
        out = HeteroSwiGLU([self.widths[e] for e in expert_ids], self.d_model)
        out = out.to(device=self.w_in[0].device, dtype=self.w_in[0].dtype)
        for new, e in enumerate(expert_ids):
            b, j = self.bucket_of[e], self.local_of[e]
            nb, nj = out.bucket_of[new], out.local_of[new]
            out.w_in[nb][nj].copy_(self.w_in[b][j])
            out.w_out[nb][nj].copy_(self.w_out[b][j])
        return out

    def row_order(self) -> torch.Tensor:
        return self.row_position_E

    def buckets(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(w_in, w_out) per width bucket; rows arrive ordered by :attr:`row_position_E`."""
        return list(zip(self.w_in, self.w_out))
