"""Routers: functions from router scores to a RoutingPlan."""

from .plan import RoutingPlan
from .topk import TopKRouter

ROUTERS = {"topk": TopKRouter}

__all__ = ["RoutingPlan", "TopKRouter", "ROUTERS"]
