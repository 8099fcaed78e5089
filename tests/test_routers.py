"""The routers of issue 3: fast dispatch = reference, each router's invariant, gradients,
edge cases, config errors, and a 2-step LM smoke test per router."""

import dataclasses
import itertools
import math

import pytest
import torch

from divmoe.config import ConfigError
import divmoe.dispatch.grouped as dispatch_grouped
from divmoe.layer import MoE, MoEConfig
from divmoe.routing import ROUTERS, RoutingPlan
from divmoe.balance import tokens_per_expert_choice
from divmoe.routing.hash import hash_keys
from divmoe.routing.null_experts import null_usage_loss
from divmoe.routing.sinkhorn import sinkhorn_log

import equivalence
from equivalence import assert_same_forward_backward
from lm import train_steps

# Per router: config overrides that make it valid and exercise its options.
ROUTER_KW = {
    "topk": dict(num_experts=6, top_k=2),
    "expert_choice": dict(num_experts=6, top_k=2, capacity_factor=1.5),
    "dynamic_topp": dict(num_experts=6, top_k=4, top_p=0.6),
    "null_experts": dict(num_experts=6, top_k=4, num_null_experts=3,
                         balance=["aux_loss", "z_loss", "null_usage"]),
    "grouped": dict(num_experts=8, top_k=4, n_groups=2),
    "sinkhorn": dict(num_experts=6, top_k=2, sinkhorn_iters=50, sinkhorn_tol=1e-6),
    "hash": dict(num_experts=6, top_k=2),
    "hypersphere": dict(num_experts=6, top_k=2, router_dim=5, router_temperature=0.5),
    "dselect_k": dict(num_experts=6, top_k=2, dselect_gamma=1.0),
    "soft_merge": dict(num_experts=6, top_k=1),  # its own invariants: tests/test_soft_merge.py
    # 6 original rows onto 4 merged experts (rows 4, 5 share experts 0, 1): test_surgery.py
    "merged_topk": dict(num_experts=4, top_k=2, router_rows=6),
}
LEARNABLE = [r for r in ROUTER_KW if r != "hash"]


def test_every_registered_router_is_tested():
    assert set(ROUTER_KW) == set(ROUTERS)


def cfg(**kw):
    return MoEConfig(**{**dataclasses.asdict(MoEConfig()), **kw})


def pair(d, **kw):
    return equivalence.pair(d, dtype=torch.float64, **kw)


def token_ids(shape, vocab=50, seed=0):
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


def check_fast_equals_reference(fast, ref, x, ids, tol=1e-10):
    return assert_same_forward_backward(fast, ref, x, tol, tol, token_ids=ids, all_grads=False)


# ---------------------------------------------------------------- (a) fast == reference

@pytest.mark.parametrize("router", list(ROUTER_KW))
@pytest.mark.parametrize("seed", range(2))
def test_fast_matches_reference(router, seed):
    torch.manual_seed(seed)
    fast, ref = pair(10, router=router, expert_hidden=12, **ROUTER_KW[router])
    x = torch.randn(2, 13, 10, dtype=torch.float64)
    check_fast_equals_reference(fast, ref, x, token_ids((2, 13), seed=seed))


# ---------------------------------------------------------------- (c) gradients

@pytest.mark.parametrize("router", LEARNABLE)
def test_gradients_reach_router(router):
    torch.manual_seed(1)
    moe = MoE(8, router=router, balance=[], **{k: v for k, v in ROUTER_KW[router].items()
                                               if k != "balance"})
    out = moe(torch.randn(30, 8))
    out.output.square().sum().backward()
    for name, p in moe.router.named_parameters():
        assert p.grad is not None and float(p.grad.abs().sum()) > 0, name


# ---------------------------------------------------------------- (d) edge cases

@pytest.mark.parametrize("router", list(ROUTER_KW))
def test_single_token(router):
    torch.manual_seed(2)
    fast, ref = pair(6, router=router, **ROUTER_KW[router])
    out = check_fast_equals_reference(fast, ref, torch.randn(1, 6, dtype=torch.float64),
                                      torch.tensor([7]))
    assert out.stats.num_tokens == 1
    # the one token's routed slots (≤ k; some routers leave slots empty)
    assert int(out.stats.tokens_per_expert.sum()) == int((out.stats.expert_ids >= 0).sum()) <= \
        out.stats.expert_ids.shape[1]


@pytest.mark.parametrize("router,kw", [
    ("expert_choice", dict(top_k=1)), ("dynamic_topp", dict(top_k=1)),
    ("null_experts", dict(top_k=1, num_null_experts=1)), ("grouped", dict(top_k=1, n_groups=1)),
    ("sinkhorn", dict(top_k=1)), ("hash", dict(top_k=1)), ("hypersphere", dict(top_k=1)),
    ("dselect_k", dict(top_k=1)),
])
def test_one_expert(router, kw):
    torch.manual_seed(3)
    fast, ref = pair(5, router=router, num_experts=1, **kw)
    out = check_fast_equals_reference(fast, ref, torch.randn(9, 5, dtype=torch.float64),
                                      token_ids((9,)))
    if router != "null_experts":
        assert out.stats.tokens_per_expert.tolist() == [9]


@pytest.mark.parametrize("router", list(ROUTER_KW))
def test_no_tokens(router):
    moe = MoE(4, router=router, **ROUTER_KW[router])
    x = torch.randn(0, 4, requires_grad=True)
    out = moe(x, token_ids=torch.zeros(0, dtype=torch.long))
    assert out.output.shape == (0, 4) and out.stats.num_tokens == 0
    # An empty batch still gives every parameter a gradient, zero (never None: under DDP a
    # parameter without one is the unused-parameter trap).
    (out.output.sum() + out.aux_loss).backward()
    for name, p in moe.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and float(p.grad.abs().sum()) == 0.0, name


# ---------------------------------------------------------------- (b) invariants: expert_choice

@pytest.mark.parametrize("T,E,k,cf", [(40, 8, 2, 1.0), (5, 8, 1, 1.0), (3, 16, 2, 0.5),
                                      (17, 4, 3, 2.0), (10, 4, 4, 4.0)])
def test_expert_choice_each_expert_takes_exactly_C(T, E, k, cf):
    torch.manual_seed(T)
    moe = MoE(6, router="expert_choice", num_experts=E, top_k=k, capacity_factor=cf)
    x = torch.randn(T, 6)
    plan = moe.router(x)
    C = tokens_per_expert_choice(T, E, k, cf)
    assert C == max(1, min(T, round(cf * T * k / E)))
    assert plan.tokens_per_expert().tolist() == [C] * E
    ids = plan.expert_ids_TK
    per_token = (ids >= 0).sum(1)
    assert ids.shape[1] == max(1, int(per_token.max()))
    for t in range(T):  # no expert twice per token; weight = the token's score
        chosen = ids[t][ids[t] >= 0]
        assert len(set(chosen.tolist())) == len(chosen)
    scores = moe.router.gate(x).softmax(-1)
    filled = ids >= 0
    torch.testing.assert_close(plan.weights_TK[filled], scores.gather(1, ids.clamp_min(0))[filled])
    assert (plan.weights_TK[~filled] == 0).all()
    # Each expert took its C best-scoring tokens.
    for e in range(E):
        took = (ids == e).any(1)
        assert scores[took, e].min() >= scores[~took, e].max() if (~took).any() else True


# ---------------------------------------------------------------- dynamic_topp

def test_dynamic_topp_fewest_experts_reaching_p():
    torch.manual_seed(4)
    for p, k_max in [(0.3, 4), (0.6, 4), (0.9, 3), (1.0, 6)]:
        moe = MoE(8, router="dynamic_topp", num_experts=6, top_k=k_max, top_p=p,
                  renormalize=False)
        x = torch.randn(40, 8) * 3
        plan = moe.router(x)
        probs = plan.probs_TE.detach()
        counts = (plan.expert_ids_TK >= 0).sum(1)
        assert (counts >= 1).all() and (counts <= k_max).all()
        for t in range(40):
            # brute force: the smallest subset size whose best mass reaches p (capped at k_max)
            best = next((n for n in range(1, 7)
                         if max(sum(probs[t, list(c)]) for c in
                                itertools.combinations(range(6), n)) >= p), 6)
            assert int(counts[t]) == min(best, k_max)
            chosen = plan.expert_ids_TK[t][: counts[t]]
            assert set(chosen.tolist()) == set(probs[t].topk(int(counts[t])).indices.tolist())
            torch.testing.assert_close(plan.weights_TK[t][: counts[t]], probs[t, chosen])


def test_dynamic_topp_renormalised_weights_sum_to_one():
    moe = MoE(8, router="dynamic_topp", num_experts=6, top_k=3, top_p=0.5)
    plan = moe.router(torch.randn(20, 8))
    torch.testing.assert_close(plan.weights_TK.sum(-1), torch.ones(20))


# ---------------------------------------------------------------- null_experts

def test_null_slots_cost_no_expert_flops_and_are_counted(monkeypatch):
    torch.manual_seed(5)
    moe = MoE(8, router="null_experts", num_experts=4, num_null_experts=4, top_k=3,
              balance=["aux_loss", "null_usage"])
    with torch.no_grad():  # make null experts attractive so many slots choose them
        moe.router.gate.weight[4:] += 0.5
    rows = []
    real = dispatch_grouped.routed_swiglu
    monkeypatch.setattr(dispatch_grouped, "routed_swiglu",
                        lambda x, token_R, *a, **kw:
                        rows.append(len(token_R)) or real(x, token_R, *a, **kw))
    x = torch.randn(50, 8)
    out = moe(x)
    plan = moe.router(x)
    null = plan.null_slots_TK
    assert 0 < int(null.sum()) < null.numel()
    assert (plan.expert_ids_TK[null] == -1).all() and (plan.weights_TK[null] == 0).all()
    assert rows == [int((plan.expert_ids_TK >= 0).sum())] == [int(out.stats.tokens_per_expert.sum())]
    assert out.stats.null_slots == int(null.sum()) and out.stats.dropped_slots == 0
    assert out.stats.null_slots + int(out.stats.tokens_per_expert.sum()) == 50 * 3
    torch.testing.assert_close(plan.probs_TE.sum(-1), torch.ones(50))


def test_null_usage_loss_is_adamoe_switch_loss_over_extended_pool():
    torch.manual_seed(6)
    E, N, K, T = 4, 2, 3, 30
    moe = MoE(8, router="null_experts", num_experts=E, num_null_experts=N, top_k=K)
    x = torch.randn(T, 8)
    plan = moe.router(x)
    full = moe.router.gate(x).softmax(-1)
    choice = full.topk(K, -1).indices
    f = torch.bincount(choice.reshape(-1), minlength=E + N).float() / (T * K)
    # AdaMoE: null experts are interchangeable, they share their load and probability.
    f[E:] = f[E:].mean()
    P = full.mean(0)
    P[E:] = P[E:].mean()
    expected = (E + N) * (f * P).sum()
    torch.testing.assert_close(null_usage_loss(plan), expected)
    # Exactly on target (uniform real loads, null share τ) the loss is 1.
    for tau in (0.25, 0.5):
        moe2 = MoE(8, router="null_experts", num_experts=E, num_null_experts=N, top_k=K,
                   null_target=tau)
        p2 = moe2.router(x)
        T2 = 8
        ids = torch.arange(T2 * K).reshape(T2, K) % E
        p2 = dataclasses.replace(p2, expert_ids_TK=ids, null_slots_TK=torch.zeros_like(ids, dtype=torch.bool),
                                 probs_TE=torch.full((T2, E), 1 / E), null_prob_T=torch.full((T2,), tau))
        # f_null = 0 here, real loads f_e = 1/E: L = E/(1-τ) · Σ (1/E)(1-τ)/E = 1
        assert math.isclose(float(null_usage_loss(p2)), 1.0, rel_tol=1e-6)


def test_null_usage_gradient_lowers_null_probability_when_overused():
    torch.manual_seed(7)
    moe = MoE(8, router="null_experts", num_experts=4, num_null_experts=4, top_k=2,
              balance=["null_usage"], null_usage_weight=1.0, null_target=0.1)
    with torch.no_grad():
        moe.router.gate.weight[4:] += 1.0
    x = torch.rand(40, 8)
    before = float(moe.router(x).null_prob_T.detach().mean())
    opt = torch.optim.SGD(moe.router.parameters(), lr=1.0)
    for _ in range(20):
        opt.zero_grad()
        moe(x).aux_loss.backward()
        opt.step()
    assert float(moe.router(x).null_prob_T.detach().mean()) < before


# ---------------------------------------------------------------- grouped

def test_grouped_k_over_g_per_group_and_group_loads():
    torch.manual_seed(8)
    E, G, K, T = 12, 3, 6, 25
    moe = MoE(8, router="grouped", num_experts=E, top_k=K, n_groups=G)
    plan = moe.router(torch.randn(T, 8) * 4)
    groups = plan.expert_ids_TK // (E // G)
    for g in range(G):
        assert ((groups == g).sum(1) == K // G).all()
    load_G = plan.tokens_per_expert().view(G, E // G).sum(1)
    assert load_G.tolist() == [T * K // G] * G
    assert ((plan.expert_ids_TK.sort(1).values.diff(1)) > 0).all()  # distinct experts


# ---------------------------------------------------------------- sinkhorn

def test_sinkhorn_balanced_matrix_marginals():
    torch.manual_seed(9)
    T, E = 64, 8
    logits = torch.randn(T, E) * 3 + torch.linspace(0, 4, E)  # skewed
    for iters, tol in [(200, 1e-6), (30, 1e-3)]:
        log_pi, used = sinkhorn_log(logits, iters, tol)
        pi = log_pi.exp()
        torch.testing.assert_close(pi.sum(1), torch.ones(T, dtype=pi.dtype))
        assert used <= iters
        assert float((pi.sum(0) / (T / E) - 1).abs().max()) <= tol


def test_sinkhorn_loads_more_uniform_than_topk_on_skewed_gate():
    torch.manual_seed(10)
    kw = dict(num_experts=8, top_k=2)
    sk = MoE(8, router="sinkhorn", sinkhorn_iters=100, sinkhorn_tol=1e-4, **kw)
    tk = MoE(8, router="topk", **kw)
    with torch.no_grad():
        w = torch.randn(8, 8) * 0.3
        w[0] += 1.0
        w[1] += 0.8
        sk.router.gate.weight.copy_(w)
        tk.router.gate.weight.copy_(w)
    x = torch.rand(256, 8) + 0.2
    sk_load, tk_load = sk(x).stats, tk(x).stats
    assert tk_load.max_vio > 1.0
    assert sk_load.max_vio < 0.25 * tk_load.max_vio


# ---------------------------------------------------------------- hash

def test_hash_deterministic_distinct_and_balanced():
    E, K = 8, 3
    a = MoE(4, router="hash", num_experts=E, top_k=K)
    b = MoE(4, router="hash", num_experts=E, top_k=K)
    ids = torch.arange(8000)
    x = torch.randn(8000, 4)
    p1, p2 = a.router(x, token_ids_T=ids), b.router(x[:, :], token_ids_T=ids)
    assert torch.equal(p1.expert_ids_TK, p2.expert_ids_TK)
    assert ((p1.expert_ids_TK.sort(1).values.diff(1)) > 0).all()
    torch.testing.assert_close(p1.weights_TK, torch.full((8000, K), 1 / K))
    load = p1.tokens_per_expert().float()
    assert float(load.max() / load.mean()) < 1.05
    # Same id → same experts, wherever it appears.
    rep = a.router(torch.randn(3, 4), token_ids_T=torch.tensor([5, 123, 5]))
    assert torch.equal(rep.expert_ids_TK[0], rep.expert_ids_TK[2])
    assert torch.equal(rep.expert_ids_TK[0], p1.expert_ids_TK[5])
    # Known values pin the hash (it must not change across versions: checkpoints depend on it).
    assert hash_keys(torch.tensor([0, 1, 255]), 4).tolist() == [
        [780218902, 493638580, 177103240, 2009271413],
        [570057048, 1563838398, 671001733, 372464115],
        [2128081661, 1784949819, 2022045028, 1334517618]]


def test_hash_needs_token_ids():
    moe = MoE(4, router="hash", num_experts=4, top_k=2)
    with pytest.raises(ValueError, match="token_ids"):
        moe(torch.randn(3, 4))


# ---------------------------------------------------------------- hypersphere

def test_hypersphere_scores_are_scaled_cosines():
    torch.manual_seed(11)
    moe = MoE(8, router="hypersphere", num_experts=5, top_k=2, router_dim=3,
              router_temperature=0.25)
    x = torch.randn(20, 8)
    plan = moe.router(x)
    h = moe.router.proj(x)
    e = moe.router.expert_emb_Er
    cos = torch.nn.functional.cosine_similarity(h[:, None, :], e[None, :, :], dim=-1)
    torch.testing.assert_close(plan.logits_TE, cos / 0.25)
    assert float(plan.logits_TE.detach().abs().max()) <= 4.0 + 1e-5
    assert torch.equal(plan.expert_ids_TK.sort(1).values, cos.topk(2, -1).indices.sort(1).values)
    # Scale-invariant in x (the projection is normalised).
    torch.testing.assert_close(moe.router(3 * x).logits_TE, plan.logits_TE)


# ---------------------------------------------------------------- dselect_k

def test_dselect_k_weights_match_binary_encoding_and_sparsify():
    from divmoe.routing.dselect_k import smooth_step
    torch.manual_seed(14)
    E, k, gamma = 5, 2, 1.0  # 3 bits, codes 5..7 fold onto experts 0..2
    moe = MoE(8, router="dselect_k", num_experts=E, top_k=k, dselect_gamma=gamma)
    r = moe.router
    x = torch.randn(12, 8)
    plan = r(x)
    torch.testing.assert_close(plan.probs_TE.sum(-1), torch.ones(12))
    s = smooth_step(r.selector_logits(x).detach().view(12, k, 3), gamma)
    alpha = r.selector_weights(x).softmax(-1)
    expected = torch.zeros(12, E)
    for t in range(12):
        for i in range(k):
            rc = [math.prod(float(s[t, i, b]) if (c >> b) & 1 else 1 - float(s[t, i, b])
                            for b in range(3)) for c in range(8)]
            ri = torch.tensor([rc[e] + (rc[e + E] if e + E < 8 else 0.0) for e in range(E)])
            assert math.isclose(float(ri.sum()), 1.0, rel_tol=1e-5)
            expected[t] += alpha[t, i] * ri
    torch.testing.assert_close(plan.probs_TE, expected)
    assert plan.expert_ids_TK.shape[1] == E  # dense at initialisation, as in the paper
    with torch.no_grad():  # saturated selectors: each is one-hot, so at most k experts
        r.selector_logits.weight.mul_(1e4)
    plan = r(x)
    assert ((plan.expert_ids_TK >= 0).sum(1) <= k).all() and plan.expert_ids_TK.shape[1] <= k
    torch.testing.assert_close(plan.weights_TK.sum(-1), torch.ones(12))
    assert float(smooth_step(torch.tensor([-0.5, 0.0, 0.5]), 1.0).sub(
        torch.tensor([0.0, 0.5, 1.0])).abs().max()) < 1e-6


# ---------------------------------------------------------------- selection bias

@pytest.mark.parametrize("router", ["expert_choice", "dynamic_topp", "sinkhorn", "hash",
                                    "dselect_k"])
def test_bias_free_routers_reject_bias(router):
    with pytest.raises(ConfigError, match=f"balance=.*router='{router}'"):
        MoE(4, cfg(router=router, balance=["loss_free_bias"], **ROUTER_KW[router]))
    moe = MoE(4, router=router, **ROUTER_KW[router])
    x, ids = torch.randn(5, 4), torch.arange(5)
    moe.router(x, selection_bias_E=torch.zeros(moe.config.num_experts), token_ids_T=ids)
    with pytest.raises(ValueError, match=f"router={router} cannot use selection_bias_E"):
        moe.router(x, selection_bias_E=torch.ones(moe.config.num_experts), token_ids_T=ids)


@pytest.mark.parametrize("router", ["grouped", "null_experts", "hypersphere"])
def test_bias_routers_follow_bias(router):
    torch.manual_seed(12)
    moe = MoE(4, router=router, balance=["loss_free_bias"],
              **{k: v for k, v in ROUTER_KW[router].items() if k != "balance"})
    bias = torch.zeros(moe.config.num_experts)
    bias[1] = 100.0
    plan = moe.router(torch.randn(10, 4), selection_bias_E=bias)
    assert (plan.expert_ids_TK == 1).any(1).all()


# ---------------------------------------------------------------- (e) config errors

@pytest.mark.parametrize("kw,match", [
    (dict(router="grouped", num_experts=8, top_k=3, n_groups=2), "top_k=3.*n_groups=2"),
    (dict(router="grouped", num_experts=8, top_k=2, n_groups=3), "n_groups=3"),
    (dict(router="null_experts", num_null_experts=0), "num_null_experts=0"),
    (dict(router="null_experts", num_experts=4, num_null_experts=2, top_k=7), "top_k=7.*num_null"),
    (dict(router="topk", balance=["null_usage"]), "null_usage needs router=null_experts"),
    (dict(router="expert_choice", capacity_factor=0.0), "capacity_factor=0.0"),
    (dict(router="dynamic_topp", top_p=1.5), "top_p=1.5"),
    (dict(router="dynamic_topp", top_p=0.0), "top_p=0.0"),
    (dict(router="null_experts", num_null_experts=2, null_target=1.0), "null_target=1.0"),
    (dict(router="sinkhorn", sinkhorn_iters=0), "sinkhorn_iters=0"),
    (dict(router="sinkhorn", sinkhorn_tol=-1.0), "sinkhorn_tol=-1.0"),
    (dict(router="hypersphere", router_dim=0), "router_dim=0"),
    (dict(router="hypersphere", router_temperature=0.0), "router_temperature=0.0"),
    (dict(router="sinkhorn", score_func="sigmoid"), "score_func='sigmoid'.*router='sinkhorn'"),
    (dict(router="dselect_k", dselect_gamma=0.0), "dselect_gamma=0.0"),
    (dict(router="nope"), "router='nope'"),
])
def test_bad_router_config(kw, match):
    with pytest.raises(ConfigError, match=match):
        MoE(8, cfg(**kw))


def test_grouped_does_not_use_topk_group_limit_check():
    # k=8 > topk_groups·E/G = 4 would fail group-limited topk, but MoGE takes k/G per group.
    with pytest.raises(ConfigError, match="selected groups hold only 4 experts"):
        MoE(8, cfg(router="topk", num_experts=16, top_k=8, n_groups=4))
    moe = MoE(8, cfg(router="grouped", num_experts=16, top_k=8, n_groups=4))
    ids = moe(torch.randn(5, 8)).stats.expert_ids
    assert ((ids // 4).sort(-1).values == torch.arange(4).repeat_interleave(2)).all()


# ---------------------------------------------------------------- LM smoke test

@pytest.mark.parametrize("router", list(ROUTER_KW))
def test_transformer_trains_two_steps(router):
    from divmoe.models.transformer import ModelConfig, MoETransformer
    torch.manual_seed(13)
    mc = ModelConfig(vocab_size=32, d_model=16, n_layers=2, n_heads=2, seq_len=12)
    model = MoETransformer(mc, MoEConfig(router=router, expert_hidden=8, **ROUTER_KW[router]))
    for loss, stats in train_steps(model, torch.randint(0, 32, (3, 12))):
        assert math.isfinite(loss) and len(stats) == 2
    assert model.param_counts()["params_active"] > 0


# ---------------------------------------------------------------- dynamic top-p's dynamic loss

def test_routing_entropy_hand_computed():
    from divmoe.balance import routing_entropy
    probs = torch.tensor([[0.5, 0.5], [1.0, 0.0]], dtype=torch.float64)
    plan = RoutingPlan(torch.zeros(2, 1, dtype=torch.long), torch.ones(2, 1), probs, probs.log())
    assert math.isclose(float(routing_entropy(plan)), math.log(2) / 2, rel_tol=1e-6)


def test_dynamic_topp_without_cap_and_its_entropy_loss_lowers_the_experts_used():
    """top_k = num_experts: no cap below E (a near-uniform router keeps ⌈p·E⌉ experts);
    descending routing_entropy sharpens the router, so the top-p rule keeps fewer."""
    torch.manual_seed(0)
    moe = MoE(8, MoEConfig(num_experts=8, top_k=8, router="dynamic_topp", top_p=0.5,
                           balance=["routing_entropy"], routing_entropy_weight=1.0))
    with torch.no_grad():
        moe.router.gate.weight.mul_(1e-3)  # near-uniform: every token needs 4 of 8 experts
    x = torch.randn(64, 8)

    def experts_used():
        with torch.no_grad():
            return float((moe.router(x).expert_ids_TK >= 0).sum(-1).double().mean())

    assert experts_used() == 4.0
    opt = torch.optim.SGD(moe.router.parameters(), lr=50.0)
    for _ in range(20):
        opt.zero_grad()
        moe(x).aux_loss.backward()
        opt.step()
    assert experts_used() < 3.0
