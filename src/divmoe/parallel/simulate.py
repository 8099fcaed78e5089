"""Project a run's routing trace to 8–256 ranks: all-to-all volume and per-rank load
imbalance for the default (contiguous), round-robin and solved placements.

How a trace of E measured experts reaches N ranks (stated, not hidden): the projected layer
has E' = experts_per_rank·N experts, each measured expert split into f = E'/E
*interchangeable sub-experts* that share its tokens equally — its load, and its ``next`` /
``within`` pair counts, divided evenly (``load/f``, ``counts/f²``). This keeps the measured
skew between experts and the measured layer-to-layer dependency at the granularity the run
has, and invents no structure inside an expert; a real model with E' experts would have its
own (likely more skewed, more local) routing, so read the projection as "this run's routing
pattern at scale", not as a prediction for a larger model.

Network assumptions (each a parameter): rows of ``d_model`` values of ``dtype_bytes`` bytes
(the trace's width, float32 by default), ``tokens_per_rank`` tokens per rank per step, and
every rank with its own full-duplex link of ``bandwidth`` bytes/s to a non-blocking switch,
so an all-to-all lasts as long as the busiest rank's bytes take on its link (no latency,
no overlap with compute, no topology). Under the ``origin`` model
(:mod:`divmoe.parallel.placement`), with tokens spread evenly over ranks, rank r receives
load_r·(N−1)/N rows in a layer's dispatch and sends (total − load_r)/N; the combine mirrors
it, so a layer's exchange takes 2·max_r max(received_r, sent_r)/bandwidth. The placement
changes the busiest rank, not the total.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..config import ConfigError
from .placement import contiguous, cost, rank_loads, round_robin, solve
from .traces import RoutingTrace

DEFAULT_RANKS = (8, 16, 32, 64, 128, 256)


def split_experts(trace: RoutingTrace, factor: int) -> RoutingTrace:
    """``trace`` with every expert split into ``factor`` interchangeable sub-experts
    (expert e becomes e·factor … e·factor + factor − 1), its counts shared equally."""
    if factor < 1:
        raise ConfigError(f"split factor must be >= 1, got {factor}")
    block = np.ones((factor, factor)) / factor ** 2
    return RoutingTrace(
        list(trace.layers), trace.num_experts * factor, trace.top_k, trace.d_model, trace.tokens,
        np.repeat(trace.load_LE / factor, factor, axis=1),
        np.stack([np.kron(m, block) for m in trace.next_PEE]).reshape(
            len(trace.next_PEE), trace.num_experts * factor, trace.num_experts * factor),
        np.stack([np.kron(m, block) for m in trace.within_LEE]))


@dataclass
class Projection:
    ranks: int
    experts: int
    placement: str
    method: str
    imbalance: float          # mean over layers of max/mean per-rank load
    origin_bytes: float       # per token, all MoE layers, forward
    follow_bytes: float
    a2a_ms_per_layer: float   # origin model, busiest rank, dispatch + combine
    a2a_ms_balanced: float    # the same with every rank equally loaded


def project(trace: RoutingTrace, ranks: tuple[int, ...] = DEFAULT_RANKS,
            experts_per_rank: int = 2, dtype_bytes: int = 4, tokens_per_rank: int = 4096,
            bandwidth: float = 25e9, time_limit: float = 10.0) -> list[Projection]:
    """Contiguous, round-robin and solved placements at every N in ``ranks`` (module doc)."""
    for name, v in (("experts_per_rank", experts_per_rank), ("tokens_per_rank", tokens_per_rank),
                    ("dtype_bytes", dtype_bytes)):
        if v < 1:
            raise ConfigError(f"{name} must be >= 1, got {v}")
    if bandwidth <= 0:
        raise ConfigError(f"bandwidth must be > 0 bytes/s, got {bandwidth}")
    out = []
    for N in ranks:
        experts = experts_per_rank * N
        if experts % trace.num_experts:
            raise ConfigError(f"{N} ranks × {experts_per_rank} experts per rank = {experts} "
                              f"experts, not a multiple of the trace's {trace.num_experts}; "
                              f"choose ranks and experts_per_rank so that it is")
        big = split_experts(trace, experts // trace.num_experts)
        slots_per_token = big.load_LE.sum(1) / max(big.tokens, 1)  # [L]
        row = big.d_model * dtype_bytes
        for name, placement in (("contiguous", contiguous(big, N)),
                                ("round-robin", round_robin(big, N)),
                                ("solved", solve(big, N, time_limit=time_limit))):
            c = cost(big, placement, dtype_bytes)
            loads = rank_loads(big, placement.rank_of(big.layers), N)  # [L, N]
            share = loads / np.maximum(loads.sum(1, keepdims=True), 1e-12)
            slots = slots_per_token[:, None] * tokens_per_rank * N  # [L, 1] all ranks' slots
            # dispatch: a rank receives the other ranks' rows for its experts, load·(N−1)/N,
            # and sends its own tokens' rows for the others' experts, (total − load)/N; the
            # combine is the mirror image, so both phases last as long as the larger
            recv = share * slots * (N - 1) / N * row
            sent = (1 - share) * slots / N * row
            t = 2 * np.maximum(recv, sent).max(1) / bandwidth * 1e3
            t_even = 2 * slots[:, 0] * (N - 1) / N ** 2 * row / bandwidth * 1e3
            out.append(Projection(N, experts, name, placement.method, c.imbalance,
                                  c.origin_bytes, c.follow_bytes, float(t.mean()),
                                  float(t_even.mean())))
    return out


def format_projection(rows: list[Projection]) -> str:
    lines = [f"{'ranks':>5} {'experts':>7}  {'placement':<12} {'load max/mean':>13} "
             f"{'origin B/token':>14} {'follow B/token':>14} {'a2a ms/layer':>12} "
             f"{'(balanced)':>10}  method"]
    for p in rows:
        lines.append(f"{p.ranks:>5} {p.experts:>7}  {p.placement:<12} {p.imbalance:>13.3f} "
                     f"{p.origin_bytes:>14.0f} {p.follow_bytes:>14.0f} "
                     f"{p.a2a_ms_per_layer:>12.3f} {p.a2a_ms_balanced:>10.3f}  {p.method}")
    return "\n".join(lines)
