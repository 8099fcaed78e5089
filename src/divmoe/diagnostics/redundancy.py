"""Expert redundancy: how alike the experts' outputs are on the same probe tokens.

Definitions implemented (outputs ``out_ETD[e]`` = expert e applied to the same T probe tokens,
see :func:`probe_experts`; every expert sees every token, regardless of routing):

* mean cosine similarity ``cos[i, j] = mean_t cos(out_i(t), out_j(t))`` (tokens where either
  output is zero contribute 0);
* linear CKA between the experts' [T, D] output matrices (Kornblith et al. 2019, via
  :func:`divmoe.diversity.pairwise_cka`): invariant to rotations and isotropic scaling, so it
  also finds experts that compute the same thing up to an orthogonal map or a scale;
* merge candidates: expert pairs ranked by CKA (then cosine), the pairs whose outputs are most
  nearly interchangeable — the pairs expert-merging methods such as Merge, Then Compress
  (Li et al. 2024) would combine first.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..diversity import pairwise_cka
from ..experts.layout import every_expert

__all__ = ["probe_experts", "output_cosine_similarity", "output_cka", "merge_candidates",
           "redundancy_summary"]


@torch.no_grad()
def probe_experts(moe, x_TD: torch.Tensor) -> torch.Tensor:
    """Every routed expert of a divmoe :class:`~divmoe.layer.MoE` on the same tokens.

    Args:
        moe: a :class:`divmoe.layer.MoE` (any expert layout with ``experts.expert(e, x)``).
        x_TD: [T, D] (or [..., D]) layer inputs, e.g. hidden states recorded at that layer.

    Returns:
        [E, T, D] expert outputs (unweighted, no shared experts), in x's dtype.
    """
    x = torch.as_tensor(x_TD)
    x = x.reshape(-1, x.shape[-1]).to(next(moe.parameters()).dtype)
    return every_expert(moe.experts, x)


def _check_ETD(out_ETD: torch.Tensor) -> torch.Tensor:
    out = torch.as_tensor(out_ETD).detach()
    if out.dim() != 3:
        raise ValueError(f"expert outputs must be [E, T, D], got shape {tuple(out.shape)}")
    return out.double()


def output_cosine_similarity(out_ETD: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of the cosine similarity of every pair of experts: float64 [E, E]."""
    u = F.normalize(_check_ETD(out_ETD), dim=-1)
    return torch.einsum("itd,jtd->ij", u, u) / max(u.shape[1], 1)


def output_cka(out_ETD: torch.Tensor) -> torch.Tensor:
    """Linear CKA between every pair of experts' [T, D] outputs: float64 [E, E]."""
    return pairwise_cka(_check_ETD(out_ETD))


def merge_candidates(cka_EE: torch.Tensor, cos_EE: torch.Tensor | None = None,
                     top: int | None = None) -> list[dict]:
    """Expert pairs (i < j) ranked by CKA, then cosine, most similar first:
    ``[{"i", "j", "cka", "cosine"}, ...]`` (at most ``top``)."""
    c = torch.as_tensor(cka_EE, dtype=torch.float64)
    E = c.shape[0]
    pairs = []
    for i in range(E):
        for j in range(i + 1, E):
            pairs.append({"i": i, "j": j, "cka": float(c[i, j]),
                          "cosine": None if cos_EE is None else float(cos_EE[i, j])})
    pairs.sort(key=lambda p: (-p["cka"], -(p["cosine"] if p["cosine"] is not None else 0.0)))
    return pairs[:top] if top is not None else pairs


def _off_diag_mean(m: torch.Tensor) -> float:
    E = m.shape[0]
    return float((m.sum() - m.diagonal().sum()) / (E * (E - 1))) if E > 1 else float("nan")


def redundancy_summary(out_ETD: torch.Tensor, top: int = 5) -> dict:
    """Cosine and CKA matrices, their off-diagonal means and the top merge candidates."""
    cos = output_cosine_similarity(out_ETD)
    cka = output_cka(out_ETD)
    return {"cosine": cos.tolist(), "cka": cka.tolist(),
            "mean_cosine": _off_diag_mean(cos), "mean_cka": _off_diag_mean(cka),
            "merge_candidates": merge_candidates(cka, cos, top)}
