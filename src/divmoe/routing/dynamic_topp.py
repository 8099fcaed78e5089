"""Dynamic top-p routing (Huang et al., 2024, "Harder Tasks Need More Experts: Dynamic
Routing in MoE Models").

Definition implemented: P_TE = softmax(x_TD W_DE); per token sort P descending and keep
the smallest prefix whose cumulative probability reaches ``top_p`` (expert j is kept iff
the mass of the experts ranked before it is < p), capped at k_max = ``top_k`` experts (the
paper has no cap: set ``top_k`` = ``num_experts``; a cap at the baseline's k can only use
fewer experts than it). Every token keeps at least one expert. Combine weights are the kept
probabilities, renormalised to sum to 1 when ``renormalize`` (the paper uses the raw
probabilities: set ``renormalize: false``). The plan has K = top_k slots, unused ones −1.

The paper's dynamic loss, the mean entropy of P, which keeps the rule from spreading mass
over many experts, is the balance term ``routing_entropy`` (``moe.balance: [aux_loss,
routing_entropy]``, weight ``routing_entropy_weight``).
A selection bias would break the cumulative-probability rule, so only a zero bias is accepted.
"""

from __future__ import annotations

import torch

from ._common import finish_weights, jittered, linear_gate, require_zero_bias
from .plan import RoutingPlan
from .router import Router


class DynamicTopPRouter(Router):
    settings = ("top_k", "top_p", "renormalize", "routed_scaling", "jitter")

    def __init__(self, d_model: int, cfg):
        super().__init__()
        self.num_experts, self.k_max, self.top_p = cfg.num_experts, cfg.top_k, cfg.top_p
        self.renormalize, self.routed_scaling, self.jitter = \
            cfg.renormalize, cfg.routed_scaling, cfg.jitter
        self.gate = linear_gate(d_model, cfg.num_experts)

    def experts_per_token(self) -> int:
        return self.k_max

    def forward(self, x_TD: torch.Tensor, selection_bias_E: torch.Tensor | None = None,
                token_ids_T: torch.Tensor | None = None, seq_len: int | None = None
                ) -> RoutingPlan:
        require_zero_bias("dynamic_topp", selection_bias_E)
        logits_TE = self.gate(jittered(x_TD, self.jitter, self.training))
        probs_TE = logits_TE.float().softmax(dim=-1)

        sorted_TK, expert_ids_TK = probs_TE.detach().topk(self.k_max, dim=-1)
        mass_before_TK = torch.cat([torch.zeros_like(sorted_TK[:, :1]),
                                    sorted_TK.cumsum(dim=-1)[:, :-1]], dim=-1)
        keep_TK = mass_before_TK < self.top_p
        keep_TK[:, 0] = True

        weights_TK = probs_TE.gather(1, expert_ids_TK)
        weights_TK = finish_weights(weights_TK, keep_TK, self.renormalize, self.routed_scaling,
                                    x_TD.dtype)
        expert_ids_TK = expert_ids_TK.masked_fill(~keep_TK, -1)
        return RoutingPlan(expert_ids_TK, weights_TK, probs_TE, logits_TE)
