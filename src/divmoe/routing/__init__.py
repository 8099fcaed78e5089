"""Routers: :class:`~divmoe.routing.router.Router` subclasses, built as
``Router(d_model, cfg)``, mapping x_TD to a RoutingPlan.

Each declares the settings it reads, its checks, whether it can take the Balancer's
selection bias (``uses_selection_bias``) and how its plan is executed (``execution``); see
:mod:`divmoe.routing.router`. A new router is one module and one entry in :data:`ROUTERS`.
"""

from .expert_choice import ExpertChoiceRouter
from .dselect_k import DSelectKRouter
from .dynamic_topp import DynamicTopPRouter
from .grouped import GroupedRouter
from .hash import HashRouter
from .hypersphere import HypersphereRouter
from .merged_topk import MergedTopKRouter
from .null_experts import NullExpertRouter, null_usage_loss
from .plan import RoutingPlan, count_per_expert
from .router import Router, causal_routing
from .sinkhorn import SinkhornRouter
from .soft_merge import SoftMergeRouter
from .topk import TopKRouter

ROUTERS = {
    "topk": TopKRouter,
    "expert_choice": ExpertChoiceRouter,
    "dynamic_topp": DynamicTopPRouter,
    "null_experts": NullExpertRouter,
    "grouped": GroupedRouter,
    "sinkhorn": SinkhornRouter,
    "hash": HashRouter,
    "hypersphere": HypersphereRouter,
    "dselect_k": DSelectKRouter,
    "soft_merge": SoftMergeRouter,
    "merged_topk": MergedTopKRouter,
}

__all__ = ["RoutingPlan", "Router", "causal_routing", "count_per_expert", "ROUTERS", "TopKRouter", "ExpertChoiceRouter", "DynamicTopPRouter",
           "NullExpertRouter", "GroupedRouter", "SinkhornRouter", "HashRouter",
           "HypersphereRouter", "MergedTopKRouter", "DSelectKRouter", "SoftMergeRouter", "null_usage_loss"]
