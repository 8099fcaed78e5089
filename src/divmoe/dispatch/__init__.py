"""Execution strategies: how a layer runs a RoutingPlan through its experts.

An execution is a function ``execute(x_TD, plan, experts) -> out_TD`` (the routed experts'
weighted output per token). The layer chooses one in ``__init__`` with :func:`execution_for`,
from the router's kind of plan (``Router.execution``: token slots → experts, or soft
merging) and ``MoEConfig.dispatch`` (the fast path or the obviously-correct reference loop
every fast path is tested against). A new strategy (say, expert parallelism across ranks) is
one more entry in :data:`EXECUTIONS`; the layer does not change.
"""

import functools

from ..config import ConfigError
from .grouped import dispatch_combine
from .reference import reference_dispatch_combine
from .soft_merge import soft_merge, soft_merge_loop

# (router's plan kind, moe.dispatch) → execution.
EXECUTIONS = {
    ("dispatch", "grouped"): dispatch_combine,
    ("dispatch", "reference"): reference_dispatch_combine,
    ("soft_merge", "grouped"): soft_merge,
    ("soft_merge", "reference"): soft_merge_loop,
}
# What `moe.dispatch` chooses, for `divmoe list`: name → (description, settings it reads).
DISPATCHERS = {
    "grouped": ("dropless dispatch → grouped experts → combine, the fast path",
                ("recompute_hidden",)),
    "reference": ("the obviously-correct loop over experts (and over groups, for soft merging) "
                  "that every fast path is tested against", ("dispatch",)),
}


def check_dispatch(cfg, prefix: str = "") -> None:
    """Cross-field rules of the execution settings (called by ``MoEConfig.check``)."""
    if cfg.recompute_hidden and (cfg.expert_layout != "swiglu" or cfg.router == "soft_merge"):
        raise ConfigError(f"{prefix}recompute_hidden=True is not allowed with {prefix}"
                          f"expert_layout={cfg.expert_layout!r}, {prefix}router="
                          f"{cfg.router!r}: it applies to the SwiGLU dispatch path only "
                          f"(expert_layout=swiglu, any router but soft_merge)")


def execution_for(cfg, router_cls):
    """The execution strategy a layer with this config and router class runs."""
    execute = EXECUTIONS[(router_cls.execution, cfg.dispatch)]
    if cfg.recompute_hidden and execute is dispatch_combine:  # the reference loop ignores it
        execute = functools.partial(execute, recompute_hidden=True)
    return execute


__all__ = ["dispatch_combine", "reference_dispatch_combine", "soft_merge", "soft_merge_loop",
           "EXECUTIONS", "DISPATCHERS", "check_dispatch", "execution_for"]
