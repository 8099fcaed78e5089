"""router=soft_merge (SMEAR): merged-expert fast path vs a plain per-sequence loop, gradients,
one-hot = one expert, grouping of 2-D input, stats/accounting, and config errors."""

import pytest
import torch
import torch.nn.functional as F

from divmoe.config import ConfigError
from divmoe.layer import MoE, MoEConfig
from divmoe.dispatch.soft_merge import soft_merge_forward, soft_merge_reference
from divmoe.routing.soft_merge import merge_groups


def make(d=10, dispatch="grouped", **kw):
    kw = {"num_experts": 5, "expert_hidden": 7, "balance": ["aux_loss", "z_loss"], **kw}
    return MoE(d, MoEConfig(router="soft_merge", dispatch=dispatch, **kw)).double()


def plain_smear(moe, x):
    """Independent reference: for each sequence, pool, softmax the gate, average every
    expert's matrices with those weights in a Python loop, run one SwiGLU."""
    d = x.shape[-1]
    seqs = x.reshape(-1, x.shape[-2], d) if x.dim() >= 3 else x.reshape(1, -1, d)
    W_in, W_out = moe.experts.w_in_EDH2, moe.experts.w_out_EHD
    out = []
    for x_SD in seqs:
        p_E = moe.router.gate(x_SD.mean(0)).softmax(-1)
        w_in = sum(p_E[e] * W_in[e] for e in range(len(p_E)))
        w_out = sum(p_E[e] * W_out[e] for e in range(len(p_E)))
        gate, up = (x_SD @ w_in).chunk(2, dim=-1)
        y = (F.silu(gate) * up) @ w_out
        if moe.shared is not None:
            y = y + moe.shared(x_SD)
        out.append(y)
    return torch.stack(out).reshape(x.shape)


def grads(moe, x, out, g):
    moe.zero_grad()
    ((out * g).sum()).backward()
    return {n: p.grad.clone() for n, p in moe.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("shape", [(3, 6, 10), (2, 2, 5, 10), (9, 10), (1, 1, 10)])
@pytest.mark.parametrize("shared", [0, 1])
def test_fast_equals_plain_loop_outputs_and_gradients(shape, shared):
    torch.manual_seed(0)
    moe = make(num_shared_experts=shared)
    x = torch.randn(*shape, dtype=torch.float64)
    x1, x2 = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    o1 = moe(x1).output
    o2 = plain_smear(moe, x2)
    torch.testing.assert_close(o1, o2, atol=1e-12, rtol=1e-12)
    g = torch.randn_like(o1)
    g1, g2 = grads(moe, x1, o1, g), grads(moe, x2, o2, g)
    assert set(g1) == set(g2)
    for n in g1:
        torch.testing.assert_close(g1[n], g2[n], atol=1e-12, rtol=1e-12, msg=n)
    torch.testing.assert_close(x1.grad, x2.grad, atol=1e-12, rtol=1e-12)


def test_fast_path_equals_module_reference_path():
    torch.manual_seed(1)
    fast, ref = make(), make(dispatch="reference")
    ref.load_state_dict(fast.state_dict())
    x = torch.randn(4, 7, 10, dtype=torch.float64)
    o1, o2 = fast(x), ref(x)
    torch.testing.assert_close(o1.output, o2.output, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(o1.aux_loss, o2.aux_loss)


def test_gradients_reach_router_and_every_expert():
    torch.manual_seed(2)
    moe = make(balance=[])
    moe(torch.randn(3, 8, 10, dtype=torch.float64)).output.square().sum().backward()
    assert float(moe.router.gate.weight.grad.abs().sum()) > 0
    # Every expert's parameters receive gradient (weighted by its probability), not just one.
    for w in (moe.experts.w_in_EDH2.grad, moe.experts.w_out_EHD.grad):
        assert (w.flatten(1).abs().sum(1) > 0).all()


@pytest.mark.parametrize("e", [0, 3])
def test_one_hot_probabilities_equal_a_single_expert(e):
    torch.manual_seed(3)
    moe = make()
    x_TD = torch.randn(12, 10, dtype=torch.float64)
    p_GE = torch.zeros(3, 5, dtype=torch.float64)
    p_GE[:, e] = 1.0
    for path in (soft_merge_forward, soft_merge_reference):
        y = path(x_TD, p_GE, moe.experts, (3, 4))
        torch.testing.assert_close(y, moe.experts.expert(e, x_TD), atol=1e-12, rtol=1e-12)


def test_saturated_router_equals_a_single_expert_through_the_layer():
    torch.manual_seed(4)
    moe = make(balance=[])
    with torch.no_grad():
        moe.router.gate.weight.zero_()
        moe.router.gate.weight[2, 0] = 1e4       # expert 2 wins whenever mean x_0 > 0
    x = torch.randn(2, 6, 10, dtype=torch.float64)
    x[..., 0] = x[..., 0].abs() + 0.1
    out = moe(x)
    torch.testing.assert_close(out.output, moe.experts.expert(2, x.reshape(-1, 10)).view(x.shape))
    assert out.stats.expert_ids.unique().tolist() == [2]


def test_routing_is_per_sequence():
    torch.manual_seed(5)
    moe = make(balance=[])
    x = torch.randn(3, 5, 10, dtype=torch.float64)
    together = moe(x).output
    alone = torch.cat([moe(x[b:b + 1]).output for b in range(3)])
    torch.testing.assert_close(together, alone, atol=1e-13, rtol=1e-13)
    plan = moe.router(x.reshape(-1, 10), seq_len=5)
    probs_BSE = plan.probs_TE.view(3, 5, -1)
    assert torch.equal(probs_BSE, probs_BSE[:, :1].expand_as(probs_BSE))  # one p per sequence
    # 2-D input is ONE group: same as a single sequence holding every token.
    flat = x.reshape(15, 10)
    torch.testing.assert_close(moe(flat).output, moe(flat.unsqueeze(0)).output.squeeze(0))


def test_merge_groups():
    assert merge_groups(28, 7) == (4, 7)        # [4, 7, d]
    assert merge_groups(42, 7) == (6, 7)        # [2, 3, 7, d]
    assert merge_groups(9, None) == (1, 9)      # [9, d]: one group
    assert merge_groups(1, None) == (1, 1)      # [d]
    assert merge_groups(0, None) == (0, 0)
    assert merge_groups(0, 5) == (0, 5)


def test_stats_soft_load_and_one_expert_activated():
    torch.manual_seed(6)
    moe = make(num_shared_experts=1)
    x = torch.randn(4, 6, 10, dtype=torch.float64)
    out = moe(x)
    s = out.stats
    plan = moe.router(x.reshape(-1, 10), seq_len=6)
    torch.testing.assert_close(s.tokens_per_expert, plan.probs_TE.detach().double().sum(0))
    assert float(s.tokens_per_expert.sum()) == pytest.approx(24)
    assert s.expert_ids.shape == (24, 1)
    assert torch.equal(s.expert_ids.squeeze(1), plan.probs_TE.argmax(-1))
    one_expert = 3 * 10 * 7
    shared = sum(p.numel() for p in moe.shared.parameters())
    router = moe.router.gate.weight.numel()
    assert s.activated_params_mean == one_expert + shared + router
    assert moe.active_params_per_token() == one_expert + shared + router
    assert s.dropped_slots == 0 and set(s.losses) == {"aux_loss", "z_loss"}


@pytest.mark.parametrize("balance,extra", [
    (["aux_loss"], dict(aux_loss_scope="sequence")),
    (["aux_loss"], dict(aux_loss_scope="global_batch")),
    (["z_loss", "dirichlet_prior"], {}),
])
def test_balancing_losses_have_router_gradients(balance, extra):
    torch.manual_seed(7)
    moe = make(balance=balance, **extra)
    out = moe(torch.randn(3, 4, 10, dtype=torch.float64))
    out.aux_loss.backward()
    assert float(moe.router.gate.weight.grad.abs().sum()) > 0


@pytest.mark.parametrize("kw,match", [
    (dict(expert_layout="lora"), "expert_layout='lora'.*router='soft_merge'"),
    (dict(expert_widths=[4, 8, 4, 8, 4]), "expert_widths=.*router='soft_merge'"),
    (dict(balance=["capacity"]), "balance=.*router='soft_merge'.*capacity"),
    (dict(balance=["loss_free_bias"]), "balance=.*router='soft_merge'"),
    (dict(balance=["null_usage"]), "null_usage needs router=null_experts"),
])
def test_config_errors(kw, match):
    with pytest.raises(ConfigError, match=match):
        make(**kw)


def test_runtime_errors():
    moe = make()
    x = torch.randn(6, 10, dtype=torch.float64)
    with pytest.raises(ValueError, match="router=soft_merge cannot use selection_bias_E"):
        moe.router(x, selection_bias_E=torch.ones(5))
    with pytest.raises(ValueError, match="groups 1×4 do not cover the 6 tokens"):
        moe.router(x, seq_len=4)
    with pytest.raises(ValueError, match="width is 9"):
        moe(torch.randn(2, 3, 9, dtype=torch.float64))


def test_bf16_runs_with_float32_probabilities():
    torch.manual_seed(8)
    moe = MoE(16, MoEConfig(router="soft_merge", num_experts=4, expert_hidden=16)).bfloat16()
    x = torch.randn(2, 8, 16, dtype=torch.bfloat16)
    out = moe(x)
    assert out.output.dtype == torch.bfloat16 and torch.isfinite(out.output.float()).all()
    ref = plain_smear(moe.float(), x.float())
    torch.testing.assert_close(out.output.float(), ref, atol=5e-2, rtol=5e-2)
