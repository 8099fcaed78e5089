"""HMoE's parameter-penalty loss (Wang et al. 2024, "HMoE: Heterogeneous Mixture of Experts
for Language Modeling", arXiv 2408.10681): favour activating *smaller* experts.

Definition implemented (the paper's P-Penalty loss, which replaces the load fraction f_i of
the Switch loss by a size-weighted one):

    L_P = E · Σ_i (f_i · M̂_i) · P_i,   M̂_i = M_i / mean_j M_j

f_i = fraction of routed slots on expert i (no gradient), P_i = mean router probability,
M_i = parameter count of expert i. The gradient only flows through P_i, and an expert's
pull on P_i is proportional to its size times its load, so large busy experts are pushed
down hardest. Normalising M by its mean is our choice (the paper writes a "normalised"
M̂_i; a third-party implementation divides by the max instead — that only rescales the
loss by mean/max). With equal sizes M̂_i = 1 and L_P is exactly the micro-batch
``aux_loss`` (a plain load-balancing term, no preference among experts).

Sizes come from ``experts.expert_sizes()`` when the expert module exposes it (heterogeneous
layouts); otherwise all experts count as equal.
"""

from __future__ import annotations

import torch

from ..routing.plan import RoutingPlan


def small_expert_bias(plan: RoutingPlan, ctx=None) -> torch.Tensor:
    E = plan.num_experts
    dtype = plan.probs_TE.dtype
    sizes_E = getattr(ctx, "expert_sizes_E", None)
    if sizes_E is None:
        rel_E = torch.ones(E, dtype=dtype, device=plan.probs_TE.device)
    else:
        sizes_E = sizes_E.to(device=plan.probs_TE.device, dtype=dtype)
        if sizes_E.shape != (E,):
            raise ValueError(f"small_expert_bias: expert sizes have shape {tuple(sizes_E.shape)}, "
                             f"expected ({E},)")
        rel_E = sizes_E / sizes_E.mean()
    counts_E = plan.tokens_per_expert().to(dtype)
    f_E = counts_E / counts_E.sum().clamp_min(1)
    return E * (f_E * rel_E * plan.probs_TE.mean(dim=0)).sum()
