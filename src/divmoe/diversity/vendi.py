"""Vendi score and its order-q family.

Definitions implemented
-----------------------
* Vendi score — Friedman & Dieng, "The Vendi Score: A Diversity Evaluation Metric for
  Machine Learning" (TMLR 2023): for n items with a positive semi-definite similarity
  matrix K (K_ii = 1), let λ_1..λ_n be the eigenvalues of K / n (they are >= 0 and sum
  to 1). Then ``VS = exp(-Σ_i λ_i log λ_i)`` (0 log 0 = 0), i.e. the exponential of the
  Shannon entropy of the spectrum. VS = 1 when all items are identical, VS = n when
  they are mutually orthogonal (K = I).
* Order-q Vendi scores — Pasarkar & Dieng, "Cousins of the Vendi Score: A Family of
  Similarity-Based Diversity Metrics for Science and Machine Learning" (AISTATS 2024):
  ``VS_q = (Σ_i λ_i^q)^(1 / (1 - q))`` (exponential of the Rényi entropy of order q),
  with the limits q -> 1: the Shannon score above; q = 0: the number of nonzero
  eigenvalues (rank of K); q = inf: ``1 / max_i λ_i``. VS_q is non-increasing in q.

Numerics
--------
Eigenvalues are computed in float64 with ``torch.linalg.eigvalsh``. Eigenvalues below
``rank_rtol * max λ`` are treated as exactly zero for *every* q (not just q = 0), so
round-off eigenvalues cannot inflate small-q scores; the default ``rank_rtol`` follows
numpy's ``matrix_rank`` convention: ``max(N, D) * eps(input dtype)``. The sum
Σ λ_i^q is evaluated as a log-sum-exp, so large finite q does not underflow.

All public functions return a python ``float``.
"""

from __future__ import annotations

import math

import torch

from ._checks import check_finite, check_matrix, f64, tensor_arg

__all__ = ["vendi_from_similarity", "vendi_from_features", "vendi_from_eigenvalues"]

# Rows of X processed per block on the D x D (N > D) path; bounds the float64 copy.
_ROW_BLOCK = 8192


def _check_q(q) -> float:
    try:
        qf = float(q)
    except (TypeError, ValueError):
        raise ValueError(f"q must be a float >= 0 (float('inf') allowed), got {q!r}") from None
    if math.isnan(qf) or qf < 0:
        raise ValueError(f"q must be a float >= 0 (float('inf') allowed), got {q!r}")
    return qf


def _check_rtol(rank_rtol) -> None:
    if rank_rtol is not None:
        r = float(rank_rtol)
        if math.isnan(r) or r < 0 or r >= 1:
            raise ValueError(f"rank_rtol must be None or a float in [0, 1), got {rank_rtol!r}")


def vendi_from_eigenvalues(lam_N: torch.Tensor, q: float = 1.0, rank_rtol: float | None = None) -> float:
    """Order-q Vendi score of a spectrum ``lam_N`` (eigenvalues of K/n, any order).

    ``lam_N`` [N] must be finite; small negative values (round-off of a PSD matrix) are
    allowed and are treated as zero, as is anything below ``rank_rtol * max(lam)``
    (default ``N * eps(float64)``). The spectrum is renormalised to sum to 1 after
    cleaning. Returns a python float.
    """
    lam_N = tensor_arg(lam_N, "lam_N").detach()
    q = _check_q(q)
    _check_rtol(rank_rtol)
    if lam_N.dim() != 1 or lam_N.numel() == 0:
        raise ValueError(f"lam_N must be a non-empty 1-D tensor [N], got shape {tuple(lam_N.shape)}")
    check_finite(lam_N, "lam_N")
    if rank_rtol is None:
        rank_rtol = lam_N.numel() * torch.finfo(torch.float64).eps
    return _score_from_spectrum(f64(lam_N), q, float(rank_rtol))


def _score_from_spectrum(lam: torch.Tensor, q: float, rtol: float) -> float:
    lam_max = float(lam.max())
    if lam_max <= 0:
        raise ValueError(
            f"similarity spectrum has no positive eigenvalue (max {lam_max:.3g}); "
            "K must be PSD with K_ii = 1"
        )
    lam = lam[lam > rtol * lam_max]
    lam = lam / lam.sum()
    if q == 0.0:
        return float(lam.numel())
    if math.isinf(q):
        return float(1.0 / lam.max())
    log_lam = lam.log()
    if abs(q - 1.0) < 1e-12:
        return float(torch.exp(-(lam * log_lam).sum()))
    # log VS_q = log(Σ λ^q) / (1 - q), with log Σ λ^q = logsumexp(q log λ).
    return float(torch.exp(torch.logsumexp(q * log_lam, dim=0) / (1.0 - q)))


def vendi_from_similarity(
    k_NN: torch.Tensor,
    q: float = 1.0,
    rank_rtol: float | None = None,
    sym_atol: float | None = None,
) -> float:
    """Order-q Vendi score (Friedman & Dieng; Pasarkar & Dieng) of a similarity matrix.

    Args:
        k_NN: [N, N] symmetric positive semi-definite similarity matrix with unit
            diagonal (K_ii = 1). Any float dtype; computed in float64.
        q: order, a float >= 0; ``1.0`` = Shannon Vendi score (default), ``0.0`` =
            numerical rank of K, ``float('inf')`` = 1 / max eigenvalue of K/N.
        rank_rtol: eigenvalues <= rank_rtol * max eigenvalue count as zero (all q).
            Default ``N * eps(k_NN.dtype)``.
        sym_atol: tolerance for the symmetry, unit-diagonal and PSD checks; default
            ``max(1e-6, 100 * N * eps(k_NN.dtype))``.

    Returns:
        python float in [1, N].

    Raises:
        ValueError: non-square / empty matrix, NaN or inf entries, asymmetric matrix,
            diagonal not 1, clearly negative eigenvalues (not PSD), q < 0 or NaN.
    """
    k_NN = tensor_arg(k_NN, "k_NN").detach()
    q = _check_q(q)
    _check_rtol(rank_rtol)
    if k_NN.dim() != 2 or k_NN.shape[0] != k_NN.shape[1] or k_NN.shape[0] == 0:
        raise ValueError(
            f"k_NN must be a non-empty square similarity matrix [N, N], got shape {tuple(k_NN.shape)}"
        )
    check_finite(k_NN, "k_NN")
    n = k_NN.shape[0]
    eps = torch.finfo(k_NN.dtype).eps if k_NN.dtype.is_floating_point else torch.finfo(torch.float64).eps
    atol = max(1e-6, 100.0 * n * eps) if sym_atol is None else float(sym_atol)
    K = f64(k_NN)
    asym = float((K - K.T).abs().max())
    if asym > atol:
        raise ValueError(f"k_NN must be symmetric, max |K - K^T| = {asym:.3g} > tolerance {atol:.1g}")
    diag_dev = float((K.diagonal() - 1).abs().max())
    if diag_dev > atol:
        raise ValueError(
            f"k_NN must have unit diagonal (K_ii = 1), max |K_ii - 1| = {diag_dev:.3g} > tolerance {atol:.1g}"
        )
    K = 0.5 * (K + K.T)
    lam_N = torch.linalg.eigvalsh(K) / n
    if float(lam_N.min()) < -atol:
        raise ValueError(
            f"k_NN must be positive semi-definite, found eigenvalue {float(lam_N.min()) * n:.3g} < 0"
        )
    rtol = n * eps if rank_rtol is None else float(rank_rtol)
    return _score_from_spectrum(lam_N, q, rtol)


def vendi_from_features(
    x_ND: torch.Tensor,
    q: float = 1.0,
    normalize: bool = True,
    rank_rtol: float | None = None,
) -> float:
    """Order-q Vendi score of N items embedded as rows of ``x_ND`` (cosine kernel).

    The similarity is the linear kernel of L2-normalised rows, K = X̂ X̂^T (cosine
    similarity, K_ii = 1), as in Friedman & Dieng's ``score_dual``. If N > D the
    nonzero spectrum of K/N is obtained from the D x D matrix X̂^T X̂ / N (same nonzero
    eigenvalues), accumulated over row blocks into float64 (block products in float64
    for float64 input, float32 otherwise), so e.g. 100,000 x 512 takes seconds;
    otherwise the N x N kernel is built in float64.

    Args:
        x_ND: [N, D] feature matrix, any float dtype.
        q: order >= 0 (``float('inf')`` allowed), see :func:`vendi_from_similarity`.
        normalize: L2-normalise rows (default). If False the rows must already have
            unit norm (checked, tolerance 1e-4 relative), otherwise K_ii != 1.
        rank_rtol: zero-eigenvalue threshold relative to the largest eigenvalue;
            default ``max(N, D) * eps(x_ND.dtype)``.

    Returns:
        python float in [1, min(N, D)].

    Raises:
        ValueError: not 2-D / empty, NaN or inf, an all-zero row (cannot be
            normalised), non-unit rows with ``normalize=False``, q < 0 or NaN.
    """
    x_ND = tensor_arg(x_ND, "x_ND").detach()
    q = _check_q(q)
    _check_rtol(rank_rtol)
    check_matrix(x_ND, "x_ND", "[N, D]")
    check_finite(x_ND, "x_ND")
    n, d = x_ND.shape
    eps = torch.finfo(x_ND.dtype).eps if x_ND.dtype.is_floating_point else torch.finfo(torch.float64).eps
    rtol = max(n, d) * eps if rank_rtol is None else float(rank_rtol)

    def prep(block: torch.Tensor, row0: int) -> torch.Tensor:
        b = f64(block)
        norms = b.norm(dim=1)
        if normalize:
            zero = (norms == 0).nonzero()
            if zero.numel():
                raise ValueError(
                    f"x_ND row {row0 + int(zero[0, 0])} is all zeros; cannot L2-normalise "
                    "(cosine similarity is undefined for zero vectors)"
                )
            return b / norms[:, None]
        dev = float((norms - 1).abs().max())
        if dev > 1e-4:
            raise ValueError(
                f"x_ND rows must have unit L2 norm when normalize=False (K_ii = 1), "
                f"max |‖x_i‖ - 1| = {dev:.3g}; pass normalize=True"
            )
        return b

    if n > d:
        # Inputs that are already float64 use float64 products; lower-precision inputs
        # use float32 products per row block (rows normalised in float64 first) summed
        # into a float64 accumulator: ~2x faster, entry error ~1e-7 relative, far
        # below what moves the score.
        block_dtype = torch.float64 if x_ND.dtype == torch.float64 else torch.float32
        s_DD = torch.zeros(d, d, dtype=torch.float64, device=x_ND.device)
        for start in range(0, n, _ROW_BLOCK):
            xb = prep(x_ND[start:start + _ROW_BLOCK], start).to(block_dtype)
            s_DD += (xb.T @ xb).to(torch.float64)
        s_DD = 0.5 * (s_DD + s_DD.T)
        lam = torch.linalg.eigvalsh(s_DD / n)
    else:
        xh = prep(x_ND, 0)
        k_NN = xh @ xh.T
        k_NN = 0.5 * (k_NN + k_NN.T)
        lam = torch.linalg.eigvalsh(k_NN / n)
    return _score_from_spectrum(lam, q, rtol)
