"""Route a trained model's tokens to other experts at inference, without touching its weights.

``with rerouted(model, pick): model(tokens)`` runs every MoE layer with its experts chosen by
``pick(router, logits_TE, selection_bias_E) -> expert_ids_TK`` instead of the router's top-k.
Everything else stays the router's own rule (:class:`~divmoe.routing.TopKRouter` steps 2-4):
the scores and the ranking come from its score function, loss-free bias and expert groups,
and the combine weights are its scores of the chosen experts, renormalised and scaled as it
would. A forward hook on each router replaces its plan, so leaving the block (normally or by
an exception) restores the model exactly.

Only top-k routers can be rerouted: the other routers choose by rules (expert choice,
thresholds, hashing, soft merging) in which "the expert of rank r" or "k sampled experts" has
no single meaning.
"""

from __future__ import annotations

import contextlib
from typing import Callable

import torch

from ..routing import RoutingPlan, TopKRouter

Pick = Callable[[TopKRouter, torch.Tensor, "torch.Tensor | None"], torch.Tensor]


def check_reroutable(model, what: str) -> None:
    """ValueError unless every MoE layer of ``model`` has a top-k router."""
    if not model.moe_layers:
        raise ValueError(f"{what} needs an MoE model; this one is dense (model.moe=false)")
    router = model.moe_config.router
    if router != "topk":
        raise ValueError(f"{what} reroutes top-k routers only (moe.router=topk); this model "
                         f"uses moe.router={router}")


@contextlib.contextmanager
def rerouted(model, pick: Pick):
    """Within the block, every MoE layer of ``model`` routes with ``pick``."""
    def hook(router, args, kwargs, plan: RoutingPlan) -> RoutingPlan:
        x_TD = args[0]
        scores_TE, probs_TE = router.scores(plan.logits_TE)
        expert_ids_TK = pick(router, plan.logits_TE, kwargs.get("selection_bias_E"))
        return RoutingPlan(expert_ids_TK, router.weights(scores_TE, expert_ids_TK, x_TD.dtype),
                           probs_TE, plan.logits_TE)

    handles = [model.blocks[i].mlp.router.register_forward_hook(hook, with_kwargs=True)
               for i in model.moe_layers]
    try:
        yield
    finally:
        for h in handles:
            h.remove()
