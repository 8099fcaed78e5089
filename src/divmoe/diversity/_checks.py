"""Input validation shared by the diversity / divergence modules (private).

Every check raises ``ValueError`` whose message names the argument, what was seen
(shape or value) and what is allowed.
"""

from __future__ import annotations

import math

import torch


def tensor_arg(t, name: str) -> torch.Tensor:
    """Return ``t`` if it is a real-valued tensor; raise otherwise."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.is_complex():
        raise ValueError(f"{name} must be real-valued, got dtype {t.dtype}")
    if t.dtype == torch.bool:
        raise ValueError(f"{name} must be a numeric (float) tensor, got dtype {t.dtype}")
    return t


def out_dtype(*ts: torch.Tensor) -> torch.dtype:
    """Floating dtype results are returned in (promoted input dtype; ints -> float64)."""
    dt = ts[0].dtype
    for t in ts[1:]:
        dt = torch.promote_types(dt, t.dtype)
    return dt if dt.is_floating_point else torch.float64


def f64(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.float64)


def check_finite(t: torch.Tensor, name: str) -> None:
    t = t.detach()
    if not bool(torch.isfinite(t).all()):
        n_nan = int(torch.isnan(t).sum())
        n_inf = int(torch.isinf(t).sum())
        raise ValueError(
            f"{name} must contain only finite values, found {n_nan} NaN and {n_inf} inf "
            f"entries (shape {tuple(t.shape)})"
        )


def check_matrix(t: torch.Tensor, name: str, desc: str = "[N, D]", min_rows: int = 1) -> None:
    if t.dim() != 2:
        raise ValueError(f"{name} must be a 2-D tensor {desc}, got shape {tuple(t.shape)}")
    if t.shape[0] < min_rows or t.shape[1] < 1:
        raise ValueError(
            f"{name} must have at least {min_rows} row(s) and 1 column {desc}, "
            f"got shape {tuple(t.shape)}"
        )


def check_positive(value, name: str, allow_inf: bool = False) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a positive number, got {value!r}") from None
    if math.isnan(v) or v <= 0 or (math.isinf(v) and not allow_inf):
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    return v


def check_int(value, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value}")
    return value


def prob_atol(dtype: torch.dtype, k: int) -> float:
    """Tolerance on |sum - 1| of a length-k probability vector stored in ``dtype``."""
    eps = torch.finfo(dtype).eps if dtype.is_floating_point else torch.finfo(torch.float64).eps
    return max(1e-6, 8.0 * k * eps) if eps < 1e-10 else max(1e-4, 8.0 * k * eps)


def check_probabilities(p: torch.Tensor, name: str) -> None:
    """Last dim must be a probability vector: finite, >= 0, sums to 1 (dtype tolerance)."""
    p = p.detach()
    if p.dim() < 1 or p.shape[-1] < 1:
        raise ValueError(
            f"{name} must have at least one dimension with >= 1 category (shape [..., K]), "
            f"got shape {tuple(p.shape)}"
        )
    check_finite(p, name)
    if bool((p < 0).any()):
        raise ValueError(
            f"{name} must be a probability vector along the last dim (entries >= 0), "
            f"found minimum entry {float(p.min()):.3g}"
        )
    s = f64(p).sum(-1)
    atol = prob_atol(p.dtype, p.shape[-1])
    dev = float((s - 1).abs().max())
    if dev > atol:
        raise ValueError(
            f"{name} must sum to 1 along the last dim (tolerance {atol:.1g}), "
            f"found a sum off by {dev:.3g} (shape {tuple(p.shape)})"
        )
