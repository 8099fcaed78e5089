"""Dirichlet-Prior Shaping Loss (DPSL: Mirvakhabova, Ehteshami Bejnordi et al. 2025,
"Dirichlet-Prior Shaping: Guiding Expert Specialization in Upcycled MoEs", arXiv 2510.01185).

Definition implemented. The paper shapes the *distribution over the batch* of the router's
probability vectors towards a target Dirichlet(α) prior. A Dirichlet's marginals are Betas,
p_k ~ Beta(α_k, A − α_k) with A = Σ_k α_k, and DPSL matches, for every expert k, the empirical
distribution of p_{t,k} over the batch's T tokens to that Beta. The matching criterion is the
one of the same group's Batch-Shaping loss (Ehteshami Bejnordi et al., ICLR 2020), a
Cramér–von Mises distance between the empirical CDF and the prior's CDF at the sorted values:

    L = (1/E) Σ_k (1/T) Σ_{i=1..T} ( F_k(p_{(i),k}) − i/(T+1) )²

where p_{(1),k} ≤ … ≤ p_{(T),k} are expert k's probabilities sorted over the tokens,
i/(T+1) the empirical CDF at the i-th of them, and F_k the CDF of Beta(α_k, A − α_k) (the
regularised incomplete beta function I_x(α_k, A − α_k)). The gradient reaches each p_{t,k}
through F_k, whose derivative is the Beta density. We could read the paper's summary (the
per-expert Beta marginals) but not its equations; the CDF matching is the Batch-Shaping
criterion, named here so that a reader can tell the two apart.

What it does: a symmetric α gives every expert the same marginal (balance); for routing that
is flatter than the prior (every p_{t,k} near 1/E — the "low-confidence, weakly differentiated
routing" of upcycled MoEs) the loss spreads each expert's probabilities over the batch, i.e.
makes routing more confident; for routing more peaked than the prior it pulls back. Smaller α
means a more peaked prior (Beta mass near 0 and 1); α_k larger than the others biases expert
k's share upwards (asymmetric priors).

It is a statistic of the batch, like aux_loss at micro-batch scope: T is the tokens of one
forward. F is evaluated by a fixed number of continued-fraction steps (no host reads; see
:func:`beta_cdf`).
"""

from __future__ import annotations

import math

import torch

from ..routing.plan import RoutingPlan

# Probabilities are kept this far inside (0, 1): the Beta density is infinite at an end where
# its parameter is below 1.
EPS = 1e-6
_TINY = 1e-300  # Lentz's guard against a zero denominator (float64)


def _beta_cf(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, steps: int) -> torch.Tensor:
    """Continued fraction of I_x(a, b) (modified Lentz), ``steps`` double steps; it converges
    fast for x < (a + 1)/(a + b + 2), which the caller ensures by symmetry."""
    qab, qap, qam = a + b, a + 1, a - 1

    def guard(v):
        return torch.where(v.abs() < _TINY, torch.full_like(v, _TINY), v)

    c = torch.ones_like(x)
    d = 1 / guard(1 - qab * x / qap)
    h = d
    for m in range(1, steps + 1):
        m2 = 2 * m
        for num in (m * (b - m) * x / ((qam + m2) * (a + m2)),
                    -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))):
            d = 1 / guard(1 + num * d)
            c = guard(1 + num / c)
            h = h * d * c
    return h


def cf_steps(alpha_E: torch.Tensor | list[float]) -> int:
    """Continued-fraction steps enough for float64 accuracy at these concentrations: the
    fraction needs O(√max(a, b)) steps (Numerical Recipes §6.4); the constants are checked
    against scipy in the tests."""
    alpha = [float(a) for a in alpha_E]
    return 16 + math.ceil(4 * math.sqrt(max(sum(alpha), 1.0)))


def beta_cdf(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, steps: int) -> torch.Tensor:
    """I_x(a, b), the CDF of Beta(a, b) at x (float64; x, a, b broadcast). Its value comes from
    the continued fraction without autograd; its gradient in x is the closed-form density
    x^(a−1)(1−x)^(b−1)/B(a, b). No gradient reaches a or b (the prior is fixed)."""
    x = x.clamp(EPS, 1 - EPS)
    log_beta = torch.lgamma(a) + torch.lgamma(b) - torch.lgamma(a + b)
    log_front = a * x.log() + b * torch.log1p(-x) - log_beta  # log x^a (1−x)^b / B(a, b)
    with torch.no_grad():
        xs = x.detach()
        a, b = a.expand_as(xs), b.expand_as(xs)
        # Below the switch point evaluate I_x(a, b) directly, above it as 1 − I_{1−x}(b, a).
        lower = xs < (a + 1) / (a + b + 2)
        cf = _beta_cf(torch.where(lower, xs, 1 - xs), torch.where(lower, a, b),
                      torch.where(lower, b, a), steps)
        front = log_front.detach().exp()
        value = torch.where(lower, front * cf / a, 1 - front * cf / b)
        density = (log_front.detach() - x.log() - torch.log1p(-x)).exp()
    return value + (x - xs) * density


def dirichlet_prior(plan: RoutingPlan, ctx=None) -> torch.Tensor:
    """DPSL: mean over experts of the Cramér–von Mises distance between expert k's routing
    probabilities over the batch and the Beta(α_k, A − α_k) marginal of the Dirichlet(α)
    prior (module docstring). ``ctx.dirichlet_alpha_E``: the concentrations (default all 1:
    the uniform prior on the simplex)."""
    probs_TE = plan.probs_TE
    T, E = probs_TE.shape
    alpha_E = getattr(ctx, "dirichlet_alpha_E", None)
    if alpha_E is None:
        alpha_E = torch.ones(E, dtype=torch.float64)
    if alpha_E.shape != (E,):
        raise ValueError(f"dirichlet_prior: concentration has shape {tuple(alpha_E.shape)}, "
                         f"expected ({E},)")
    steps = getattr(ctx, "dirichlet_cf_steps", None) or cf_steps(alpha_E.tolist())
    alpha_E = alpha_E.to(device=probs_TE.device, dtype=torch.float64)
    sorted_TE = probs_TE.to(torch.float64).sort(dim=0).values
    cdf_TE = beta_cdf(sorted_TE, alpha_E, alpha_E.sum() - alpha_E, steps)
    ecdf_T1 = torch.arange(1, T + 1, device=probs_TE.device, dtype=torch.float64)[:, None] / (T + 1)
    return (cdf_TE - ecdf_T1).square().mean().to(probs_TE.dtype)
