"""Divergences between distributions: discrete, Gaussian, and sample-based.

Discrete distributions (last dim = K categories, must sum to 1; leading dims are a batch
and broadcast against each other). Natural logarithms throughout.

* :func:`kl_divergence` — Kullback–Leibler, KL(p‖q) = Σ_k p_k log(p_k / q_k), with
  0 log 0 = 0 and +inf where p_k > 0 = q_k.
* :func:`js_divergence` — Jensen–Shannon (Lin 1991), ½KL(p‖m) + ½KL(q‖m), m = (p+q)/2;
  symmetric, in [0, log 2].
* :func:`cauchy_schwarz_divergence` — Cauchy–Schwarz divergence (Principe et al.,
  information-theoretic learning), −log(Σ p q / sqrt(Σ p² Σ q²)); >= 0, 0 iff p = q,
  +inf if p and q have disjoint supports.

These three return a tensor of the broadcast batch shape (0-dim for 1-D inputs) in the
promoted input dtype; they are computed in float64 and are differentiable.

Gaussians:

* :func:`gaussian_kl` — closed-form KL(N(μ0, Σ0) ‖ N(μ1, Σ1)) =
  ½[tr(Σ1⁻¹Σ0) + (μ1−μ0)ᵀΣ1⁻¹(μ1−μ0) − d + log det Σ1 − log det Σ0]; 0-dim tensor.

Samples (rows are i.i.d. draws):

* :func:`mmd2` — unbiased squared maximum mean discrepancy MMD²_u of Gretton et al.,
  "A Kernel Two-Sample Test" (JMLR 2012, eq. 3) with the Gaussian RBF kernel
  k(a, b) = exp(−‖a−b‖² / (2σ²)); σ defaults to the median heuristic (median pairwise
  distance of the pooled sample). 0-dim tensor, differentiable in x and y.
* :func:`sinkhorn_distance` — entropic optimal transport between histograms,
  OT_ε(a, b) = min_P ⟨P, C⟩ + ε KL(P ‖ a⊗b) over couplings P of a and b, solved with
  log-domain Sinkhorn iterations (Cuturi 2013; stabilised as in Peyré & Cuturi,
  "Computational Optimal Transport", §4.4, and Schmitzer 2019). 0-dim tensor.
* :func:`sinkhorn_divergence` — debiased Sinkhorn divergence of Genevay, Peyré & Cuturi
  (AISTATS 2018) / Feydy et al. (AISTATS 2019):
  S_ε(x, y) = OT_ε(x, y) − ½OT_ε(x, x) − ½OT_ε(y, y) between the uniform empirical
  measures, cost ‖x−y‖^p. 0-dim tensor.
* :func:`knn_kl_divergence` — k-nearest-neighbour KL estimator of Wang, Kulkarni &
  Verdú, "Divergence Estimation for Multidimensional Densities via k-Nearest-Neighbor
  Distances" (IEEE Trans. IT 2009, eq. 17):
  D̂(P‖Q) = (d/n) Σ_i log(ν_k(i) / ρ_k(i)) + log(m / (n − 1)). Python float.
* :func:`nnr_divergence` — nearest-neighbour-ratio (NNR) estimator of Noshad, Moon,
  Sekeh & Hero, "Direct Estimation of Information Divergence Using Nearest Neighbor
  Ratios" (ISIT 2017). Python float. See its docstring for exactly what is implemented.
"""

from __future__ import annotations

import math
import warnings
from typing import Callable

import torch

from ._checks import (
    check_finite,
    check_int,
    check_matrix,
    check_positive,
    check_probabilities,
    f64,
    out_dtype,
    tensor_arg,
)

__all__ = [
    "kl_divergence",
    "js_divergence",
    "cauchy_schwarz_divergence",
    "gaussian_kl",
    "mmd2",
    "median_bandwidth",
    "sinkhorn_distance",
    "sinkhorn_divergence",
    "knn_kl_divergence",
    "nnr_divergence",
]

# ---------------------------------------------------------------------------------------
# discrete distributions
# ---------------------------------------------------------------------------------------


def _pair_probs(p: torch.Tensor, q: torch.Tensor, pname: str = "p", qname: str = "q"):
    p = tensor_arg(p, pname)
    q = tensor_arg(q, qname)
    check_probabilities(p, pname)
    check_probabilities(q, qname)
    if p.shape[-1] != q.shape[-1]:
        raise ValueError(
            f"{pname} and {qname} must have the same number of categories (last dim), "
            f"got shapes {tuple(p.shape)} and {tuple(q.shape)}"
        )
    try:
        torch.broadcast_shapes(p.shape, q.shape)
    except RuntimeError:
        raise ValueError(
            f"{pname} and {qname} batch dims must broadcast, got shapes {tuple(p.shape)} and {tuple(q.shape)}"
        ) from None
    return f64(p), f64(q), out_dtype(p, q)


def _kl64(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    # xlogy(p, p) = 0 where p = 0; -xlogy(p, q) = +inf where p > 0 = q.
    return (torch.xlogy(p, p) - torch.xlogy(p, q)).sum(-1)


def kl_divergence(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """KL(p ‖ q) = Σ_k p_k log(p_k / q_k) between discrete distributions (natural log).

    Args:
        p, q: [..., K] probability vectors along the last dim (>= 0, sum to 1); batch
            dims broadcast.

    Returns:
        tensor of the broadcast batch shape (0-dim for [K] inputs), promoted input
        dtype; >= 0, == 0 iff p == q, +inf if p puts mass where q has none.
    """
    p64, q64, dt = _pair_probs(p, q)
    return _kl64(p64, q64).clamp_min(0.0).to(dt)


def js_divergence(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Jensen–Shannon divergence ½KL(p‖m) + ½KL(q‖m), m = (p + q)/2 (natural log).

    Args:
        p, q: [..., K] probability vectors along the last dim; batch dims broadcast.

    Returns:
        tensor of the broadcast batch shape, promoted input dtype; symmetric, in
        [0, log 2] (log 2 exactly for disjoint supports).
    """
    p64, q64, dt = _pair_probs(p, q)
    m = 0.5 * (p64 + q64)
    js = 0.5 * _kl64(p64, m) + 0.5 * _kl64(q64, m)
    return js.clamp(0.0, math.log(2.0)).to(dt)


def cauchy_schwarz_divergence(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Cauchy–Schwarz divergence −log(Σ_k p_k q_k / sqrt(Σ_k p_k² · Σ_k q_k²)).

    Args:
        p, q: [..., K] probability vectors along the last dim; batch dims broadcast.

    Returns:
        tensor of the broadcast batch shape, promoted input dtype; >= 0, 0 iff p == q,
        +inf when the supports are disjoint. Symmetric.
    """
    p64, q64, dt = _pair_probs(p, q)
    cross = (p64 * q64).sum(-1)
    norm = (p64.square().sum(-1) * q64.square().sum(-1)).sqrt()
    return (-(cross.log() - norm.log())).clamp_min(0.0).to(dt)


# ---------------------------------------------------------------------------------------
# Gaussians
# ---------------------------------------------------------------------------------------


def _chol(cov: torch.Tensor, name: str, d: int) -> torch.Tensor:
    if cov.shape != (d, d):
        raise ValueError(f"{name} must be [D, D] = [{d}, {d}] to match the mean, got shape {tuple(cov.shape)}")
    check_finite(cov, name)
    c = f64(cov)
    asym = float((c - c.T).abs().max())
    if asym > 1e-6 * max(1.0, float(c.abs().max())):
        raise ValueError(f"{name} must be symmetric, max |C - C^T| = {asym:.3g}")
    L, info = torch.linalg.cholesky_ex(0.5 * (c + c.T))
    if int(info) != 0:
        raise ValueError(f"{name} must be symmetric positive definite (Cholesky failed at column {int(info)})")
    return L


def gaussian_kl(mu0: torch.Tensor, cov0: torch.Tensor, mu1: torch.Tensor, cov1: torch.Tensor) -> torch.Tensor:
    """Closed-form KL(N(mu0, cov0) ‖ N(mu1, cov1)) (natural log).

    Args:
        mu0, mu1: [D] means.
        cov0, cov1: [D, D] symmetric positive-definite covariances.

    Returns:
        0-dim tensor in the promoted input dtype (computed in float64 via Cholesky).
    """
    for t, nm in ((mu0, "mu0"), (cov0, "cov0"), (mu1, "mu1"), (cov1, "cov1")):
        tensor_arg(t, nm)
    if mu0.dim() != 1 or mu0.numel() == 0:
        raise ValueError(f"mu0 must be a non-empty 1-D mean [D], got shape {tuple(mu0.shape)}")
    d = mu0.shape[0]
    if mu1.shape != (d,):
        raise ValueError(f"mu1 must be [D] = [{d}] like mu0, got shape {tuple(mu1.shape)}")
    check_finite(mu0, "mu0")
    check_finite(mu1, "mu1")
    L0 = _chol(cov0, "cov0", d)
    L1 = _chol(cov1, "cov1", d)
    diff = (f64(mu1) - f64(mu0))[:, None]
    A = torch.linalg.solve_triangular(L1, L0, upper=False)  # L1^-1 L0
    b = torch.linalg.solve_triangular(L1, diff, upper=False)
    trace = A.square().sum()
    maha = b.square().sum()
    logdet = 2.0 * (L1.diagonal().log().sum() - L0.diagonal().log().sum())
    kl = 0.5 * (trace + maha - d + logdet)
    return kl.clamp_min(0.0).to(out_dtype(mu0, cov0, mu1, cov1))


# ---------------------------------------------------------------------------------------
# sample helpers
# ---------------------------------------------------------------------------------------


def _samples(x: torch.Tensor, name: str, min_rows: int) -> torch.Tensor:
    x = tensor_arg(x, name)
    check_matrix(x, name, "[N, D] (rows = samples)", min_rows=min_rows)
    check_finite(x, name)
    return x


def _same_dim(x: torch.Tensor, y: torch.Tensor, xn: str, yn: str) -> None:
    if x.shape[1] != y.shape[1]:
        raise ValueError(
            f"{xn} and {yn} must have the same feature dimension D, got shapes "
            f"{tuple(x.shape)} and {tuple(y.shape)}"
        )


def _sqdist(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean distances [N, M] (float64, clamped >= 0)."""
    d = a.square().sum(1)[:, None] + b.square().sum(1)[None, :] - 2.0 * (a @ b.T)
    return d.clamp_min(0.0)


def _sqdist_nograd(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Same as :func:`_sqdist` with in-place ops (inputs must not need gradients)."""
    d = a @ b.T
    d.mul_(-2.0).add_(a.square().sum(1)[:, None]).add_(b.square().sum(1)[None, :])
    return d.clamp_min_(0.0)


# ---------------------------------------------------------------------------------------
# MMD
# ---------------------------------------------------------------------------------------


def median_bandwidth(x_ND: torch.Tensor, y_MD: torch.Tensor, max_points: int = 2000) -> float:
    """Median heuristic σ: median Euclidean distance between distinct pooled points.

    If the pooled sample has more than ``max_points`` rows a fixed-seed random subset of
    that size is used (deterministic). Falls back to the mean positive distance when the
    median is 0 (many duplicates) and to 1.0 when all points coincide.
    """
    x = _samples(x_ND, "x_ND", 1)
    y = _samples(y_MD, "y_MD", 1)
    _same_dim(x, y, "x_ND", "y_MD")
    z = torch.cat([f64(x.detach()), f64(y.detach())], 0)
    if z.shape[0] > max_points:
        g = torch.Generator().manual_seed(0)
        idx = torch.randperm(z.shape[0], generator=g)[:max_points]
        z = z[idx.to(z.device)]
    d = _sqdist_nograd(z, z).sqrt_()
    iu = torch.triu_indices(z.shape[0], z.shape[0], offset=1, device=z.device)
    dv = d[iu[0], iu[1]]
    med = float(dv.median())
    if med > 0:
        return med
    pos = dv[dv > 0]
    return float(pos.mean()) if pos.numel() else 1.0


def mmd2(x_ND: torch.Tensor, y_MD: torch.Tensor, bandwidth: float | None = None) -> torch.Tensor:
    """Unbiased MMD² (Gretton et al. 2012, eq. 3) with the RBF kernel exp(−‖a−b‖²/(2σ²)).

    MMD²_u = 1/(n(n−1)) Σ_{i≠j} k(x_i, x_j) + 1/(m(m−1)) Σ_{i≠j} k(y_i, y_j)
             − 2/(n m) Σ_{i,j} k(x_i, y_j).

    Args:
        x_ND: [N, D] samples from P (N >= 2).
        y_MD: [M, D] samples from Q (M >= 2).
        bandwidth: RBF σ > 0; default :func:`median_bandwidth` of the pooled sample.

    Returns:
        0-dim tensor (promoted input dtype), differentiable. Unbiased, so it can be
        slightly negative when P = Q.
    """
    x = _samples(x_ND, "x_ND", 2)
    y = _samples(y_MD, "y_MD", 2)
    _same_dim(x, y, "x_ND", "y_MD")
    sigma = median_bandwidth(x, y) if bandwidth is None else check_positive(bandwidth, "bandwidth")
    n, m = x.shape[0], y.shape[0]
    x64, y64 = f64(x), f64(y)
    gamma = 1.0 / (2.0 * sigma * sigma)
    kxx = torch.exp(-gamma * _sqdist(x64, x64))
    kyy = torch.exp(-gamma * _sqdist(y64, y64))
    kxy = torch.exp(-gamma * _sqdist(x64, y64))
    # diagonal of kxx / kyy is exactly 1 (k(a, a) = 1).
    sxx = (kxx.sum() - n) / (n * (n - 1))
    syy = (kyy.sum() - m) / (m * (m - 1))
    sxy = kxy.mean()
    return (sxx + syy - 2.0 * sxy).to(out_dtype(x, y))


# ---------------------------------------------------------------------------------------
# Sinkhorn
# ---------------------------------------------------------------------------------------


def _warn_unconverged(err: float, tol: float, iters: int, eps: float) -> None:
    if tol > 0 and not err < tol:
        warnings.warn(
            f"Sinkhorn did not reach tol={tol:g} in iters={iters} iterations at epsilon={eps:g} "
            f"(row-marginal L1 error {err:.2e}); increase iters or epsilon for a more accurate value",
            RuntimeWarning,
            stacklevel=3,
        )


_EPS_SCALING_STEPS = 5  # Sinkhorn iterations per intermediate epsilon (annealing)


def _sinkhorn_log(log_a: torch.Tensor, log_b: torch.Tensor, C: torch.Tensor, eps: float, iters: int, tol: float):
    """Log-domain Sinkhorn with epsilon-scaling. Returns dual potentials (f [N], g [M]).

    Updates (stable for any ε, no exp of large numbers):
        f_i = −ε logsumexp_j(log b_j + (g_j − C_ij)/ε),
        g_j = −ε logsumexp_i(log a_i + (f_i − C_ij)/ε).
    Warm start by ε-scaling (Schmitzer 2019; Feydy et al. 2019): a few iterations at
    ε_k = range(C)·2^-k for ε_k > ε, then at most ``iters`` iterations at the target ε,
    stopping when the L1 error of the row marginal of P = a b^T exp((f ⊕ g − C)/ε)
    drops below ``tol``. The annealing only changes the starting point, not the fixed
    point. Iterations run without autograd; one final differentiable pair of updates
    from the converged, detached potentials gives gradients w.r.t. C (envelope theorem).
    """

    def f_update(g, C_, e):
        return -e * torch.logsumexp(log_b[None, :] + (g[None, :] - C_) / e, dim=1)

    def g_update(f, C_, e):
        return -e * torch.logsumexp(log_a[:, None] + (f[:, None] - C_) / e, dim=0)

    with torch.no_grad():
        Cd = C.detach()
        la, lb = log_a.detach(), log_b.detach()
        a = la.exp()

        def fu(g, e):
            return -e * torch.logsumexp(lb[None, :] + (g[None, :] - Cd) / e, dim=1)

        def gu(f, e):
            return -e * torch.logsumexp(la[:, None] + (f[:, None] - Cd) / e, dim=0)

        g = torch.zeros_like(lb)
        e = float(Cd.max() - Cd.min())
        while e > 2.0 * eps:
            for _ in range(_EPS_SCALING_STEPS):
                f = fu(g, e)
                g = gu(f, e)
            e *= 0.5
        f = fu(g, eps)
        err = float("inf")
        for _ in range(iters):
            g = gu(f, eps)
            f_new = fu(g, eps)
            # row marginal of the plan (f, g) is a_i exp((f_i - f_new_i)/eps)
            err = float((a * torch.expm1((f - f_new) / eps)).abs().sum())
            f = f_new
            if err < tol:
                break
        _warn_unconverged(err, tol, iters, eps)
    g = g_update(f, C, eps)
    f = f_update(g, C, eps)
    return f, g


def _sinkhorn_sym_value(a: torch.Tensor, C: torch.Tensor, eps: float, iters: int, tol: float) -> torch.Tensor:
    """OT_ε(a, a) for a symmetric cost C [N, N] with the symmetric Sinkhorn iteration.

    Single potential f, averaged update f <- ½(f + T(f)), T(f)_i = −ε logsumexp_j(log a_j
    + (f_j − C_ij)/ε) (Feydy et al. 2019, §3.1), which converges in a few iterations
    where plain alternating updates on a symmetric problem crawl. Same ε-scaling warm
    start and row-marginal stopping rule as :func:`_sinkhorn_log`. Returns
    <a, f*> + <a, T(f*)> (= 2<a, f*> at the fixed point) whose gradient w.r.t. C is the
    optimal plan, as for the asymmetric solver.
    """
    log_a = a.log()

    def T(f, C_, e):
        return -e * torch.logsumexp(log_a[None, :] + (f[None, :] - C_) / e, dim=1)

    with torch.no_grad():
        Cd = C.detach()
        f = torch.zeros_like(a)
        e = float(Cd.max() - Cd.min())
        while e > 2.0 * eps:
            for _ in range(_EPS_SCALING_STEPS):
                f = 0.5 * (f + T(f, Cd, e))
            e *= 0.5
        err = float("inf")
        for _ in range(iters):
            tf = T(f, Cd, eps)
            err = float((a * torch.expm1((f - tf) / eps)).abs().sum())
            f = 0.5 * (f + tf)
            if err < tol:
                break
        _warn_unconverged(err, tol, iters, eps)
    return (a * f).sum() + (a * T(f, C, eps)).sum()


def sinkhorn_distance(
    a: torch.Tensor,
    b: torch.Tensor,
    cost: torch.Tensor,
    epsilon: float = 0.1,
    iters: int = 1000,
    tol: float = 1e-9,
    return_plan: bool = False,
):
    """Entropic OT between histograms, OT_ε(a, b) = min_P ⟨P, C⟩ + ε KL(P ‖ a⊗b).

    The minimiser is the same coupling as for ⟨P, C⟩ − ε H(P) (Cuturi 2013, POT's
    ``ot.sinkhorn``); the returned value includes the ε·KL term (it equals the dual
    objective ⟨a, f⟩ + ⟨b, g⟩ at convergence). For the transport cost alone (POT's
    ``ot.sinkhorn2``) use ``return_plan=True`` and compute ``(P * cost).sum()``.

    Args:
        a: [N] source histogram (>= 0, sums to 1; zero entries allowed).
        b: [M] target histogram.
        cost: [N, M] finite cost matrix.
        epsilon: entropic regularisation ε > 0, in the units of ``cost``.
        iters: maximum number of Sinkhorn iterations (>= 1).
        tol: stop when the L1 error of the row marginal is below ``tol``; 0 runs all
            ``iters`` (after the ε-scaling warm start, see ``_sinkhorn_log``).
        return_plan: also return the coupling P [N, M].

    Returns:
        0-dim tensor (promoted input dtype), or ``(value, P_NM)`` with ``return_plan``.
    """
    a = tensor_arg(a, "a")
    b = tensor_arg(b, "b")
    cost = tensor_arg(cost, "cost")
    if a.dim() != 1:
        raise ValueError(f"a must be a 1-D histogram [N], got shape {tuple(a.shape)}")
    if b.dim() != 1:
        raise ValueError(f"b must be a 1-D histogram [M], got shape {tuple(b.shape)}")
    check_probabilities(a, "a")
    check_probabilities(b, "b")
    if cost.shape != (a.shape[0], b.shape[0]):
        raise ValueError(
            f"cost must be [N, M] = [{a.shape[0]}, {b.shape[0]}] to match a and b, got shape {tuple(cost.shape)}"
        )
    check_finite(cost, "cost")
    eps = check_positive(epsilon, "epsilon")
    iters = check_int(iters, "iters", 1)
    tol = float(tol)
    if math.isnan(tol) or tol < 0:
        raise ValueError(f"tol must be >= 0, got {tol!r}")
    dt = out_dtype(a, b, cost)
    a64, b64, C = f64(a), f64(b), f64(cost)
    val, f, g, C = _ot_value(a64, b64, C, eps, iters, tol)
    if not return_plan:
        return val.to(dt)
    P = torch.exp(a64.log()[:, None] + b64.log()[None, :] + (f[:, None] + g[None, :] - C) / eps)
    return val.to(dt), P.to(dt)


def _ot_value(a64, b64, C, eps, iters, tol):
    log_a, log_b = a64.log(), b64.log()
    f, g = _sinkhorn_log(log_a, log_b, C, eps, iters, tol)
    # <a, f> + <b, g>, skipping zero-weight points (their potentials are irrelevant).
    val = torch.where(a64 > 0, a64 * f, torch.zeros_like(f)).sum() + torch.where(
        b64 > 0, b64 * g, torch.zeros_like(g)
    ).sum()
    return val, f, g, C


def _cost(x64: torch.Tensor, y64: torch.Tensor, p: float) -> torch.Tensor:
    d2 = _sqdist(x64, y64)
    if p == 2.0:
        return d2
    # sqrt has an infinite derivative at 0; the tiny shift avoids NaN gradients on ties.
    return (d2 + 1e-300).sqrt().pow(p)


def sinkhorn_divergence(
    x_ND: torch.Tensor,
    y_MD: torch.Tensor,
    epsilon: float = 0.1,
    iters: int = 1000,
    p: float = 2,
    tol: float = 1e-9,
) -> torch.Tensor:
    """Debiased Sinkhorn divergence S_ε = OT_ε(x, y) − ½OT_ε(x, x) − ½OT_ε(y, y).

    Between the uniform empirical measures on the rows of ``x_ND`` and ``y_MD`` with
    cost C(u, v) = ‖u − v‖^p (p = 2: squared Euclidean, no ½ factor). OT_ε is
    :func:`sinkhorn_distance` (entropic OT including the ε KL(P‖a⊗b) term, the
    convention of Feydy et al. 2019 under which S_ε >= 0 for p in {1, 2}, and S_ε -> 0
    iff the measures coincide). Log-domain Sinkhorn with ε-scaling, float64; the two
    symmetric terms use the symmetric (averaged) Sinkhorn update.

    Args:
        x_ND: [N, D] samples; y_MD: [M, D] samples (same D).
        epsilon: ε > 0 in units of the cost (for p = 2: squared distance units).
        iters: max Sinkhorn iterations per OT problem; tol: marginal-error stop.
        p: cost exponent >= 1.

    Returns:
        0-dim tensor (promoted input dtype), differentiable in x and y. 0 for identical
        samples up to solver accuracy. Sinkhorn needs more iterations as ε shrinks
        relative to the cost range (max C − min C); a RuntimeWarning is issued when a
        sub-problem stops at ``iters`` before reaching ``tol``.
    """
    x = _samples(x_ND, "x_ND", 1)
    y = _samples(y_MD, "y_MD", 1)
    _same_dim(x, y, "x_ND", "y_MD")
    pf = float(p)
    if math.isnan(pf) or math.isinf(pf) or pf < 1:
        raise ValueError(f"p must be a finite cost exponent >= 1, got {p!r}")
    eps = check_positive(epsilon, "epsilon")
    iters = check_int(iters, "iters", 1)
    tol = float(tol)
    if math.isnan(tol) or tol < 0:
        raise ValueError(f"tol must be >= 0, got {tol!r}")
    x64, y64 = f64(x), f64(y)
    n, m = x.shape[0], y.shape[0]
    a = torch.full((n,), 1.0 / n, dtype=torch.float64, device=x.device)
    b = torch.full((m,), 1.0 / m, dtype=torch.float64, device=y.device)
    ot_xy = _ot_value(a, b, _cost(x64, y64, pf), eps, iters, tol)[0]
    ot_xx = _sinkhorn_sym_value(a, _cost(x64, x64, pf), eps, iters, tol)
    ot_yy = _sinkhorn_sym_value(b, _cost(y64, y64, pf), eps, iters, tol)
    return (ot_xy - 0.5 * ot_xx - 0.5 * ot_yy).to(out_dtype(x, y))


# ---------------------------------------------------------------------------------------
# nearest-neighbour estimators
# ---------------------------------------------------------------------------------------

_KNN_BLOCK_ELEMS = 1 << 22  # distance entries per block (~32 MB in float64)


_KNN_EXTRA = 8  # extra candidates re-checked with exact distances


def _knn(q: torch.Tensor, ref: torch.Tensor, k: int, self_offset: int | None):
    """k nearest rows of ``ref`` for each row of ``q`` (float64, no autograd).

    Returns (squared distances [Q, k] ascending, indices into ref [Q, k]). If
    ``self_offset`` is given, q[i] is ref[self_offset + i] and is excluded.

    Candidates come from the fast ‖a‖² + ‖b‖² − 2ab formula on centred data; the best
    k + 8 are then re-scored with exact differences, so round-off cancellation cannot
    turn a tiny true distance into 0 or mis-order close neighbours.
    """
    centre = ref.mean(0, keepdim=True)
    q = q - centre
    ref = ref - centre
    n_ref = ref.shape[0]
    avail = n_ref - (1 if self_offset is not None else 0)
    kk = min(k + _KNN_EXTRA, avail)
    rows = max(1, min(_KNN_BLOCK_ELEMS // max(1, n_ref), _KNN_BLOCK_ELEMS // max(1, kk * q.shape[1])))
    out_d = torch.empty(q.shape[0], k, dtype=torch.float64, device=q.device)
    out_i = torch.empty(q.shape[0], k, dtype=torch.long, device=q.device)
    for s in range(0, q.shape[0], rows):
        qb = q[s:s + rows]
        d2 = _sqdist_nograd(qb, ref)
        if self_offset is not None:
            i = torch.arange(d2.shape[0], device=q.device)
            d2[i, self_offset + s + i] = float("inf")
        cand = d2.topk(kk, dim=1, largest=False).indices
        exact = (qb[:, None, :] - ref[cand]).square().sum(-1)
        ex_sorted, order = exact.sort(dim=1)
        out_d[s:s + rows] = ex_sorted[:, :k]
        out_i[s:s + rows] = cand.gather(1, order[:, :k])
    return out_d, out_i


def _kth_nn_dist(q: torch.Tensor, ref: torch.Tensor, k: int, self_offset: int | None) -> torch.Tensor:
    """Euclidean distance from each row of q to its k-th nearest row of ref (float64)."""
    return _knn(q, ref, k, self_offset)[0][:, -1].sqrt()


def knn_kl_divergence(x_ND: torch.Tensor, y_MD: torch.Tensor, k: int = 1) -> float:
    """k-NN estimate of KL(P ‖ Q) from x ~ P and y ~ Q (Wang, Kulkarni & Verdú 2009).

    D̂ = (d/n) Σ_{i=1}^n log(ν_k(i) / ρ_k(i)) + log(m / (n − 1)), where ρ_k(i) is the
    Euclidean distance from x_i to its k-th nearest neighbour among the other x's and
    ν_k(i) the distance from x_i to its k-th nearest neighbour among the y's.
    Asymptotically unbiased and mean-square consistent for fixed k; P and Q must have
    densities (continuous data).

    Args:
        x_ND: [n, d] samples from P (n >= k + 1).
        y_MD: [m, d] samples from Q (m >= k).
        k: neighbour order >= 1.

    Returns:
        python float (natural log; may be slightly negative from estimation noise).

    Raises:
        ValueError: shapes/dims, NaN/inf, too few samples, or duplicated points giving a
            zero neighbour distance (the estimator needs continuous data).
    """
    k = check_int(k, "k", 1)
    x = _samples(x_ND, "x_ND", 2)
    y = _samples(y_MD, "y_MD", 1)
    _same_dim(x, y, "x_ND", "y_MD")
    n, d = x.shape
    m = y.shape[0]
    if n < k + 1:
        raise ValueError(f"x_ND needs at least k + 1 = {k + 1} rows for k = {k}, got {n}")
    if m < k:
        raise ValueError(f"y_MD needs at least k = {k} rows, got {m}")
    x64, y64 = f64(x.detach()), f64(y.detach())
    rho = _kth_nn_dist(x64, x64, k, self_offset=0)
    nu = _kth_nn_dist(x64, y64, k, self_offset=None)
    if bool((rho == 0).any()):
        raise ValueError(
            f"x_ND has duplicated points (zero distance to the {k}-th neighbour within x_ND); "
            "the k-NN estimator requires continuous, distinct samples"
        )
    if bool((nu == 0).any()):
        raise ValueError(
            f"some x_ND points coincide with y_MD points (zero {k}-th neighbour distance); "
            "the k-NN estimator requires continuous, distinct samples"
        )
    return float((d / n) * (nu.log() - rho.log()).sum() + math.log(m / (n - 1)))


def nnr_divergence(
    x_ND: torch.Tensor,
    y_MD: torch.Tensor,
    k: int | None = None,
    kind: str | Callable[[torch.Tensor], torch.Tensor] = "kl",
    alpha: float = 2.0,
) -> float:
    """Nearest-neighbour-ratio (NNR) divergence estimate of D(P ‖ Q), x ~ P, y ~ Q.

    Base estimator of Noshad, Moon, Sekeh & Hero (ISIT 2017). With X = x (N points,
    density f1), Y = y (M points, density f2), η = M / N and Z = X ∪ Y: for each Y_i take
    its k nearest neighbours in Z \\ {Y_i}; N_i of them are X points, M_i = k − N_i are Y
    points. The ratio η N_i / (M_i + 1) estimates the likelihood ratio f1/f2 at Y_i
    (for N_i ~ Binomial(k, π), E[N_i/(k − N_i + 1)] = (π − π^{k+1})/(1 − π), so the
    +1 keeps the ratio finite while staying unbiased up to π^{k+1}). Then

        f-divergence   D̂_g = (1/M) Σ_i g(η N_i / (M_i + 1))        (D_g = ∫ g(f1/f2) f2)
        ``kind="kl"``:  g(t) = t log t, giving KL(P ‖ Q);
        ``kind="renyi"``: (1/(α−1)) log[(1/M) Σ_i (η N_i / (M_i + 1))^α], the Rényi-α
                        divergence D_α(P ‖ Q) = (1/(α−1)) log ∫ f1^α f2^{1−α};
        callable ``kind``: a convex g with g(1) = 0 applied elementwise to the ratios.

    Not implemented: the paper's thresholded g̃ (which needs known density bounds
    C_L, C_U) and its weighted ensemble over several k (which removes the O(k/N)^{γ/d}
    bias terms). Consequently this base estimator is consistent only as k -> ∞ with
    k / N -> 0, and at finite k it has a noticeable bias (variance of the count ratio
    inflates convex g); it is coarser than :func:`knn_kl_divergence` at moderate N.

    Args:
        x_ND: [N, D] samples from P; y_MD: [M, D] samples from Q (M >= 2).
        k: number of neighbours (1 <= k <= N + M − 1); default round(sqrt(M)).
        kind: ``"kl"``, ``"renyi"`` or a callable g.
        alpha: Rényi order (> 0, != 1), used only for ``kind="renyi"``.

    Returns:
        python float (natural log). Always finite for ``"kl"`` (ratios are bounded by
        η k); for ``"renyi"`` with α < 1 it is +inf if no Y point has an X neighbour.
    """
    x = _samples(x_ND, "x_ND", 1)
    y = _samples(y_MD, "y_MD", 2)
    _same_dim(x, y, "x_ND", "y_MD")
    n, m = x.shape[0], y.shape[0]
    if k is None:
        k = max(1, int(round(math.sqrt(m))))
    k = check_int(k, "k", 1)
    if k > n + m - 1:
        raise ValueError(f"k must be <= N + M - 1 = {n + m - 1} (neighbours available), got {k}")
    if isinstance(kind, str):
        if kind not in ("kl", "renyi"):
            raise ValueError(f"kind must be 'kl', 'renyi' or a callable g, got {kind!r}")
        if kind == "renyi":
            af = float(alpha)
            if math.isnan(af) or math.isinf(af) or af <= 0 or af == 1.0:
                raise ValueError(f"alpha must be a finite float > 0 and != 1 for kind='renyi', got {alpha!r}")
    elif not callable(kind):
        raise ValueError(f"kind must be 'kl', 'renyi' or a callable g, got {kind!r}")

    z = torch.cat([f64(x.detach()), f64(y.detach())], 0)
    _, idx = _knn(z[n:], z, k, self_offset=n)  # Y_i itself (row n + i of z) excluded
    counts_x = (idx < n).sum(1).to(torch.float64)
    ratio = (m / n) * counts_x / (k - counts_x + 1.0)
    if kind == "kl":
        return float(torch.xlogy(ratio, ratio).mean())
    if kind == "renyi":
        af = float(alpha)
        return float(torch.log(ratio.pow(af).mean()) / (af - 1.0))
    return float(torch.as_tensor(kind(ratio), dtype=torch.float64).mean())
