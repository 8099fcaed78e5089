"""The expert-layout interface: what the layer, dispatch and diagnostics may rely on.

Every layout is an :class:`ExpertLayout`. Its fast form is one of two, and the dispatch
strategy picks by the protocol the layout implements, not by probing attributes:

- :class:`BucketedSwiGLU` — SwiGLU experts as buckets of equal width, run by the fused
  gather → experts → scatter node (:mod:`divmoe.dispatch.routed_swiglu`);
- :class:`GroupedExperts` — any experts over expert-contiguous rows, under autograd.

The protocols hold methods only, so a layout's class answers :func:`layout_kind` once and
the answer is cached: the hot path pays no per-call protocol check.
"""

from __future__ import annotations

import functools
from typing import Optional, Protocol, runtime_checkable

import torch


@runtime_checkable
class ExpertLayout(Protocol):
    def expert(self, e: int, x_ND: torch.Tensor) -> torch.Tensor:
        """Expert ``e`` on its tokens: the plain form the reference dispatch uses."""

    def expert_sizes(self) -> list[int]:
        """Parameters of each routed expert."""

    def base_params(self) -> int:
        """Parameters shared by every expert and touched by any routed token (0 if none)."""

    def select(self, expert_ids: list[int]) -> "ExpertLayout":
        """A new layout of these experts only (copies of their weights, in this order): an
        expert-parallel rank's shard."""


@runtime_checkable
class BucketedSwiGLU(ExpertLayout, Protocol):
    def row_order(self) -> Optional[torch.Tensor]:
        """Each expert's rank in the row order (buckets in turn); None when that is its id."""

    def buckets(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(w_in [E_b, d, 2·H_b], w_out [E_b, H_b, d]) per bucket of equal-width experts."""


@runtime_checkable
class GroupedExperts(ExpertLayout, Protocol):
    def grouped(self, x_SD: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        """All experts over expert-contiguous rows (rows of expert e: counts_E[e] of them)."""


@functools.lru_cache(maxsize=None)
def layout_kind(cls: type) -> str:
    """``"bucketed"`` or ``"grouped"``: the fast form a layout class implements."""
    if issubclass(cls, BucketedSwiGLU):
        return "bucketed"
    if issubclass(cls, GroupedExperts):
        return "grouped"
    raise TypeError(f"{cls.__name__} implements neither BucketedSwiGLU nor GroupedExperts "
                    f"(divmoe.experts.layout): dispatch cannot run it")


def every_expert(experts: ExpertLayout, x_PD: torch.Tensor) -> torch.Tensor:
    """Every routed expert on every row: ``Y_EPD`` [E, P, D] (differentiable).

    The one expert probe: the diversity regularisers, the expert-output Vendi score and the
    redundancy diagnostics all compare experts on the same inputs through it.
    """
    return torch.stack([experts.expert(e, x_PD) for e in range(len(experts.expert_sizes()))])
