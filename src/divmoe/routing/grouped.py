"""Grouped routing (MoGE, "Pangu Pro MoE: Mixture of Grouped Experts for Efficient
Sparsity", Tang et al., 2025).

Definition implemented: S_TE = softmax(x_TD W_DE) over all E experts; the experts are split
into G = ``n_groups`` contiguous groups of E / G, and every token takes its top k / G experts
inside EVERY group (``top_k`` must be divisible by ``n_groups``). Combine weights are the
chosen softmax scores, renormalised over the k chosen when ``renormalize``. Each group (one
device in the paper) therefore receives exactly T·k/G slots. A selection bias is added to
the scores for selection only. (``topk_groups`` is not used by this router.)
"""

from __future__ import annotations

import torch

from ..config import ConfigError
from ._common import finish_weights, jittered, linear_gate
from .plan import RoutingPlan
from .router import Router, check_groups_divide_experts


class GroupedRouter(Router):
    settings = ("top_k", "n_groups", "renormalize", "routed_scaling", "jitter")
    uses_selection_bias = True

    @classmethod
    def check_settings(cls, cfg, prefix: str = "") -> None:
        p = prefix
        check_groups_divide_experts(cfg, p)
        if cfg.top_k % cfg.n_groups:
            raise ConfigError(f"{p}top_k={cfg.top_k} is not allowed with {p}router='grouped': "
                              f"must be divisible by {p}n_groups={cfg.n_groups} (every group "
                              f"gives each token top_k/n_groups experts)")

    def __init__(self, d_model: int, cfg):
        super().__init__()
        self.num_experts, self.top_k, self.n_groups = cfg.num_experts, cfg.top_k, cfg.n_groups
        self.renormalize, self.routed_scaling, self.jitter = \
            cfg.renormalize, cfg.routed_scaling, cfg.jitter
        self.gate = linear_gate(d_model, cfg.num_experts)

    def forward(self, x_TD: torch.Tensor, selection_bias_E: torch.Tensor | None = None,
                token_ids_T: torch.Tensor | None = None, seq_len: int | None = None
                ) -> RoutingPlan:
        T, E, G = x_TD.shape[0], self.num_experts, self.n_groups
        per_group, group_size = self.top_k // G, E // G
        logits_TE = self.gate(jittered(x_TD, self.jitter, self.training))
        scores_TE = logits_TE.float().softmax(dim=-1)

        select_TE = scores_TE.detach()
        if selection_bias_E is not None:
            select_TE = select_TE + selection_bias_E
        local_TGk = select_TE.view(T, G, group_size).topk(per_group, dim=-1).indices
        offset_G1 = torch.arange(G, device=x_TD.device).unsqueeze(-1) * group_size
        expert_ids_TK = (local_TGk + offset_G1).reshape(T, G * per_group)

        weights_TK = scores_TE.gather(1, expert_ids_TK)
        weights_TK = finish_weights(weights_TK, None, self.renormalize, self.routed_scaling,
                                    x_TD.dtype)
        return RoutingPlan(expert_ids_TK, weights_TK, scores_TE, logits_TE)
