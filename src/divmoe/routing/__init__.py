"""Routers: modules ``Router(d_model, cfg)`` mapping x_TD to a RoutingPlan.

Each router class says whether it can use a loss-free selection bias
(``uses_selection_bias``); ``MoEConfig.check`` rejects ``loss_free_bias`` otherwise.
"""

from .expert_choice import ExpertChoiceRouter
from .dselect_k import DSelectKRouter
from .dynamic_topp import DynamicTopPRouter
from .grouped import GroupedRouter
from .hash import HashRouter
from .hypersphere import HypersphereRouter
from .null_experts import NullExpertRouter, null_usage_loss
from .plan import RoutingPlan
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
}

__all__ = ["RoutingPlan", "ROUTERS", "TopKRouter", "ExpertChoiceRouter", "DynamicTopPRouter",
           "NullExpertRouter", "GroupedRouter", "SinkhornRouter", "HashRouter",
           "HypersphereRouter", "DSelectKRouter", "SoftMergeRouter", "null_usage_loss"]
