"""Dynamic skipping of weak expert slots: a plan transform between the router and dispatch.

Definition implemented (NAEE, Lu et al. 2024, "Not All Experts are Equal", dynamic
skipping): with a token's slots sorted by weight (w_0 ≥ w_1 ≥ ...), slot i > 0 is skipped
when w_i < skip_ratio · w_0; its expert does not run for that token. The kept weights are
left as they are (not renormalised): the output loses exactly the skipped terms w_i·f_i(x),
each smaller than skip_ratio times the first one.

A skipped slot becomes a null slot (id −1, weight 0, ``null_slots_TK``): a routing decision
that costs no FLOPs, counted in ``RoutingStats.null_slots``, not a dropped token.
"""

from __future__ import annotations

import dataclasses

import torch

from ..routing.plan import RoutingPlan


class DynamicSkip:
    """Skips a token's later experts whose weight is below skip_ratio times its first one's.

    NAEE dynamic skipping; ``DynamicSkip(cfg)(plan) -> plan``."""

    settings = ("skip_ratio",)

    def __init__(self, cfg):
        self.skip_ratio = cfg.skip_ratio

    def __call__(self, plan: RoutingPlan) -> RoutingPlan:
        w_TK = plan.weights_TK.detach()
        live_TK = plan.expert_ids_TK >= 0
        first_T = w_TK.masked_fill(~live_TK, float("-inf")).amax(-1, keepdim=True)
        is_first_TK = torch.zeros_like(live_TK)
        is_first_TK.scatter_(1, w_TK.masked_fill(~live_TK, float("-inf")).argmax(-1, keepdim=True),
                             True)
        skip_TK = live_TK & ~is_first_TK & (w_TK < self.skip_ratio * first_T)
        null_TK = skip_TK if plan.null_slots_TK is None else plan.null_slots_TK | skip_TK
        return dataclasses.replace(
            plan, expert_ids_TK=plan.expert_ids_TK.masked_fill(skip_TK, -1),
            weights_TK=plan.weights_TK.masked_fill(skip_TK, 0.0), null_slots_TK=null_TK)
