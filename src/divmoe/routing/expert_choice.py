"""Expert-choice routing (Zhou et al., 2022, "Mixture-of-Experts with Expert Choice Routing").

Definition implemented: S_TE = softmax(x_TD W_DE) over experts; every expert e takes the
C tokens with the largest S[:, e] (top-C down the token axis), with capacity
C = round(capacity_factor · T · top_k / E), clamped to [1, T]. A token may be taken by
0..E experts; its combine weight for expert e is S[t, e] (the paper's G = S at the
chosen positions, no renormalisation: ``renormalize`` is not applied). The plan pads each
token's experts to K = the largest number any token got, with −1; tokens no expert took
have only empty slots (counted as dropped slots).

Each expert's load is exactly C by construction, so no balancing loss is needed. Note
that selection looks at all T tokens of the batch at once, so in a causal LM a token's
routing depends on other (including later) tokens. ``selection_bias_E`` cannot change a
per-expert ranking of tokens, so only an all-zero bias is accepted.

Causal rule (:func:`~divmoe.routing.router.causal_routing`, for evaluation): each token
takes its own top-k' experts by S, k' = clamp(round(capacity_factor · top_k), 1, E) — the
mean number of experts per token of the batch rule — with weights S (no renormalisation),
times ``routed_scaling``. The paper routes by batch only; this is our causal reading of it.

Under expert parallelism each rank routes its own tokens: every expert takes its top-C of
the rank's T tokens (C from the rank's T), so an expert's load is C per rank, not C of the
whole batch (``divmoe.parallel.TOKEN_SETS``).
"""

from __future__ import annotations

import torch

from ..balance.capacity import tokens_per_expert_choice
from ._common import finish_weights, jittered, linear_gate, require_zero_bias
from .plan import RoutingPlan
from .router import Router


class ExpertChoiceRouter(Router):
    settings = ("top_k", "capacity_factor", "routed_scaling", "jitter")
    batch_dependent = True

    def __init__(self, d_model: int, cfg):
        super().__init__()
        self.num_experts, self.top_k = cfg.num_experts, cfg.top_k
        self.capacity_factor = cfg.capacity_factor
        self.routed_scaling, self.jitter = cfg.routed_scaling, cfg.jitter
        self.gate = linear_gate(d_model, cfg.num_experts)

    def forward(self, x_TD: torch.Tensor, selection_bias_E: torch.Tensor | None = None,
                token_ids_T: torch.Tensor | None = None, seq_len: int | None = None
                ) -> RoutingPlan:
        require_zero_bias("expert_choice", selection_bias_E)
        T, E = x_TD.shape[0], self.num_experts
        logits_TE = self.gate(jittered(x_TD, self.jitter, self.training))
        scores_TE = logits_TE.float().softmax(dim=-1)
        if self.route_causally:
            k = min(E, max(1, round(self.capacity_factor * self.top_k)))
            expert_ids_TK = scores_TE.detach().topk(k, dim=-1).indices
            weights_TK = finish_weights(scores_TE.gather(1, expert_ids_TK), None, False,
                                        self.routed_scaling, x_TD.dtype)
            return RoutingPlan(expert_ids_TK, weights_TK, scores_TE, logits_TE)
        C = tokens_per_expert_choice(T, E, self.top_k, self.capacity_factor)

        # Each expert picks its top-C tokens: token_CE[c, e] is the c-th token of expert e.
        token_CE = scores_TE.detach().topk(C, dim=0).indices
        taken_TE = torch.zeros(T, E, dtype=torch.bool, device=x_TD.device)
        taken_TE.scatter_(0, token_CE, True)

        # Per token, list the experts that took it (best score first), padded with −1.
        K = max(1, int(taken_TE.sum(dim=1).max())) if T else 1
        order_TE = scores_TE.detach().masked_fill(~taken_TE, float("-inf"))
        expert_ids_TK = order_TE.topk(K, dim=-1).indices
        filled_TK = taken_TE.gather(1, expert_ids_TK)
        weights_TK = finish_weights(scores_TE.gather(1, expert_ids_TK), filled_TK, False,
                                    self.routed_scaling, x_TD.dtype)
        expert_ids_TK = expert_ids_TK.masked_fill(~filled_TK, -1)
        return RoutingPlan(expert_ids_TK, weights_TK, scores_TE, logits_TE)
