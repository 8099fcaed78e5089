"""Auxiliary-loss-free balancing (Wang et al., 2024): a per-expert selection bias.

The bias is added to the router scores for *selection only*; combine weights come from
the unbiased scores, so the bias never receives or blocks gradient. After each optimizer
step, b_i += u · sign(mean load − load_i): overloaded experts become less attractive.
"""

from __future__ import annotations

import torch


@torch.no_grad()
def update_selection_bias(bias_E: torch.Tensor, load_E: torch.Tensor, rate: float) -> None:
    """In place: ``bias_E += rate * sign(mean(load_E) - load_E)``."""
    load_E = load_E.to(bias_E.dtype)
    bias_E.add_(rate * torch.sign(load_E.mean() - load_E))
