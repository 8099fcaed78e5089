"""Load-balance measures over per-expert loads (plain tensors in, floats out)."""

from __future__ import annotations

import math

import torch

from ..balance.loss_free import max_vio as max_vio_tensor


def max_vio(load_E: torch.Tensor) -> float:
    """MaxVio (Loss-Free Balancing paper): (max_i load_i − mean load) / mean load. 0 = balanced.
    A float; the layer's stats keep the tensor (:func:`divmoe.balance.loss_free.max_vio`)."""
    return float(max_vio_tensor(torch.as_tensor(load_E)))


def coefficient_of_variation(load_E: torch.Tensor) -> float:
    """Std / mean of per-expert loads (population std)."""
    load_E = load_E.double()
    mean = load_E.mean()
    return 0.0 if mean <= 0 else float(load_E.std(unbiased=False) / mean)


def load_entropy(load_E: torch.Tensor) -> float:
    """Shannon entropy (nats) of the load distribution; log E when perfectly balanced."""
    p = load_E.double() / load_E.double().sum().clamp_min(1e-300)
    return float(-(p * p.clamp_min(1e-300).log()).sum())


def load_counts(expert_ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Routed slots per expert, int64 [E], from expert ids of any shape (−1 = empty slot;
    ids >= ``num_experts``, e.g. null experts, are not counted)."""
    ids = torch.as_tensor(expert_ids).reshape(-1).long()
    ids = ids[(ids >= 0) & (ids < num_experts)]
    return torch.bincount(ids, minlength=num_experts)


def load_summary(load_E: torch.Tensor) -> dict:
    """The load measures of one layer as a dict of floats.

    ``load`` (fractions of routed slots, sums to 1), ``max_vio``, ``cv`` (coefficient of
    variation), ``entropy`` (nats) and ``entropy_normalized`` (entropy / log E, 1 = balanced).
    """
    load_E = torch.as_tensor(load_E).double()
    total = float(load_E.sum())
    E = load_E.numel()
    ent = load_entropy(load_E) if total > 0 else 0.0
    return {"load": (load_E / total).tolist() if total > 0 else [0.0] * E,
            "max_vio": max_vio(load_E), "cv": coefficient_of_variation(load_E),
            "entropy": ent, "entropy_normalized": ent / math.log(E) if E > 1 else 1.0}


def load_trajectory(loads_SE) -> dict:
    """Per-step load measures of one layer over time (evaluation steps or token chunks).

    ``loads_SE``: [steps, E] per-expert loads (counts or fractions), e.g. the ``expert_load``
    of one layer across the rows of ``metrics.jsonl``. Returns lists (one value per step) of
    ``max_vio``, ``cv`` and ``entropy`` (nats).
    """
    loads_SE = torch.as_tensor(loads_SE, dtype=torch.float64)
    if loads_SE.dim() != 2:
        raise ValueError(f"loads_SE must be [steps, E], got shape {tuple(loads_SE.shape)}")
    return {"max_vio": [max_vio(r) for r in loads_SE],
            "cv": [coefficient_of_variation(r) for r in loads_SE],
            "entropy": [load_entropy(r) for r in loads_SE]}


def load_over_tokens(expert_ids: torch.Tensor, num_experts: int, chunks: int) -> torch.Tensor:
    """Load fractions [chunks, E] over consecutive chunks of the token stream (flattened in
    order): how a layer's load moves through the data. Empty chunks are all zero."""
    ids = torch.as_tensor(expert_ids)
    ids = ids.reshape(-1, ids.shape[-1]) if ids.dim() > 1 else ids[:, None]
    out = torch.zeros(chunks, num_experts, dtype=torch.float64)
    for c, part in enumerate(ids.tensor_split(chunks)):
        cnt = load_counts(part, num_experts).double()
        out[c] = cnt / cnt.sum().clamp_min(1)
    return out


def routing_totals(stats) -> dict:
    """Drops, reroutes, null slots and activated parameters summed over a sequence of
    :class:`~divmoe.layer.RoutingStats` (one per forward pass of the same layer).

    ``activated_params_mean`` is the token-weighted mean; ``dropped_fraction`` is over all
    routed slots (tokens · k, k from the expert-id width).
    """
    tokens = dropped = rerouted = null = slots = 0
    act = 0.0
    for s in stats:
        tokens += int(s.num_tokens)
        slots += int(s.expert_ids.numel())
        dropped += int(s.dropped_slots)
        rerouted += int(getattr(s, "rerouted_slots", 0))
        null += int(getattr(s, "null_slots", 0))
        act += float(getattr(s, "activated_params_mean", 0.0)) * int(s.num_tokens)
    return {"tokens": tokens, "slots": slots, "dropped_slots": dropped,
            "rerouted_slots": rerouted, "null_slots": null,
            "dropped_fraction": dropped / slots if slots else 0.0,
            "activated_params_mean": act / tokens if tokens else 0.0}
