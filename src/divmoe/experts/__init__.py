"""Expert layouts.

A layout implements :class:`~divmoe.experts.layout.ExpertLayout` (``expert(e, x_ND)``, the
plain per-expert form the reference dispatch uses; ``expert_sizes()``; ``base_params()``)
and one fast form: :class:`~divmoe.experts.layout.BucketedSwiGLU` (``buckets()``, run by
the fused gather → experts → scatter node) or
:class:`~divmoe.experts.layout.GroupedExperts` (``grouped(x_SD, counts_E)``, under autograd).

``EXPERT_LAYOUTS[name]`` declares the layout named by ``MoEConfig.expert_layout``: how to
build it (``build(d_model, moe_config)``), the settings it reads and its cross-field check.

- ``swiglu``: E SwiGLU experts — :class:`StackedSwiGLU` (all of width ``expert_hidden``) or,
  when ``expert_widths`` is set, :class:`HeteroSwiGLU` (HMoE: per-expert widths, no padding);
- ``gelu``: :class:`StackedGELU`, E two-layer GELU MLPs of width ``expert_hidden``
  (GShard / Switch Transformer experts);
- ``lora``: :class:`LoRASwiGLU`, one frozen dense SwiGLU of width ``expert_hidden`` plus
  rank-``lora_rank`` adapters per expert (LoRAMoE / MoLA).

:class:`SwiGLU` is the dense MLP (shared experts, the dense baseline).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from ..config import ConfigError, check_per_expert
from .accounting import activated_params
from .dense import SwiGLU
from .gelu import StackedGELU
from .hetero import HeteroSwiGLU
from .layout import BucketedSwiGLU, ExpertLayout, GroupedExperts, every_expert
from .lora import LoRASwiGLU
from .swiglu import StackedSwiGLU


@dataclass(frozen=True)
class LayoutSpec:
    build: Callable[[int, Any], ExpertLayout]
    classes: tuple[type, ...]          # what it builds (their docstrings describe it)
    settings: tuple[str, ...]
    check: Callable[[Any, str], None] | None = None


def _build_swiglu(d_model: int, cfg) -> ExpertLayout:
    if cfg.expert_widths:
        return HeteroSwiGLU(cfg.expert_widths, d_model)
    return StackedSwiGLU(cfg.num_experts, d_model, cfg.expert_hidden)


def _check_swiglu(cfg, prefix: str) -> None:
    check_per_expert(cfg, "expert_widths", prefix, 1, False, "width")


def _build_gelu(d_model: int, cfg) -> ExpertLayout:
    return StackedGELU(cfg.num_experts, d_model, cfg.expert_hidden)


def _build_lora(d_model: int, cfg) -> ExpertLayout:
    return LoRASwiGLU(cfg.num_experts, d_model, cfg.expert_hidden, cfg.lora_rank)


def _check_one_width(cfg, prefix: str) -> None:
    if cfg.expert_widths is not None:
        raise ConfigError(f"{prefix}expert_widths={cfg.expert_widths} is not allowed with "
                          f"{prefix}expert_layout={cfg.expert_layout!r}: only the 'swiglu' "
                          f"layout has per-expert widths (or set it to null)")


EXPERT_LAYOUTS = {
    "swiglu": LayoutSpec(_build_swiglu, (StackedSwiGLU, HeteroSwiGLU),
                         ("expert_hidden", "expert_widths"), _check_swiglu),
    "gelu": LayoutSpec(_build_gelu, (StackedGELU,), ("expert_hidden",), _check_one_width),
    "lora": LayoutSpec(_build_lora, (LoRASwiGLU,), ("expert_hidden", "lora_rank"),
                       _check_one_width),
}

__all__ = ["StackedSwiGLU", "StackedGELU", "HeteroSwiGLU", "LoRASwiGLU", "SwiGLU", "EXPERT_LAYOUTS",
           "LayoutSpec", "ExpertLayout", "BucketedSwiGLU", "GroupedExperts", "every_expert",
           "activated_params"]
