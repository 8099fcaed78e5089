"""Expert capacity: the two formulas, and the capacity plan transform between the router and
dispatch.

Two meanings, one function each:

- :func:`slot_capacity` — token choice with a capacity (GShard / Switch Transformer): the
  routed slots an expert accepts, C = ⌈capacity_factor · T · k / E⌉; the rest overflow.
- :func:`tokens_per_expert_choice` — expert choice (Zhou et al. 2022): the tokens each expert
  picks, C = round(capacity_factor · T · k / E), clamped to [1, T].

"Capacity-Aware Inference: Mitigating the Straggler Effect in Mixture of Experts" (He et al.
2025, arXiv 2503.05066) has two rules: Token Drop (an overloaded expert drops its
lowest-scoring tokens: ``capacity_priority=score``) and Expanded Drop (``overflow=expand``).
``overflow=reroute`` is divmoe's own: overflowing slots move to the next-best expert with room.

Priority (which slots keep their place), ``capacity_priority``:

- ``position`` (GShard / Switch training): slot rank first, then token order — all tokens'
  first choices in token order, then all second choices, ... (a token's best expert
  outranks anyone's second choice). Router scores do not enter it.
- ``score`` (He et al.'s Capacity-Aware Token Drop): each overloaded expert keeps the C
  slots with the highest router score ``probs_TE[t, e]`` and drops the lowest-scoring ones;
  ties fall back to the position order.

overflow = ``drop``: a slot past its expert's capacity becomes empty (id −1, weight 0);
the plan's ``dropped_slots`` counts it.

overflow = ``expand`` (He et al.'s Capacity-Aware Expanded Drop, over all experts): every
token's candidates are its routed experts plus its next-best experts by ``probs_TE``, up to
M = min(E, ⌈``capacity_expand`` · k⌉) in all; each expert keeps the C highest-scoring of the
candidate slots that name it (the score priority above, whatever ``capacity_priority``
says); then each token keeps its best surviving candidates, as many as it had routed slots,
in the slots it had (best first; the rest become empty). A kept routed expert keeps its
weight; an expert the token did not route to gets w_ref · p[t, new] / p[t, ref], ref the
token's highest-weight routed slot (the router's normalisation of that token is kept, as in
reroute). The paper's "local" experts are those on the token's device under expert
parallelism, with a capacity per device; divmoe's version widens to all experts with a
capacity per expert (the authors' code offers both scopes).

overflow = ``reroute``: after every original slot has been placed (as above), the
overflowing slots are rerouted rank by rank (all overflowing rank-0 slots, then rank-1,
...). Within a rank, in proposal rounds: every pending slot proposes the highest-scoring
expert (by ``probs_TE``; ties → lower expert id) that still has room and that its token
does not already hold (its original k choices or an earlier reroute); each expert accepts
proposals in token order up to its remaining room; rejected slots propose again next round
(the expert they asked is now full). A slot with no eligible expert is dropped. Each round
fills at least one expert, so there are at most E + 1 rounds per rank.

A rerouted slot's combine weight is w · p[t, new] / p[t, old]: the router's normalisation
of that token is kept and the score is swapped (for softmax and sigmoid routers the weight
is proportional to the expert's probability), differentiable through both probabilities.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from ..routing.plan import RoutingPlan

OVERFLOW = ("drop", "reroute", "expand")
PRIORITY = ("position", "score")


def slot_capacity(num_tokens: int, num_experts: int, top_k: int, capacity_factor: float) -> int:
    """Routed slots one expert accepts under token choice: C = ⌈capacity_factor · T · k / E⌉."""
    return math.ceil(capacity_factor * num_tokens * top_k / num_experts)


def tokens_per_expert_choice(num_tokens: int, num_experts: int, top_k: int,
                             capacity_factor: float) -> int:
    """Tokens each expert picks under expert choice: C = round(capacity_factor · T · k / E),
    at least 1 and at most T (0 when T = 0)."""
    if num_tokens == 0:
        return 0
    c = int(round(capacity_factor * num_tokens * top_k / num_experts))
    return max(1, min(num_tokens, c))


def _positions(ids_S: torch.Tensor, E: int) -> torch.Tensor:
    """For each entry (ids ≥ 0), how many earlier entries have the same id."""
    onehot_SE = torch.nn.functional.one_hot(ids_S.clamp_min(0), E).to(torch.int64)
    onehot_SE = onehot_SE * (ids_S >= 0).unsqueeze(1)
    before_SE = onehot_SE.cumsum(0) - onehot_SE
    return before_SE.gather(1, ids_S.clamp_min(0).unsqueeze(1)).squeeze(1)


def apply_capacity(plan: RoutingPlan, capacity_factor: float, overflow: str = "drop",
                   top_k: int | None = None, priority: str = "position",
                   expand: float = 2.0) -> tuple[RoutingPlan, int]:
    """Return (plan with capacity applied, number of rerouted slots); the plan records the
    rerouted slots too (``plan.rerouted_slots``).

    ``top_k`` is the k of the capacity formula (default: the plan's slot count K);
    ``priority``: which slots an overloaded expert keeps; ``expand``: the candidate factor
    of overflow=expand (module docstring).
    """
    if overflow not in OVERFLOW:
        raise ValueError(f"overflow={overflow!r}: expected one of {', '.join(OVERFLOW)}")
    if priority not in PRIORITY:
        raise ValueError(f"priority={priority!r}: expected one of {', '.join(PRIORITY)}")
    ids_TK = plan.expert_ids_TK
    T, K = ids_TK.shape
    E = plan.num_experts
    if T == 0:
        return plan, 0
    C = slot_capacity(T, E, top_k or K, capacity_factor)
    if overflow == "expand":
        return _expanded_drop(plan, C, min(E, math.ceil(expand * (top_k or K))))

    # Phase 1: rank-major order (all rank-0 slots in token order, then rank 1, ...); for
    # score priority each slot's place among its expert's slots counts by descending score.
    ids_S = ids_TK.t().reshape(-1)
    if priority == "score":
        score_S = plan.probs_TE.detach().gather(1, ids_TK.clamp_min(0)).t().reshape(-1)
        order_S = torch.argsort(score_S, descending=True, stable=True)
        place_S = torch.empty_like(ids_S)
        place_S[order_S] = _positions(ids_S[order_S], E)
    else:
        place_S = _positions(ids_S, E)
    keep_S = (ids_S >= 0) & (place_S < C)
    over_S = (ids_S >= 0) & ~keep_S
    keep_TK = keep_S.view(K, T).t()
    over_TK = over_S.view(K, T).t()
    new_ids_TK = torch.where(keep_TK, ids_TK, torch.full_like(ids_TK, -1))
    rerouted = 0

    if overflow == "reroute" and bool(over_TK.any()):
        load_E = torch.bincount(new_ids_TK[new_ids_TK >= 0], minlength=E)
        room_E = (C - load_E).clamp_min(0)
        held_TE = (torch.nn.functional.one_hot(ids_TK.clamp_min(0), E).bool()
                   & (ids_TK >= 0).unsqueeze(-1)).any(dim=1)  # the token's original choices
        score_TE = plan.probs_TE.detach()
        for k in range(K):
            pending_P = torch.nonzero(over_TK[:, k]).squeeze(1)  # token order
            while pending_P.numel():
                cand_PE = score_TE[pending_P].masked_fill(held_TE[pending_P] | (room_E == 0),
                                                          float("-inf"))
                best_val_P, best_P = cand_PE.max(dim=1)
                has_P = best_val_P > float("-inf")
                pending_P, best_P = pending_P[has_P], best_P[has_P]  # the rest stay dropped
                if not pending_P.numel():
                    break
                accept_P = _positions(best_P, E) < room_E[best_P]
                tok, exp = pending_P[accept_P], best_P[accept_P]
                new_ids_TK[tok, k] = exp
                held_TE[tok, exp] = True
                room_E -= torch.bincount(exp, minlength=E)
                rerouted += int(accept_P.sum())
                pending_P = pending_P[~accept_P]

    moved_TK = (new_ids_TK != ids_TK) & (new_ids_TK >= 0)
    weights_TK = plan.weights_TK
    if bool(moved_TK.any()):
        probs_TE = plan.probs_TE
        p_old = probs_TE.gather(1, ids_TK.clamp_min(0)).clamp_min(1e-20)
        p_new = probs_TE.gather(1, new_ids_TK.clamp_min(0))
        weights_TK = torch.where(moved_TK, weights_TK * (p_new / p_old).to(weights_TK.dtype),
                                 weights_TK)
    weights_TK = weights_TK * (new_ids_TK >= 0).to(weights_TK.dtype)
    return dataclasses.replace(plan, expert_ids_TK=new_ids_TK, weights_TK=weights_TK,
                               rerouted_slots=rerouted), rerouted


def _expanded_drop(plan: RoutingPlan, C: int, M: int) -> tuple[RoutingPlan, int]:
    """overflow=expand with capacity C and M candidates per token (module docstring)."""
    ids_TK, probs_TE = plan.expert_ids_TK, plan.probs_TE.detach()
    T, K = ids_TK.shape
    E = plan.num_experts
    valid_TK = ids_TK >= 0
    held_TE = (torch.nn.functional.one_hot(ids_TK.clamp_min(0), E).bool()
               & valid_TK.unsqueeze(-1)).any(dim=1)
    # Candidates: the routed experts, then the best others (−inf where none is left).
    extra = max(0, M - K)
    others_TE = probs_TE.masked_fill(held_TE, float("-inf"))
    extra_score_TX, extra_ids_TX = others_TE.topk(extra, dim=-1)
    cand_ids_TM = torch.cat([ids_TK, extra_ids_TX], dim=1)
    cand_ok_TM = torch.cat([valid_TK, extra_score_TX > float("-inf")], dim=1)
    cand_score_TM = probs_TE.gather(1, cand_ids_TM.clamp_min(0)).masked_fill(~cand_ok_TM,
                                                                           float("-inf"))
    # Each expert keeps its C best candidate slots (ties: slot rank, then token order).
    ids_S = torch.where(cand_ok_TM, cand_ids_TM, -1).t().reshape(-1)
    order_S = torch.argsort(cand_score_TM.t().reshape(-1), descending=True, stable=True)
    place_S = torch.empty_like(ids_S)
    place_S[order_S] = _positions(ids_S[order_S], E)
    alive_TM = ((ids_S >= 0) & (place_S < C)).view(-1, T).t()
    # Each token refills the slots it had with its best survivors, best first.
    best_score_TK, best_col_TK = cand_score_TM.masked_fill(~alive_TM, float("-inf")).topk(
        min(K, cand_ids_TM.shape[1]), dim=-1)
    rank_TK = (valid_TK.cumsum(dim=1) - 1).clamp_min(0)
    new_ids_TK = cand_ids_TM.gather(1, best_col_TK.gather(1, rank_TK))
    filled_TK = valid_TK & (best_score_TK.gather(1, rank_TK) > float("-inf"))
    new_ids_TK = torch.where(filled_TK, new_ids_TK, torch.full_like(new_ids_TK, -1))
    # Weights: a routed expert keeps its own; a new one scales the reference slot's.
    w_TK = plan.weights_TK
    same_TKK = (new_ids_TK.unsqueeze(-1) == ids_TK.unsqueeze(1)) & valid_TK.unsqueeze(1)
    kept_TK = same_TKK.any(dim=-1)
    w_kept_TK = (same_TKK.to(w_TK.dtype) * w_TK.unsqueeze(1)).sum(dim=-1)
    ref_T1 = w_TK.detach().masked_fill(~valid_TK, float("-inf")).argmax(dim=1, keepdim=True)
    ratio_T1 = (w_TK.gather(1, ref_T1)
                / plan.probs_TE.gather(1, ids_TK.gather(1, ref_T1).clamp_min(0)).clamp_min(1e-20)
                .to(w_TK.dtype))
    w_new_TK = plan.probs_TE.gather(1, new_ids_TK.clamp_min(0)).to(w_TK.dtype) * ratio_T1
    weights_TK = torch.where(kept_TK, w_kept_TK, w_new_TK) * filled_TK.to(w_TK.dtype)
    moved = int((filled_TK & ~kept_TK).sum())
    return dataclasses.replace(plan, expert_ids_TK=new_ids_TK, weights_TK=weights_TK,
                               rerouted_slots=moved), moved


class Capacity:
    """Token-choice capacity (GShard / Switch): each expert takes at most C routed slots, the
    overflow is dropped (by position or, He et al.'s Token Drop, by score), rerouted, or
    handled by Expanded Drop (module docstring); a plan transform,
    ``Capacity(cfg)(plan) -> plan``.

    Its host reads (overflow tests, reroute rounds) are the price of a batch-dependent
    transform; the default layer has no capacity and so none of them. Under expert
    parallelism C counts the rank's tokens: each expert takes up to C slots from each rank
    (``divmoe.parallel.TOKEN_SETS``).
    """

    settings = ("capacity_factor", "capacity_overflow", "capacity_priority", "capacity_expand")

    def __init__(self, cfg):
        self.capacity_factor, self.overflow, self.top_k = \
            cfg.capacity_factor, cfg.capacity_overflow, cfg.top_k
        self.priority, self.expand = cfg.capacity_priority, cfg.capacity_expand

    def __call__(self, plan: RoutingPlan) -> RoutingPlan:
        return apply_capacity(plan, self.capacity_factor, self.overflow, self.top_k,
                              self.priority, self.expand)[0]
