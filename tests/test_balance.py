"""Balancers of issue 3: aux-loss scopes, capacity (drop / reroute), HMoE small-expert bias
and the loss-free bias invariants (the Dirichlet prior: test_dirichlet_prior.py)."""

import math

import pytest
import torch

from divmoe.balance import (BalanceContext, aux_loss, apply_capacity, slot_capacity,
                            small_expert_bias)
from divmoe.config import ConfigError
from divmoe.diagnostics.load import max_vio
from divmoe.layer import MoE, MoEConfig
from divmoe.routing import RoutingPlan


def plan_of(ids, probs, weights=None):
    ids = torch.as_tensor(ids, dtype=torch.long)
    probs = torch.as_tensor(probs, dtype=torch.float64)
    if weights is None:
        weights = torch.ones(ids.shape, dtype=torch.float64)
    return RoutingPlan(ids, weights, probs, probs.log())


def router_grad(moe):
    g = moe.router.gate.weight.grad
    return 0.0 if g is None else float(g.abs().sum())


def layer(d=8, **kw):
    torch.manual_seed(0)
    return MoE(d, MoEConfig(**kw)).double()


# ---------------------------------------------------------------- aux_loss scopes

def test_sequence_scope_closed_form():
    # Sequence 0: both tokens on expert 0 with p = (1, 0); sequence 1: uniform everything.
    E = 2
    ids = [[0], [0], [0], [1]]
    probs = [[1.0, 0.0], [1.0, 0.0], [0.5, 0.5], [0.5, 0.5]]
    plan = plan_of(ids, probs)
    ctx = BalanceContext(aux_loss_scope="sequence", seq_shape=(2, 2))
    # seq 0: E·(1·1) = 2; seq 1: E·(0.5·0.5 + 0.5·0.5) = 1 → mean 1.5
    assert math.isclose(float(aux_loss(plan, ctx)), 1.5)
    # micro-batch: f = (3/4, 1/4), P = (3/4, 1/4) → 2·(9/16 + 1/16) = 1.25
    assert math.isclose(float(aux_loss(plan)), 1.25)
    assert E == plan.num_experts


def test_sequence_scope_equals_micro_batch_for_one_sequence():
    x = torch.randn(1, 24, 8, dtype=torch.float64)
    a = layer(aux_loss_scope="micro_batch", balance=["aux_loss"])
    b = layer(aux_loss_scope="sequence", balance=["aux_loss"])
    b.load_state_dict(a.state_dict())
    la, lb = a(x).stats.losses["aux_loss"], b(x).stats.losses["aux_loss"]
    assert math.isclose(la, lb, rel_tol=1e-12)
    # ... and differs once there are several sequences with different routing
    x2 = torch.randn(3, 8, 8, dtype=torch.float64)
    assert float(a(x2).stats.losses["aux_loss"]) != pytest.approx(float(b(x2).stats.losses["aux_loss"]))


def test_sequence_scope_needs_sequences():
    moe = layer(aux_loss_scope="sequence", balance=["aux_loss"])
    with pytest.raises(ValueError, match=r"\(10, 8\)"):
        moe(torch.randn(10, 8, dtype=torch.float64))


def test_global_scope_closed_form():
    plan = plan_of([[0], [1]], [[0.75, 0.25], [0.25, 0.75]])
    # step counts so far (including this micro-batch): expert 0 has 3 of 4 slots
    ctx = BalanceContext(aux_loss_scope="global_batch",
                         step_counts_E=torch.tensor([3.0, 1.0], dtype=torch.float64))
    # f = (3/4, 1/4), P = (1/2, 1/2) → 2·(3/8 + 1/8) = 1
    assert math.isclose(float(aux_loss(plan, ctx)), 1.0)
    ctx.step_counts_E = torch.tensor([4.0, 0.0], dtype=torch.float64)
    assert math.isclose(float(aux_loss(plan, ctx)), 1.0 * 2 * 0.5)


def test_global_scope_one_micro_batch_equals_micro_batch_then_accumulates():
    micro = layer(balance=["aux_loss"], aux_loss_scope="micro_batch")
    glob = layer(balance=["aux_loss"], aux_loss_scope="global_batch")
    glob.load_state_dict(micro.state_dict())
    x1 = torch.randn(2, 16, 8, dtype=torch.float64)
    x2 = torch.randn(2, 16, 8, dtype=torch.float64) + 1.0  # routes differently
    glob.begin_step()
    o1g, o1m = glob(x1), micro(x1)
    torch.testing.assert_close(o1g.aux_loss, o1m.aux_loss, rtol=1e-12, atol=0)
    o2g, o2m = glob(x2), micro(x2)
    # Micro-batch 2 uses f from the counts of both micro-batches, P of micro-batch 2 only.
    counts = (o1g.stats.tokens_per_expert + o2g.stats.tokens_per_expert).double()
    f = counts / counts.sum()
    with torch.no_grad():
        P = glob.router(x2.reshape(-1, 8)).probs_TE.mean(0)
    expected = 8 * float((f * P).sum())
    assert math.isclose(o2g.stats.losses["aux_loss"], expected, rel_tol=1e-6)  # float32 probs
    assert not math.isclose(o2g.stats.losses["aux_loss"], o2m.stats.losses["aux_loss"],
                            rel_tol=1e-6)
    # begin_step starts over: micro-batch 2 alone equals the micro-batch scope again
    glob.begin_step()
    torch.testing.assert_close(glob(x2).aux_loss, o2m.aux_loss, rtol=1e-12, atol=0)
    # update_balancers (end of a step) also clears the counts
    glob(x1)
    glob.update_balancers()
    torch.testing.assert_close(glob(x2).aux_loss, o2m.aux_loss, rtol=1e-12, atol=0)


def test_global_scope_eval_does_not_accumulate():
    glob = layer(balance=["aux_loss"], aux_loss_scope="global_batch").eval()
    x = torch.randn(2, 8, 8, dtype=torch.float64)
    a = glob(x).aux_loss
    torch.testing.assert_close(glob(x).aux_loss, a)
    assert float(glob.balancer.step_counts_E.sum()) == 0


@pytest.mark.parametrize("scope", ["micro_batch", "sequence", "global_batch"])
def test_aux_scopes_reach_the_router(scope):
    moe = layer(balance=["aux_loss"], aux_loss_scope=scope)
    moe(torch.randn(2, 12, 8, dtype=torch.float64)).aux_loss.backward()
    assert router_grad(moe) > 0


# ---------------------------------------------------------------- capacity

def reference_capacity(ids_TK, probs_TE, capacity_factor, overflow, priority="position"):
    """The definition in divmoe.balance.capacity, as plain Python loops."""
    T, K = len(ids_TK), len(ids_TK[0])
    E = len(probs_TE[0])
    C = math.ceil(capacity_factor * T * K / E)
    load = [0] * E
    new = [list(row) for row in ids_TK]
    over = []
    slots = [(t, k) for k in range(K) for t in range(T) if ids_TK[t][k] >= 0]  # rank-major
    if priority == "score":  # each expert keeps its C highest-scoring slots
        kept = set()
        for e in range(E):
            mine = sorted((s for s in slots if ids_TK[s[0]][s[1]] == e),
                          key=lambda s: -probs_TE[s[0]][e])  # stable: ties by position
            kept |= set(mine[:C])
            load[e] = len(mine[:C])
        for t, k in slots:
            if (t, k) not in kept:
                new[t][k] = -1
                over.append((t, k))
    else:
        for t, k in slots:
            e = ids_TK[t][k]
            if load[e] < C:
                load[e] += 1
            else:
                new[t][k] = -1
                over.append((t, k))
    rerouted = 0
    if overflow == "reroute":
        held = [set(e for e in row if e >= 0) for row in ids_TK]
        for k in range(K):
            pending = [t for (t, kk) in over if kk == k]
            while pending:
                proposals = []
                for t in pending:
                    best, best_p = None, None
                    for e in range(E):
                        if e in held[t] or load[e] >= C:
                            continue
                        if best is None or probs_TE[t][e] > best_p:
                            best, best_p = e, probs_TE[t][e]
                    if best is not None:
                        proposals.append((t, best))
                still = []
                taken = [0] * E
                room = [C - load[e] for e in range(E)]
                for t, e in proposals:       # token order
                    if taken[e] < room[e]:
                        taken[e] += 1
                        new[t][k] = e
                        held[t].add(e)
                        rerouted += 1
                    else:
                        still.append(t)
                for e in range(E):
                    load[e] += taken[e]
                pending = still
    return new, rerouted


def test_capacity_drop_hand_built():
    # T=4, K=1, E=2, cf=1 → C = ceil(4/2) = 2; all four tokens want expert 0.
    plan = plan_of([[0], [0], [0], [0]], [[0.9, 0.1]] * 4)
    assert slot_capacity(4, 2, 1, 1.0) == 2
    out, rerouted = apply_capacity(plan, 1.0, "drop")
    assert out.expert_ids_TK.squeeze(1).tolist() == [0, 0, -1, -1]  # token order keeps 0, 1
    assert rerouted == 0 and int(out.dropped_slots) == 2
    assert out.weights_TK.squeeze(1).tolist() == [1.0, 1.0, 0.0, 0.0]


def test_capacity_score_priority_drops_the_lowest_scoring_tokens():
    # He et al.'s Capacity-Aware Token Drop: C = 2 of four tokens on expert 0; the two with
    # the highest expert-0 scores (tokens 1 and 3) stay, whatever their position.
    plan = plan_of([[0], [0], [0], [0]], [[0.6, 0.4], [0.9, 0.1], [0.7, 0.3], [0.8, 0.2]])
    out, _ = apply_capacity(plan, 1.0, "drop", priority="score")
    assert out.expert_ids_TK.squeeze(1).tolist() == [-1, 0, -1, 0]
    # A lower-ranked slot with a higher score outranks a first choice: token 1's second
    # choice (0.45 on expert 1) beats token 0's first choice (0.4). C = ceil(0.5·2·2/4) = 1.
    plan = plan_of([[1, 0], [2, 1]], [[0.3, 0.4, 0.2, 0.1], [0.05, 0.45, 0.5, 0.0]])
    out, _ = apply_capacity(plan, 0.5, "drop", priority="score")
    assert out.expert_ids_TK.tolist() == [[-1, 0], [2, 1]]
    with pytest.raises(ValueError, match="priority='rank': expected one of position, score"):
        apply_capacity(plan, 0.5, "drop", priority="rank")


def test_capacity_score_priority_in_layer():
    moe = layer(num_experts=4, top_k=1, balance=["capacity"], capacity_factor=0.5,
                capacity_priority="score")
    with torch.no_grad():
        moe.router.gate.weight[0] += 2.0  # crowd expert 0
    x = torch.rand(24, 8, dtype=torch.float64)
    plan = moe.router(x)
    kept = moe(x).stats.expert_ids.squeeze(1)
    for e in range(4):
        mine = (plan.expert_ids_TK.squeeze(1) == e).nonzero().squeeze(1)
        best = mine[plan.probs_TE[mine, e].argsort(descending=True)[:3]]  # C = ⌈0.5·24/4⌉
        assert sorted((kept == e).nonzero().squeeze(1).tolist()) == sorted(best.tolist())
    assert int((kept < 0).sum()) > 0


def reference_expanded_drop(ids_TK, probs_TE, weights_TK, capacity_factor, expand):
    """overflow=expand as plain loops (divmoe.balance.capacity)."""
    T, K, E = len(ids_TK), len(ids_TK[0]), len(probs_TE[0])
    C = math.ceil(capacity_factor * T * K / E)
    M = min(E, math.ceil(expand * K))
    cands = []
    for t in range(T):
        routed = [e for e in ids_TK[t] if e >= 0]
        others = sorted((e for e in range(E) if e not in routed), key=lambda e: -probs_TE[t][e])
        cands.append(routed + others[:max(0, M - K)])
    slots = [(t, m) for m in range(M) for t in range(T) if m < len(cands[t])]  # rank-major
    alive = set()
    for e in range(E):
        mine = sorted((s for s in slots if cands[s[0]][s[1]] == e),
                      key=lambda s: -probs_TE[s[0]][e])
        alive |= set(mine[:C])
    new_ids, new_w = [], []
    for t in range(T):
        best = sorted((cands[t][m] for m in range(len(cands[t])) if (t, m) in alive),
                      key=lambda e: -probs_TE[t][e])
        ref = max((k for k in range(K) if ids_TK[t][k] >= 0), key=lambda k: weights_TK[t][k])
        ratio = weights_TK[t][ref] / probs_TE[t][ids_TK[t][ref]]
        row_ids, row_w, r = [], [], 0
        for k in range(K):
            if ids_TK[t][k] < 0 or r >= len(best):
                row_ids.append(-1)
                row_w.append(0.0)
                continue
            e = best[r]
            r += 1
            row_ids.append(e)
            row_w.append(weights_TK[t][ids_TK[t].index(e)] if e in ids_TK[t]
                         else probs_TE[t][e] * ratio)
        new_ids.append(row_ids)
        new_w.append(row_w)
    return new_ids, new_w


def test_capacity_expanded_drop_hand_built():
    # C = 2; four tokens want expert 0 (k=1), candidates = both experts (expand 2 → M = 2).
    # Expert 0 keeps its two best scores (tokens 0, 1), expert 1 its two best (tokens 3, 2):
    # nobody is dropped, tokens 2 and 3 move to expert 1 with weight p_new · w/p_old.
    probs = [[0.9, 0.1], [0.8, 0.2], [0.7, 0.3], [0.6, 0.4]]
    plan = plan_of([[0]] * 4, probs)
    out, moved = apply_capacity(plan, 1.0, "expand", expand=2.0)
    assert out.expert_ids_TK.squeeze(1).tolist() == [0, 0, 1, 1] and moved == 2
    torch.testing.assert_close(out.weights_TK.squeeze(1),
                               torch.tensor([1.0, 1.0, 0.3 / 0.7, 0.4 / 0.6], dtype=torch.float64))
    dropped, _ = apply_capacity(plan, 1.0, "drop", priority="score")  # the plain Token Drop
    assert dropped.expert_ids_TK.squeeze(1).tolist() == [0, 0, -1, -1]
    # expand = 1: no extra candidates, the same as Token Drop
    same, _ = apply_capacity(plan, 1.0, "expand", expand=1.0)
    assert torch.equal(same.expert_ids_TK, dropped.expert_ids_TK)


@pytest.mark.parametrize("seed", range(12))
def test_capacity_expanded_drop_matches_reference_loop(seed):
    gen = torch.Generator().manual_seed(seed)
    E = int(torch.randint(3, 9, (1,), generator=gen))
    K = int(torch.randint(1, min(3, E) + 1, (1,), generator=gen))
    T = int(torch.randint(2, 30, (1,), generator=gen))
    probs = torch.softmax(2 * torch.randn(T, E, generator=gen, dtype=torch.float64), -1)
    skew = torch.zeros(E, dtype=torch.float64)
    skew[0] = 3.0
    ids = (probs.log() + skew).topk(K, dim=-1).indices  # not in score order: a selection bias
    if seed % 3 == 0:
        ids[torch.rand(T, K, generator=gen) < 0.2] = -1
        ids[:, 0] = ids[:, 0].clamp_min(0)  # every token keeps a routed slot
    chosen = probs.gather(1, ids.clamp_min(0)) * (ids >= 0)
    weights = chosen / chosen.sum(-1, keepdim=True)
    cf, expand = [0.5, 0.8, 1.0][seed % 3], [1.5, 2.0, 3.0][seed % 3]
    out, _ = apply_capacity(plan_of(ids, probs, weights=weights), cf, "expand", expand=expand)
    ref_ids, ref_w = reference_expanded_drop(ids.tolist(), probs.tolist(), weights.tolist(),
                                             cf, expand)
    assert out.expert_ids_TK.tolist() == ref_ids
    torch.testing.assert_close(out.weights_TK, torch.tensor(ref_w, dtype=torch.float64))
    assert int(out.tokens_per_expert().max()) <= math.ceil(cf * T * K / E)


def test_capacity_expanded_drop_in_layer():
    moe = layer(num_experts=4, top_k=2, balance=["capacity"], capacity_factor=1.0,
                capacity_overflow="expand", capacity_expand=2.0)
    with torch.no_grad():
        moe.router.gate.weight[0] += 2.0  # crowd expert 0
    x = torch.rand(3, 10, 8, dtype=torch.float64)
    out = moe(x)
    assert int(out.stats.tokens_per_expert.max()) <= math.ceil(30 * 2 / 4)
    assert out.stats.rerouted_slots > 0
    assert int(out.stats.tokens_per_expert.sum()) + out.stats.dropped_slots == 60
    out.output.sum().backward()
    assert router_grad(moe) > 0


def test_capacity_rank_major_priority():
    # First choices of all tokens outrank second choices: token 1's first choice (expert 1)
    # keeps its place although token 0's second choice asked for expert 1 too.
    # T=2, K=2, E=4, cf=0.5 → C = ceil(0.5·2·2/4) = 1
    plan = plan_of([[0, 1], [1, 2]], [[0.4, 0.3, 0.2, 0.1], [0.1, 0.4, 0.3, 0.2]])
    out, _ = apply_capacity(plan, 0.5, "drop")
    assert out.expert_ids_TK.tolist() == [[0, -1], [1, 2]]


def test_capacity_reroute_hand_built():
    # C = 2; four tokens want expert 0 (k=1). Tokens 2, 3 overflow; token 2's next best is 1,
    # token 3's next best is 2 → both rerouted, nothing dropped.
    probs = [[0.7, 0.2, 0.1], [0.7, 0.2, 0.1], [0.5, 0.3, 0.2], [0.5, 0.1, 0.4]]
    plan = plan_of([[0]] * 4, probs, weights=torch.tensor([[0.7], [0.7], [0.5], [0.5]],
                                                          dtype=torch.float64))
    out, rerouted = apply_capacity(plan, 1.5, "reroute")  # C = ceil(1.5·4/3) = 2
    assert out.expert_ids_TK.squeeze(1).tolist() == [0, 0, 1, 2]
    assert rerouted == 2 and int(out.dropped_slots) == 0
    # the rerouted weight keeps the token's normalisation: w · p_new / p_old
    torch.testing.assert_close(out.weights_TK.squeeze(1),
                               torch.tensor([0.7, 0.7, 0.3, 0.4], dtype=torch.float64))


def test_capacity_reroute_never_duplicates_an_expert_and_drops_when_full():
    # T=3, K=2, E=3, cf=1 → C = 2 (6 slots, capacity 6). Everyone wants experts 0 and 1.
    probs = [[0.5, 0.4, 0.1]] * 3
    plan = plan_of([[0, 1]] * 3, probs)
    out, rerouted = apply_capacity(plan, 1.0, "reroute")
    ids = out.expert_ids_TK.tolist()
    assert ids == [[0, 1], [0, 1], [2, 2]] or ids[2] == [2, -1]
    for row in ids:
        real = [e for e in row if e >= 0]
        assert len(real) == len(set(real))
    assert ids[2] == [2, -1] and rerouted == 1 and int(out.dropped_slots) == 1


@pytest.mark.parametrize("seed", range(20))
@pytest.mark.parametrize("overflow", ["drop", "reroute"])
@pytest.mark.parametrize("priority", ["position", "score"])
def test_capacity_matches_reference_loop(seed, overflow, priority):
    gen = torch.Generator().manual_seed(seed)
    r = lambda lo, hi: int(torch.randint(lo, hi + 1, (1,), generator=gen))
    E = r(2, 8)
    K, T = r(1, min(3, E)), r(1, 40)
    probs = torch.softmax(2 * torch.randn(T, E, generator=gen, dtype=torch.float64), -1)
    skew = torch.zeros(E, dtype=torch.float64)
    skew[0] = 3.0  # crowd expert 0 so that there is overflow
    ids = (probs.log() + skew).topk(K, dim=-1).indices
    if seed % 3 == 0:  # some empty slots from the router
        ids[torch.rand(T, K, generator=gen) < 0.2] = -1
    cf = [0.5, 0.8, 1.0, 1.25][seed % 4]
    plan = plan_of(ids, probs, weights=probs.gather(1, ids.clamp_min(0)))
    out, rerouted = apply_capacity(plan, cf, overflow, priority=priority)
    ref_ids, ref_rerouted = reference_capacity(ids.tolist(), probs.tolist(), cf, overflow,
                                               priority)
    assert out.expert_ids_TK.tolist() == ref_ids
    assert rerouted == ref_rerouted
    C = math.ceil(cf * T * K / E)
    assert int(out.tokens_per_expert().max()) <= C
    before = int((ids >= 0).sum())
    assert int((out.expert_ids_TK >= 0).sum()) + int(out.dropped_slots) - int((ids < 0).sum()) \
        == before


def test_capacity_in_layer_counts_and_gradients():
    moe = layer(num_experts=4, top_k=2, balance=["aux_loss", "capacity"],
                capacity_factor=0.75, capacity_overflow="reroute")
    with torch.no_grad():
        moe.router.gate.weight[0] += 2.0  # crowd expert 0
    x = torch.rand(3, 10, 8, dtype=torch.float64)
    out = moe(x)
    C = math.ceil(0.75 * 30 * 2 / 4)
    assert int(out.stats.tokens_per_expert.max()) <= C
    assert out.stats.rerouted_slots > 0
    assert int(out.stats.tokens_per_expert.sum()) + out.stats.dropped_slots == 60
    (out.output.sum() + out.aux_loss).backward()
    assert router_grad(moe) > 0
    drop = layer(num_experts=4, top_k=2, balance=["capacity"], capacity_factor=0.75)
    drop.load_state_dict(moe.state_dict())
    s = drop(x).stats
    assert s.rerouted_slots == 0 and s.dropped_slots > 0
    assert int(s.tokens_per_expert.sum()) + s.dropped_slots == 60


# ---------------------------------------------------------------- small_expert_bias (HMoE)

def test_small_expert_bias_closed_form():
    # E=2, sizes 1:3 → M̂ = (0.5, 1.5); f = (1/2, 1/2); P = (0.6, 0.4)
    plan = plan_of([[0], [1]], [[0.6, 0.4], [0.6, 0.4]])
    ctx = BalanceContext(expert_sizes_E=torch.tensor([100.0, 300.0]))
    expected = 2 * (0.5 * 0.5 * 0.6 + 0.5 * 1.5 * 0.4)
    assert math.isclose(float(small_expert_bias(plan, ctx)), expected)
    # equal sizes (or none known): exactly the micro-batch aux_loss
    assert math.isclose(float(small_expert_bias(plan)), float(aux_loss(plan)))
    ctx.expert_sizes_E = torch.tensor([7.0, 7.0])
    assert math.isclose(float(small_expert_bias(plan, ctx)), float(aux_loss(plan)))


def test_small_expert_bias_pushes_probability_to_small_experts():
    probs = torch.tensor([[0.5, 0.5]], dtype=torch.float64, requires_grad=True)
    plan = RoutingPlan(torch.tensor([[0, 1]]), torch.ones(1, 2, dtype=torch.float64), probs, probs)
    small_expert_bias(plan, BalanceContext(expert_sizes_E=torch.tensor([1.0, 4.0]))).backward()
    assert probs.grad[0, 1] > probs.grad[0, 0] > 0  # the big expert is penalised more


def test_small_expert_bias_in_layer_uses_expert_sizes():
    moe = layer(num_experts=4, balance=["small_expert_bias"])
    x = torch.randn(2, 8, 8, dtype=torch.float64)
    equal = moe(x).stats.losses["small_expert_bias"]
    moe.balancer.expert_sizes_E.copy_(torch.tensor([10.0, 10.0, 10.0, 50.0]))  # its losses' sizes
    out = moe(x)
    plan = moe.router(x.reshape(-1, 8))
    ctx = BalanceContext(expert_sizes_E=torch.tensor([10.0, 10.0, 10.0, 50.0]))
    assert math.isclose(out.stats.losses["small_expert_bias"],
                        float(small_expert_bias(plan, ctx).detach()), rel_tol=1e-12)
    assert float(out.stats.losses["small_expert_bias"]) != pytest.approx(float(equal))
    out.aux_loss.backward()
    assert router_grad(moe) > 0


# ---------------------------------------------------------------- loss-free bias invariants

@pytest.mark.parametrize("score_func", ["softmax", "sigmoid"])  # sigmoid: the paper's gate
def test_loss_free_bias_lowers_max_vio_on_a_skewed_router(score_func):
    torch.manual_seed(7)
    moe = MoE(8, MoEConfig(num_experts=4, top_k=1, balance=["loss_free_bias"],
                           bias_update_rate=1e-2, score_func=score_func))
    with torch.no_grad():
        moe.router.gate.weight[0] += 0.5  # skewed towards expert 0
    x = torch.rand(64, 8) + 0.2
    start = moe(x).stats.max_vio
    moe.update_balancers()
    moe.selection_bias_E.zero_()
    assert start > 1.0
    vios = []
    for _ in range(200):
        vios.append(moe(x).stats.max_vio)
        moe.update_balancers()
    with torch.no_grad():
        end = max_vio(moe(x).stats.tokens_per_expert)
    assert end < start and min(vios[-20:]) < start


@pytest.mark.parametrize("score_func", ["softmax", "sigmoid"])
def test_loss_free_bias_does_not_change_combine_gradients(score_func):
    torch.manual_seed(8)
    moe = MoE(8, MoEConfig(num_experts=6, top_k=2, balance=["loss_free_bias"],
                           score_func=score_func)).double()
    x = torch.randn(40, 8, dtype=torch.float64)
    g = torch.randn(40, 2, dtype=torch.float64)
    bias = 1e-4 * torch.randn(6, dtype=torch.float64)  # too small to change any choice

    def combine_grad(b):
        moe.zero_grad()
        plan = moe.router(x, selection_bias_E=b)
        (plan.weights_TK * g).sum().backward()
        return plan.expert_ids_TK, moe.router.gate.weight.grad.clone()

    ids0, g0 = combine_grad(torch.zeros(6, dtype=torch.float64))
    ids1, g1 = combine_grad(bias)
    assert torch.equal(ids0, ids1)
    assert torch.equal(g0, g1)


def test_loss_free_bias_with_sigmoid_selects_by_biased_scores_and_weights_by_sigmoid():
    """Wang et al.'s gate: g_i = s_i for i in TopK(s_i + b_i), s = sigmoid(logits),
    renormalised over the chosen experts; a bias large enough changes the choice, never the
    weight of a chosen expert."""
    torch.manual_seed(9)
    moe = MoE(8, MoEConfig(num_experts=4, top_k=2, balance=["loss_free_bias"],
                           score_func="sigmoid")).double()
    x = torch.randn(16, 8, dtype=torch.float64)
    bias = torch.tensor([0.0, 0.0, 0.0, 10.0], dtype=torch.float64)  # expert 3 always chosen
    with torch.no_grad():
        plan = moe.router(x, selection_bias_E=bias)
        s = moe.router.gate(x).sigmoid()
    assert bool((plan.expert_ids_TK == 3).any(-1).all())
    other = (s[:, :3]).argmax(-1)
    expected_ids = torch.stack([other, torch.full_like(other, 3)], -1)
    assert torch.equal(plan.expert_ids_TK.sort(-1).values, expected_ids)
    chosen = s.gather(1, plan.expert_ids_TK)
    torch.testing.assert_close(plan.weights_TK, chosen / chosen.sum(-1, keepdim=True))


def test_training_batch_max_vio_is_the_steps_whole_batch():
    """MaxVio_batch (Loss-Free Balancing): the load of the step's whole batch, all micro-batches
    summed, not one micro-batch's."""
    from divmoe.models.transformer import ModelConfig, MoETransformer
    from divmoe.train import train_step
    from divmoe.train.step import batch_max_vio
    assert math.isclose(float(batch_max_vio(torch.tensor([[3.0, 1.0], [2.0, 2.0]]))), 0.25)
    torch.manual_seed(0)
    model = MoETransformer(ModelConfig(d_model=16, n_layers=2, n_heads=2, seq_len=12),
                           MoEConfig(num_experts=4, top_k=1, expert_hidden=8))
    tokens = torch.cat([torch.randint(0, 64, (2, 13)), torch.randint(128, 256, (2, 13))])
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    with torch.no_grad():
        expected = sum(torch.stack([s.tokens_per_expert.double() for s in model(t[:, :-1]).stats])
                       for t in (tokens[:2], tokens[2:]))
    result = train_step(model, opt, [tokens[:2], tokens[2:]])
    torch.testing.assert_close(result.load_LE, expected)
    assert result.load_LE.shape == (2, 4) and float(result.load_LE.sum()) == 2 * 4 * 12


# ---------------------------------------------------------------- config errors

@pytest.mark.parametrize("key,value", [
    ("aux_loss_scope", "per_token"),
    ("capacity_overflow", "spill"),
    ("capacity_factor", 0.0),
    ("dirichlet_alpha", 0.0),
    ("dirichlet_alpha_per_expert", [1.0, 2.0]),
    ("dirichlet_alpha_per_expert", [1.0, 2.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0]),
    ("small_expert_bias_weight", -1.0),
    ("dirichlet_prior_weight", -0.5),
    ("balance", ["capacity", "bogus"]),
])
def test_bad_config_names_the_key(key, value):
    balance = ["aux_loss", "dirichlet_prior"] if key.startswith("dirichlet") else ["aux_loss"]
    with pytest.raises(ConfigError, match=f"moe.{key}"):
        MoE(8, MoEConfig(**{"balance": balance, key: value}))


def test_bad_grad_accum_names_the_key():
    from divmoe.train import load_config
    with pytest.raises(ConfigError, match="train.grad_accum"):
        load_config(None, ["train.grad_accum=0"])


# ---------------------------------------------------------------- gradient accumulation

def test_grad_accum_global_batch_trains_and_resumes_exactly(tmp_path):
    from divmoe.train import load_config, train
    tiny = ["model.d_model=16", "model.n_layers=1", "model.n_heads=2", "model.seq_len=16",
            "moe.num_experts=4", "moe.top_k=2", "moe.expert_hidden=8",
            "moe.aux_loss_scope=global_batch", "train.grad_accum=2", "train.steps=4",
            "train.batch_size=2", "train.eval_every=2", "train.warmup_steps=1",
            "train.eval_batch_size=16", "data.val_bytes_per_domain=256", "train.threads=1"]
    cfg = load_config(None, tiny)
    full = train(tmp_path / "full", cfg, progress=False)
    train(tmp_path / "part", cfg, progress=False, stop_after=3)
    resumed = train(tmp_path / "part", None, resume=True, progress=False)
    strip = lambda rows: [{k: v for k, v in r.items() if k not in ("tokens_per_s", "elapsed_s")}
                          for r in rows]
    assert [r["step"] for r in full.metrics] == [0, 2, 4]
    assert strip(resumed.metrics) == strip(full.metrics)


def _lm_and_batches(global_counts, seed=0):
    from divmoe.models.transformer import ModelConfig, MoETransformer
    torch.manual_seed(seed)
    model = MoETransformer(ModelConfig(d_model=16, n_layers=1, n_heads=2, seq_len=12),
                           MoEConfig(num_experts=4, top_k=1, expert_hidden=8, balance=["aux_loss"],
                                     aux_loss_weight=1.0, aux_loss_scope="global_batch",
                                     aux_loss_global_counts=global_counts)).double()
    # Two micro-batches that route differently (different byte ranges).
    tokens = torch.cat([torch.randint(0, 64, (2, 13)), torch.randint(128, 256, (2, 13))])
    return model, tokens


def _one_sgd_step(model, micro_batches):
    from divmoe.train import train_step
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    train_step(model, opt, micro_batches)
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def test_global_counting_pass_equals_one_batch_of_the_whole_step():
    """counting_pass is exact: 2 micro-batches of 2 sequences give the step one batch of 4
    gives (SGD, so equal gradients ⇔ equal parameters); running (the buffer) does not."""
    model, tokens = _lm_and_batches("counting_pass")
    one_batch = _one_sgd_step(model, [tokens])
    model, tokens = _lm_and_batches("counting_pass")
    counted = _one_sgd_step(model, [tokens[:2], tokens[2:]])
    torch.testing.assert_close(counted, one_batch, rtol=1e-10, atol=1e-12)
    model, tokens = _lm_and_batches("running")
    running = _one_sgd_step(model, [tokens[:2], tokens[2:]])
    assert float((running - one_batch).abs().max()) > 1e-6


def test_global_counting_pass_feeds_every_micro_batch_the_step_counts():
    model, tokens = _lm_and_batches("counting_pass")
    moe = model.blocks[0].mlp
    model.train()
    model.begin_step()
    model.count_step([tokens[:2, :-1], tokens[2:, :-1]])
    step_counts = moe.balancer.step_counts_E.clone()
    first = model(tokens[:2, :-1]).stats[0].tokens_per_expert.double()
    second = model(tokens[2:, :-1]).stats[0].tokens_per_expert.double()
    torch.testing.assert_close(step_counts, first + second)  # the pass saw the step's routing
    torch.testing.assert_close(moe.balancer.step_counts_E, step_counts)  # and nothing re-adds
    model.update_balancers()
    assert float(moe.balancer.step_counts_E.sum()) == 0 and not moe.balancer.counts_complete


def test_global_counting_pass_leaves_the_loss_free_load_and_rng_alone():
    from divmoe.models.transformer import ModelConfig, MoETransformer
    torch.manual_seed(0)
    model = MoETransformer(ModelConfig(d_model=16, n_layers=1, n_heads=2, seq_len=12),
                           MoEConfig(num_experts=4, top_k=1, expert_hidden=8, jitter=0.1,
                                     balance=["aux_loss", "loss_free_bias"],
                                     aux_loss_scope="global_batch",
                                     aux_loss_global_counts="counting_pass"))
    tokens = torch.randint(0, 256, (4, 12))
    balancer = model.blocks[0].mlp.balancer
    model.begin_step()
    state = torch.random.get_rng_state()
    model.count_step([tokens[:2], tokens[2:]])
    assert torch.equal(torch.random.get_rng_state(), state)
    assert float(balancer.load_since_update_E.sum()) == 0
    assert float(balancer.step_counts_E.sum()) == 4 * 12
