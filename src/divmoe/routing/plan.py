"""The RoutingPlan: the one record a router hands to dispatch and to the stats."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class RoutingPlan:
    """Which expert each token slot goes to, and with what weight.

    Shapes: T tokens, K slots per token, E routed experts.

    - ``expert_ids_TK`` (int64): expert of each slot; ``-1`` marks an empty slot
      (a dropped token or a router that chose fewer than K experts). Empty slots
      are never silent: :attr:`dropped_slots` counts them.
    - ``weights_TK``: combine weight of each slot (differentiable; 0 for empty slots).
    - ``probs_TE``: router probabilities used by balancing losses (rows sum to 1).
    - ``logits_TE``: raw router logits (for z-loss).
    - ``null_slots_TK`` (optional, bool): slots that chose a *null expert* (AdaMoE). They
      hold id ``-1`` like an empty slot (no expert FLOPs) but are a routing decision, not
      a drop: :attr:`dropped_slots` excludes them and :attr:`num_null_slots` counts them.
    - ``null_prob_T`` (optional): each token's total router probability on null experts,
      over the full E + N softmax (differentiable; for the ``null_usage`` loss). The
      full-softmax probability of real expert e is ``probs_TE[:, e] * (1 - null_prob_T)``.
    - ``null_target`` (optional): the share of slots the null experts should get on average.
    """

    expert_ids_TK: torch.Tensor
    weights_TK: torch.Tensor
    probs_TE: torch.Tensor
    logits_TE: torch.Tensor
    null_slots_TK: torch.Tensor | None = None
    null_prob_T: torch.Tensor | None = None
    null_target: float | None = None

    @property
    def num_tokens(self) -> int:
        return self.expert_ids_TK.shape[0]

    @property
    def num_experts(self) -> int:
        return self.probs_TE.shape[1]

    @property
    def dropped_slots(self) -> torch.Tensor:
        """Empty slots that are not null-expert choices."""
        empty_TK = self.expert_ids_TK < 0
        if self.null_slots_TK is not None:
            empty_TK = empty_TK & ~self.null_slots_TK
        return empty_TK.sum()

    @property
    def num_null_slots(self) -> int:
        return 0 if self.null_slots_TK is None else int(self.null_slots_TK.sum())

    def tokens_per_expert(self) -> torch.Tensor:
        """Routed slot count per expert, [E] int64 (empty slots excluded)."""
        ids = self.expert_ids_TK.reshape(-1)
        return torch.bincount(ids[ids >= 0], minlength=self.num_experts)
