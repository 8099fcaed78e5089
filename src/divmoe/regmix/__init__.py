"""RegMix (seed 001): choose a data mixture by regression over tiny proxy runs
(``divmoe mixture search``).

* :mod:`.proposals` — Dirichlet mixtures around the token prior; the simplex search.
* :mod:`.regression` — linear and LightGBM regressors, cross-validated rank correlation.
* :mod:`.runner` — proxies in parallel single-thread processes (resumable), fit, search,
  ``mixture.yaml``, plots.
"""
from .proposals import draw_mixtures, search_simplex, token_prior
from .regression import cross_val_predictions, make_regressor, spearman
from .runner import PROXY_DEFAULTS, fit_and_search, run_search

__all__ = ["PROXY_DEFAULTS", "cross_val_predictions", "draw_mixtures", "fit_and_search",
           "make_regressor", "run_search", "search_simplex", "spearman", "token_prior"]
