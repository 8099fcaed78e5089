"""Mixtures: the sampler's re-weighting, the dynamic rule on a hand-computed case, RegMix's
proposals, regression and simplex search on synthetic loss surfaces, `divmoe mixture search`."""

import json
import math

import numpy as np
import pytest
import torch
import yaml

from divmoe.cli import main
from divmoe.data import Document, MixtureSampler
from divmoe.data.dynamic_mix import dynamic_update, redundancy_delta, routing_profiles
from divmoe.regmix import (cross_val_predictions, draw_mixtures, fit_and_search, make_regressor,
                           search_simplex, spearman, token_prior)
from divmoe.regmix.regression import lightgbm_available
from divmoe.train import load_config, train


def _docs():
    return [Document(f"{d}/{i}", d, (d * 7 + f" {i}\n") * 40) for d in ("aa", "bb", "cc") for i in range(3)]


# ----------------------------------------------------------------------------- sampler
def test_set_weights_changes_the_draws_and_keeps_batches_pure():
    s = MixtureSampler(_docs(), seq_len=16, seed=3)
    s.set_weights({"aa": 0.0, "bb": 1.0, "cc": 3.0})
    assert s.weights == pytest.approx({"aa": 0.0, "bb": 0.25, "cc": 0.75})
    _, dom = s.batch(5, 4000)
    freq = torch.bincount(dom, minlength=3).double() / 4000
    assert freq[0] == 0 and abs(float(freq[2]) - 0.75) < 0.03
    again = MixtureSampler(_docs(), seq_len=16, seed=3, weights={"bb": 1, "cc": 3})
    assert torch.equal(again.batch(5, 64)[0], s.batch(5, 64)[0])
    with pytest.raises(ValueError, match="unknown domain"):
        s.set_weights({"zz": 1.0})


def test_single_domain_batches_follow_the_weights_over_batches():
    """batch_domains=single: every batch is one domain (its rows are windows of it), drawn by
    the mixture weights across batches; pure in (seed, step) like the mixed sampler."""
    s = MixtureSampler(_docs(), seq_len=16, seed=3, weights={"aa": 1, "bb": 1, "cc": 2},
                       batch_domains="single")
    firsts = []
    for step in range(800):
        tokens, dom = s.batch(step, 4)
        assert bool((dom == dom[0]).all())
        allowed = set(s.domain_names[int(dom[0])] + "0123456789 \n")
        assert all(set(bytes(row.tolist()).decode()) <= allowed for row in tokens)
        firsts.append(int(dom[0]))
    freq = torch.bincount(torch.tensor(firsts), minlength=3).double() / 800
    assert torch.allclose(freq, torch.tensor([0.25, 0.25, 0.5], dtype=torch.float64), atol=0.05)
    again = MixtureSampler(_docs(), seq_len=16, seed=3, weights={"aa": 1, "bb": 1, "cc": 2},
                           batch_domains="single")
    assert torch.equal(again.batch(7, 4)[0], s.batch(7, 4)[0])
    mixed = MixtureSampler(_docs(), seq_len=16, seed=3, weights={"aa": 1, "bb": 1, "cc": 2})
    assert any(len(set(mixed.batch(step, 4)[1].tolist())) > 1 for step in range(10))
    with pytest.raises(ValueError, match="batch_domains='rows': expected one of mixed, single"):
        MixtureSampler(_docs(), seq_len=16, seed=3, batch_domains="rows")


def test_probe_windows_are_fixed_and_from_their_domain():
    s = MixtureSampler(_docs(), seq_len=16, seed=0)
    p = s.probe_windows(5)
    assert sorted(p) == ["aa", "bb", "cc"] and all(v.shape == (5, 16) for v in p.values())
    for d, w in p.items():
        text = bytes(w[0].tolist()).decode()
        assert text.startswith(d)  # the first window starts at the domain's first byte
    assert all(torch.equal(p[d], s.probe_windows(5)[d]) for d in p)


# ----------------------------------------------------------------------------- dynamic rule
def test_dynamic_update_hand_computed():
    # 3 domains, 1 layer, 2 experts: domains 0 and 1 route to expert 0 only, domain 2 to expert 1.
    counts_LED = torch.tensor([[[10, 4, 0], [0, 0, 7]]])            # [L=1, E=2, D=3]
    prof = routing_profiles(counts_LED)
    assert torch.allclose(prof, torch.tensor([[1.0, 0], [1, 0], [0, 1]], dtype=torch.float64))
    # cos sim rows [1,1,0], [1,1,0], [0,0,1]: δ = 1 − mean = [1/3, 1/3, 2/3]
    delta = redundancy_delta(prof)
    assert torch.allclose(delta, torch.tensor([1 / 3, 1 / 3, 2 / 3], dtype=torch.float64))
    # uniform start, η = 3: α ∝ [e, e, e²] = [1, 1, e] / (2 + e); c = 0.1: w = 0.9 α + 0.1/3
    w = dynamic_update(torch.full((3,), 1 / 3), prof, eta=3.0, smoothing=0.1)
    e = math.e
    expect = [0.9 / (2 + e) + 0.1 / 3, 0.9 / (2 + e) + 0.1 / 3, 0.9 * e / (2 + e) + 0.1 / 3]
    assert w.tolist() == pytest.approx(expect, abs=1e-12)
    assert w.tolist() == pytest.approx([0.22408, 0.22408, 0.55184], abs=1e-5)
    # identical routing: nothing to prefer, only the smoothing acts
    same = dynamic_update(torch.tensor([0.5, 0.3, 0.2]), torch.ones(3, 4), eta=10.0, smoothing=0.0)
    assert same.tolist() == pytest.approx([0.5, 0.3, 0.2])


def test_dynamic_profiles_normalise_each_layer():
    counts = torch.tensor([[[2, 0], [2, 6]], [[1, 3], [3, 1]]])     # [L=2, E=2, D=2]
    prof = routing_profiles(counts)
    assert prof.shape == (2, 4)
    assert torch.allclose(prof[0], torch.tensor([0.5, 0.5, 0.25, 0.75], dtype=torch.float64))
    assert torch.allclose(prof.reshape(2, 2, 2).sum(-1), torch.ones(2, 2, dtype=torch.float64))


TINY = ["model.d_model=16", "model.n_layers=1", "model.n_heads=2", "model.seq_len=32",
        "moe.num_experts=4", "moe.top_k=2", "moe.expert_hidden=16", "train.steps=8",
        "train.batch_size=4", "train.eval_every=4", "train.warmup_steps=1",
        "data.val_bytes_per_domain=512", "train.threads=1"]


def test_dynamic_run_logs_weights_and_resumes_exactly(tmp_path):
    cfg = TINY + ["data.mixing=dynamic", "data.mix_every=2", "data.mix_eta=50"]
    full = train(tmp_path / "a", load_config(None, cfg), progress=False, report=False)
    w = [r["mix_weights"] for r in full.metrics]
    assert len(w) == 3 and all(abs(sum(x.values()) - 1) < 1e-9 for x in w)
    assert w[0] != w[-1]                                             # the rule moved them
    assert min(w[-1].values()) >= 0.05 / len(w[-1]) - 1e-12          # smoothing floor
    train(tmp_path / "b", load_config(None, cfg), progress=False, report=False, stop_after=4)
    resumed = train(tmp_path / "b", None, resume=True, progress=False, report=False)
    assert [r["mix_weights"] for r in resumed.metrics] == w
    assert resumed.metrics[-1]["val_bpb"] == full.metrics[-1]["val_bpb"]
    static = train(tmp_path / "c", load_config(None, TINY), progress=False, report=False)
    assert static.metrics[0]["mix_weights"] == static.metrics[-1]["mix_weights"]
    with pytest.raises(ValueError, match="dense model"):
        train(tmp_path / "d", load_config(None, TINY + ["data.mixing=dynamic", "model.moe=false"]),
              progress=False, report=False)


# ----------------------------------------------------------------------------- RegMix
SIZES = {"a": 1000, "b": 4000, "c": 2500, "d": 2500}


def test_draw_mixtures_follow_the_paper_rules():
    W = draw_mixtures(SIZES, 40, seed=0)
    assert W.shape == (40, 4)
    assert np.allclose(W.sum(1), 1)
    assert ((W == 0) | (W >= 0.0095)).all()                          # nothing below `minimum`
    assert len({tuple(np.round(r, 6)) for r in W}) == 40              # de-duplicated
    assert np.array_equal(W, draw_mixtures(SIZES, 40, seed=0))
    assert not np.array_equal(W, draw_mixtures(SIZES, 40, seed=1))
    assert (W == 0).any() and (W.max(1) < 0.9).any()                # spread: sparse and mixed draws
    prior = token_prior(SIZES)
    assert prior == pytest.approx(np.sqrt([0.1, 0.4, 0.25, 0.25]) / np.sqrt([0.1, 0.4, 0.25, 0.25]).sum())
    tight = draw_mixtures({"a": 1, "b": 99}, 3, seed=0, max_usage=2.0)
    assert (tight[:, 0] <= 0.02 + 1e-9).all()                        # usage bound
    with pytest.raises(ValueError, match="distinct mixtures"):
        draw_mixtures({"a": 1, "b": 1}, 10_000, seed=0, oversample=1)


def test_spearman_matches_scipy():
    from scipy.stats import spearmanr

    rng = np.random.default_rng(0)
    a, b = rng.normal(size=30), rng.normal(size=30)
    b[:5] = b[5]                                                     # ties
    assert spearman(a, b) == pytest.approx(spearmanr(a, b).statistic)
    assert spearman(a, 2 * a + 1) == pytest.approx(1.0)


def test_linear_regression_recovers_a_linear_surface_and_cross_validates():
    X = draw_mixtures(SIZES, 40, seed=2)
    c = np.array([3.0, 2.0, 2.5, 4.0])
    y = X @ c
    assert make_regressor("linear").fit(X, y).coef_ == pytest.approx(c)
    oof = cross_val_predictions("linear", X, y)
    assert np.allclose(oof, y) and spearman(oof, y) > 0.999
    with pytest.raises(ValueError, match="unknown regressor"):
        make_regressor("forest")


def test_simplex_search_finds_a_known_interior_optimum():
    w_star = np.array([0.4, 0.3, 0.2, 0.1])
    chosen, top = search_simplex(lambda W: ((W - w_star) ** 2).sum(1), SIZES, seed=0)
    assert np.abs(chosen - w_star).max() < 0.03
    assert chosen.sum() == pytest.approx(1.0) and top.shape == (100, 4)


def test_fit_and_search_on_a_synthetic_surface():
    # loss falls fastest with domain b: every regressor ranks held-out mixtures right and the
    # search puts most weight on b
    X = draw_mixtures(SIZES, 48, seed=3)
    y = X @ np.array([3.0, 1.0, 2.5, 2.6]) + 0.001 * np.random.default_rng(0).normal(size=48)
    res = fit_and_search(X, y, SIZES, "linear", seed=0)
    assert res["regressors"]["linear"]["cv_spearman"] > 0.99
    assert res["regressor"] == "linear" and res["mixture"][1] > 0.8
    if lightgbm_available():
        assert res["regressors"]["lightgbm"]["cv_spearman"] > 0.5
        best = fit_and_search(X, y, SIZES, "best", seed=0)
        assert best["regressor"] == "linear"                         # the higher CV Spearman


def test_mixture_search_cli_end_to_end_and_resumes(tmp_path, capsys):
    out = tmp_path / "s"
    proxy = ["model.d_model=16", "model.n_layers=1", "model.n_heads=2", "moe.num_experts=4",
             "moe.expert_hidden=16", "train.steps=2", "train.eval_every=2", "train.batch_size=2",
             "train.warmup_steps=1", "data.val_bytes_per_domain=256", "train.eval_batch_size=8"]
    args = ["mixture", "search", "--out", str(out), "--proxies", "6", "--workers", "2",
            "--quiet", "--regressor", "linear"] + [a for kv in proxy for a in ("--proxy-set", kv)]
    assert main(args + ["--time-budget", "0"]) == 3                 # nothing may start
    assert "0 of 6 proxies finished" in capsys.readouterr().out
    assert main(args) == 0
    cfg = load_config(out / "mixture.yaml")
    assert sum(cfg.data.weights.values()) == pytest.approx(1.0, abs=1e-4)
    assert cfg.model.d_model == 128                                 # the proxy settings stay out
    res = json.loads((out / "search.json").read_text())
    assert len(res["rows"]) == 6 and res["fit"]["regressor"] == "linear"
    for f in ("predicted_vs_observed.png", "weights_vs_loss.png", "search.md"):
        assert (out / f).is_file()
    mtime = (out / "proxies" / "p000" / "summary.json").stat().st_mtime
    assert main(args) == 0                                            # resumed: nothing retrained
    assert (out / "proxies" / "p000" / "summary.json").stat().st_mtime == mtime
    assert main(args + ["--proxies", "7"]) == 2                       # other draws: refused
    assert "choose another --out" in capsys.readouterr().err
    assert main(["mixture", "search", "--out", str(tmp_path / "t"), "--target", "klingon"]) == 2
    assert "allowed" in capsys.readouterr().err
    yaml.safe_load((out / "mixture.yaml").read_text())
