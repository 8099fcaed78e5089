"""Causal routing for the batch-dependent routers (expert choice, Sinkhorn, soft merging):
under ``causal_routing`` a token's output does not depend on later tokens or other
sequences; each router's causal rule; the per-token soft-merge fast path."""

import math

import pytest
import torch

from divmoe.dispatch.soft_merge import soft_merge_per_token, soft_merge_reference
from divmoe.layer import MoEConfig
from divmoe.models.transformer import ModelConfig, MoETransformer
from divmoe.routing import ROUTERS, causal_routing
from divmoe.train import evaluate

BATCH_DEPENDENT = ["expert_choice", "sinkhorn", "soft_merge"]


def lm(router, **moe):
    torch.manual_seed(0)
    balance = ["aux_loss"] if router == "soft_merge" else ["z_loss"]
    cfg = MoEConfig(num_experts=4, top_k=1, expert_hidden=8, router=router, balance=balance,
                    **moe)
    return MoETransformer(ModelConfig(d_model=16, n_layers=2, n_heads=2, seq_len=16),
                          cfg).double().eval()


def test_exactly_the_batch_dependent_routers_declare_it():
    assert sorted(n for n, r in ROUTERS.items() if r.batch_dependent) == BATCH_DEPENDENT


@pytest.mark.parametrize("router", BATCH_DEPENDENT)
def test_causal_routing_does_not_see_later_tokens_or_other_sequences(router):
    model = lm(router)
    torch.manual_seed(1)
    tokens = torch.randint(0, 256, (4, 16))
    later = tokens.clone()
    later[:, 8:] = torch.randint(0, 256, (4, 8))   # every sequence's future changes
    later[1:] = torch.randint(0, 256, (3, 16))     # and the other sequences entirely
    with torch.no_grad():
        with causal_routing(model):
            causal, causal_later = model(tokens).logits, model(later).logits
        batch, batch_later = model(tokens).logits, model(later).logits
    torch.testing.assert_close(causal_later[0, :8], causal[0, :8], rtol=0, atol=1e-12)
    # ... while the batch rule lets them leak into the earlier positions
    assert float((batch_later[0, :8] - batch[0, :8]).abs().max()) > 1e-6
    assert not any(r.route_causally for r in model.modules() if hasattr(r, "route_causally"))


def test_expert_choice_causal_rule_is_top_k_of_the_scores():
    torch.manual_seed(2)
    cfg = MoEConfig(num_experts=6, top_k=1, capacity_factor=2.0, router="expert_choice",
                    routed_scaling=0.5, balance=["z_loss"])
    router = ROUTERS["expert_choice"](8, cfg).eval()
    x = torch.randn(10, 8)
    with causal_routing(router):
        plan = router(x)
    s = router.gate(x).softmax(-1)
    top = s.topk(2, dim=-1)  # k' = round(capacity_factor · top_k) = 2
    assert torch.equal(plan.expert_ids_TK, top.indices)
    torch.testing.assert_close(plan.weights_TK, 0.5 * top.values)  # S, not renormalised


def test_sinkhorn_causal_rule_is_greedy_top_k():
    torch.manual_seed(3)
    cfg = MoEConfig(num_experts=4, top_k=2, router="sinkhorn", balance=["z_loss"])
    router = ROUTERS["sinkhorn"](8, cfg).eval()
    x = torch.randn(12, 8) + torch.tensor([3.0] + [0.0] * 7)  # skewed: balancing would move some
    with causal_routing(router):
        plan = router(x)
    logits = router.gate(x)
    assert torch.equal(plan.expert_ids_TK, logits.topk(2, dim=-1).indices)
    p = logits.softmax(-1).gather(1, plan.expert_ids_TK)
    torch.testing.assert_close(plan.weights_TK, p / p.sum(-1, keepdim=True))
    assert not torch.equal(router(x).expert_ids_TK, plan.expert_ids_TK)  # balanced ≠ greedy


def test_soft_merge_causal_rule_routes_each_token_from_its_prefix():
    torch.manual_seed(4)
    cfg = MoEConfig(num_experts=3, router="soft_merge", balance=["aux_loss"])
    router = ROUTERS["soft_merge"](8, cfg).eval()
    x_NSD = torch.randn(2, 5, 8, dtype=torch.float64)
    router.double()
    with causal_routing(router):
        plan = router(x_NSD.reshape(10, 8), seq_len=5)
    assert plan.groups == (10, 1)
    prefix = x_NSD.cumsum(1) / torch.arange(1, 6, dtype=torch.float64).view(1, 5, 1)
    torch.testing.assert_close(plan.probs_TE, router.gate(prefix.reshape(10, 8)).softmax(-1))
    whole = router(x_NSD.reshape(10, 8), seq_len=5)  # the batch rule: one p per sequence
    last_token = plan.probs_TE.view(2, 5, 3)[:, -1]
    torch.testing.assert_close(last_token, whole.probs_TE.view(2, 5, 3)[:, 0])


def test_soft_merge_per_token_matches_the_reference_outputs_and_gradients():
    from divmoe.experts import EXPERT_LAYOUTS
    torch.manual_seed(5)
    cfg = MoEConfig(num_experts=3, expert_hidden=6, router="soft_merge", balance=["aux_loss"])
    experts = EXPERT_LAYOUTS["swiglu"].build(8, cfg).double()
    x = torch.randn(7, 8, dtype=torch.float64, requires_grad=True)
    logits = torch.randn(7, 3, dtype=torch.float64, requires_grad=True)
    g = torch.randn(7, 8, dtype=torch.float64)

    def run(fn):
        for t in (x, logits, *experts.parameters()):
            t.grad = None
        y = fn(x, logits.softmax(-1))
        (y * g).sum().backward()
        return y.detach(), [t.grad.clone() for t in (x, logits, *experts.parameters())]

    y_fast, g_fast = run(lambda x, p: soft_merge_per_token(x, p, experts))
    y_ref, g_ref = run(lambda x, p: soft_merge_reference(x, p, experts, (7, 1)))
    torch.testing.assert_close(y_fast, y_ref, rtol=1e-12, atol=1e-12)
    for a, b in zip(g_fast, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_evaluation_reports_the_causal_bpb():
    val = {"a": torch.randint(0, 256, (3, 17)), "b": torch.randint(0, 256, (2, 17))}
    topk = evaluate(lm("topk").float(), val, batch_size=2, probe_tokens_per_domain=0).row
    assert topk["val_bpb_causal"] == topk["val_bpb"]  # per-token routing: causal already
    assert topk["val_bpb_causal_by_domain"] == topk["val_bpb_by_domain"]
    model = lm("expert_choice").float()
    ec = evaluate(model, val, batch_size=2, probe_tokens_per_domain=0).row
    assert ec["val_bpb_causal"] != pytest.approx(ec["val_bpb"], rel=1e-6)
    with torch.no_grad(), causal_routing(model):
        out = model(val["b"][:, :-1], val["b"][:, 1:])
    assert ec["val_bpb_causal_by_domain"]["b"] == pytest.approx(float(out.loss) / math.log(2),
                                                                 rel=1e-6)
