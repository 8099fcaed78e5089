"""Diversity and divergence metrics as plain torch functions.

* :mod:`.vendi` — Vendi score and its order-q family (Friedman & Dieng; Pasarkar & Dieng).
* :mod:`.cka` — linear CKA (Kornblith et al. 2019), single pair and pairwise matrix.
* :mod:`.divergence` — KL / JS / Cauchy–Schwarz between discrete distributions,
  closed-form Gaussian KL, unbiased RBF MMD², log-domain Sinkhorn OT and the debiased
  Sinkhorn divergence, k-NN KL (Wang, Kulkarni & Verdú 2009) and the NNR estimator
  (Noshad, Moon, Sekeh & Hero 2017).
"""

from .cka import linear_cka, pairwise_cka
from .divergence import (
    cauchy_schwarz_divergence,
    gaussian_kl,
    js_divergence,
    kl_divergence,
    knn_kl_divergence,
    median_bandwidth,
    mmd2,
    nnr_divergence,
    sinkhorn_distance,
    sinkhorn_divergence,
)
from .vendi import vendi_from_eigenvalues, vendi_from_features, vendi_from_similarity

__all__ = [
    "vendi_from_similarity",
    "vendi_from_features",
    "vendi_from_eigenvalues",
    "linear_cka",
    "pairwise_cka",
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
