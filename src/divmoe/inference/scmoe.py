"""Self-contrast decoding (SCMoE; Shi et al., "Unchosen Experts Can Contribute Too:
Unleashing MoE Models' Power by Self-Contrast", 2024).

Definition implemented (the paper's, as in its code for Mixtral):
  1. Strong pass: the model with its normal top-k routing, next-token log-probabilities
     log p_s.
  2. Weak pass: the same model in which every MoE layer sends each token to one expert only,
     the expert of rank ``weak_rank`` (1 = the best) in the router's own ranking (its scores
     plus any loss-free bias, within its eligible groups), with the router's weight rule
     applied to that one expert (renormalised: weight 1 · routed_scaling; without
     renormalisation: its score). The paper's code defaults to weak_rank=1, β=0.5, α=0.1.
  3. Scores (1 + β)·log p_s − β·log p_w for the tokens whose strong probability is at least
     α times the best one (p_s ≥ α·max p_s, the plausibility constraint); every other token
     gets −inf. The paper contrasts logits; over one position the logits and log-probabilities
     differ by a constant, so the ranking and any softmax of the scores are the same.

The scores are a ranking, not a calibrated distribution: decode greedily (or sample from
softmax(scores / T), as the paper's sampling variant does), and compare methods by accuracy,
not by bits per byte. β = 0 gives the strong pass's log-probabilities on the kept tokens, so
greedy decoding equals plain greedy decoding (and with α = 0 sampling equals it too).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .methods import Pass
from .rerouting import check_reroutable


def rank_pick(rank: int):
    """Each token to its expert of rank ``rank`` (1-based) in the router's ranking."""
    def pick(router, logits_TE, selection_bias_E):
        select_TE = router.selection(router.scores(logits_TE)[0], selection_bias_E)
        return select_TE.topk(rank, dim=-1).indices[:, rank - 1:]
    return pick


@dataclass(frozen=True)
class SelfContrast:
    beta: float
    alpha: float
    weak_rank: int

    calibrated = False

    def __post_init__(self):
        if not (math.isfinite(self.beta) and self.beta >= 0):
            raise ValueError(f"SCMoE beta={self.beta} is not allowed: expected a number >= 0 "
                             f"(0 = plain decoding)")
        if not (0.0 <= self.alpha <= 1.0):
            raise ValueError(f"SCMoE alpha={self.alpha} is not allowed: expected a number in "
                             f"[0, 1] (tokens need strong probability >= alpha · the best one)")
        if isinstance(self.weak_rank, bool) or not isinstance(self.weak_rank, int) \
                or self.weak_rank < 1:
            raise ValueError(f"SCMoE weak_rank={self.weak_rank!r} is not allowed: expected an "
                             f"int >= 1 (1 = each token's best expert)")

    def check(self, model) -> None:
        check_reroutable(model, "SCMoE")
        c = model.moe_config
        eligible = c.num_experts if c.n_groups == 1 else c.topk_groups * (c.num_experts //
                                                                            c.n_groups)
        if self.weak_rank > eligible:
            raise ValueError(f"SCMoE weak_rank={self.weak_rank} is not allowed: each token can "
                             f"reach {eligible} experts (moe.num_experts={c.num_experts}"
                             + (f", {c.topk_groups} of {c.n_groups} groups" if c.n_groups > 1
                                else "") + ")")

    def passes(self) -> list[Pass]:
        return [Pass(), Pass(rank_pick(self.weak_rank))]

    def combine(self, logits: list[torch.Tensor]) -> torch.Tensor:
        strong, weak = (x.float().log_softmax(-1) for x in logits)
        scores = (1 + self.beta) * strong - self.beta * weak
        if self.alpha > 0:
            plausible = strong >= strong.max(-1, keepdim=True).values + math.log(self.alpha)
            scores = scores.masked_fill(~plausible, float("-inf"))
        return scores

    def describe(self) -> str:
        return f"SCMoE β={self.beta:g}, α={self.alpha:g}, weak rank {self.weak_rank}"


def parse_scmoe(spec: str) -> SelfContrast:
    """``"beta,alpha,weak_rank"`` (e.g. ``"0.5,0.1,2"``) → :class:`SelfContrast`."""
    parts = spec.split(",")
    try:
        if len(parts) != 3:
            raise ValueError
        beta, alpha, rank = float(parts[0]), float(parts[1]), int(parts[2])
    except ValueError:
        raise ValueError(f"--scmoe {spec!r} is not allowed: expected beta,alpha,weak_rank, "
                         f"e.g. --scmoe 0.5,0.1,2") from None
    return SelfContrast(beta, alpha, rank)
