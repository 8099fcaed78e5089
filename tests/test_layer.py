"""The MoE layer: fast path against the reference loop, invariants, and input errors."""

import dataclasses
import math

import pytest
import torch

from divmoe.balance import aux_loss
from divmoe.config import ConfigError
from divmoe.dispatch import dispatch_combine, reference_dispatch_combine
from divmoe.experts import StackedSwiGLU
from divmoe.layer import MoE, MoEConfig
from divmoe.routing import RoutingPlan
from equivalence import assert_same_forward_backward, force_expert, pair


@pytest.mark.parametrize("seed", range(12))
def test_fast_matches_reference_random_shapes(seed):
    gen = torch.Generator().manual_seed(seed)
    r = lambda lo, hi: int(torch.randint(lo, hi + 1, (1,), generator=gen))
    E = r(1, 16)
    kw = dict(num_experts=E, top_k=r(1, E), expert_hidden=r(1, 24),
              num_shared_experts=r(0, 2), score_func=["softmax", "sigmoid"][seed % 2],
              renormalize=bool(seed % 3), routed_scaling=[1.0, 2.5][seed % 2])
    d = r(1, 20)
    torch.manual_seed(seed)
    fast, ref = pair(d, **kw)
    x = torch.randn(r(1, 3), r(1, 33), d, dtype=torch.float64)
    fast.double(), ref.double()
    assert_same_forward_backward(fast, ref, x, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
def test_fast_matches_reference_dtypes(dtype, tol):
    torch.manual_seed(0)
    fast, ref = pair(16, num_experts=8, top_k=2, expert_hidden=32)
    fast.to(dtype), ref.to(dtype)
    x = torch.randn(64, 16, dtype=dtype)
    assert_same_forward_backward(fast, ref, x, atol=tol, rtol=tol)


def test_group_limited_sigmoid_matches_reference():
    torch.manual_seed(1)
    fast, ref = pair(12, num_experts=16, top_k=4, n_groups=4, topk_groups=2,
                     score_func="sigmoid", routed_scaling=2.5, num_shared_experts=1)
    fast.double(), ref.double()
    assert_same_forward_backward(fast, ref, torch.randn(40, 12, dtype=torch.float64), 1e-10, 1e-10)


def test_group_limited_selects_only_from_top_groups():
    torch.manual_seed(2)
    moe = MoE(8, num_experts=8, top_k=2, n_groups=4, topk_groups=1, score_func="sigmoid")
    x = torch.randn(50, 8)
    plan = moe.router(x)
    groups = plan.expert_ids_TK // 2
    assert (groups[:, 0] == groups[:, 1]).all()


def test_all_tokens_on_one_expert_and_empty_experts():
    torch.manual_seed(3)
    fast, ref = pair(6, num_experts=5, top_k=1, expert_hidden=7)
    force_expert(fast, 3), force_expert(ref, 3)
    x = torch.rand(30, 6, dtype=torch.float64) + 0.1  # positive, so column 3 wins for every token
    fast.double(), ref.double()
    out = fast(x)
    assert out.stats.tokens_per_expert.tolist() == [0, 0, 0, 30, 0]
    assert math.isclose(out.stats.max_vio, 4.0)
    assert_same_forward_backward(fast, ref, x, 1e-10, 1e-10)


def test_single_token():
    torch.manual_seed(4)
    fast, ref = pair(10, num_experts=6, top_k=3)
    fast.double(), ref.double()
    assert_same_forward_backward(fast, ref, torch.randn(1, 10, dtype=torch.float64), 1e-10, 1e-10)


def test_no_tokens():
    moe = MoE(4, num_experts=3, top_k=2)
    out = moe(torch.randn(0, 4))
    assert out.output.shape == (0, 4)
    assert float(out.aux_loss) == 0.0 and out.stats.num_tokens == 0


def test_empty_slots_are_skipped_and_counted():
    torch.manual_seed(5)
    experts = StackedSwiGLU(4, 6, 5).double()
    ids = torch.tensor([[0, -1], [2, 1], [-1, -1], [3, 3]])
    w = torch.rand(4, 2, dtype=torch.float64, requires_grad=True)
    plan = RoutingPlan(ids, w, torch.full((4, 4), 0.25, dtype=torch.float64), torch.zeros(4, 4))
    x = torch.randn(4, 6, dtype=torch.float64)
    y1 = dispatch_combine(x, plan, experts)
    y2 = reference_dispatch_combine(x, plan, experts)
    torch.testing.assert_close(y1, y2)
    assert int(plan.dropped_slots) == 3
    assert plan.tokens_per_expert().tolist() == [1, 1, 1, 2]
    assert torch.equal(y1[2], torch.zeros(6, dtype=torch.float64))


def test_aux_loss_equals_alpha_when_uniform():
    E, K, T = 8, 2, 32
    ids = torch.arange(T * K).reshape(T, K) % E  # every expert gets exactly T*K/E slots
    plan = RoutingPlan(ids, torch.ones(T, K), torch.full((T, E), 1.0 / E), torch.zeros(T, E))
    alpha = 0.037
    assert math.isclose(alpha * float(aux_loss(plan)), alpha, rel_tol=1e-6)


def test_aux_loss_is_larger_when_skewed():
    E, T = 4, 16
    probs = torch.zeros(T, E)
    probs[:, 0] = 1.0
    plan = RoutingPlan(torch.zeros(T, 1, dtype=torch.long), torch.ones(T, 1), probs, probs)
    assert math.isclose(float(aux_loss(plan)), E)


def test_renormalised_weights_sum_to_one_and_choice_is_topk():
    torch.manual_seed(6)
    for score in ("softmax", "sigmoid"):
        moe = MoE(12, num_experts=10, top_k=3, score_func=score, renormalize=True)
        x = torch.randn(25, 12)
        plan = moe.router(x)
        torch.testing.assert_close(plan.weights_TK.sum(-1), torch.ones(25))
        logits = moe.router.gate(x)
        expected = logits.topk(3, dim=-1).indices.sort(-1).values
        assert torch.equal(plan.expert_ids_TK.sort(-1).values, expected)


def test_gradients_reach_router():
    torch.manual_seed(7)
    for balance in ([], ["aux_loss"], ["z_loss"]):
        moe = MoE(8, num_experts=4, top_k=2, balance=balance)
        out = moe(torch.randn(20, 8))
        (out.output.square().sum() + out.aux_loss).backward()
        g = moe.router.gate.weight.grad
        assert g is not None and float(g.abs().sum()) > 0


def test_aux_and_z_loss_in_stats():
    moe = MoE(8, num_experts=4, top_k=2, aux_loss_weight=0.5, z_loss_weight=0.25)
    out = moe(torch.randn(20, 8))
    s = out.stats.losses
    assert set(s) == {"aux_loss", "z_loss"}
    assert math.isclose(float(out.aux_loss.detach()), 0.5 * s["aux_loss"] + 0.25 * s["z_loss"], rel_tol=1e-5)


@pytest.mark.parametrize("bad,match", [
    (torch.tensor([[float("nan")] * 8]), "NaN/inf"),
    (torch.tensor([[float("inf")] * 8]), "NaN/inf"),
    (torch.randn(3, 7), "width is 7"),
    (torch.tensor(1.0), "rank"),
    (torch.ones(3, 8, dtype=torch.long), "floating point"),
])
def test_bad_input_raises(bad, match):
    moe = MoE(8, num_experts=4, top_k=2)
    with pytest.raises(ValueError, match=match):
        moe(bad)


@pytest.mark.parametrize("kw,match", [
    (dict(top_k=9), "top_k=9"),
    (dict(num_experts=0), "num_experts=0"),
    (dict(score_func="relu"), "score_func='relu'.*softmax"),
    (dict(n_groups=3), "n_groups=3"),
    (dict(balance=["aux_loss", "nope"]), "nope"),
    (dict(aux_loss_weight=-1.0), "aux_loss_weight"),
])
def test_bad_config_raises(kw, match):
    with pytest.raises(ConfigError, match=match):
        MoE(8, MoEConfig(**{**dataclasses.asdict(MoEConfig()), **kw}))


def test_leading_dims_preserved():
    moe = MoE(8, num_experts=4, top_k=2)
    assert moe(torch.randn(2, 3, 4, 8)).output.shape == (2, 3, 4, 8)


def test_loss_free_bias_moves_selection_not_weights():
    torch.manual_seed(8)
    moe = MoE(8, num_experts=4, top_k=1, balance=["loss_free_bias"], bias_update_rate=0.1,
              renormalize=False)
    force_expert(moe, 0)
    x = torch.rand(64, 8) + 0.1
    moe(x)
    moe.update_balancers()
    bias = moe.selection_bias_E.clone()
    assert bias[0] < 0 and (bias[1:] > 0).all()  # overloaded expert made less attractive
    # The combine weight of a token is its *unbiased* score of the chosen expert.
    with torch.no_grad():
        moe.selection_bias_E.copy_(torch.tensor([-100.0, 100.0, 0.0, 0.0]))
    plan = moe.router(x, selection_bias_E=moe.selection_bias_E)
    assert (plan.expert_ids_TK[:, 0] == 1).all()
    scores = moe.router.gate(x).softmax(-1)
    torch.testing.assert_close(plan.weights_TK[:, 0], scores[:, 1])
    assert "selection_bias_E" in moe.state_dict()


def test_shared_expert_gate():
    torch.manual_seed(9)
    fast, ref = pair(8, num_experts=4, top_k=2, num_shared_experts=1, shared_expert_gate=True)
    fast.double(), ref.double()
    assert_same_forward_backward(fast, ref, torch.randn(10, 8, dtype=torch.float64), 1e-10, 1e-10)




# ---------------------------------------------------------------- dtypes, d_model, empty batch

def test_input_dtype_other_than_the_layer_s_is_named():
    moe = MoE(8, MoEConfig(num_experts=4, expert_hidden=4)).to(torch.bfloat16)
    with pytest.raises(ValueError, match=r"input dtype is torch.float32 but the layer's expert "
                                         r"weights are torch.bfloat16"):
        moe(torch.randn(3, 8))


def test_float32_router_in_a_bf16_layer_computes_in_float32():
    """HF checkpoints (DeepSeek-V3) keep the router in float32 inside a bf16 model."""
    torch.manual_seed(0)
    moe = MoE(8, MoEConfig(num_experts=4, expert_hidden=4)).to(torch.bfloat16)
    moe.router.float()
    x = torch.randn(5, 8, dtype=torch.bfloat16)
    out = moe(x)
    assert out.output.dtype == torch.bfloat16
    plan = moe.router(x)
    assert plan.logits_TE.dtype == torch.float32
    torch.testing.assert_close(plan.logits_TE, x.float() @ moe.router.gate.weight.t())


@pytest.mark.parametrize("d_model", [0, -3, 2.5, True, "8"])
def test_bad_d_model_is_named(d_model):
    with pytest.raises(ValueError, match=r"d_model=.* is not allowed: expected an int >= 1"):
        MoE(d_model, MoEConfig())


def test_empty_training_batch_gives_zero_gradients_inside_a_model():
    """T = 0 inside a larger model: every MoE parameter gets a zero gradient, not None."""
    moe = MoE(8, MoEConfig(num_experts=4, expert_hidden=4, num_shared_experts=1)).train()
    proj = torch.nn.Linear(8, 8)
    out = moe(proj(torch.randn(0, 8)))
    (out.output.sum() + out.aux_loss).backward()
    for name, p in moe.named_parameters():
        assert p.grad is not None and torch.count_nonzero(p.grad) == 0, name
