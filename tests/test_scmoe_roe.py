"""SCMoE (self-contrast with a weak rank-r routing) and RoE (Gumbel-top-k routings averaged):
their limits equal plain decoding, their routings are the ones defined, RoE is batched."""

import math

import pytest
import torch

from divmoe.inference import Plain, Roster, SelfContrast, generate, next_token_scores, rerouted
from divmoe.inference.scmoe import rank_pick
from divmoe.inference.validation import score_validation
from divmoe.layer import MoEConfig
from divmoe.routing import TopKRouter

from test_generate import VARIANTS, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")


LOSS_FREE = ["moe.balance=[loss_free_bias,z_loss]"]


def with_bias(model, seed=3):
    """Give every MoE layer a non-zero loss-free selection bias, as a trained run has."""
    g = torch.Generator().manual_seed(seed)
    for i in model.moe_layers:
        bias = model.blocks[i].mlp.balancer.selection_bias_E
        bias.copy_(torch.randn(bias.shape, generator=g) * 0.05)
    return model


@torch.no_grad()
def plans_of(model, tokens):
    """The plan every router returns in one forward of ``tokens`` (hooked after any rerouting
    hook already in place, so it sees the rerouted plan)."""
    plans = []
    handles = [model.blocks[i].mlp.router.register_forward_hook(
        lambda mod, args, out: plans.append(out)) for i in model.moe_layers]
    try:
        model(tokens)
    finally:
        for h in handles:
            h.remove()
    return plans


def val_windows(n=6, seq=24, seed=5):
    g = torch.Generator().manual_seed(seed)
    return {"a": torch.randint(0, 256, (n, seq + 1), generator=g),
            "b": torch.randint(0, 256, (n, seq + 1), generator=g)}


# ------------------------------------------------------------------------------------ SCMoE
@pytest.mark.parametrize("variant", ["topk", "sigmoid_groups_shared"])
def test_scmoe_weak_pass_sends_each_token_to_its_expert_of_that_rank(variant):
    model = with_bias(tiny_model(VARIANTS[variant] + LOSS_FREE)[0])
    tokens = torch.randint(0, 256, (2, 10))
    plain_plans = plans_of(model, tokens)
    for rank in (1, 2):
        with rerouted(model, rank_pick(rank)):
            plans = plans_of(model, tokens)
        router = model.blocks[model.moe_layers[0]].mlp.router
        base, weak = plain_plans[0], plans[0]  # the first MoE layer sees the same input
        bias = model.blocks[model.moe_layers[0]].mlp.balancer.selection_bias_E
        select = router.selection(router.scores(base.logits_TE)[0], bias)
        ranking = select.argsort(-1, descending=True)
        assert weak.expert_ids_TK.shape == (20, 1)
        assert torch.equal(weak.expert_ids_TK[:, 0], ranking[:, rank - 1])
        if rank == 1 and router.top_k == 2:
            assert torch.equal(weak.expert_ids_TK[:, 0], base.expert_ids_TK[:, 0])
        scores = router.scores(base.logits_TE)[0].gather(1, weak.expert_ids_TK)
        want = (torch.ones_like(scores) if router.renormalize else scores) * router.routed_scaling
        torch.testing.assert_close(weak.weights_TK.float(), want)


def test_scmoe_with_beta_zero_is_plain_decoding():
    model = tiny_model()[0]
    prompt = torch.randint(0, 256, (2, 4))
    plain = generate(model, prompt, 12, temperature=0, keep_scores=True)
    contrast = generate(model, prompt, 12, temperature=0, keep_scores=True,
                        method=SelfContrast(0.0, 0.1, 2))
    assert torch.equal(plain.new_tokens, contrast.new_tokens)
    for p, c in zip(plain.step_scores, contrast.step_scores):
        kept = torch.isfinite(c)
        assert torch.equal(c[kept], p[kept])      # the strong log-probabilities, bit for bit
        assert torch.equal(kept, p >= p.max(-1, keepdim=True).values + math.log(0.1))
    # without the plausibility cut, sampling draws the same tokens from the same seed
    sampled = [generate(model, prompt, 12, temperature=1.0, seed=4, method=m).new_tokens
               for m in (Plain(), SelfContrast(0.0, 0.0, 3))]
    assert torch.equal(*sampled)


def test_scmoe_scores_contrast_strong_against_weak():
    model = tiny_model()[0]
    tokens = torch.randint(0, 256, (2, 8))
    beta, alpha = 0.5, 0.05
    scores = next_token_scores(SelfContrast(beta, alpha, 2), model, tokens)
    strong = next_token_scores(Plain(), model, tokens)
    with rerouted(model, rank_pick(2)):
        weak = next_token_scores(Plain(), model, tokens)
    want = (1 + beta) * strong - beta * weak
    keep = strong >= strong.max(-1, keepdim=True).values + math.log(alpha)
    assert torch.equal(torch.isfinite(scores), keep)
    torch.testing.assert_close(scores[keep], want[keep])
    assert not torch.equal(scores.argmax(-1), strong.argmax(-1)) or \
        not torch.allclose(scores[keep], strong[keep])


# -------------------------------------------------------------------------------------- RoE
@pytest.mark.parametrize("variant", ["topk", "sigmoid_groups_shared"])
def test_roe_at_tau_zero_routes_exactly_as_the_router(variant):
    model = with_bias(tiny_model(VARIANTS[variant] + LOSS_FREE)[0])
    tokens = torch.randint(0, 256, (3, 10))
    base = plans_of(model, tokens)
    roe = Roster(1, 0.0, seed=1)
    with rerouted(model, roe.pick):
        plans = plans_of(model, tokens)
    assert len(plans) == len(base) == len(model.moe_layers)
    for a, b in zip(base, plans):
        assert torch.equal(a.expert_ids_TK, b.expert_ids_TK)
        assert torch.equal(a.weights_TK, b.weights_TK)


def test_roe_at_tau_zero_equals_deterministic_scoring_and_generation():
    model = tiny_model()[0]
    val = val_windows()
    plain = score_validation(model, val, 4)
    roe = score_validation(model, val, 4, Roster(3, 0.0))
    for d in val:
        assert roe["bpb_by_domain"][d] == pytest.approx(plain["bpb_by_domain"][d], rel=1e-6)
    assert roe["accuracy"] == plain["accuracy"]
    prompt = torch.randint(0, 256, (2, 4))
    assert torch.equal(generate(model, prompt, 10, temperature=0).new_tokens,
                       generate(model, prompt, 10, temperature=0,
                                method=Roster(4, 0.0)).new_tokens)


def test_roe_samples_other_routings_reproducibly_and_averages_them():
    model = tiny_model()[0]
    tokens = torch.randint(0, 256, (2, 12))
    a = next_token_scores(Roster(3, 1.0, seed=0), model, tokens)
    b = next_token_scores(Roster(3, 1.0, seed=0), model, tokens)
    c = next_token_scores(Roster(3, 1.0, seed=1), model, tokens)
    plain = next_token_scores(Plain(), model, tokens)
    assert torch.equal(a, b) and not torch.equal(a, c) and not torch.allclose(a, plain)
    torch.testing.assert_close(a.exp().sum(-1), torch.ones(2, 12))  # a distribution
    # the average of the three replicas' distributions, each replica one sampled routing
    roe = Roster(3, 1.0, seed=0)
    with rerouted(model, roe.pick):
        replicas = model(tokens.repeat(3, 1)).logits.float().softmax(-1).view(3, 2, 12, -1)
    torch.testing.assert_close(a, replicas.mean(0).log(), atol=1e-5, rtol=1e-5)


def test_roe_runs_the_replicas_in_one_batch():
    model = tiny_model()[0]
    shapes = []
    h = model.embed.register_forward_hook(lambda m, args, out: shapes.append(tuple(args[0].shape)))
    generate(model, torch.randint(0, 256, (2, 5)), 3, temperature=0, method=Roster(4, 0.5))
    h.remove()
    assert shapes == [(8, 5), (8, 1), (8, 1)]  # one forward per step over N·B = 4·2 rows


def test_gumbel_top_k_samples_experts_from_the_router_softmax():
    """k = 1: expert e is chosen with probability softmax(logits / τ)_e."""
    torch.manual_seed(0)
    router = TopKRouter(8, MoEConfig(num_experts=4, top_k=1)).eval()
    x = torch.randn(1, 8).repeat(20000, 1)
    logits = router.gate(x)[0]
    for tau in (1.0, 2.0):
        ids = Roster(1, tau, seed=2).pick(router, router.gate(x), None)
        freq = torch.bincount(ids[:, 0], minlength=4).float() / len(ids)
        torch.testing.assert_close(freq, (logits / tau).softmax(-1), atol=0.015, rtol=0)


def test_rerouting_ends_with_its_block_even_on_an_error():
    model = tiny_model()[0]
    tokens = torch.randint(0, 256, (1, 6))
    before = next_token_scores(Plain(), model, tokens)
    with pytest.raises(RuntimeError, match="boom"):
        with rerouted(model, rank_pick(3)):
            assert not torch.equal(next_token_scores(Plain(), model, tokens), before)
            raise RuntimeError("boom")
    assert all(not model.blocks[i].mlp.router._forward_hooks for i in model.moe_layers)
    assert torch.equal(next_token_scores(Plain(), model, tokens), before)
