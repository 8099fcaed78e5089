"""Hyperspherical routing (X-MoE: Chi et al., 2022, "On the Representation Collapse of
Sparse Mixture of Experts").

Definition implemented: the token is projected to a low dimension r = ``router_dim``
(h_Tr = x_TD W_Dr) and the router scores are cosine similarities with learnable expert
embeddings e_Er, divided by a temperature τ = ``router_temperature``:
logits_TE = cos(h_t, e_e) / τ (both L2-normalised); scores = softmax(logits), top-k, combine
weights = the chosen scores (renormalised when ``renormalize``). The paper learns τ; here it
is a fixed config value. A selection bias is added to the scores for selection only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ._common import finish_weights, jittered
from .plan import RoutingPlan
from .router import Router


class HypersphereRouter(Router):
    settings = ("top_k", "router_dim", "router_temperature", "renormalize", "routed_scaling",
                "jitter")
    uses_selection_bias = True

    def __init__(self, d_model: int, cfg):
        super().__init__()
        self.num_experts, self.top_k = cfg.num_experts, cfg.top_k
        self.temperature = cfg.router_temperature
        self.renormalize, self.routed_scaling, self.jitter = \
            cfg.renormalize, cfg.routed_scaling, cfg.jitter
        self.proj = nn.Linear(d_model, cfg.router_dim, bias=False)
        nn.init.normal_(self.proj.weight, std=d_model ** -0.5)
        self.expert_emb_Er = nn.Parameter(torch.randn(cfg.num_experts, cfg.router_dim))

    def forward(self, x_TD: torch.Tensor, selection_bias_E: torch.Tensor | None = None,
                token_ids_T: torch.Tensor | None = None, seq_len: int | None = None
                ) -> RoutingPlan:
        h_Tr = F.normalize(self.proj(jittered(x_TD, self.jitter, self.training)).float(), dim=-1)
        e_Er = F.normalize(self.expert_emb_Er.float(), dim=-1)
        logits_TE = h_Tr @ e_Er.t() / self.temperature
        scores_TE = logits_TE.softmax(dim=-1)

        select_TE = scores_TE.detach()
        if selection_bias_E is not None:
            select_TE = select_TE + selection_bias_E
        expert_ids_TK = select_TE.topk(self.top_k, dim=-1).indices
        weights_TK = finish_weights(scores_TE.gather(1, expert_ids_TK), None, self.renormalize,
                                    self.routed_scaling, x_TD.dtype)
        return RoutingPlan(expert_ids_TK, weights_TK, scores_TE, logits_TE)
