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

Causal rule (:func:`~divmoe.routing.router.causal_routing`, for evaluation): per-prefix
routing. Token t of a sequence is routed from the mean of the sequence's tokens up to and
including t, r_t = mean_{s≤t} x_s, and runs through its own merged expert with
p_t = softmax(r_t W_DE); the last token's p equals the sequence's batch-rule p. The plan then
has one group per token (groups (T, 1)). This is our causal reading of SMEAR's per-example
routing, not the paper's.

The plan, for balancing losses and the stats: ``probs_TE`` / ``logits_TE`` are the group's
p / logits repeated for each of its tokens; ``expert_ids_TK`` ([T, 1]) is the group's
dominant expert argmax_e p_ge, ``weights_TK`` its probability (what discrete consumers such
as the expert × domain matrix see). The layer runs the plan with the
soft-merge execution (:mod:`divmoe.dispatch.soft_merge`) instead of dispatching it, and its stats count expert e as
used by Σ_t p_te tokens (soft load). ``top_k`` is not used: a token touches one (merged)
expert's parameters. The selection bias must be zero (no selection to bias).
"""

from __future__ import annotations

import torch

from ..config import ConfigError
from ._common import jittered, linear_gate, require_zero_bias
from .plan import RoutingPlan
from .router import Router


def merge_groups(num_tokens: int, seq_len: int | None) -> tuple[int, int]:
    """(G groups, S tokens per group) for T tokens in sequences of ``seq_len`` (input
    [..., S, d]); without a sequence axis (2-D input) all T tokens are one group."""
    if seq_len is not None:
        return (num_tokens // seq_len if seq_len else 0), seq_len
    return (1, num_tokens) if num_tokens else (0, 0)


class SoftMergeRouter(Router):
    """SMEAR: one router distribution per sequence over the experts, whose parameters are
    averaged with those weights (see the module docstring)."""

    settings = ("jitter",)
    execution = "soft_merge"
    batch_dependent = True

    @classmethod
    def check_settings(cls, cfg, prefix: str = "") -> None:
        p = prefix
        if cfg.expert_layout != "swiglu" or cfg.expert_widths is not None:
            raise ConfigError(f"{p}expert_layout={cfg.expert_layout!r}"
                              + (f", {p}expert_widths={cfg.expert_widths}"
                                 if cfg.expert_widths is not None else "")
                              + f" is not allowed with {p}router='soft_merge': merging needs "
                                f"experts of one shape (expert_layout=swiglu, expert_widths="
                                f"null)")
        if "capacity" in cfg.balance:
            raise ConfigError(f"{p}balance={cfg.balance!r} is not allowed with "
                              f"{p}router='soft_merge': capacity drops token slots, and "
                              f"soft merging has none (every token runs the merged expert)")

    def __init__(self, d_model: int, cfg):
        super().__init__()
        self.num_experts, self.jitter = cfg.num_experts, cfg.jitter
        self.gate = linear_gate(d_model, cfg.num_experts)

    def experts_per_token(self) -> int:
        return 1  # one merged expert

    def forward(self, x_TD: torch.Tensor, selection_bias_E: torch.Tensor | None = None,
                token_ids_T: torch.Tensor | None = None, seq_len: int | None = None
                ) -> RoutingPlan:
        """Groups: the sequences of ``seq_len`` tokens, or all T tokens when it is None."""
        require_zero_bias("soft_merge", selection_bias_E)
        T, D = x_TD.shape
        G, S = merge_groups(T, seq_len)
        if G * S != T:
            raise ValueError(f"soft_merge groups {G}×{S} do not cover the {T} tokens")
        if T == 0:
            logits_TE = self.gate(x_TD)
            return RoutingPlan(torch.zeros(0, 1, dtype=torch.int64, device=x_TD.device),
                               x_TD.new_zeros(0, 1), logits_TE.float().softmax(-1), logits_TE,
                               groups=(G, S))
        x_GSD = jittered(x_TD, self.jitter, self.training).view(G, S, D)
        if self.route_causally:  # every token its own group, routed from its prefix's mean
            count_S1 = torch.arange(1, S + 1, device=x_TD.device, dtype=x_GSD.dtype)[:, None]
            pooled_GD = (x_GSD.cumsum(dim=1) / count_S1).reshape(T, D)
            G, S = T, 1
        else:
            pooled_GD = x_GSD.mean(dim=1)
        logits_GE = self.gate(pooled_GD)
        # At least float32 (bf16 logits are up-cast); float64 stays float64 so the merged
        # weights and their gradients lose nothing in double-precision checks.
        probs_GE = logits_GE.to(torch.promote_types(logits_GE.dtype, torch.float32)).softmax(-1)
        probs_TE = probs_GE.repeat_interleave(S, dim=0)
        logits_TE = logits_GE.repeat_interleave(S, dim=0)
        top_T1 = probs_TE.detach().argmax(dim=-1, keepdim=True)
        weights_T1 = probs_TE.gather(1, top_T1).to(x_TD.dtype)
        return RoutingPlan(top_T1, weights_T1, probs_TE, logits_TE, groups=(G, S))
