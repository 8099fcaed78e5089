"""Top-k over a merged model's original router rows, each choice sent to its group's expert.

Definition implemented (MC-SMoE, Li et al. 2024, "Merge, Then Compress"): after experts
are merged in groups, the router keeps its R original rows and every row's choice goes to
the merged expert of its group, so every token reaches the expert its original choice was
merged into. ``expert_of_row_R[r]`` is that expert for row r: a buffer saved with the
weights (each layer has its own groups), written by ``divmoe merge``; ``router_rows`` = R.

Forward pass (x_TD → RoutingPlan over E = num_experts merged experts):
  1. The top-k router over the R rows (:class:`~divmoe.routing.topk.TopKRouter`), with the
     Balancer's selection bias of each row's expert.
  2. expert_ids_TK ← expert_of_row[ids]: two slots may now name one expert; both run and
     their weights add up, which is what the unmerged layer computed when the two chosen
     experts were identical.
  3. probs_TE: each expert's group probability (the sum of its rows' probabilities), so
     balancing losses see the merged experts; logits_TE: the log of the group's summed
     exponentials (logsumexp over a token's row equals the unmerged one, so z-loss is too).
"""

from __future__ import annotations

import dataclasses

import torch

from ..config import ConfigError
from .plan import RoutingPlan
from .topk import TopKRouter


class MergedTopKRouter(TopKRouter):
    settings = TopKRouter.settings + ("router_rows",)

    @classmethod
    def check_settings(cls, cfg, prefix: str = "") -> None:
        p = prefix
        if cfg.router_rows < cfg.num_experts:
            raise ConfigError(f"{p}router_rows={cfg.router_rows} is not allowed with {p}router="
                              f"'merged_topk': must be >= {p}num_experts={cfg.num_experts} (the "
                              f"original rows that `divmoe merge` kept)")
        if cfg.n_groups != 1:
            raise ConfigError(f"{p}n_groups={cfg.n_groups} is not allowed with {p}router="
                              f"'merged_topk': group-limited routing over merged rows is undefined")

    @classmethod
    def max_top_k(cls, cfg) -> int:
        return max(cfg.router_rows, cfg.num_experts)

    @classmethod
    def max_top_k_text(cls, cfg, prefix: str) -> str:
        return f"{prefix}router_rows={cfg.router_rows}"

    def __init__(self, d_model: int, cfg):
        super().__init__(d_model, _with_rows(cfg, cfg.router_rows))
        self.num_experts = cfg.num_experts
        # Placeholder until the checkpoint's map is loaded: row r → expert r mod E.
        self.register_buffer("expert_of_row_R", torch.arange(cfg.router_rows) % cfg.num_experts)

    def forward(self, x_TD: torch.Tensor, selection_bias_E: torch.Tensor | None = None,
                token_ids_T: torch.Tensor | None = None, seq_len: int | None = None
                ) -> RoutingPlan:
        row_bias_R = None if selection_bias_E is None else selection_bias_E[self.expert_of_row_R]
        plan = super().forward(x_TD, row_bias_R, token_ids_T, seq_len)
        T, E = plan.num_tokens, self.num_experts
        index_TR = self.expert_of_row_R.expand(T, -1)
        probs_TE = plan.probs_TE.new_zeros(T, E).scatter_add_(1, index_TR, plan.probs_TE)
        exp_TR = (plan.logits_TE.float() - plan.logits_TE.float().amax(-1, keepdim=True)).exp()
        logits_TE = (exp_TR.new_zeros(T, E).scatter_add_(1, index_TR, exp_TR).log()
                     + plan.logits_TE.float().amax(-1, keepdim=True))
        return RoutingPlan(self.expert_of_row_R[plan.expert_ids_TK], plan.weights_TK,
                           probs_TE, logits_TE)


def _with_rows(cfg, rows: int):
    """A view of ``cfg`` whose ``num_experts`` is the number of router rows (the gate's size)."""
    return dataclasses.replace(cfg, num_experts=rows)
