"""Null-expert routing (AdaMoE: Zeng et al., 2024, "AdaMoE: Token-Adaptive Routing with
Null Experts for Mixture-of-Experts Language Models").

Definition implemented: the gate scores E real + N null experts,
P_T(E+N) = softmax(x_TD W_D(E+N)); each token takes its top-k over all E + N candidates
(k = ``top_k`` counts null choices too, as AdaMoE raises k). A null expert outputs zero,
so a slot that chose one becomes id −1 (the dispatch skips it: no FLOPs) and is marked in
``plan.null_slots_TK`` (it is not a drop). Combine weights are the chosen probabilities,
renormalised over all k chosen slots (null ones included) when ``renormalize``; null slots
then get weight 0. The number of real experts per token is therefore 0..k.

``probs_TE`` is the real-expert part renormalised per token (rows sum to 1) for the
standard aux loss; ``null_prob_T`` is each token's null mass in the full softmax.
``logits_TE`` holds the real experts' logits only (z-loss sees those).

Balancing: AdaMoE applies the Switch load-balancing loss over all E + N experts, where the
null experts (identical) share their load and probability equally; that fixes the average
null usage at N / (E + N) of the slots. :func:`null_usage_loss` is that loss generalised to a
target null share τ (``null_target``; 0 means N / (E + N), which gives exactly AdaMoE's loss):

    L = Σ_e f_e P_e / q_e + f_null P_null / τ,   q_e = (1 − τ) / E,

with f the fraction of all T·k slots (no gradient) and P the mean full-softmax probability.
L = 1 when loads and probabilities sit at their targets. A selection bias is added to the
real experts' scores for selection only (null candidates get 0).
"""

from __future__ import annotations

import torch

from ..config import ConfigError
from ._common import finish_weights, jittered, linear_gate
from .plan import RoutingPlan
from .router import Router


class NullExpertRouter(Router):
    settings = ("top_k", "num_null_experts", "null_target", "renormalize", "routed_scaling",
                "jitter")
    uses_selection_bias = True

    @classmethod
    def check_settings(cls, cfg, prefix: str = "") -> None:
        p = prefix
        if cfg.num_null_experts < 1:
            raise ConfigError(f"{p}num_null_experts={cfg.num_null_experts} is not allowed with "
                              f"{p}router='null_experts': must be >= 1")
        if cfg.null_target >= 1.0:
            raise ConfigError(f"{p}null_target={cfg.null_target} is not allowed: must be < 1")

    @classmethod
    def max_top_k(cls, cfg) -> int:  # k counts null choices too (AdaMoE raises k)
        return cfg.num_experts + cfg.num_null_experts

    @classmethod
    def max_top_k_text(cls, cfg, prefix: str) -> str:
        return (f"{prefix}num_experts={cfg.num_experts} + {prefix}num_null_experts="
                f"{cfg.num_null_experts}")

    def __init__(self, d_model: int, cfg):
        super().__init__()
        self.num_experts, self.num_null, self.top_k = \
            cfg.num_experts, cfg.num_null_experts, cfg.top_k
        self.renormalize, self.routed_scaling, self.jitter = \
            cfg.renormalize, cfg.routed_scaling, cfg.jitter
        self.null_target = cfg.null_target if cfg.null_target > 0 else \
            cfg.num_null_experts / (cfg.num_experts + cfg.num_null_experts)
        self.gate = linear_gate(d_model, cfg.num_experts + cfg.num_null_experts)

    def forward(self, x_TD: torch.Tensor, selection_bias_E: torch.Tensor | None = None,
                token_ids_T: torch.Tensor | None = None, seq_len: int | None = None
                ) -> RoutingPlan:
        E = self.num_experts
        logits_TA = self.gate(jittered(x_TD, self.jitter, self.training))  # A = E + N
        probs_TA = logits_TA.float().softmax(dim=-1)

        select_TA = probs_TA.detach()
        if selection_bias_E is not None:
            bias_A = torch.cat([selection_bias_E.to(select_TA.dtype),
                                select_TA.new_zeros(self.num_null)])
            select_TA = select_TA + bias_A
        choice_TK = select_TA.topk(self.top_k, dim=-1).indices
        null_TK = choice_TK >= E

        # Renormalised over all k chosen slots, null ones included, before they are zeroed.
        weights_TK = finish_weights(probs_TA.gather(1, choice_TK), None, self.renormalize, 1.0,
                                    probs_TA.dtype)
        weights_TK = finish_weights(weights_TK, ~null_TK, False, self.routed_scaling, x_TD.dtype)
        expert_ids_TK = choice_TK.masked_fill(null_TK, -1)

        real_TE = probs_TA[:, :E]
        null_prob_T = probs_TA[:, E:].sum(dim=-1)
        probs_TE = real_TE / real_TE.sum(dim=-1, keepdim=True).clamp_min(1e-20)
        return RoutingPlan(expert_ids_TK, weights_TK, probs_TE, logits_TA[:, :E],
                           null_slots_TK=null_TK, null_prob_T=null_prob_T,
                           null_target=self.null_target)


def null_usage_loss(plan: RoutingPlan, ctx=None) -> torch.Tensor:
    """AdaMoE's balancing loss over E real + N null experts (see the module docstring);
    the target null share τ travels in ``plan.null_target``. ``ctx`` (a balance context)
    is accepted for a uniform loss signature and not used: the loss is micro-batch scope."""
    if plan.null_slots_TK is None or plan.null_prob_T is None or plan.null_target is None:
        raise ValueError("null_usage loss needs a plan from router=null_experts "
                         "(null_slots_TK / null_prob_T / null_target are missing)")
    E, tau = plan.num_experts, plan.null_target
    num_slots = max(plan.expert_ids_TK.numel(), 1)
    dtype = plan.probs_TE.dtype
    f_E = plan.tokens_per_expert().to(dtype) / num_slots
    f_null = plan.null_slots_TK.sum().to(dtype) / num_slots
    P_E = (plan.probs_TE * (1.0 - plan.null_prob_T).unsqueeze(-1)).mean(dim=0)
    P_null = plan.null_prob_T.mean()
    return (f_E * P_E).sum() * E / (1.0 - tau) + f_null * P_null / tau
