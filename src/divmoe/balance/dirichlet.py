"""Dirichlet prior on routing distributions (after DPSL: Mirvakhabova et al. 2025,
"Dirichlet-Prior Shaping: Guiding Expert Specialization in Upcycled MoEs", arXiv 2510.01185).

The paper shapes the router's probability vectors towards a target Dirichlet(α) prior
(symmetric α for balance, asymmetric α to bias experts; small α → confident, specialised
routing, large α → spread-out routing). Its summaries describe matching each expert's
marginal p_k to the Beta(α_k, A − α_k) marginal of the prior (A = Σ α); we could not read
the paper's exact loss, so this module implements **our reading** of the stated idea —
the negative Dirichlet log-density of each token's routing distribution, averaged:

    L = −(1/T) Σ_t log Dir(p_t; α)
      = −(1/T) Σ_t [ log Γ(A) − Σ_i log Γ(α_i) + Σ_i (α_i − 1) log p_{t,i} ]

p_t = ``probs_TE`` row t (clamped to ≥ 1e-6 so the log stays finite). α_i > 1 pulls
each p_t towards the prior's mode (α_i − 1)/(A − E) (uniform for symmetric α); α_i < 1
rewards mass near the simplex corners (confident routing) and is bounded only by the clamp;
α_i = 1 gives a constant (no gradient). The normalising constant is kept so the value is
a true negative log-density (it does not affect gradients).
"""

from __future__ import annotations

import torch

from ..routing.plan import RoutingPlan

EPS = 1e-6


def dirichlet_prior(plan: RoutingPlan, ctx=None) -> torch.Tensor:
    probs_TE = plan.probs_TE
    E = plan.num_experts
    alpha_E = getattr(ctx, "dirichlet_alpha_E", None)
    if alpha_E is None:
        alpha_E = torch.ones(E)
    alpha_E = alpha_E.to(device=probs_TE.device, dtype=probs_TE.dtype)
    if alpha_E.shape != (E,):
        raise ValueError(f"dirichlet_prior: concentration has shape {tuple(alpha_E.shape)}, "
                         f"expected ({E},)")
    log_norm = torch.lgamma(alpha_E.sum()) - torch.lgamma(alpha_E).sum()
    log_density_T = log_norm + (probs_TE.clamp_min(EPS).log() * (alpha_E - 1)).sum(dim=-1)
    return -log_density_T.mean()
