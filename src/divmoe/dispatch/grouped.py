"""Dropless dispatch → grouped experts → combine: the hot path.

Steps (T tokens, K slots per token, R = routed (non-empty) slots ≤ T·K):
  1. Sort the flat slot list by the row position of its expert (stable), empty slots
     (id −1) last, and cut them off: ``token_R`` is the token of each routed row, rows
     expert-contiguous; ``weight_R`` its combine weight.
  2. SwiGLU layouts (:class:`~divmoe.experts.layout.BucketedSwiGLU`): cut the rows into chunks of whole experts
     (:func:`plan_chunks`); one hand-written autograd node gathers each chunk's rows, runs
     its grouped experts with the weight folded into the activation, and scatter-adds into
     the output (:mod:`divmoe.dispatch.routed_swiglu`), keeping only x, the hidden
     pre-activation and the activation for backward.
     Other layouts (:class:`~divmoe.experts.layout.GroupedExperts`): x_RD = x_TD[token_R], y_RD = ``experts.grouped(x_RD, counts)``,
     out_TD = scatter_add(token_R, weight_R · y_RD), under plain autograd.

Gathers are ``index_select`` (backward: ``index_add``) and the combine is ``index_add``
(backward: ``index_select``); on CPU both are single passes over the rows, unlike
``x[idx]``, whose backward is the sorting ``index_put`` with accumulation.
"""

from __future__ import annotations

from itertools import accumulate
from typing import NamedTuple

import torch

from ..experts.layout import layout_kind
from ..routing.plan import RoutingPlan
from .routed_swiglu import Chunk, routed_swiglu

# Bytes per chunk of the SwiGLU path on CPU: a chunk's widest temporary ([rows, max(d, 2H)])
# stays near this size. Small enough for the allocator to recycle the same blocks chunk after
# chunk (glibc maps every block above 32 MiB afresh, paying a page fault per 4 KiB) and to
# keep a chunk's rows in cache from gather to scatter; large enough that a chunk's GEMMs are
# a few hundred rows. On GPU one chunk per bucket: one grouped kernel launch, and the caching
# allocator already recycles memory.
CPU_CHUNK_BYTES = 8 << 20


# torch.compile runs this function eagerly, as one opaque step between compiled graphs: its
# row counts are data-dependent (the layer's one host read), its fused node keeps Python
# chunk lists across forward and backward, and ``torch._grouped_mm`` has no float32 meta
# kernel to trace with. One graph break per MoE layer call; docs/architecture.md lists it.
@torch.compiler.disable(reason="dropless dispatch: data-dependent row counts")
def dispatch_combine(x_TD: torch.Tensor, plan: RoutingPlan, experts,
                     recompute_hidden: bool = False) -> torch.Tensor:
    """out_TD: every token's routed experts, weighted by the plan. ``recompute_hidden``: the
    SwiGLU path keeps no expert hidden for backward and recomputes it there."""
    if plan.num_tokens == 0:
        return torch.zeros_like(x_TD)
    bucketed = layout_kind(type(experts)) == "bucketed"
    rows = routed_rows(x_TD, plan, experts.row_order() if bucketed else None)
    if bucketed:
        buckets = experts.buckets()
        chunks = plan_chunks(rows.counts, buckets, x_TD, counts_E=rows.counts_E)
        return routed_swiglu(x_TD, rows.token_R, rows.weight_R, buckets, chunks,
                             save_hidden=not recompute_hidden)
    with torch.profiler.record_function("divmoe.dispatch"):
        x_RD = x_TD.index_select(0, rows.token_R)
    with torch.profiler.record_function("divmoe.experts"):
        y_RD = experts.grouped(x_RD, rows.counts_E)
    with torch.profiler.record_function("divmoe.combine"):
        return x_TD.new_zeros(x_TD.shape).index_add(0, rows.token_R, y_RD * rows.weight_R[:, None])


class RoutedRows(NamedTuple):
    """The plan's routed slots as rows, expert-contiguous in row order (R of them)."""

    counts: list[int]         # rows per expert in row order, on the host
    counts_E: torch.Tensor    # the same, int64 on the device
    slot_R: torch.Tensor      # the flat slot (t·K + k) of each row
    token_R: torch.Tensor     # its token
    weight_R: torch.Tensor    # its combine weight, in the input's dtype


def routed_rows(x_TD: torch.Tensor, plan: RoutingPlan,
                position_E: torch.Tensor | None = None) -> RoutedRows:
    """Step 1 of every dropless execution: sort the plan's slots into expert-contiguous rows.

    ``position_E``: each expert's rank in the row order (a layout's ``row_order()``; None
    when that is its id). Reads the row counts on the host: the one host read.
    """
    K, E = plan.expert_ids_TK.shape[1], plan.num_experts
    # Profiler ranges (cheap when no profiler runs): `divmoe bench` splits the layer's time by them.
    with torch.profiler.record_function("divmoe.dispatch"):
        ids_S = plan.expert_ids_TK.reshape(-1)
        key_S = ids_S if position_E is None else position_E[ids_S.clamp(min=0)]
        key_S = torch.where(ids_S < 0, E, key_S)  # empty slots last, then cut off
        order_S = torch.argsort(key_S, stable=True)
        counts_P = torch.zeros(E + 1, dtype=torch.int64, device=key_S.device)
        counts_E = counts_P.scatter_add_(0, key_S, torch.ones_like(key_S))[:E]  # rows per expert
        counts = counts_E.tolist()  # the one host read: row counts size every expert's GEMM
        slot_R = order_S[:sum(counts)]
        weight_R = plan.weights_TK.reshape(-1).index_select(0, slot_R).to(x_TD.dtype)
        return RoutedRows(counts, counts_E, slot_R, slot_R // K, weight_R)


def plan_chunks(counts: list[int], buckets, x_TD: torch.Tensor,
                chunk_bytes: int | None = None,
                counts_E: torch.Tensor | None = None) -> list[Chunk]:
    """Cut the routed rows into chunks of whole experts, bucket by bucket.

    ``counts``: rows of each expert in row order (the buckets' experts in turn). A chunk
    closes before the expert that would take its widest temporary past ``chunk_bytes``
    (default :data:`CPU_CHUNK_BYTES` on CPU, no limit elsewhere); an expert larger than that
    is a chunk of its own. Experts with no rows join a neighbouring chunk, so the chunks of a
    bucket cover all its experts (their weight gradient is zero), and every chunk has rows.
    """
    if chunk_bytes is None:
        chunk_bytes = CPU_CHUNK_BYTES if x_TD.device.type == "cpu" else None
    chunks, lo, r = [], 0, 0
    for b, (w_in, _) in enumerate(buckets):
        E_b = w_in.shape[0]
        first, lo = lo, lo + E_b
        bucket_counts = counts[first:lo]
        if not any(bucket_counts):
            continue
        width = max(w_in.shape[1], w_in.shape[2])
        budget = chunk_bytes // (width * x_TD.element_size()) if chunk_bytes else None
        start = [0]  # chunk start experts
        rows = 0
        for e, n in enumerate(bucket_counts):
            if budget is not None and n and rows and rows + n > budget:
                start.append(e)
                rows = 0
            rows += n
        for e0, e1 in zip(start, start[1:] + [E_b]):
            offs = list(accumulate(bucket_counts[e0:e1]))
            if counts_E is None:
                offs_t = torch.tensor(offs, dtype=torch.int32, device=x_TD.device)
            else:  # cut on the device: a host → device copy on CUDA waits for the stream
                offs_t = counts_E[first + e0:first + e1].cumsum(0).to(torch.int32)
            chunks.append(Chunk(b, e0, e1, r, r + offs[-1], offs_t, [0] + offs))
            r += offs[-1]
    return chunks
