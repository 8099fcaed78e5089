"""The RoutingPlan: the one record a router hands to dispatch and to the stats."""

from __future__ import annotations

from dataclasses import dataclass

import torch


def count_per_expert(expert_ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Routed slots per expert, [E] int64, from expert ids of any shape (−1 = empty slot).

    A scatter-add into E + 1 bins (empty slots land in the spare bin E, which is cut off):
    unlike ``bincount`` or boolean indexing it needs no host read of the ids, so it never
    stalls a CUDA stream.
    """
    ids_S = expert_ids.reshape(-1)
    bins_S = torch.where(ids_S < 0, num_experts, ids_S)
    counts = torch.zeros(num_experts + 1, dtype=torch.int64, device=ids_S.device)
    counts.scatter_add_(0, bins_S, torch.ones_like(bins_S))
    return counts[:num_experts]


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
    - ``groups`` (optional): ``(G, S)`` when the plan routes G groups of S consecutive tokens
      as units (soft merging: one merged expert per group) rather than slot by slot.
    - ``rerouted_slots``: slots a plan transform moved to another expert (capacity reroute).
    """

    expert_ids_TK: torch.Tensor
    weights_TK: torch.Tensor
    probs_TE: torch.Tensor
    logits_TE: torch.Tensor
    null_slots_TK: torch.Tensor | None = None
    null_prob_T: torch.Tensor | None = None
    null_target: float | None = None
    groups: tuple[int, int] | None = None
    rerouted_slots: torch.Tensor | int = 0

    @property
    def num_tokens(self) -> int:
        return self.expert_ids_TK.shape[0]

    @property
    def num_experts(self) -> int:
        return self.probs_TE.shape[1]

    @property
    def dropped_slots(self) -> torch.Tensor:
        """Empty slots that are not null-expert choices (0-dim int64 tensor)."""
        empty_TK = self.expert_ids_TK < 0
        if self.null_slots_TK is not None:
            empty_TK = empty_TK & ~self.null_slots_TK
        return empty_TK.sum()

    @property
    def num_null_slots(self) -> torch.Tensor:
        """Slots that chose a null expert (0-dim int64 tensor)."""
        if self.null_slots_TK is None:
            return torch.zeros((), dtype=torch.int64, device=self.expert_ids_TK.device)
        return self.null_slots_TK.sum()

    def tokens_per_expert(self) -> torch.Tensor:
        """Routed slot count per expert, [E] int64 (empty slots excluded)."""
        return count_per_expert(self.expert_ids_TK, self.num_experts)

    def expert_load(self) -> torch.Tensor:
        """What each expert was used for, [E]: routed slots, or for a plan of groups (soft
        merging, where every expert is used in proportion to p) Σ_t p_te as float64."""
        if self.groups is not None:
            return self.probs_TE.detach().double().sum(0)
        return self.tokens_per_expert()
