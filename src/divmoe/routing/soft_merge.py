"""Soft merging of experts (SMEAR: Muqeeth, Liu & Raffel, 2023, "Soft Merging of Experts
with Adaptive Routing", arXiv 2306.03745).

Definition implemented: every example (here: every sequence) is routed once. The router
sees the example's average-pooled representation, r_G = mean_s x_GS (the paper routes per
example from the average of the hidden states over the sequence, since one merged expert
per token would be far too large), and gives p_GE = softmax(r_G W_DE). The example then runs
through ONE expert whose parameters are the probability-weighted average of all experts':

    W_in(g) = Σ_e p_ge W_in(e),   W_out(g) = Σ_e p_ge W_out(e),
    y_gs = (silu(x_gs W_in,gate(g)) ⊙ x_gs W_in,up(g)) W_out(g).

There is no discrete choice, so every parameter (router included) gets an exact gradient.
Only the stacked SwiGLU layout can be merged (``MoEConfig`` refuses the others).

Groups: input [..., S, d] (at least 3-D) gives one group per sequence of S tokens; 2-D input
[T, d] has no sequence axis and is treated as ONE group of all T tokens (one merged expert).

Caveat for causal LMs: pooling over the whole sequence lets the merged weights (and hence
the output at position t) depend on tokens after t. This is the paper's per-example routing
(T5 / ViT, not causal LMs); it is a small leak (E numbers per sequence and layer), but
validation losses of a causal LM with ``router=soft_merge`` are not strictly comparable.

The plan, for balancing losses and the stats: ``probs_TE`` / ``logits_TE`` are the group's
p / logits repeated for each of its tokens; ``expert_ids_TK`` ([T, 1]) is the group's
dominant expert argmax_e p_ge, ``weights_TK`` its probability (what discrete consumers such
as the expert × domain matrix see). The layer computes the output with
:func:`soft_merge_forward` instead of dispatching the plan, and its stats count expert e as
used by Σ_t p_te tokens (soft load). ``top_k`` is not used: a token touches one (merged)
expert's parameters. The selection bias must be zero (no selection to bias).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ._common import jittered, linear_gate, require_zero_bias
from .plan import RoutingPlan


def merge_groups(shape: tuple[int, ...]) -> tuple[int, int]:
    """(G groups, S tokens per group) for an input of this shape ([..., S, d] or [T, d])."""
    T = 1
    for n in shape[:-1]:
        T *= n
    if len(shape) >= 3:
        S = shape[-2]
        return (T // S if S else 0), S
    return (1, T) if T else (0, 0)


class SoftMergeRouter(nn.Module):
    """SMEAR: one router distribution per sequence over the experts, whose parameters are
    averaged with those weights (see the module docstring)."""

    uses_selection_bias = False

    def __init__(self, d_model: int, cfg):
        super().__init__()
        self.num_experts, self.jitter = cfg.num_experts, cfg.jitter
        self.gate = linear_gate(d_model, cfg.num_experts)

    def forward(self, x_TD: torch.Tensor, selection_bias_E: torch.Tensor | None = None,
                token_ids_T: torch.Tensor | None = None,
                groups: tuple[int, int] | None = None) -> RoutingPlan:
        """``groups = (G, S)``: the T = G·S tokens form G groups of S consecutive tokens
        (default: one group of all tokens)."""
        require_zero_bias("soft_merge", selection_bias_E)
        T, D = x_TD.shape
        G, S = groups if groups is not None else ((1, T) if T else (0, 0))
        if G * S != T:
            raise ValueError(f"soft_merge groups {G}×{S} do not cover the {T} tokens")
        if T == 0:
            logits_TE = self.gate(x_TD)
            return RoutingPlan(torch.zeros(0, 1, dtype=torch.int64, device=x_TD.device),
                               x_TD.new_zeros(0, 1), logits_TE.float().softmax(-1), logits_TE)
        pooled_GD = jittered(x_TD, self.jitter, self.training).view(G, S, D).mean(dim=1)
        logits_GE = self.gate(pooled_GD)
        # At least float32 (bf16 logits are up-cast); float64 stays float64 so the merged
        # weights and their gradients lose nothing in double-precision checks.
        probs_GE = logits_GE.to(torch.promote_types(logits_GE.dtype, torch.float32)).softmax(-1)
        probs_TE = probs_GE.repeat_interleave(S, dim=0)
        logits_TE = logits_GE.repeat_interleave(S, dim=0)
        top_T1 = probs_TE.detach().argmax(dim=-1, keepdim=True)
        weights_T1 = probs_TE.gather(1, top_T1).to(x_TD.dtype)
        return RoutingPlan(top_T1, weights_T1, probs_TE, logits_TE)


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


SOFT_MERGE_PATHS = {"grouped": soft_merge_forward, "reference": soft_merge_reference}
