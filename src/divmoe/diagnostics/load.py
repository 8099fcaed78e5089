"""Load-balance measures over per-expert loads (plain tensors in, floats out)."""

from __future__ import annotations

import torch


def max_vio(load_E: torch.Tensor) -> float:
    """MaxVio (Loss-Free Balancing paper): (max_i load_i − mean load) / mean load. 0 = balanced."""
    load_E = load_E.double()
    mean = load_E.mean()
    if mean <= 0:
        return 0.0
    return float((load_E.max() - mean) / mean)


def coefficient_of_variation(load_E: torch.Tensor) -> float:
    """Std / mean of per-expert loads (population std)."""
    load_E = load_E.double()
    mean = load_E.mean()
    return 0.0 if mean <= 0 else float(load_E.std(unbiased=False) / mean)


def load_entropy(load_E: torch.Tensor) -> float:
    """Shannon entropy (nats) of the load distribution; log E when perfectly balanced."""
    p = load_E.double() / load_E.double().sum().clamp_min(1e-300)
    return float(-(p * p.clamp_min(1e-300).log()).sum())
