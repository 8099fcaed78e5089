"""Top-k routing: Switch/GShard/Mixtral (softmax) and DeepSeek-V3 (sigmoid, group-limited)."""

from __future__ import annotations

import torch

from ..config import ConfigError
from ._common import finish_weights, jittered, linear_gate
from .plan import RoutingPlan
from .router import Router, check_groups_divide_experts


class TopKRouter(Router):
    """Linear gate, then each token keeps its k best experts.

    Forward pass (x_TD → RoutingPlan):
      1. logits_TE = x_TD @ W_DE (with optional multiplicative jitter on x at train time,
         as in Switch Transformer / Mixtral).
      2. scores_TE = softmax(logits) or sigmoid(logits).
      3. Selection uses ``scores + selection_bias`` (the bias is a balancer's state, e.g.
         loss-free balancing; it never enters the combine weights). With ``n_groups > 1``
         (DeepSeek-V3 group-limited routing) a group's score is the sum of its top-2
         selection scores; only the best ``topk_groups`` groups stay eligible.
      4. weights_TK = scores of the chosen experts, renormalised to sum to 1 if asked,
         times ``routed_scaling``.
    ``probs_TE`` for balancing losses is the softmax, or the sigmoid scores normalised
    per token (DeepSeek-V3's sequence-wise balance loss uses the same normalisation).
    """

    settings = ("top_k", "score_func", "renormalize", "n_groups", "topk_groups",
                "routed_scaling", "jitter")
    uses_selection_bias = True

    @classmethod
    def check_settings(cls, cfg, prefix: str = "") -> None:
        p = prefix
        check_groups_divide_experts(cfg, p)
        if cfg.topk_groups > cfg.n_groups:
            raise ConfigError(f"{p}topk_groups={cfg.topk_groups} is not allowed: must be <= "
                              f"{p}n_groups={cfg.n_groups}")
        eligible = cfg.topk_groups * (cfg.num_experts // cfg.n_groups)
        if cfg.n_groups > 1 and cfg.top_k > eligible:
            raise ConfigError(f"{p}top_k={cfg.top_k} is not allowed: the {cfg.topk_groups} "
                              f"selected groups hold only {eligible} experts")

    def __init__(self, d_model: int, cfg):
        super().__init__()
        self.num_experts, self.top_k = cfg.num_experts, cfg.top_k
        self.score_func, self.renormalize = cfg.score_func, cfg.renormalize
        self.n_groups, self.topk_groups = cfg.n_groups, cfg.topk_groups
        self.routed_scaling, self.jitter = cfg.routed_scaling, cfg.jitter
        self.gate = linear_gate(d_model, cfg.num_experts)

    def forward(self, x_TD: torch.Tensor, selection_bias_E: torch.Tensor | None = None,
                token_ids_T: torch.Tensor | None = None, seq_len: int | None = None
                ) -> RoutingPlan:
        logits_TE = self.gate(jittered(x_TD, self.jitter, self.training))
        scores_TE, probs_TE = self.scores(logits_TE)
        expert_ids_TK = self.selection(scores_TE, selection_bias_E).topk(self.top_k, dim=-1).indices
        return RoutingPlan(expert_ids_TK, self.weights(scores_TE, expert_ids_TK, x_TD.dtype),
                           probs_TE, logits_TE)

    # Steps 2-4 as methods of their own, so that inference-time routing (divmoe.inference:
    # SCMoE's rank routing, RoE's Gumbel sampling) picks other experts by the same rules.
    def scores(self, logits_TE: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(scores_TE, probs_TE) of step 2."""
        if self.score_func == "softmax":
            scores_TE = logits_TE.float().softmax(dim=-1)
            return scores_TE, scores_TE
        scores_TE = logits_TE.float().sigmoid()
        return scores_TE, scores_TE / scores_TE.sum(dim=-1, keepdim=True).clamp_min(1e-20)

    def selection(self, scores_TE: torch.Tensor, selection_bias_E: torch.Tensor | None
                  ) -> torch.Tensor:
        """What step 3 ranks experts by: scores + bias, ineligible groups at −inf."""
        select_TE = scores_TE.detach()
        if selection_bias_E is not None:
            select_TE = select_TE + selection_bias_E
        if self.n_groups > 1:
            select_TE = self._mask_groups(select_TE)
        return select_TE

    def weights(self, scores_TE: torch.Tensor, expert_ids_TK: torch.Tensor,
                dtype: torch.dtype) -> torch.Tensor:
        """Step 4: combine weights of the chosen experts."""
        return finish_weights(scores_TE.gather(1, expert_ids_TK), None, self.renormalize,
                              self.routed_scaling, dtype)

    def _mask_groups(self, select_TE: torch.Tensor) -> torch.Tensor:
        T, E = select_TE.shape
        groups_TGe = select_TE.view(T, self.n_groups, E // self.n_groups)
        group_score_TG = groups_TGe.topk(min(2, E // self.n_groups), dim=-1).values.sum(-1)
        keep_TG = torch.zeros_like(group_score_TG, dtype=torch.bool)
        keep_TG.scatter_(1, group_score_TG.topk(self.topk_groups, dim=-1).indices, True)
        return groups_TGe.masked_fill(~keep_TG.unsqueeze(-1), float("-inf")).view(T, E)
