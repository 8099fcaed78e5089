"""Diversity of expert outputs: a Vendi score over the experts.

Definition implemented: the Vendi score (Friedman & Dieng 2023; order q: Pasarkar & Dieng
2024) of the E experts as items, each embedded by its outputs on the same T probe tokens
(:func:`~divmoe.diagnostics.redundancy.probe_experts`). Each expert's [T, D] output is
mean-normalised — every output feature centred over the probe tokens, so a constant offset
shared by all tokens does not count — then flattened to one vector; the kernel is the cosine
similarity of these vectors (:func:`divmoe.diversity.vendi_from_features`). VS = 1 when all
experts compute the same function (up to scale), E when their centred outputs are orthogonal:
"the effective number of distinct experts".
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
    centred = out - out.mean(dim=1, keepdim=True)
    return vendi_from_features(centred.reshape(out.shape[0], -1), q=q)
