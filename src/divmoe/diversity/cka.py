"""Linear centered kernel alignment (CKA).

Definition implemented: linear CKA of Kornblith, Norouzi, Lee & Hinton, "Similarity of
Neural Network Representations Revisited" (ICML 2019), eq. for the linear kernel:
with X [N, D1] and Y [N, D2] column-centred (each feature has zero mean over the N
examples),

    CKA(X, Y) = ||Y^T X||_F^2 / (||X^T X||_F * ||Y^T Y||_F).

This equals HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L)) with K = X X^T, L = Y Y^T. The
feature-space form costs O(N D1 D2) and never builds an N x N matrix; when N is smaller
than the feature dims the (identical) N x N Gram form is used instead. CKA is in [0, 1],
invariant to orthogonal transforms and isotropic scaling of either representation, and
equals 1 for identical (or orthogonally/isotropically transformed) representations.

Computation is in float64. :func:`linear_cka` returns a python ``float``;
:func:`pairwise_cka` returns a float64 tensor [M, M].
"""

from __future__ import annotations

from typing import Sequence

import torch

from ._checks import check_finite, check_matrix, f64, tensor_arg

__all__ = ["linear_cka", "pairwise_cka"]


def _prep(x_ND: torch.Tensor, name: str) -> torch.Tensor:
    x_ND = tensor_arg(x_ND, name).detach()
    check_matrix(x_ND, name, "[N, D]", min_rows=2)
    check_finite(x_ND, name)
    x = f64(x_ND)
    x = x - x.mean(dim=0, keepdim=True)
    if float(x.abs().max()) == 0.0:
        raise ValueError(
            f"{name} has zero variance in every feature after centring (shape {tuple(x_ND.shape)}); "
            "CKA is undefined for constant representations"
        )
    return x


def _cross(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """||Y^T X||_F^2 = <X X^T, Y Y^T>_F for centred x [N, D1], y [N, D2]."""
    n, d1 = x.shape
    d2 = y.shape[1]
    if n * (d1 + d2) < d1 * d2:
        # Gram form, O(N^2 (D1 + D2)): cheaper when N is small relative to the feature dims.
        return ((x @ x.T) * (y @ y.T)).sum()
    return (y.T @ x).square().sum()


def _self(x: torch.Tensor) -> torch.Tensor:
    """||X^T X||_F for centred x."""
    n, d = x.shape
    g = x @ x.T if n < d else x.T @ x
    return g.square().sum().sqrt()


def linear_cka(x_ND1: torch.Tensor, y_ND2: torch.Tensor) -> float:
    """Linear CKA (Kornblith et al. 2019) between two representations of the same N examples.

    Args:
        x_ND1: [N, D1] representation (rows = examples), any float dtype.
        y_ND2: [N, D2] representation of the same N examples (D2 may differ from D1).

    Returns:
        python float in [0, 1].

    Raises:
        ValueError: not 2-D, N < 2, NaN/inf, different N, or a constant representation.
    """
    x = _prep(x_ND1, "x_ND1")
    y = _prep(y_ND2, "y_ND2")
    if x.shape[0] != y.shape[0]:
        raise ValueError(
            f"x_ND1 and y_ND2 must have the same number of rows N (examples), "
            f"got {x.shape[0]} and {y.shape[0]}"
        )
    val = _cross(x, y) / (_self(x) * _self(y))
    return float(val.clamp(0.0, 1.0))


def pairwise_cka(reps: Sequence[torch.Tensor] | torch.Tensor) -> torch.Tensor:
    """Matrix of linear CKA between every pair of M representations.

    Args:
        reps: a tensor [M, N, D] or a list/tuple of M tensors [N, D_m] (feature dims may
            differ, N must agree), e.g. the outputs of M experts on the same N tokens.

    Returns:
        float64 tensor [M, M], symmetric, ones on the diagonal.

    Raises:
        ValueError: empty input, a 3-D tensor with wrong rank, mismatched N, NaN/inf,
            or a constant representation.
    """
    if isinstance(reps, torch.Tensor):
        if reps.dim() != 3 or reps.shape[0] == 0:
            raise ValueError(
                f"reps as a tensor must be 3-D [M, N, D] with M >= 1, got shape {tuple(reps.shape)}"
            )
        items = [reps[i] for i in range(reps.shape[0])]
    else:
        items = list(reps)
        if not items:
            raise ValueError("reps must contain at least one representation [N, D], got an empty sequence")
    xs = [_prep(r, f"reps[{i}]") for i, r in enumerate(items)]
    n0 = xs[0].shape[0]
    for i, x in enumerate(xs):
        if x.shape[0] != n0:
            raise ValueError(
                f"all representations must share N (rows): reps[0] has {n0}, reps[{i}] has {x.shape[0]}"
            )
    m = len(xs)
    norms = torch.stack([_self(x) for x in xs])
    out_MM = torch.eye(m, dtype=torch.float64)
    for i in range(m):
        for j in range(i + 1, m):
            v = (_cross(xs[i], xs[j]) / (norms[i] * norms[j])).clamp(0.0, 1.0)
            out_MM[i, j] = out_MM[j, i] = v
    return out_MM
