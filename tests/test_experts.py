"""Expert layouts (stacked, heterogeneous widths, LoRA over a frozen MLP) and the
activated-parameter accounting: fast path against reference, layout invariants, LM training."""

import dataclasses

import pytest
import torch

from divmoe.config import ConfigError
from divmoe.dispatch import dispatch_combine
from divmoe.experts import (EXPERT_LAYOUTS, HeteroSwiGLU, LoRASwiGLU, StackedSwiGLU,
                            activated_params)
from divmoe.layer import MoE, MoEConfig, SwiGLU
from divmoe.routing import RoutingPlan

import equivalence
from equivalence import assert_same_forward_backward, force_expert, grads
from lm import train_steps

LAYOUTS = {
    "stacked": dict(expert_layout="swiglu"),
    "hetero": dict(expert_layout="swiglu", expert_widths=[1, 4, 4, 9, 2, 9]),  # unsorted buckets
    "hetero_sorted": dict(expert_layout="swiglu", expert_widths=[1, 3, 3, 3, 8, 8]),
    "lora": dict(expert_layout="lora", lora_rank=3),
    "gelu": dict(expert_layout="gelu"),
}
DTYPES = {torch.float64: 1e-10, torch.float32: 1e-5}


def perturb_lora(module):
    """LoRA B starts at zero, which would make adapter gradients trivial; randomise it."""
    for m in module.modules():
        if isinstance(m, LoRASwiGLU):
            with torch.no_grad():
                m.b_in_ERH2.normal_(std=0.3)
                m.b_out_ERD.normal_(std=0.3)


def pair(d, dtype=torch.float64, **kw):
    fast, ref = equivalence.pair(d, dtype=dtype, **kw)
    perturb_lora(fast)
    ref.load_state_dict(fast.state_dict())
    return fast, ref


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("seed", range(3))
def test_fast_matches_reference(layout, dtype, seed):
    torch.manual_seed(seed)
    kw = dict(LAYOUTS[layout], num_experts=6, top_k=1 + seed, expert_hidden=5,
              num_shared_experts=seed % 2, renormalize=bool(seed % 2))
    fast, ref = pair(7, dtype, **kw)
    x = torch.randn(2, 23, 7, dtype=dtype)
    tol = DTYPES[dtype]
    # A whole width bucket may get no tokens; then neither path gives it a gradient.
    assert_same_forward_backward(fast, ref, x, tol, tol, all_grads="hetero" not in layout)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_fast_matches_reference_bfloat16(layout):
    """bf16: the two paths round differently, so compare each tensor relative to its largest
    entry (a few bf16 ulps), not elementwise."""
    torch.manual_seed(15)
    fast, ref = pair(16, torch.bfloat16, num_experts=6, top_k=2, expert_hidden=16,
                     **{**LAYOUTS[layout], "lora_rank": 8})
    x = torch.randn(48, 16, dtype=torch.bfloat16)
    o1, o2 = fast(x), ref(x)
    g = torch.randn_like(o1.output)
    ((o1.output * g).sum() + o1.aux_loss).backward()
    ((o2.output * g).sum() + o2.aux_loss).backward()
    pairs = [("output", o1.output, o2.output)] + [
        (n, p.grad, dict(ref.named_parameters())[n].grad)
        for n, p in fast.named_parameters() if p.grad is not None]
    for name, a, b in pairs:
        a, b = a.detach().float(), b.detach().float()
        assert float((a - b).abs().max()) <= 3e-2 * float(b.abs().max()) + 1e-6, name


@pytest.mark.parametrize("layout", LAYOUTS)
def test_experts_with_zero_tokens(layout):
    torch.manual_seed(3)
    fast, ref = pair(6, num_experts=6, top_k=1, expert_hidden=4, **LAYOUTS[layout])
    force_expert(fast, 3), force_expert(ref, 3)
    x = torch.rand(30, 6, dtype=torch.float64) + 0.1
    out = assert_same_forward_backward(fast, ref, x, 1e-10, 1e-10, all_grads=False)
    assert out.stats.tokens_per_expert.tolist() == [0, 0, 0, 30, 0, 0]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_single_token(layout):
    torch.manual_seed(4)
    fast, ref = pair(10, num_experts=6, top_k=3, expert_hidden=6, **LAYOUTS[layout])
    assert_same_forward_backward(fast, ref, torch.randn(1, 10, dtype=torch.float64),
                                 1e-10, 1e-10, all_grads=False)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_fast_path_equals_expert_loop_for_any_counts(layout):
    """Layout level: arbitrary expert-contiguous counts (zeros included) against expert().
    One slot per token, weight 1, so the dispatch output is each token's expert output."""
    torch.manual_seed(5)
    moe = MoE(5, num_experts=6, expert_hidden=3, **LAYOUTS[layout]).double()
    perturb_lora(moe)
    for counts in ([0, 0, 0, 0, 0, 0], [3, 0, 2, 0, 0, 1], [0, 1, 0, 0, 7, 0], [1, 1, 1, 1, 1, 1]):
        ids = torch.repeat_interleave(torch.arange(6), torch.tensor(counts))
        ids = ids[torch.randperm(len(ids))].unsqueeze(1)  # tokens in any order
        T = len(ids)
        plan = RoutingPlan(ids, torch.ones(T, 1, dtype=torch.float64),
                           torch.full((T, 6), 1 / 6, dtype=torch.float64), torch.zeros(T, 6))
        x = torch.randn(T, 5, dtype=torch.float64)
        y = dispatch_combine(x, plan, moe.experts)
        ref = torch.stack([moe.experts.expert(int(e), x[t:t + 1])[0] for t, e in enumerate(ids[:, 0])]) \
            if T else x.new_zeros(0, 5)
        assert y.shape == (T, 5)
        torch.testing.assert_close(y, ref, atol=1e-12, rtol=1e-12)


# ---- heterogeneous widths -------------------------------------------------------------------

def test_hetero_has_no_padding():
    widths, d = [1, 16, 3, 16, 1, 7], 9
    moe = MoE(d, num_experts=6, top_k=2, expert_widths=widths)
    assert isinstance(moe.experts, HeteroSwiGLU)
    n = sum(p.numel() for p in moe.experts.parameters())
    assert n == sum(3 * d * h for h in widths)
    assert moe.experts.expert_sizes() == [3 * d * h for h in widths]
    assert len(moe.experts.w_in) == 4  # buckets 1, 3, 7, 16: one stacked tensor per width


def test_hetero_width_one_expert_only():
    torch.manual_seed(6)
    fast, ref = pair(4, num_experts=3, top_k=1, expert_widths=[5, 1, 5])
    force_expert(fast, 1), force_expert(ref, 1)
    x = torch.rand(9, 4, dtype=torch.float64) + 0.1
    out = assert_same_forward_backward(fast, ref, x, 1e-10, 1e-10, all_grads=False)
    assert out.stats.tokens_per_expert.tolist() == [0, 9, 0]
    # Only the width-1 bucket was used: it has a gradient, the width-5 bucket none.
    grads_ = grads(fast)
    assert "experts.w_in.0" in grads_ and "experts.w_in.1" not in grads_


def test_hetero_single_width_equals_stacked():
    torch.manual_seed(7)
    het = HeteroSwiGLU([4] * 5, 6).double()
    st = StackedSwiGLU(5, 6, 4).double()
    with torch.no_grad():
        st.w_in_EDH2.copy_(het.w_in[0]), st.w_out_EHD.copy_(het.w_out[0])
    ids = torch.tensor([[2, 0], [4, 3], [2, 2], [1, 4], [0, -1]])
    w = torch.rand(5, 2, dtype=torch.float64)
    plan = RoutingPlan(ids, w, torch.full((5, 5), 0.2, dtype=torch.float64), torch.zeros(5, 5))
    x = torch.randn(5, 6, dtype=torch.float64)
    torch.testing.assert_close(dispatch_combine(x, plan, het), dispatch_combine(x, plan, st))
    assert het.expert_sizes() == st.expert_sizes()


# ---- LoRA over a frozen dense MLP -----------------------------------------------------------

def test_lora_at_init_equals_base_exactly():
    torch.manual_seed(8)
    dense = SwiGLU(6, 10).double()
    lora = LoRASwiGLU.from_dense(dense, num_experts=4, rank=2)
    assert lora.w_in_DH2.dtype == torch.float64
    x = torch.randn(12, 6, dtype=torch.float64)
    base = lora.base(x)
    torch.testing.assert_close(base, dense(x), atol=1e-12, rtol=1e-12)
    counts = torch.tensor([5, 0, 4, 3])
    assert torch.equal(lora.grouped(x, counts), base)
    for e in range(4):
        assert torch.equal(lora.expert(e, x), base)
    # A copy: changing the dense MLP afterwards leaves the experts alone; it is frozen.
    with torch.no_grad():
        dense.w_in.weight.add_(1.0)
    assert torch.equal(lora.base(x), base)
    assert not lora.w_in_DH2.requires_grad and not lora.w_out_HD.requires_grad
    assert dense.w_in.weight.requires_grad


def test_lora_moe_at_init_equals_base():
    torch.manual_seed(9)
    moe = MoE(8, num_experts=4, top_k=2, expert_layout="lora", lora_rank=2, renormalize=True,
              expert_hidden=12).double()
    x = torch.randn(20, 8, dtype=torch.float64)
    # Exact per expert (see above); here the k routed weights sum to 1 up to the router's
    # float32 arithmetic.
    torch.testing.assert_close(moe(x).output, moe.experts.base(x), atol=1e-6, rtol=1e-6)


def test_lora_gradients_reach_adapters_not_base():
    torch.manual_seed(10)
    moe = MoE(8, num_experts=4, top_k=2, expert_layout="lora", lora_rank=2, expert_hidden=12)
    opt = torch.optim.SGD([p for p in moe.parameters() if p.requires_grad], lr=0.1)
    base = {n: p.detach().clone() for n, p in moe.named_parameters() if not p.requires_grad}
    assert set(base) == {"experts.w_in_DH2", "experts.w_out_HD"}
    for step in range(2):
        opt.zero_grad()
        out = moe(torch.randn(32, 8))
        (out.output.square().sum() + out.aux_loss).backward()
        e = moe.experts
        assert e.w_in_DH2.grad is None and e.w_out_HD.grad is None
        assert float(e.b_in_ERH2.grad.abs().sum()) > 0 and float(e.b_out_ERD.grad.abs().sum()) > 0
        assert e.a_in_EDR.grad is not None and e.a_out_EHR.grad is not None
        if step == 1:  # B moved away from zero, so A now gets a real gradient too
            assert float(e.a_in_EDR.grad.abs().sum()) > 0
        opt.step()
    for n, p in moe.named_parameters():
        if n in base:
            assert torch.equal(p, base[n])
    r, d, h = 2, 8, 12
    assert e.expert_sizes() == [r * (d + 2 * h) + r * (h + d)] * 4
    assert sum(p.numel() for p in e.parameters() if p.requires_grad) == sum(e.expert_sizes())


# ---- activated-parameter accounting ---------------------------------------------------------

def brute_force(ids_TK, sizes, shared, router, base=0):
    out = []
    for row in ids_TK.tolist():
        real = {e for e in row if e >= 0}
        out.append(sum(sizes[e] + base for e in real) + shared + router)
    return out


def test_activated_params_hand_built_plans():
    sizes = [10, 200, 3000, 40000]
    ids = torch.tensor([[0, 1], [2, -1], [-1, -1], [3, 3], [1, 0], [-1, 3]])
    plan = RoutingPlan(ids, torch.ones(6, 2), torch.full((6, 4), 0.25), torch.zeros(6, 4))
    for shared, router, base in [(0, 0, 0), (7, 11, 0), (5, 2, 100000)]:
        mean, per_T = activated_params(plan, sizes, shared, router, base_params=base)
        expected = brute_force(ids, sizes, shared, router, base)
        assert per_T.tolist() == expected
        assert per_T.dtype == torch.int64 and not per_T.requires_grad
        assert mean == pytest.approx(sum(expected) / len(expected))
    # the all-empty token touches only router + shared
    assert activated_params(ids, sizes, 5, 2)[1][2] == 7
    mean, per_T = activated_params(torch.zeros(0, 2, dtype=torch.long), sizes)
    assert mean == 0.0 and per_T.shape == (0,)
    with pytest.raises(ValueError, match="expert ids"):
        activated_params(torch.tensor([[4]]), sizes)


def test_activated_params_random_plans():
    gen = torch.Generator().manual_seed(11)
    for _ in range(20):
        E, K, T = 5, 3, 17
        ids = torch.randint(-1, E, (T, K), generator=gen)
        sizes = torch.randint(1, 1000, (E,), generator=gen).tolist()
        assert activated_params(ids, sizes, 3, 4, 9)[1].tolist() == \
            brute_force(ids, sizes, 3, 4, 9)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_stats_activated_params(layout):
    torch.manual_seed(12)
    moe = MoE(8, num_experts=6, top_k=2, expert_hidden=4, num_shared_experts=1, **LAYOUTS[layout])
    out = moe(torch.randn(3, 5, 8))
    s = out.stats
    sizes = moe.experts.expert_sizes()
    shared = sum(p.numel() for p in moe.shared.parameters())
    router = sum(p.numel() for p in moe.router.parameters())
    base = 3 * 8 * 4 if layout == "lora" else 0
    assert s.activated_params_T.tolist() == brute_force(s.expert_ids, sizes, shared, router, base)
    assert s.activated_params_mean == pytest.approx(float(s.activated_params_T.double().mean()))
    static = shared + router + 2 * (base + sum(sizes) / len(sizes))  # the base once per expert
    assert moe.active_params_per_token() == round(static)
    if layout == "stacked":  # the old formula for equal experts
        assert moe.active_params_per_token() == router + shared + 2 * 3 * 8 * 4


def test_null_expert_slots_cost_nothing():
    torch.manual_seed(13)
    moe = MoE(8, MoEConfig(router="null_experts", num_null_experts=8, num_experts=4, top_k=2,
                           expert_hidden=4))
    s = moe(torch.randn(64, 8)).stats
    assert (s.expert_ids < 0).any(-1).any() and (s.expert_ids < 0).all(-1).any()
    sizes = moe.experts.expert_sizes()
    router = sum(p.numel() for p in moe.router.parameters())
    assert s.activated_params_T.tolist() == brute_force(s.expert_ids, sizes, 0, router)
    assert s.activated_params_T.min() == router  # a token that chose only null experts
    assert s.activated_params_mean < moe.active_params_per_token()


# ---- configuration and the LM ---------------------------------------------------------------

@pytest.mark.parametrize("kw,match", [
    (dict(expert_widths=[4, 4]), r"expert_widths=\[4, 4\].*num_experts=8"),
    (dict(num_experts=2, expert_widths=[4, 0]), r"expert_widths=\[4, 0\].*>= 1"),
    (dict(num_experts=2, expert_widths=[4, "x"]), r"expert_widths\[1\]='x'"),
    (dict(num_experts=2, expert_widths=[4, 4], expert_layout="lora"), "expert_layout='lora'"),
    (dict(expert_layout="relu"), "expert_layout='relu'.*gelu, lora, swiglu"),
    (dict(num_experts=2, expert_widths=[4, 4], expert_layout="gelu"), "expert_layout='gelu'"),
    (dict(lora_rank=0), "lora_rank=0.*>= 1"),
])
def test_bad_layout_config_raises(kw, match):
    with pytest.raises(ConfigError, match=match):
        MoE(8, MoEConfig(**{**dataclasses.asdict(MoEConfig()), **kw}))


def test_registry_builds_each_layout():
    assert set(EXPERT_LAYOUTS) == {"swiglu", "lora", "gelu"}
    assert isinstance(MoE(4, num_experts=2, top_k=1).experts, StackedSwiGLU)
    assert isinstance(MoE(4, num_experts=2, top_k=1, expert_widths=[2, 3]).experts, HeteroSwiGLU)
    assert isinstance(MoE(4, num_experts=2, top_k=1, expert_layout="lora").experts, LoRASwiGLU)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_lm_trains_two_steps(layout):
    from divmoe.models import MoETransformer
    from divmoe.models.transformer import ModelConfig
    torch.manual_seed(14)
    mc = ModelConfig(vocab_size=32, d_model=16, n_layers=2, n_heads=2, seq_len=16)
    model = MoETransformer(mc, MoEConfig(num_experts=6, top_k=2, expert_hidden=8,
                                         **LAYOUTS[layout]))
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    assert bool(frozen) == (layout == "lora")
    steps = train_steps(model, torch.randint(0, 32, (4, 16)))
    for _, stats in steps:
        assert all(s.activated_params_mean > 0 for s in stats)
    assert all(torch.isfinite(torch.tensor([loss for loss, _ in steps])))
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n])
    counts = model.param_counts()
    assert counts["params_active"] < counts["params_total"]
