"""Execution strategies: how a layer runs a RoutingPlan through its experts.

An execution is a function ``execute(x_TD, plan, experts) -> out_TD`` (the routed experts'
weighted output per token). The layer chooses one in ``__init__`` with :func:`execution_for`,
from the router's kind of plan (``Router.execution``: token slots → experts, or soft
merging) and ``MoEConfig.dispatch`` (the fast path or the obviously-correct reference loop
every fast path is tested against). A new strategy (say, expert parallelism across ranks) is
one more entry in :data:`EXECUTIONS`; the layer does not change.

``triton`` (the fused Triton kernels, :mod:`divmoe.dispatch.triton_swiglu`) needs the
optional ``triton`` package (``pip install 'divmoe[gpu]'``) and is imported only by a layer
that chooses it; ``auto`` picks it per call for CUDA inputs when triton is installed and the
experts are SwiGLU, and is exactly ``grouped`` everywhere else (CPU included).
"""

import functools
import importlib.util

import torch

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
    "triton": ("fused Triton kernels for SwiGLU experts on CUDA: rows gathered and scattered by "
               "index, SwiGLU and routing weight fused into the GEMMs (needs divmoe[gpu])",
               ("recompute_hidden",)),
    "auto": ("triton for CUDA inputs when it is installed and the experts are SwiGLU, else "
             "grouped (on CPU exactly grouped)", ("recompute_hidden",)),
}


# What the Triton kernels run (they accumulate in float32); auto leaves the rest to grouped.
TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def check_dispatch(cfg, prefix: str = "") -> None:
    """Cross-field rules of the execution settings (called by ``MoEConfig.check``)."""
    if cfg.recompute_hidden and (cfg.expert_layout != "swiglu" or cfg.router == "soft_merge"):
        raise ConfigError(f"{prefix}recompute_hidden=True is not allowed with {prefix}"
                          f"expert_layout={cfg.expert_layout!r}, {prefix}router="
                          f"{cfg.router!r}: it applies to the SwiGLU dispatch path only "
                          f"(expert_layout=swiglu, any router but soft_merge)")
    if cfg.dispatch == "triton" and (cfg.expert_layout != "swiglu" or cfg.router == "soft_merge"):
        raise ConfigError(f"{prefix}dispatch='triton' is not allowed with {prefix}expert_layout="
                          f"{cfg.expert_layout!r}, {prefix}router={cfg.router!r}: its kernels run "
                          f"SwiGLU experts on dispatched rows (expert_layout=swiglu, any router "
                          f"but soft_merge); {prefix}dispatch='auto' falls back to grouped")


def execution_for(cfg, router_cls):
    """The execution strategy a layer with this config and router class runs."""
    kind = router_cls.execution
    if cfg.dispatch == "triton":
        execute = _triton_execution()
    elif cfg.dispatch == "auto" and kind == "dispatch" and cfg.expert_layout == "swiglu" \
            and triton_installed():
        execute = _auto
    else:
        execute = EXECUTIONS[(kind, "grouped" if cfg.dispatch == "auto" else cfg.dispatch)]
    if cfg.recompute_hidden and cfg.dispatch != "reference":  # the reference loop ignores it
        execute = functools.partial(execute, recompute_hidden=True)
    return execute


def triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


@functools.lru_cache(maxsize=None)
def _triton_execution():
    if not triton_installed():
        raise ConfigError("moe.dispatch='triton' needs the triton package, which is not "
                          "installed: pip install 'divmoe[gpu]' (or choose moe.dispatch="
                          "'auto' or 'grouped')")
    from .triton_swiglu import triton_dispatch_combine

    return triton_dispatch_combine


@torch.compiler.disable(reason="dropless dispatch: data-dependent row counts")
def _auto(x_TD, plan, experts, recompute_hidden=False):
    """dispatch=auto: the Triton kernels for CUDA inputs of their dtypes (imported on the
    first), the grouped path for the rest."""
    fits = x_TD.is_cuda and x_TD.dtype in TRITON_DTYPES
    execute = _triton_execution() if fits else dispatch_combine
    return execute(x_TD, plan, experts, recompute_hidden=recompute_hidden)


__all__ = ["dispatch_combine", "reference_dispatch_combine", "soft_merge", "soft_merge_loop",
           "EXECUTIONS", "DISPATCHERS", "check_dispatch", "execution_for",
           "triton_installed", "TRITON_DTYPES"]
