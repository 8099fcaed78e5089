"""Tests for divmoe.diversity (Vendi, CKA, divergences).

Reference packages, used only where installed (tests skip otherwise):
``vendi-score`` (vendi_score.vendi), ``POT`` (ot), ``scipy``.
"""

from __future__ import annotations

import math

import pytest
import torch

from divmoe.diversity import (
    cauchy_schwarz_divergence,
    gaussian_kl,
    js_divergence,
    kl_divergence,
    knn_kl_divergence,
    linear_cka,
    median_bandwidth,
    mmd2,
    nnr_divergence,
    pairwise_cka,
    sinkhorn_distance,
    sinkhorn_divergence,
    vendi_from_eigenvalues,
    vendi_from_features,
    vendi_from_similarity,
)

F64 = torch.float64
INF = float("inf")


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    """These problems are small; one intra-op thread avoids OpenMP spin-wait blowups
    on a loaded 2-core machine. Restored afterwards."""
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def cosine_kernel(x: torch.Tensor) -> torch.Tensor:
    xn = x / x.norm(dim=1, keepdim=True)
    return xn @ xn.T


# =======================================================================================
# Vendi
# =======================================================================================

QS = [0.0, 0.5, 1.0, 2.0, INF]


@pytest.mark.parametrize("q", QS)
def test_vendi_identical_items_is_one(q):
    assert vendi_from_similarity(torch.ones(7, 7), q=q) == pytest.approx(1.0, abs=1e-9)
    x = torch.randn(1, 5, generator=gen(0)).repeat(9, 1)
    assert vendi_from_features(x, q=q) == pytest.approx(1.0, abs=1e-9)


@pytest.mark.parametrize("q", QS)
def test_vendi_orthogonal_items_is_n(q):
    assert vendi_from_similarity(torch.eye(6), q=q) == pytest.approx(6.0, rel=1e-9)
    # orthonormal rows, N < D and scaled rows (normalisation removes the scale)
    Q, _ = torch.linalg.qr(torch.randn(16, 16, generator=gen(1), dtype=F64))
    x = Q[:5] * torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0], dtype=F64)[:, None]
    assert vendi_from_features(x, q=q) == pytest.approx(5.0, rel=1e-9)
    # N > D path: each basis direction repeated 10 times -> D effective items
    xr = torch.eye(4, dtype=F64).repeat(10, 1)
    assert vendi_from_features(xr, q=q) == pytest.approx(4.0, rel=1e-9)


@pytest.mark.parametrize("q", QS)
def test_vendi_block_clusters(q):
    # m clusters of identical items (equal sizes) -> all orders give m
    k = torch.block_diag(*[torch.ones(3, 3, dtype=F64)] * 4)
    assert vendi_from_similarity(k, q=q) == pytest.approx(4.0, rel=1e-9)


def _spectrum(k):
    return torch.linalg.eigvalsh(k.to(F64)) / k.shape[0]


def test_vendi_shannon_value_and_q_to_1_limit():
    k = cosine_kernel(torch.randn(40, 6, generator=gen(2), dtype=F64))
    lam = _spectrum(k).clamp_min(0)
    lam = lam[lam > 1e-12]
    shannon = math.exp(float(-(lam * lam.log()).sum()))
    assert vendi_from_similarity(k) == pytest.approx(shannon, rel=1e-10)
    for dq in (1e-3, 1e-5):
        assert vendi_from_similarity(k, q=1 - dq) == pytest.approx(shannon, rel=10 * dq)
        assert vendi_from_similarity(k, q=1 + dq) == pytest.approx(shannon, rel=10 * dq)


def test_vendi_q0_counts_rank_and_qinf_is_inverse_max_eigenvalue():
    x = torch.randn(30, 5, generator=gen(3), dtype=F64)
    k = cosine_kernel(x)
    assert vendi_from_similarity(k, q=0) == 5.0
    assert vendi_from_similarity(k.float(), q=0) == 5.0  # float32 round-off eigenvalues ignored
    assert vendi_from_features(x, q=0) == 5.0
    assert vendi_from_features(x[:4], q=0) == 4.0
    lam_max = float(_spectrum(k).max())
    assert vendi_from_similarity(k, q=INF) == pytest.approx(1.0 / lam_max, rel=1e-10)
    assert vendi_from_similarity(k, q=1e4) == pytest.approx(1.0 / lam_max, rel=1e-3)


def test_vendi_nonincreasing_in_q():
    for seed in range(3):
        k = cosine_kernel(torch.randn(25, 8, generator=gen(10 + seed), dtype=F64) + 0.5 * seed)
        vals = [vendi_from_similarity(k, q=q) for q in (0, 0.1, 0.25, 0.5, 0.9, 1, 1.1, 2, 3, 10, 100, INF)]
        assert all(b <= a * (1 + 1e-12) for a, b in zip(vals, vals[1:])), vals
        assert 1.0 <= vals[-1] and vals[0] <= 25


@pytest.mark.parametrize("n,d", [(300, 12), (12, 64), (30, 45)])
@pytest.mark.parametrize("q", [0.0, 0.5, 1.0, 2.0, INF])
def test_vendi_features_path_equals_similarity_path(n, d, q):
    x = torch.randn(n, d, generator=gen(4), dtype=F64)
    x[: n // 3] += 2.0  # some structure, not isotropic
    a = vendi_from_features(x, q=q)
    b = vendi_from_similarity(cosine_kernel(x), q=q)
    assert a == pytest.approx(b, rel=1e-9)
    # float32 input: D x D block products in float32, still agrees closely (q = 0 is
    # skipped: its default rank tolerance scales with eps(float32), by design)
    if q != 0.0:
        assert vendi_from_features(x.float(), q=q) == pytest.approx(b, rel=1e-5)


def test_vendi_normalize_false_and_eigenvalue_entry_point():
    x = torch.randn(50, 7, generator=gen(5), dtype=F64)
    xn = x / x.norm(dim=1, keepdim=True)
    assert vendi_from_features(xn, normalize=False) == pytest.approx(vendi_from_features(x), rel=1e-12)
    lam = _spectrum(cosine_kernel(x))
    assert vendi_from_eigenvalues(lam, q=2) == pytest.approx(vendi_from_similarity(cosine_kernel(x), q=2), rel=1e-9)


def test_vendi_large_features_finishes():
    x = torch.randn(100_000, 512, generator=gen(6))
    v = vendi_from_features(x)
    assert math.isfinite(v) and 1.0 <= v <= 512.0


def test_vendi_errors():
    with pytest.raises(ValueError, match="k_NN.*square"):
        vendi_from_similarity(torch.ones(3, 4))
    with pytest.raises(ValueError, match="k_NN.*square"):
        vendi_from_similarity(torch.ones(3))
    bad = torch.eye(3)
    bad[0, 1] = float("nan")
    with pytest.raises(ValueError, match="k_NN.*finite.*1 NaN"):
        vendi_from_similarity(bad)
    with pytest.raises(ValueError, match="q must be"):
        vendi_from_similarity(torch.eye(3), q=-0.5)
    with pytest.raises(ValueError, match="q must be"):
        vendi_from_similarity(torch.eye(3), q=float("nan"))
    with pytest.raises(ValueError, match="unit diagonal"):
        vendi_from_similarity(2 * torch.eye(3))
    asym = torch.eye(3)
    asym[0, 1] = 0.5
    with pytest.raises(ValueError, match="symmetric"):
        vendi_from_similarity(asym)
    not_psd = torch.tensor([[1.0, 0.9, -0.9], [0.9, 1.0, 0.9], [-0.9, 0.9, 1.0]])
    with pytest.raises(ValueError, match="positive semi-definite"):
        vendi_from_similarity(not_psd)
    with pytest.raises(ValueError, match="x_ND row 1 is all zeros"):
        vendi_from_features(torch.tensor([[1.0, 0.0], [0.0, 0.0]]))
    with pytest.raises(ValueError, match="x_ND must be a 2-D"):
        vendi_from_features(torch.ones(5))
    with pytest.raises(ValueError, match="x_ND.*finite"):
        vendi_from_features(torch.tensor([[1.0, INF]]))
    with pytest.raises(ValueError, match="unit L2 norm"):
        vendi_from_features(torch.ones(4, 3), normalize=False)
    with pytest.raises(TypeError):
        vendi_from_similarity([[1.0]])


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # vendi_score uses scipy.sparse.csr
def test_vendi_matches_vendi_score_package():
    vs = pytest.importorskip("vendi_score.vendi")
    for seed, (n, d) in enumerate([(60, 10), (20, 50)]):
        x = torch.randn(n, d, generator=gen(20 + seed), dtype=F64)
        x[: n // 2] += 1.5
        k = cosine_kernel(x)
        for q in (0.5, 1, 2, INF):
            ref = float(vs.score_K(k.numpy(), q="inf" if math.isinf(q) else q))
            assert vendi_from_similarity(k, q=q) == pytest.approx(ref, rel=1e-6)
            ref_dual = float(vs.score_dual(x.numpy(), q="inf" if math.isinf(q) else q))
            assert vendi_from_features(x, q=q) == pytest.approx(ref_dual, rel=1e-6)


# =======================================================================================
# CKA
# =======================================================================================


def _cka_hsic_reference(x, y):
    """Gram-matrix definition: HSIC(K,L)/sqrt(HSIC(K,K) HSIC(L,L)), H = I - 11^T/n."""
    n = x.shape[0]
    h = torch.eye(n, dtype=F64) - 1.0 / n
    kc = h @ (x @ x.T) @ h
    lc = h @ (y @ y.T) @ h
    return float((kc * lc).sum() / ((kc * kc).sum().sqrt() * (lc * lc).sum().sqrt()))


def test_cka_identity_and_invariances():
    x = torch.randn(500, 20, generator=gen(30), dtype=F64)
    Q, _ = torch.linalg.qr(torch.randn(20, 20, generator=gen(31), dtype=F64))
    assert linear_cka(x, x) == pytest.approx(1.0, abs=1e-12)
    assert linear_cka(x, x @ Q) == pytest.approx(1.0, abs=1e-10)
    assert linear_cka(x, 3.7 * x) == pytest.approx(1.0, abs=1e-12)
    assert linear_cka(x, -0.2 * (x @ Q) + 5.0) == pytest.approx(1.0, abs=1e-10)  # + translation
    y = torch.randn(500, 7, generator=gen(32), dtype=F64)
    z = y @ torch.randn(7, 7, generator=gen(33), dtype=F64)  # generic (non-orthogonal) map
    assert linear_cka(x, y) == pytest.approx(linear_cka(x @ Q * 2.0, y), rel=1e-10)
    assert linear_cka(y, z) < 1.0


def test_cka_independent_random_near_zero():
    x = torch.randn(4000, 10, generator=gen(34))
    y = torch.randn(4000, 12, generator=gen(35))
    assert linear_cka(x, y) < 0.03


@pytest.mark.parametrize("n,d1,d2", [(200, 8, 5), (6, 40, 30)])
def test_cka_matches_gram_definition(n, d1, d2):
    x = torch.randn(n, d1, generator=gen(36), dtype=F64)
    y = x[:, :1] * torch.randn(1, d2, generator=gen(37), dtype=F64) + torch.randn(n, d2, generator=gen(38), dtype=F64)
    assert linear_cka(x, y) == pytest.approx(_cka_hsic_reference(x, y), rel=1e-10)


def test_pairwise_cka():
    base = torch.randn(300, 6, generator=gen(39), dtype=F64)
    reps = [base, 2 * base, torch.randn(300, 9, generator=gen(40), dtype=F64), base[:, :3]]
    m = pairwise_cka(reps)
    assert m.shape == (4, 4) and m.dtype == F64
    assert torch.allclose(m, m.T)
    assert torch.allclose(m.diagonal(), torch.ones(4, dtype=F64))
    assert m[0, 1] == pytest.approx(1.0, abs=1e-12)
    for i in range(4):
        for j in range(4):
            assert float(m[i, j]) == pytest.approx(linear_cka(reps[i], reps[j]), abs=1e-12)
    stacked = torch.randn(3, 100, 5, generator=gen(41))
    ms = pairwise_cka(stacked)
    assert float(ms[0, 2]) == pytest.approx(linear_cka(stacked[0], stacked[2]), abs=1e-12)


def test_cka_errors():
    with pytest.raises(ValueError, match="same number of rows"):
        linear_cka(torch.randn(10, 3), torch.randn(11, 3))
    with pytest.raises(ValueError, match="x_ND1.*finite"):
        linear_cka(torch.full((4, 2), float("nan")), torch.randn(4, 2))
    with pytest.raises(ValueError, match="y_ND2 has zero variance"):
        linear_cka(torch.randn(5, 2), torch.ones(5, 3))
    with pytest.raises(ValueError, match="y_ND2 must be a 2-D"):
        linear_cka(torch.randn(5, 2), torch.randn(5))
    with pytest.raises(ValueError, match=r"\[M, N, D\]"):
        pairwise_cka(torch.randn(5, 4))
    with pytest.raises(ValueError, match="reps\\[1\\] has 6"):
        pairwise_cka([torch.randn(5, 2), torch.randn(6, 2)])
    with pytest.raises(ValueError, match="empty"):
        pairwise_cka([])


# =======================================================================================
# discrete divergences
# =======================================================================================


def _binned_gaussian(mu, sigma, edges):
    cdf = torch.distributions.Normal(mu, sigma).cdf(edges)
    p = cdf[1:] - cdf[:-1]
    return p / p.sum()


EDGES = torch.linspace(-6, 6, 41, dtype=F64)


def test_kl_nonnegative_zero_iff_equal_and_batched():
    ps = torch.stack([_binned_gaussian(m, s, EDGES) for m, s in [(0.0, 1.0), (0.5, 1.0), (0.0, 2.0), (1.0, 0.7)]])
    kl = kl_divergence(ps[:, None, :], ps[None, :, :])  # [4, 4] all pairs
    assert kl.shape == (4, 4)
    assert torch.all(kl >= 0)
    assert torch.allclose(kl.diagonal(), torch.zeros(4, dtype=F64), atol=1e-14)
    off = kl[~torch.eye(4, dtype=torch.bool)]
    assert torch.all(off > 1e-3)
    # binned 1-D Gaussians, equal sigma: close to the continuous closed form (mu diff 0.5 -> 0.125)
    assert float(kl[0, 1]) == pytest.approx(0.125, rel=0.05)
    # mass where q has none -> inf; zeros in p are fine
    assert math.isinf(float(kl_divergence(torch.tensor([0.5, 0.5]), torch.tensor([1.0, 0.0]))))
    assert float(kl_divergence(torch.tensor([1.0, 0.0]), torch.tensor([0.5, 0.5]))) == pytest.approx(math.log(2))
    assert kl_divergence(torch.tensor([0.3, 0.7]), torch.tensor([0.5, 0.5])).dim() == 0


def test_js_bounds_symmetry_and_cs():
    g = gen(50)
    p = torch.softmax(torch.randn(64, 10, generator=g, dtype=F64) * 2, -1)
    q = torch.softmax(torch.randn(64, 10, generator=g, dtype=F64) * 2, -1)
    js = js_divergence(p, q)
    assert torch.all(js >= 0) and torch.all(js <= math.log(2))
    assert torch.allclose(js, js_divergence(q, p), atol=1e-15)
    assert torch.allclose(js_divergence(p, p), torch.zeros(64, dtype=F64), atol=1e-15)
    disjoint = js_divergence(torch.tensor([1.0, 0.0], dtype=F64), torch.tensor([0.0, 1.0], dtype=F64))
    assert float(disjoint) == pytest.approx(math.log(2), abs=1e-12)
    cs = cauchy_schwarz_divergence(p, q)
    assert torch.all(cs >= 0) and torch.all(cs > 0)
    assert torch.allclose(cs, cauchy_schwarz_divergence(q, p), atol=1e-14)
    assert torch.allclose(cauchy_schwarz_divergence(p, p), torch.zeros(64, dtype=F64), atol=1e-12)
    assert math.isinf(float(cauchy_schwarz_divergence(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0]))))
    # hand value: p=(1,0), q=(.5,.5): -log(.5 / sqrt(1 * .5)) = 0.5 log 2
    assert float(cauchy_schwarz_divergence(torch.tensor([1.0, 0.0]), torch.tensor([0.5, 0.5]))) == pytest.approx(
        0.5 * math.log(2)
    )


def test_discrete_divergences_match_scipy():
    pytest.importorskip("scipy")
    from scipy.spatial.distance import jensenshannon
    from scipy.special import rel_entr

    g = gen(51)
    p = torch.softmax(torch.randn(12, generator=g, dtype=F64), -1)
    q = torch.softmax(torch.randn(12, generator=g, dtype=F64), -1)
    assert float(kl_divergence(p, q)) == pytest.approx(float(rel_entr(p.numpy(), q.numpy()).sum()), rel=1e-12)
    assert float(js_divergence(p, q)) == pytest.approx(float(jensenshannon(p.numpy(), q.numpy())) ** 2, rel=1e-10)


def test_discrete_divergences_dtype_and_grad():
    logits = torch.randn(3, 5, requires_grad=True)
    p = torch.softmax(logits, -1)
    q = torch.full((5,), 0.2)
    out = kl_divergence(p, q)
    assert out.dtype == torch.float32 and out.shape == (3,)
    out.sum().backward()
    assert torch.isfinite(logits.grad).all()


def test_discrete_divergence_errors():
    with pytest.raises(ValueError, match="p must sum to 1"):
        kl_divergence(torch.tensor([0.5, 0.6]), torch.tensor([0.5, 0.5]))
    with pytest.raises(ValueError, match="q must be a probability vector.*>= 0"):
        js_divergence(torch.tensor([0.5, 0.5]), torch.tensor([1.5, -0.5]))
    with pytest.raises(ValueError, match="same number of categories"):
        cauchy_schwarz_divergence(torch.tensor([0.5, 0.5]), torch.tensor([0.2, 0.3, 0.5]))
    with pytest.raises(ValueError, match="p must contain only finite"):
        kl_divergence(torch.tensor([float("nan"), 1.0]), torch.tensor([0.5, 0.5]))
    with pytest.raises(ValueError, match="broadcast"):
        kl_divergence(torch.full((2, 4), 0.25), torch.full((3, 4), 0.25))


# =======================================================================================
# Gaussian KL
# =======================================================================================


def test_gaussian_kl_1d_hand_formula():
    mu0, s0, mu1, s1 = 0.3, 0.8, -1.1, 1.7
    hand = math.log(s1 / s0) + (s0**2 + (mu0 - mu1) ** 2) / (2 * s1**2) - 0.5
    t = lambda v: torch.tensor([v], dtype=F64)  # noqa: E731
    val = gaussian_kl(t(mu0), t(s0**2)[:, None], t(mu1), t(s1**2)[:, None])
    assert val.dim() == 0 and float(val) == pytest.approx(hand, rel=1e-12)
    assert float(gaussian_kl(t(mu0), t(s0**2)[:, None], t(mu0), t(s0**2)[:, None])) == pytest.approx(0.0, abs=1e-14)


def test_gaussian_kl_matches_torch_distributions():
    g = gen(60)
    a = torch.randn(4, 4, generator=g, dtype=F64)
    b = torch.randn(4, 4, generator=g, dtype=F64)
    c0, c1 = a @ a.T + 0.5 * torch.eye(4, dtype=F64), b @ b.T + 0.5 * torch.eye(4, dtype=F64)
    m0, m1 = torch.randn(4, generator=g, dtype=F64), torch.randn(4, generator=g, dtype=F64)
    ref = torch.distributions.kl_divergence(
        torch.distributions.MultivariateNormal(m0, c0), torch.distributions.MultivariateNormal(m1, c1)
    )
    assert float(gaussian_kl(m0, c0, m1, c1)) == pytest.approx(float(ref), rel=1e-10)


def test_gaussian_kl_errors():
    with pytest.raises(ValueError, match="cov1 must be symmetric positive definite"):
        gaussian_kl(torch.zeros(2), torch.eye(2), torch.zeros(2), torch.tensor([[1.0, 2.0], [2.0, 1.0]]))
    with pytest.raises(ValueError, match=r"cov0 must be \[D, D\] = \[2, 2\]"):
        gaussian_kl(torch.zeros(2), torch.eye(3), torch.zeros(2), torch.eye(2))
    with pytest.raises(ValueError, match=r"mu1 must be \[D\]"):
        gaussian_kl(torch.zeros(2), torch.eye(2), torch.zeros(3), torch.eye(2))


# =======================================================================================
# sample-based estimators
# =======================================================================================


def _gauss_pair(n, m, shift, seed, d=1):
    g = gen(seed)
    x = torch.randn(n, d, generator=g, dtype=F64)
    y = torch.randn(m, d, generator=g, dtype=F64) + shift
    return x, y


def test_knn_kl_close_to_gaussian_kl():
    # KL(N(0,1) || N(1,1)) = 0.5; std of the estimator at n = m = 3000 is ~0.02-0.035
    x, y = _gauss_pair(3000, 3000, 1.0, seed=70)
    true = float(gaussian_kl(torch.zeros(1, dtype=F64), torch.eye(1, dtype=F64), torch.ones(1, dtype=F64), torch.eye(1, dtype=F64)))
    assert true == pytest.approx(0.5)
    for k in (1, 5):
        assert knn_kl_divergence(x, y, k=k) == pytest.approx(true, abs=0.1)
    # 2-D, scale + shift: KL = 0.1904
    g = gen(71)
    x2 = torch.randn(3000, 2, generator=g, dtype=F64)
    y2 = 1.3 * torch.randn(3000, 2, generator=g, dtype=F64) + torch.tensor([0.5, 0.0], dtype=F64)
    true2 = float(gaussian_kl(torch.zeros(2, dtype=F64), torch.eye(2, dtype=F64), torch.tensor([0.5, 0.0], dtype=F64), 1.69 * torch.eye(2, dtype=F64)))
    assert knn_kl_divergence(x2, y2, k=5) == pytest.approx(true2, abs=0.08)
    # same distribution -> near 0
    x3, y3 = _gauss_pair(3000, 2000, 0.0, seed=72)
    assert abs(knn_kl_divergence(x3, y3, k=5)) < 0.08


def test_knn_kl_matches_scipy_kdtree_formula():
    spatial = pytest.importorskip("scipy.spatial")
    import numpy as np

    x, y = _gauss_pair(400, 300, 0.7, seed=73, d=3)
    n, d = x.shape
    for k in (1, 3):
        rho = spatial.cKDTree(x.numpy()).query(x.numpy(), k + 1)[0][:, -1]
        nu = spatial.cKDTree(y.numpy()).query(x.numpy(), [k])[0][:, -1]
        ref = d / n * np.log(nu / rho).sum() + np.log(y.shape[0] / (n - 1))
        assert knn_kl_divergence(x, y, k=k) == pytest.approx(float(ref), rel=1e-10)


def test_nnr_counts_match_brute_force():
    g = gen(74)
    x = torch.randn(37, 2, generator=g, dtype=F64)
    y = torch.randn(23, 2, generator=g, dtype=F64) + 0.5
    k = 6
    z = torch.cat([x, y])
    ratios = []
    for i in range(23):
        d = (z - y[i]).norm(dim=1)
        d[37 + i] = INF
        nn = d.argsort()[:k]
        n_i = int((nn < 37).sum())
        ratios.append((23 / 37) * n_i / (k - n_i + 1))
    r = torch.tensor(ratios, dtype=F64)
    assert nnr_divergence(x, y, k=k) == pytest.approx(float(torch.xlogy(r, r).mean()), rel=1e-12)
    assert nnr_divergence(x, y, k=k, kind="renyi", alpha=2.0) == pytest.approx(float(r.pow(2).mean().log()), rel=1e-12)
    hell = lambda t: (t.sqrt() - 1).square()  # noqa: E731  (squared-Hellinger-type g)
    assert nnr_divergence(x, y, k=k, kind=hell) == pytest.approx(float(hell(r).mean()), rel=1e-12)


def test_nnr_estimates_gaussian_divergences():
    # 1-D, unit variances, shift 0.7: KL = 0.245, Renyi-2 = 0.49. The base NNR
    # estimator (no ensemble bias correction) is within ~0.05 here at N = M = 3000.
    x, y = _gauss_pair(3000, 3000, 0.7, seed=75)
    assert nnr_divergence(x, y) == pytest.approx(0.245, abs=0.1)
    assert nnr_divergence(x, y, kind="renyi", alpha=2.0) == pytest.approx(0.49, abs=0.15)
    x0, y0 = _gauss_pair(3000, 3000, 0.0, seed=76)
    assert abs(nnr_divergence(x0, y0)) < 0.08
    assert nnr_divergence(x, y) > nnr_divergence(x0, y0) + 0.1


def test_mmd2():
    x, y_same = _gauss_pair(400, 300, 0.0, seed=80, d=3)
    _, y_shift = _gauss_pair(400, 300, 1.0, seed=81, d=3)
    same = float(mmd2(x, y_same))
    shifted = float(mmd2(x, y_shift))
    assert abs(same) < 0.01
    assert shifted > 0.1 and shifted > 20 * abs(same)
    # explicit unbiased formula with a fixed bandwidth on a tiny sample
    xs, ys = x[:5], y_shift[:4]
    sig = 1.3
    kf = lambda a, b: math.exp(-float((a - b).square().sum()) / (2 * sig * sig))  # noqa: E731
    kxx = sum(kf(xs[i], xs[j]) for i in range(5) for j in range(5) if i != j) / 20
    kyy = sum(kf(ys[i], ys[j]) for i in range(4) for j in range(4) if i != j) / 12
    kxy = sum(kf(xs[i], ys[j]) for i in range(5) for j in range(4)) / 20
    assert float(mmd2(xs, ys, bandwidth=sig)) == pytest.approx(kxx + kyy - 2 * kxy, rel=1e-12)
    # median heuristic = median pairwise distance
    z = torch.cat([xs, ys])
    d = torch.cdist(z, z)
    iu = torch.triu_indices(9, 9, 1)
    assert median_bandwidth(xs, ys) == pytest.approx(float(d[iu[0], iu[1]].median()), rel=1e-12)
    # differentiable
    xg = x[:50].clone().float().requires_grad_(True)
    mmd2(xg, y_shift[:40].float()).backward()
    assert torch.isfinite(xg.grad).all() and xg.grad.abs().sum() > 0


def test_sinkhorn_divergence_zero_for_identical_and_grows_with_shift():
    g = gen(90)
    x = torch.randn(150, 2, generator=g, dtype=F64)
    assert abs(float(sinkhorn_divergence(x, x.clone(), epsilon=0.5))) < 1e-9
    # small epsilon relative to the cost range: the x-y solve stops at `iters` (warned)
    with pytest.warns(RuntimeWarning, match="Sinkhorn did not reach tol"):
        assert abs(float(sinkhorn_divergence(x, x.clone(), epsilon=0.1))) < 1e-5
    shifts = (0.25, 0.5, 1.0, 2.0)
    vals = [float(sinkhorn_divergence(x, x + torch.tensor([s, 0.0], dtype=F64), epsilon=0.5)) for s in shifts]
    assert all(b > a for a, b in zip(vals, vals[1:]))
    # for a pure translation t and p = 2 the debiased divergence equals |t|^2 for any
    # epsilon (the cross term -2<x_i - y_j, t> is absorbed by the potentials)
    for s, v in zip(shifts, vals):
        assert v == pytest.approx(s * s, rel=1e-4)
    y = torch.randn(120, 2, generator=g, dtype=F64) * 1.5
    assert float(sinkhorn_divergence(x, y)) > 0
    assert float(sinkhorn_divergence(x, y, p=1, epsilon=0.2)) > 0
    xg = x.clone().float().requires_grad_(True)
    sinkhorn_divergence(xg, y.float() + 1.0).backward()
    assert torch.isfinite(xg.grad).all() and xg.grad.abs().sum() > 0


def test_sinkhorn_divergence_gradient_matches_finite_differences():
    g = gen(93)
    x = torch.randn(8, 2, generator=g, dtype=F64)
    y = torch.randn(7, 2, generator=g, dtype=F64) + 0.5
    kw = dict(epsilon=0.3, iters=10000, tol=1e-13)
    xg = x.clone().requires_grad_(True)
    sinkhorn_divergence(xg, y, **kw).backward()
    h = 1e-6
    for i, j in [(0, 0), (3, 1), (7, 0)]:
        xp, xm = x.clone(), x.clone()
        xp[i, j] += h
        xm[i, j] -= h
        fd = float(sinkhorn_divergence(xp, y, **kw) - sinkhorn_divergence(xm, y, **kw)) / (2 * h)
        assert float(xg.grad[i, j]) == pytest.approx(fd, abs=1e-7)


def test_sinkhorn_distance_value_is_entropic_objective():
    g = gen(91)
    a = torch.softmax(torch.randn(12, generator=g, dtype=F64), 0)
    b = torch.softmax(torch.randn(9, generator=g, dtype=F64), 0)
    c = torch.rand(12, 9, generator=g, dtype=F64)
    eps = 0.05
    val, P = sinkhorn_distance(a, b, c, epsilon=eps, iters=5000, return_plan=True)
    assert torch.allclose(P.sum(1), a, atol=1e-8) and torch.allclose(P.sum(0), b, atol=1e-8)
    primal = (P * c).sum() + eps * (P * (P / (a[:, None] * b[None, :])).log()).sum()
    assert float(val) == pytest.approx(float(primal), rel=1e-8)
    # zero-weight bins are allowed
    a0 = torch.tensor([0.0] * 3 + [1.0 / 9] * 9, dtype=F64)
    v0, P0 = sinkhorn_distance(a0, b, c, epsilon=eps, return_plan=True)
    assert math.isfinite(float(v0)) and float(P0[:3].abs().sum()) == 0.0


def test_sinkhorn_matches_pot():
    ot = pytest.importorskip("ot")
    import numpy as np

    g = gen(92)
    a = torch.softmax(torch.randn(30, generator=g, dtype=F64), 0)
    b = torch.softmax(torch.randn(40, generator=g, dtype=F64), 0)
    c = torch.rand(30, 40, generator=g, dtype=F64)
    an, bn, cn = a.numpy(), b.numpy(), c.numpy()
    for eps in (0.5, 0.05):
        _, P = sinkhorn_distance(a, b, c, epsilon=eps, iters=5000, tol=1e-12, return_plan=True)
        P_ref = ot.sinkhorn(an, bn, cn, eps, numItermax=100000, stopThr=1e-13)
        assert np.abs(P.numpy() - P_ref).max() < 1e-8
        cost_ref = float(ot.sinkhorn2(an, bn, cn, eps, numItermax=100000, stopThr=1e-13))
        assert float((P * c).sum()) == pytest.approx(cost_ref, rel=1e-7)
    # small epsilon approaches exact OT (ot.emd2)
    _, P = sinkhorn_distance(a, b, c, epsilon=1e-3, iters=20000, return_plan=True)
    assert float((P * c).sum()) == pytest.approx(float(ot.emd2(an, bn, cn)), rel=1e-3)

    # debiased divergence rebuilt from POT plans (entropic value <P,C> + eps KL(P | a b^T))
    x = torch.randn(60, 2, generator=g, dtype=F64)
    y = torch.randn(50, 2, generator=g, dtype=F64) + 0.8
    eps = 0.5

    def ot_eps(u, v):
        wu, wv = np.full(len(u), 1 / len(u)), np.full(len(v), 1 / len(v))
        M = ot.dist(u.numpy(), v.numpy())  # squared Euclidean
        T = ot.sinkhorn(wu, wv, M, eps, numItermax=20000, stopThr=1e-12, method="sinkhorn_log")
        nz = T > 0
        return (T * M).sum() + eps * (T[nz] * np.log(T[nz] / np.outer(wu, wv)[nz])).sum()

    ref = ot_eps(x, y) - 0.5 * ot_eps(x, x) - 0.5 * ot_eps(y, y)
    assert float(sinkhorn_divergence(x, y, epsilon=eps, iters=5000, tol=1e-12)) == pytest.approx(ref, rel=1e-6)


def test_sample_estimator_errors():
    x = torch.randn(20, 2)
    with pytest.raises(ValueError, match="same feature dimension"):
        mmd2(x, torch.randn(20, 3))
    with pytest.raises(ValueError, match="bandwidth must be a positive"):
        mmd2(x, x, bandwidth=0.0)
    with pytest.raises(ValueError, match="y_MD must have at least 2 row"):
        mmd2(x, torch.randn(1, 2))
    with pytest.raises(ValueError, match="epsilon must be a positive"):
        sinkhorn_divergence(x, x, epsilon=-1)
    with pytest.raises(ValueError, match="p must be a finite cost exponent"):
        sinkhorn_divergence(x, x, p=0.5)
    with pytest.raises(ValueError, match="iters must be an int >= 1"):
        sinkhorn_divergence(x, x, iters=0)
    with pytest.raises(ValueError, match=r"cost must be \[N, M\] = \[3, 2\]"):
        sinkhorn_distance(torch.full((3,), 1 / 3), torch.full((2,), 0.5), torch.rand(2, 3))
    with pytest.raises(ValueError, match="b must sum to 1"):
        sinkhorn_distance(torch.full((3,), 1 / 3), torch.full((2,), 0.7), torch.rand(3, 2))
    with pytest.raises(ValueError, match="x_ND has duplicated points"):
        knn_kl_divergence(torch.cat([x, x[:1]]), torch.randn(10, 2))
    with pytest.raises(ValueError, match="x_ND needs at least k \\+ 1 = 6 rows"):
        knn_kl_divergence(x[:5], x, k=5)
    with pytest.raises(ValueError, match="k must be an int >= 1"):
        knn_kl_divergence(x, x, k=0)
    with pytest.raises(ValueError, match="x_ND.*finite"):
        knn_kl_divergence(torch.full((5, 2), INF), x)
    with pytest.raises(ValueError, match="kind must be"):
        nnr_divergence(x, x + 1, kind="tv")
    with pytest.raises(ValueError, match="alpha must be"):
        nnr_divergence(x, x + 1, kind="renyi", alpha=1.0)
    with pytest.raises(ValueError, match="k must be <= N \\+ M - 1"):
        nnr_divergence(x, x + 1, k=40)
