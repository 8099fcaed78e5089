"""Regressors from mixture weights to validation loss, and their cross-validated rank correlation.

``linear``: least squares ``loss ≈ w · c`` on the weights (the weights sum to 1, so this is
an affine model of the mixture). ``lightgbm``: gradient-boosted trees (optional dependency,
``pip install divmoe[regmix]``), settings for a few dozen points.
"""
from __future__ import annotations

import numpy as np

__all__ = ["REGRESSORS", "make_regressor", "spearman", "cross_val_predictions", "lightgbm_available"]


class LinearRegressor:
    name = "linear"

    def fit(self, X: np.ndarray, y: np.ndarray) -> "LinearRegressor":
        self.coef_, *_ = np.linalg.lstsq(np.asarray(X, float), np.asarray(y, float), rcond=None)
        return self

    def predict(self, X: np.ndarray) -> np.ndarray:
        return np.asarray(X, float) @ self.coef_


class LightGBMRegressor:
    name = "lightgbm"

    def __init__(self, seed: int = 0):
        self.seed = seed

    def fit(self, X: np.ndarray, y: np.ndarray) -> "LightGBMRegressor":
        import lightgbm

        self.model_ = lightgbm.LGBMRegressor(
            n_estimators=300, learning_rate=0.05, num_leaves=7, min_child_samples=3,
            subsample=1.0, colsample_bytree=1.0, random_state=self.seed, deterministic=True,
            force_row_wise=True, n_jobs=1, verbose=-1)
        self.model_.fit(np.asarray(X, float), np.asarray(y, float))
        return self

    def predict(self, X: np.ndarray) -> np.ndarray:
        return self.model_.predict(np.asarray(X, float))


REGRESSORS = ("linear", "lightgbm")


def lightgbm_available() -> bool:
    try:
        import lightgbm  # noqa: F401
    except ImportError:
        return False
    return True


def make_regressor(name: str, seed: int = 0):
    if name == "linear":
        return LinearRegressor()
    if name == "lightgbm":
        if not lightgbm_available():
            raise ValueError("regressor 'lightgbm' needs the lightgbm package "
                             "(pip install 'divmoe[regmix]'); allowed without it: linear")
        return LightGBMRegressor(seed)
    raise ValueError(f"unknown regressor {name!r}; allowed: {', '.join(REGRESSORS)}")


def _ranks(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n with ties given their average rank."""
    x = np.asarray(x, float)
    order = np.argsort(x, kind="stable")
    ranks = np.empty(len(x))
    ranks[order] = np.arange(1, len(x) + 1)
    for v in np.unique(x):
        tie = x == v
        if tie.sum() > 1:
            ranks[tie] = ranks[tie].mean()
    return ranks


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation (Pearson correlation of average ranks); nan if constant."""
    ra, rb = _ranks(a), _ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = np.sqrt((ra ** 2).sum() * (rb ** 2).sum())
    return float((ra * rb).sum() / denom) if denom > 0 else float("nan")


def cross_val_predictions(name: str, X: np.ndarray, y: np.ndarray, folds: int = 5,
                          seed: int = 0) -> np.ndarray:
    """Out-of-fold predictions: each point predicted by a regressor fitted without its fold."""
    n = len(y)
    if n < 2 * folds and n >= 4:
        folds = max(2, n // 2)
    if n < 4:
        raise ValueError(f"cross-validation needs at least 4 proxy runs, got {n}")
    idx = np.random.default_rng(seed).permutation(n)
    out = np.empty(n)
    for f in range(folds):
        test = idx[f::folds]
        train = np.setdiff1d(idx, test)
        out[test] = make_regressor(name, seed).fit(X[train], y[train]).predict(X[test])
    return out
