"""Local routing consistency: SRP and SCH.

From Liang et al., "Not All Models Suit Expert Offloading: On Local Routing Consistency of
Mixture-of-Expert Models" (arXiv 2505.16056, 2025). Both measure how well the experts of
consecutive tokens can be served by a small, slowly changing set of experts (what expert
offloading caches need). The definitions below follow the paper and the authors' released
code (github.com/ljcleo/moe-lrc, ``30_srp_calc.py``/``31_srp_refine.py`` and
``41_sch_calc.py``), re-implemented here.

Input: routing of one layer as ``expert_ids`` [S, K] (one sequence of S tokens, K slots per
token) or [N, S, K] (N independent sequences; segments never cross a sequence boundary).
Ids −1 (empty slot) and ids >= ``num_experts`` (null experts) are not activations.
Segments of length m are all sliding windows ``[s, s + m)`` inside a sequence.
With ``c_{w,e}`` = tokens of segment w routed to expert e and ``A_w = Σ_e c_{w,e}`` its
routed slots:

**SRP(m)** — Segment Routing Best Performance. Treat a fixed expert set G, used for every
token of the segment, as a multi-label prediction of the segment's routing: it predicts
``|G|·m`` (token, expert) pairs of which ``Σ_{e∈G} c_{w,e}`` are routed. For a threshold τ let
``G_w(τ) = {e : c_{w,e} >= τ}`` (the best set of each size is the most-used experts, so
thresholds enumerate the candidates). Then, micro-averaged over all segments as in the
released code,

    F1(τ) = 2 Σ_w Σ_{e∈G_w(τ)} c_{w,e} / (Σ_w |G_w(τ)|·m + Σ_w A_w),   SRP(m) = max_τ F1(τ).

SRP(1) = 1 (each token's own experts); SRP falls as m grows unless neighbouring tokens share
experts. :func:`segment_routing_best_performance` with ``set_size=k'`` instead returns the
**coverage** variant: the fraction of routed slots covered by the best fixed set of k'
experts of each segment, ``Σ_w Σ_{top-k' e} c_{w,e} / Σ_w A_w`` (1 when every segment uses
at most k' distinct experts).

**SCH(m, c)** — Segment Cache Best Hit Rate. A cache of c experts that may look m tokens
ahead, following the released ``41_sch_calc.py`` step by step: before token t the experts
already used in the sequence are ranked by their activations in the segment ``[t, t + m)``
(truncated at the sequence end), ties broken by the most recent use (the later slot of the
later token ranks higher), and the cache holds the first c of them. An expert's first use in
the sequence is ranked after every expert used before it, in slot order (the j-th expert
seen so far sits at place j): a first use is a miss for every cache no larger than the
number of experts already seen — the cache cannot prefetch an expert it has never seen, even
if the look-ahead shows it coming. SCH is the fraction of routed slots whose expert is in the
cache. Caches of different sizes are nested, so SCH is non-decreasing in c, and SCH = 1 for
c = E. The paper's finding: most models get most of the
achievable hit rate at c ≈ 2k ("cache sizes approximately 2x the active experts").
"""

from __future__ import annotations

from typing import Iterable

import torch

__all__ = ["segment_counts", "segment_routing_best_performance", "srp_curve",
           "segment_cache_hit_rate", "sch_curve", "cache_gain_at"]


def _as_NSK(expert_ids: torch.Tensor) -> torch.Tensor:
    ids = torch.as_tensor(expert_ids).long()
    if ids.dim() == 2:
        ids = ids[None]
    if ids.dim() != 3:
        raise ValueError(f"expert_ids must be [S, K] or [N, S, K], got shape {tuple(ids.shape)}")
    return ids


def _token_counts(ids_NSK: torch.Tensor, num_experts: int) -> torch.Tensor:
    """[N, S, E] int64: 1 where the token routed a slot to the expert."""
    N, S, K = ids_NSK.shape
    ok = (ids_NSK >= 0) & (ids_NSK < num_experts)
    out = torch.zeros(N, S, num_experts + 1, dtype=torch.int64)
    out.scatter_add_(2, torch.where(ok, ids_NSK, num_experts), ok.long())
    # Two slots of one token may name one expert (a merged model, router merged_topk).
    return out[..., :num_experts].clamp_max_(1)


def _check_m(m: int, S: int) -> int:
    m = int(m)
    if m < 1:
        raise ValueError(f"segment length must be >= 1, got {m}")
    if m > S:
        raise ValueError(f"segment length {m} exceeds the sequence length {S}")
    return m


def segment_counts(expert_ids: torch.Tensor, num_experts: int, segment_len: int) -> torch.Tensor:
    """Per-segment expert counts ``c_{w,e}``: int64 [N, S − m + 1, E] (sliding windows)."""
    ids = _as_NSK(expert_ids)
    m = _check_m(segment_len, ids.shape[1])
    cum = _token_counts(ids, num_experts).cumsum(1)
    cum = torch.cat([torch.zeros_like(cum[:, :1]), cum], 1)
    return cum[:, m:] - cum[:, :-m]


def segment_routing_best_performance(expert_ids: torch.Tensor, num_experts: int,
                                     segment_len: int, set_size: int | None = None) -> float:
    """SRP(m) of the paper (best micro-F1 of a fixed per-segment expert set), or with
    ``set_size=k'`` the coverage of the best k' experts per segment. See the module docs."""
    m = int(segment_len)
    W = segment_counts(expert_ids, num_experts, m)
    acts = int(W.sum())
    if acts == 0:
        return float("nan")
    if set_size is not None:
        if set_size < 1:
            raise ValueError(f"set_size must be >= 1, got {set_size}")
        kk = min(int(set_size), num_experts)
        return float(W.topk(kk, dim=-1).values.sum()) / acts
    hist = torch.bincount(W.reshape(-1), minlength=m + 1).double()       # [m + 1], value v
    v = torch.arange(m + 1, dtype=torch.float64)
    matches = (v * hist).flip(0).cumsum(0).flip(0)                         # Σ_{c >= τ} c
    preds = m * hist.flip(0).cumsum(0).flip(0)                             # m · #{c >= τ}
    f1 = 2 * matches / (preds + acts)
    return float(f1.max())


def srp_curve(expert_ids: torch.Tensor, num_experts: int, segment_lens: Iterable[int],
              set_size: int | None = None) -> dict[int, float]:
    """{m: SRP(m)} for every segment length that fits in the sequences."""
    S = _as_NSK(expert_ids).shape[1]
    return {int(m): segment_routing_best_performance(expert_ids, num_experts, m, set_size)
            for m in segment_lens if 1 <= int(m) <= S}


def segment_cache_hit_rate(expert_ids: torch.Tensor, num_experts: int,
                           segment_len: int) -> torch.Tensor:
    """SCH(m, c) for every cache size c = 1 .. E: float64 [E] (entry c − 1). See module docs."""
    ids = _as_NSK(expert_ids)
    N, S, K = ids.shape
    m = _check_m(segment_len, S)
    E = num_experts
    used = _token_counts(ids, E)                                           # [N, S, E]
    cum = torch.cat([torch.zeros_like(used[:, :1]), used.cumsum(1)], 1)    # [N, S + 1, E]
    t = torch.arange(S)
    ahead = cum[:, (t + m).clamp(max=S)] - cum[:, t]                       # counts in [t, t+m)
    ok = (ids >= 0) & (ids < E)
    # Recency: the latest slot t·K + k that used the expert before token t (−1: never).
    slot_NSK = torch.where(ok, (t[:, None] * K + torch.arange(K))[None].expand(N, S, K), -1)
    last_NSE = torch.full((N, S, E + 1), -1, dtype=torch.int64)
    last_NSE.scatter_reduce_(2, torch.where(ok, ids, E), slot_NSK, reduce="amax")
    last = last_NSE[..., :E].cummax(1).values                              # last use <= t
    last_before = torch.cat([torch.full_like(last[:, :1], -1), last[:, :-1]], 1)
    seen = last_before >= 0
    key = torch.where(seen, ahead * (S * K + 1) + last_before + 1, -1)     # bigger = kept first
    order = torch.sort(key, dim=-1, descending=True, stable=True).indices
    rank = torch.empty_like(order)
    rank.scatter_(-1, order, torch.arange(E).expand_as(order).contiguous())
    safe = torch.where(ok, ids, 0)
    first_NSK = ok & ~seen.gather(-1, safe)                                # first uses
    # A first use sits after the experts seen before it (earlier first uses of this token too).
    first_rank = (seen.sum(-1, keepdim=True) + first_NSK.cumsum(-1) - first_NSK.long()
                  ).clamp(max=E - 1)  # an expert twice in one token: the last place
    slot_rank = torch.where(first_NSK, first_rank, rank.gather(-1, safe))[ok]
    total = slot_rank.numel()
    if total == 0:
        return torch.full((E,), float("nan"), dtype=torch.float64)
    return torch.bincount(slot_rank, minlength=E).double().cumsum(0) / total


def sch_curve(expert_ids: torch.Tensor, num_experts: int,
              segment_lens: Iterable[int]) -> dict[int, list[float]]:
    """{m: [SCH(m, c) for c = 1 .. E]} for every segment length that fits."""
    S = _as_NSK(expert_ids).shape[1]
    return {int(m): segment_cache_hit_rate(expert_ids, num_experts, m).tolist()
            for m in segment_lens if 1 <= int(m) <= S}


def cache_gain_at(sch_E, cache_size: int, top_k: int) -> float:
    """Share of the hit-rate gain from a cache of k experts to one of all E experts that a cache
    of ``cache_size`` reaches: (SCH(c) − SCH(k)) / (1 − SCH(k)); 1 if SCH(k) is already 1.
    With ``cache_size = 2k`` this checks the paper's "about 2x the active experts" claim."""
    s = torch.as_tensor(sch_E, dtype=torch.float64)
    E = s.numel()
    k, c = min(top_k, E), min(cache_size, E)
    base = float(s[k - 1])
    return 1.0 if base >= 1.0 else (float(s[c - 1]) - base) / (1.0 - base)
