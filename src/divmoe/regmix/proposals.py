"""Mixtures to try and mixtures to search over: Dirichlet draws around the token prior.

RegMix's proposal distribution (seed 001; parameters as in the paper's released setup):
the prior is the domains' token shares sharpened by temperature 0.5 (``p ∝ share ** 0.5``);
each draw picks a strength ``s`` among 15 log-spaced values in [0.1, 5] and samples
``Dirichlet(s · p)`` (small s: mass on few domains; large s: close to the prior). Draws
where a domain's weight exceeds ``max_usage`` times its token share are rejected (it
would be repeated too often), weights below ``minimum`` are set to 0, the rest rounded
to multiples of ``minimum``, and near-duplicates (L1 distance ≤ ``dedup_tol``) dropped.
"""
from __future__ import annotations

import numpy as np

__all__ = ["token_prior", "draw_mixtures", "search_simplex"]

STRENGTHS = np.logspace(np.log10(0.1), np.log10(5.0), 15)


def token_prior(sizes: dict[str, int], temperature: float = 0.5) -> np.ndarray:
    """Token shares (sorted domain order) raised to ``temperature`` and renormalised."""
    share = np.array([sizes[d] for d in sorted(sizes)], dtype=np.float64)
    if share.sum() <= 0:
        raise ValueError("token_prior: every domain is empty")
    p = (share / share.sum()) ** temperature
    return p / p.sum()


def _dirichlet_draws(prior: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    strength = rng.choice(STRENGTHS, size=n)
    return np.stack([rng.dirichlet(np.maximum(prior * s, 1e-6)) for s in strength])


def draw_mixtures(sizes: dict[str, int], n: int, seed: int, minimum: float = 0.01,
                  max_usage: float = 15.0, dedup_tol: float = 1e-5,
                  oversample: int = 100) -> np.ndarray:
    """``n`` distinct mixtures [n, D] (sorted domain order, rows sum to 1); deterministic in seed.

    Steps: draw ``oversample · n`` Dirichlet proposals, reject over-used domains, zero and
    round at ``minimum``, de-duplicate, then pick ``n`` of the survivors at random.
    """
    if n < 1:
        raise ValueError(f"need at least one mixture, got n={n}")
    rng = np.random.default_rng(seed)
    share = np.array([sizes[d] for d in sorted(sizes)], dtype=np.float64)
    share = share / share.sum()
    bound = np.minimum(share * max_usage, 1.0)
    draws = _dirichlet_draws(token_prior(sizes), oversample * n, rng)
    draws = draws[(draws <= bound).all(1)]
    draws = np.where(draws < minimum, 0.0, draws)
    draws = draws[draws.sum(1) > 0]
    draws = draws / draws.sum(1, keepdims=True)
    draws = np.round(draws / minimum) * minimum
    draws = draws[draws.sum(1) > 0]
    draws = draws / draws.sum(1, keepdims=True)
    kept: list[np.ndarray] = []
    for row in draws[np.lexsort(draws.T)]:
        if not kept or np.abs(row - kept[-1]).sum() > dedup_tol:
            kept.append(row)
    if len(kept) < n:
        raise ValueError(f"only {len(kept)} distinct mixtures survived the rejection and "
                         f"de-duplication; ask for fewer than {n}")
    pick = rng.choice(len(kept), size=n, replace=False)
    return np.stack([kept[i] for i in sorted(pick)])


def search_simplex(predict, sizes: dict[str, int], seed: int, n_candidates: int = 100_000,
                   top_k: int = 100) -> tuple[np.ndarray, np.ndarray]:
    """RegMix's search: draw ``n_candidates`` mixtures from the proposal distribution, predict
    their loss with ``predict`` ([N, D] → [N]) and average the ``top_k`` lowest.
    Returns (chosen mixture [D], the top_k candidates [top_k, D])."""
    rng = np.random.default_rng(seed)
    cands = _dirichlet_draws(token_prior(sizes), n_candidates, rng)
    pred = np.asarray(predict(cands), dtype=np.float64)
    top = cands[np.argsort(pred, kind="stable")[:top_k]]
    chosen = top.mean(0)
    return chosen / chosen.sum(), top
