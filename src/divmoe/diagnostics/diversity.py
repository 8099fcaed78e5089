"""Diversity of expert outputs: a Vendi score over the experts.

Definition implemented: the Vendi score (Friedman & Dieng 2023; order q: Pasarkar & Dieng
2024) of the E experts as items, each embedded by its outputs on the same T probe tokens
(:func:`divmoe.experts.every_expert`). Each expert's [T, D] output is
mean-normalised — every output feature centred over the probe tokens, so a constant offset
shared by all tokens does not count — then flattened to one vector; the kernel is the cosine
similarity of these vectors (:func:`divmoe.diversity.vendi_from_features`). VS = 1 when all
experts compute the same function (up to scale), E when their centred outputs are orthogonal:
"the effective number of distinct experts". An expert whose output is constant on the
probe (nothing left after centring) counts as distinct from every other: it gets an axis of
its own instead of a zero vector the cosine kernel cannot normalise.

``divmoe train`` (metrics ``expert_vendi``) and ``divmoe analyze`` both call this function.
"""

from __future__ import annotations

import torch

from ..diversity import vendi_from_features

__all__ = ["expert_output_vendi"]


def expert_output_vendi(out_ETD: torch.Tensor, q: float = 1.0) -> float:
    """Vendi score (order q) of E experts from their outputs [E, T, D] on shared probe tokens."""
    out = torch.as_tensor(out_ETD).detach().double()
    if out.dim() != 3:
        raise ValueError(f"expert outputs must be [E, T, D], got shape {tuple(out.shape)}")
    E = out.shape[0]
    f_EF = (out - out.mean(dim=1, keepdim=True)).reshape(E, -1)
    dead_E = f_EF.norm(dim=1) <= 1e-12 * max(1.0, float(out.abs().max()) if out.numel() else 1.0)
    n_dead = int(dead_E.sum())
    if n_dead:
        own_axes = torch.zeros(E, n_dead, dtype=f_EF.dtype)
        own_axes[dead_E.nonzero().squeeze(1), torch.arange(n_dead)] = 1.0
        f_EF = torch.cat([f_EF, own_axes], dim=1)
    return vendi_from_features(f_EF, q=q)
