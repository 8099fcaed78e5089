"""Building a new MoE layer from an old one with other experts and router rows.

The transforms compute new expert weights and router rows; this is the one place that turns
them into a layer: a new :class:`~divmoe.layer.MoE` of the new configuration whose every
other tensor (shared experts, their gate) is the old layer's.
"""

from __future__ import annotations

import dataclasses

import torch

from ..config import ConfigError
from ..experts import StackedSwiGLU
from ..layer import MoE


def check_editable(moe: MoE, what: str) -> None:
    """The layers these transforms handle: SwiGLU experts of one width, a top-k router."""
    c = moe.config
    if not isinstance(moe.experts, StackedSwiGLU):
        raise ConfigError(f"{what}: moe.expert_layout={c.expert_layout!r}"
                          f"{' with expert_widths' if c.expert_widths else ''} is not supported; "
                          f"{what} works on SwiGLU experts of one width (expert_layout=swiglu, "
                          f"expert_widths=null)")
    if moe.shard is not None:
        raise ConfigError(f"{what}: the layer's experts are sharded over ranks; {what} a "
                          f"single-process model (load the checkpoint without torchrun)")
    if c.router not in ("topk", "merged_topk"):
        raise ConfigError(f"{what}: moe.router={c.router!r} is not supported; {what} needs "
                          f"router=topk (or merged_topk, a merged model)")
    if c.n_groups != 1:
        raise ConfigError(f"{what}: moe.n_groups={c.n_groups} is not supported (group-limited "
                          f"routing fixes the expert count per group)")


@torch.no_grad()
def rebuilt_moe(moe: MoE, w_in_EDH2: torch.Tensor, w_out_EHD: torch.Tensor,
                gate_RD: torch.Tensor, bias_E: torch.Tensor, router_state: dict | None = None,
                **config_changes) -> MoE:
    """A new layer: ``moe``'s configuration with ``config_changes`` (num_experts follows the
    weights), these experts, router rows and selection bias (and ``router_state``: other
    router tensors by name), and ``moe``'s shared experts."""
    cfg = dataclasses.replace(moe.config, num_experts=w_in_EDH2.shape[0], **config_changes)
    new = MoE(moe.d_model, cfg)
    state = moe.state_dict()
    state.update({"router.gate.weight": gate_RD, "experts.w_in_EDH2": w_in_EDH2,
                  "experts.w_out_EHD": w_out_EHD, "selection_bias_E": bias_E})
    state.update({f"router.{k}": v for k, v in (router_state or {}).items()})
    if cfg.router != "merged_topk":
        state.pop("router.expert_of_row_R", None)
    new.load_state_dict(state)
    new.to(device=w_in_EDH2.device, dtype=w_in_EDH2.dtype)
    new.router.to(dtype=gate_RD.dtype)  # a float32 router in a bf16 model stays float32
    return new.train(moe.training)
