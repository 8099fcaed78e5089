"""Domain specialisation of routing: the expert × domain matrix and how much it says.

Definitions implemented (slot-weighted: every routed token-slot is one observation of the
pair (expert, domain of its token); empty slots, id −1, are not observations):

* routing matrix ``counts_ED[e, d]`` = routed slots of domain-``d`` tokens given to expert e
  (the matrix of ``routing.json`` and of the expert × domain plots in the MoE literature,
  e.g. Mixtral's and OLMoE's routing analyses).
* mutual information ``I(expert; domain) = Σ_{e,d} p(e,d) log2 p(e,d) / (p(e) p(d))`` in bits,
  with ``p(e,d) = counts_ED / Σ counts``. 0 when routing is independent of the domain;
  ``H(domain)`` when the expert determines the domain (perfect specialisation).
* normalised MI = ``I / H(domain)`` in [0, 1] (``H(domain)`` of the slot-weighted domain
  marginal; 0 when there is one domain).
* per-domain JS divergence ``JS(p(e | d) ‖ p(e))`` between a domain's expert distribution
  and the domain-agnostic one (ALGORITHMS.md §5), in bits, so in [0, 1].
* MI given the token, ``I(expert; domain | token) = Σ_v p(v) I(expert; domain | token = v)``
  from ``counts_VED[v, e, d]`` (slots of token id v). The plain MI credits a router with
  "specialisation" that only reflects which tokens each domain uses: a hash router, whose
  expert is a function of the token id, has plain MI > 0 on bytes but exactly 0 here. This
  one counts only what routing says about the domain beyond the token itself (the plug-in
  estimate, biased upwards for rare tokens like the plain one).
"""

from __future__ import annotations

import math

import torch

from ..diversity import js_divergence

__all__ = ["expert_domain_counts", "mutual_information_bits", "normalized_mutual_information",
           "conditional_mutual_information_bits", "domain_js_bits", "specialization_summary"]

LN2 = math.log(2.0)


def expert_domain_counts(expert_ids_TK: torch.Tensor, domain_id_T: torch.Tensor,
                         num_experts: int, num_domains: int | None = None) -> torch.Tensor:
    """Routed slots per (expert, domain): int64 [E, D].

    Args:
        expert_ids_TK: [T, K] (or [T]) expert ids; −1 and ids >= ``num_experts`` are skipped.
        domain_id_T: [T] domain index of each token (0 .. D−1).
        num_experts: E.
        num_domains: D (default ``max(domain_id_T) + 1``).
    """
    ids = torch.as_tensor(expert_ids_TK).long()
    ids = ids[:, None] if ids.dim() == 1 else ids.reshape(ids.shape[0], -1)
    dom = torch.as_tensor(domain_id_T).long().reshape(-1)
    if dom.numel() != ids.shape[0]:
        raise ValueError(f"domain_id_T has {dom.numel()} tokens but expert_ids_TK has "
                         f"{ids.shape[0]}")
    if dom.numel() and int(dom.min()) < 0:
        raise ValueError("domain_id_T must be >= 0")
    D = int(num_domains) if num_domains is not None else (int(dom.max()) + 1 if dom.numel() else 0)
    if dom.numel() and int(dom.max()) >= D:
        raise ValueError(f"domain id {int(dom.max())} >= num_domains={D}")
    dom_TK = dom[:, None].expand_as(ids)
    ok = (ids >= 0) & (ids < num_experts)
    flat = ids[ok] * D + dom_TK[ok]
    return torch.bincount(flat, minlength=num_experts * D).reshape(num_experts, D)


def _joint(counts_ED) -> torch.Tensor:
    c = torch.as_tensor(counts_ED, dtype=torch.float64)
    if c.dim() != 2:
        raise ValueError(f"counts_ED must be [E, D], got shape {tuple(c.shape)}")
    if (c < 0).any():
        raise ValueError("counts_ED must be non-negative")
    return c / c.sum().clamp_min(1e-300)


def _entropy_bits(p: torch.Tensor) -> float:
    return float(-(torch.xlogy(p, p)).sum() / LN2)


def mutual_information_bits(counts_ED) -> float:
    """I(expert; domain) in bits from an [E, D] count (or joint probability) matrix."""
    p = _joint(counts_ED)
    if float(p.sum()) == 0:
        return 0.0
    pe, pd = p.sum(1, keepdim=True), p.sum(0, keepdim=True)
    mi = (torch.xlogy(p, p) - torch.xlogy(p, pe * pd)).sum() / LN2
    return max(0.0, float(mi))


def conditional_mutual_information_bits(counts_VED) -> float:
    """I(expert; domain | token) in bits from a [V, E, D] count tensor (module docstring)."""
    c = torch.as_tensor(counts_VED, dtype=torch.float64)
    if c.dim() != 3:
        raise ValueError(f"counts_VED must be [V, E, D], got shape {tuple(c.shape)}")
    if (c < 0).any():
        raise ValueError("counts_VED must be non-negative")
    total = float(c.sum())
    if total == 0:
        return 0.0
    p = c / total
    pv, pve, pvd = p.sum((1, 2), keepdim=True), p.sum(2, keepdim=True), p.sum(1, keepdim=True)
    mi = (torch.xlogy(p, p * pv) - torch.xlogy(p, pve * pvd)).sum() / LN2
    return max(0.0, float(mi))


def normalized_mutual_information(counts_ED) -> float:
    """I(expert; domain) / H(domain), in [0, 1]; 0 if there is only one domain."""
    p = _joint(counts_ED)
    h = _entropy_bits(p.sum(0))
    return 0.0 if h <= 0 else min(1.0, mutual_information_bits(counts_ED) / h)


def domain_js_bits(counts_ED) -> torch.Tensor:
    """JS(p(expert | d) ‖ p(expert)) in bits for every domain d: float64 [D] (NaN for a domain
    with no routed slots)."""
    c = torch.as_tensor(counts_ED, dtype=torch.float64)
    _joint(c)
    col = c.sum(0)
    marg = c.sum(1) / c.sum().clamp_min(1e-300)
    out = torch.full((c.shape[1],), float("nan"), dtype=torch.float64)
    for d in range(c.shape[1]):
        if col[d] > 0:
            out[d] = js_divergence(c[:, d] / col[d], marg) / LN2
    return out


def specialization_summary(counts_ED, domains: list[str] | None = None) -> dict:
    """All of the above for one layer, JSON-ready."""
    c = torch.as_tensor(counts_ED, dtype=torch.float64)
    names = list(domains) if domains is not None else [str(d) for d in range(c.shape[1])]
    p = _joint(c)
    js = domain_js_bits(c)
    return {"mi_bits": mutual_information_bits(c),
            "nmi": normalized_mutual_information(c),
            "h_domain_bits": _entropy_bits(p.sum(0)),
            "js_bits": {n: (None if math.isnan(v) else float(v)) for n, v in zip(names, js.tolist())}}
