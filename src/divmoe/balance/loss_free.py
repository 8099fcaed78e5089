"""Auxiliary-loss-free balancing (Wang et al., 2024): a per-expert selection bias.

The bias is added to the router scores for *selection only*; combine weights come from
the unbiased scores, so the bias never receives or blocks gradient. After each optimizer
step, b_i += u · sign(mean load − load_i): overloaded experts become less attractive.
The paper's balance measure, MaxVio, is defined here too.
"""

from __future__ import annotations

import torch


@torch.no_grad()
def update_selection_bias(bias_E: torch.Tensor, load_E: torch.Tensor, rate: float) -> None:
    """In place: ``bias_E += rate * sign(mean(load_E) - load_E)``."""
    load_E = load_E.to(bias_E.dtype)
    bias_E.add_(rate * torch.sign(load_E.mean() - load_E))


def max_vio(load_E: torch.Tensor) -> torch.Tensor:
    """MaxVio = (max_i load_i − mean load) / mean load, a 0-dim float64 tensor (0 = balanced,
    and 0 when nothing was routed); no host read."""
    load_E = load_E.double()
    mean = load_E.mean()
    return torch.where(mean > 0, (load_E.max() - mean) / mean.clamp_min(1e-300),
                       torch.zeros_like(mean))
