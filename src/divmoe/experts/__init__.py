"""Expert layouts.

A layout is an ``nn.Module`` with ``expert(e, x_ND)`` (the plain per-expert form the
reference dispatch uses), ``expert_sizes()`` (parameters of each expert) and one of two fast
forms:

- ``buckets()``: [(w_in [E_b, d, 2·H_b], w_out [E_b, H_b, d])] for SwiGLU experts, run by the
  fused gather → experts → scatter node (:mod:`divmoe.dispatch.routed_swiglu`); with several
  buckets, ``row_position_E`` gives each expert's rank in the row order, buckets in turn;
- ``grouped(x_SD, counts_E)``: all experts over expert-contiguous rows, under autograd.

Layouts with a part shared by every expert also have ``base_params()``.

``EXPERT_LAYOUTS[name](d_model, moe_config)`` builds the layout named by
``MoEConfig.expert_layout``:

- ``swiglu``: E SwiGLU experts — :class:`StackedSwiGLU` (all of width ``expert_hidden``) or,
  when ``expert_widths`` is set, :class:`HeteroSwiGLU` (HMoE: per-expert widths, no padding);
- ``lora``: :class:`LoRASwiGLU`, one frozen dense SwiGLU of width ``expert_hidden`` plus
  rank-``lora_rank`` adapters per expert (LoRAMoE / MoLA).
"""

from .accounting import activated_params
from .hetero import HeteroSwiGLU
from .lora import LoRASwiGLU
from .swiglu import StackedSwiGLU


def _build_swiglu(d_model: int, cfg):
    if getattr(cfg, "expert_widths", None):
        return HeteroSwiGLU(cfg.expert_widths, d_model)
    return StackedSwiGLU(cfg.num_experts, d_model, cfg.expert_hidden)


def _build_lora(d_model: int, cfg):
    return LoRASwiGLU(cfg.num_experts, d_model, cfg.expert_hidden, cfg.lora_rank)


EXPERT_LAYOUTS = {"swiglu": _build_swiglu, "lora": _build_lora}

__all__ = ["StackedSwiGLU", "HeteroSwiGLU", "LoRASwiGLU", "EXPERT_LAYOUTS", "activated_params"]
