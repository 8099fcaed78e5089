"""Soft-merge execution (SMEAR, :mod:`divmoe.routing.soft_merge`): each group of tokens runs
through ONE expert whose weights are the group's probability-weighted average of all
experts' weights. A plan from the soft-merge router carries its groups (``plan.groups``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..routing.plan import RoutingPlan


def group_probs(plan: RoutingPlan, groups: tuple[int, int]) -> torch.Tensor:
    """p_GE from a soft_merge plan (its rows are constant within each group)."""
    G, S = groups
    if G == 0 or S == 0:
        return plan.probs_TE.new_zeros(G, plan.num_experts)
    return plan.probs_TE.view(G, S, plan.num_experts)[:, 0]


def soft_merge_forward(x_TD: torch.Tensor, probs_GE: torch.Tensor, experts,
                       groups: tuple[int, int]) -> torch.Tensor:
    """Fast path: merged weights of every group with one einsum per matrix, then bmm.

    Memory: G merged experts (G · 3·d·H values), never one per token.
    """
    G, S = groups
    if x_TD.shape[0] == 0:
        return torch.zeros_like(x_TD)
    p_GE = probs_GE.to(experts.w_in_EDH2.dtype)
    w_in_GDH2 = torch.einsum("ge,edh->gdh", p_GE, experts.w_in_EDH2)
    w_out_GHD = torch.einsum("ge,ehd->ghd", p_GE, experts.w_out_EHD)
    x_GSD = x_TD.view(G, S, -1).to(w_in_GDH2.dtype)
    gate, up = torch.bmm(x_GSD, w_in_GDH2).chunk(2, dim=-1)
    y_GSD = torch.bmm(F.silu(gate) * up, w_out_GHD)
    return y_GSD.reshape(x_TD.shape).to(x_TD.dtype)


def soft_merge_per_token(x_TD: torch.Tensor, probs_TE: torch.Tensor, experts) -> torch.Tensor:
    """Fast path for groups of one token (the causal rule's plan): the merged expert is linear
    in the weights, so x_t · Σ_e p_te W_in(e) = Σ_e p_te (x_t W_in(e)) and likewise for W_out;
    every expert's projections are mixed per token instead of materialising T merged weight
    sets. Memory: T · E · 2H pre-activations and T · E · d outputs."""
    if x_TD.shape[0] == 0:
        return torch.zeros_like(x_TD)
    p_TE = probs_TE.to(experts.w_in_EDH2.dtype)
    pre_TEH2 = torch.einsum("td,edh->teh", x_TD.to(p_TE.dtype), experts.w_in_EDH2)
    pre_TH2 = torch.einsum("te,teh->th", p_TE, pre_TEH2)
    gate, up = pre_TH2.chunk(2, dim=-1)
    act_TH = F.silu(gate) * up
    out_TED = torch.einsum("th,ehd->ted", act_TH, experts.w_out_EHD)
    y_TD = torch.einsum("te,ted->td", p_TE, out_TED)
    return y_TD.to(x_TD.dtype)


def soft_merge_reference(x_TD: torch.Tensor, probs_GE: torch.Tensor, experts,
                         groups: tuple[int, int]) -> torch.Tensor:
    """The obviously-correct form: for each group, sum p_ge · W_e over experts in a loop and
    run that one SwiGLU on the group's tokens."""
    G, S = groups
    out = []
    for g in range(G):
        w_in = sum(probs_GE[g, e].to(experts.w_in_EDH2.dtype) * experts.w_in_EDH2[e]
                   for e in range(experts.num_experts))
        w_out = sum(probs_GE[g, e].to(experts.w_out_EHD.dtype) * experts.w_out_EHD[e]
                    for e in range(experts.num_experts))
        x_SD = x_TD[g * S:(g + 1) * S].to(w_in.dtype)
        gate, up = (x_SD @ w_in).chunk(2, dim=-1)
        out.append((F.silu(gate) * up) @ w_out)
    if not out:
        return torch.zeros_like(x_TD)
    return torch.cat(out).to(x_TD.dtype)




def soft_merge(x_TD: torch.Tensor, plan: RoutingPlan, experts) -> torch.Tensor:
    """The execution strategy: the plan's groups through their merged experts (fast path;
    groups of one token mix the experts' projections instead of merging weights)."""
    if plan.groups[1] == 1:
        return soft_merge_per_token(x_TD, plan.probs_TE, experts)
    return soft_merge_forward(x_TD, group_probs(plan, plan.groups), experts, plan.groups)


def soft_merge_loop(x_TD: torch.Tensor, plan: RoutingPlan, experts) -> torch.Tensor:
    """The execution strategy on the reference form (a loop over groups and experts)."""
    return soft_merge_reference(x_TD, group_probs(plan, plan.groups), experts, plan.groups)
