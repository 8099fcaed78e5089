"""divmoe.diagnostics: known values of every routing diagnostic."""

import math

import pytest
import torch

from divmoe.diagnostics import (cache_gain_at, coefficient_of_variation, domain_js_bits,
                                expert_domain_counts, expert_output_vendi, load_counts,
                                load_entropy, load_over_tokens, load_summary, load_trajectory,
                                max_vio, merge_candidates, mutual_information_bits,
                                normalized_mutual_information, output_cka,
                                output_cosine_similarity, probe_experts, redundancy_summary,
                                routing_totals, sch_curve, segment_cache_hit_rate,
                                segment_counts, segment_routing_best_performance,
                                specialization_summary, srp_curve)
from divmoe.layer import MoE, MoEConfig


# ----------------------------------------------------------------------------- load
def test_load_measures_known_values():
    bal = torch.tensor([5, 5, 5, 5])
    s = load_summary(bal)
    assert s["max_vio"] == 0 and s["cv"] == 0
    assert s["entropy"] == pytest.approx(math.log(4)) and s["entropy_normalized"] == pytest.approx(1)
    assert s["load"] == [0.25] * 4
    skew = torch.tensor([8.0, 0, 0, 0])
    assert max_vio(skew) == pytest.approx(3.0)
    assert coefficient_of_variation(skew) == pytest.approx(math.sqrt(3))
    assert load_entropy(skew) == 0.0
    traj = load_trajectory([[1, 1], [3, 1]])
    assert traj["max_vio"] == pytest.approx([0.0, 0.5])


def test_load_counts_and_chunks_skip_empty_and_null_slots():
    ids = torch.tensor([[0, 1], [1, -1], [2, 5]])        # 5 = a null expert of E = 3
    assert load_counts(ids, 3).tolist() == [1, 2, 1]
    chunks = load_over_tokens(torch.tensor([[0], [0], [1], [1]]), 2, 2)
    assert chunks.tolist() == [[1.0, 0.0], [0.0, 1.0]]


def test_routing_totals_from_stats():
    moe = MoE(8, MoEConfig(num_experts=4, top_k=2, expert_hidden=8,
                           balance=["capacity"], capacity_factor=0.5)).eval()
    torch.manual_seed(0)
    stats = [moe(torch.randn(10, 8)).stats for _ in range(3)]
    tot = routing_totals(stats)
    assert tot["tokens"] == 30 and tot["slots"] == 60
    assert tot["dropped_slots"] == sum(s.dropped_slots for s in stats) > 0
    assert tot["dropped_fraction"] == pytest.approx(tot["dropped_slots"] / 60)
    assert tot["activated_params_mean"] == pytest.approx(
        sum(s.activated_params_mean for s in stats) / 3)


# ----------------------------------------------------------------------------- specialisation
def test_mi_zero_for_domain_independent_routing():
    # every domain routes identically (same expert mix) → I = 0, JS = 0
    ids = torch.tensor([[0, 1], [2, 3]] * 6)
    dom = torch.tensor([0, 0, 1, 1, 2, 2] * 2)
    counts = expert_domain_counts(ids, dom, 4)
    assert counts.sum() == 24
    assert mutual_information_bits(counts) == pytest.approx(0.0, abs=1e-12)
    assert normalized_mutual_information(counts) == pytest.approx(0.0, abs=1e-12)
    assert torch.allclose(domain_js_bits(counts), torch.zeros(3, dtype=torch.float64), atol=1e-12)


def test_mi_equals_domain_entropy_for_perfect_specialisation():
    # domain d's tokens use only experts {2d, 2d+1}; unequal domain sizes
    dom = torch.tensor([0] * 10 + [1] * 5 + [2] * 1)
    ids = torch.stack([2 * dom, 2 * dom + 1], 1)
    counts = expert_domain_counts(ids, dom, 6)
    p = torch.tensor([10, 5, 1], dtype=torch.float64) / 16
    h = float(-(p * p.log2()).sum())
    assert mutual_information_bits(counts) == pytest.approx(h)
    assert normalized_mutual_information(counts) == pytest.approx(1.0)
    s = specialization_summary(counts, ["a", "b", "c"])
    assert s["h_domain_bits"] == pytest.approx(h) and set(s["js_bits"]) == {"a", "b", "c"}
    # disjoint supports: JS(p(e|d) || p(e)) < 1 bit but > 0, larger for the smaller domain
    js = domain_js_bits(counts)
    assert (js > 0).all() and js[2] > js[1] > js[0]


def test_mi_given_token_hand_computed_and_zero_when_the_token_decides():
    from divmoe.diagnostics.specialization import conditional_mutual_information_bits as cmi
    # token 0: expert = domain (1 bit given v = 0); token 1: independent (0 bits); p(v) = ½ each
    counts = torch.tensor([[[2, 0], [0, 2]], [[1, 1], [1, 1]]])
    assert cmi(counts) == pytest.approx(0.5)
    # Each domain uses its own token and each token its own expert: the plain MI is a full bit,
    # all of it explained by the token (a hash router on bytes looks like this)
    by_token = torch.zeros(2, 2, 2)
    by_token[0, 0, 0], by_token[1, 1, 1] = 5, 5
    assert mutual_information_bits(by_token.sum(0)) == pytest.approx(1.0)
    assert cmi(by_token) == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError, match=r"\[V, E, D\]"):
        cmi(torch.ones(2, 2))


def test_evaluation_mi_given_token_is_zero_for_a_hash_router():
    """Plain MI rewards a hash router for the domains' byte frequencies; MI given the token
    does not (the expert is a function of the token id)."""
    from divmoe.models.transformer import ModelConfig, MoETransformer
    from divmoe.train import evaluate
    torch.manual_seed(0)
    model = MoETransformer(ModelConfig(d_model=16, n_layers=1, n_heads=2, seq_len=16),
                           MoEConfig(num_experts=4, top_k=1, expert_hidden=8, router="hash",
                                     balance=[]))
    val = {"lower": torch.randint(97, 123, (4, 17)), "digits": torch.randint(48, 58, (4, 17))}
    ev = evaluate(model, val, batch_size=2, probe_tokens_per_domain=0)
    assert mutual_information_bits(torch.tensor(ev.routing["counts"][0])) > 0.05
    assert ev.row["mi_given_token_bits"] == pytest.approx(0.0, abs=1e-12)
    assert ev.row["mi_given_token_bits_by_layer"] == [ev.row["mi_given_token_bits"]]


def test_expert_domain_counts_checks_lengths():
    with pytest.raises(ValueError, match="tokens"):
        expert_domain_counts(torch.zeros(3, 2, dtype=torch.long), torch.zeros(4), 2)


# ----------------------------------------------------------------------------- consistency
def test_srp_is_one_when_segments_use_few_experts():
    # sequence of 8 tokens, k = 2; segments of 4 tokens [0,4) use experts {0,1}, then {2,3}
    ids = torch.tensor([[0, 1], [1, 0], [0, 1], [1, 0], [2, 3], [3, 2], [2, 3], [3, 2]])
    # coverage variant: a segment never spans more than 4 experts → best 4 cover everything
    assert segment_routing_best_performance(ids, 4, 4, set_size=4) == pytest.approx(1.0)
    # segments of length 2 use <= 2 distinct... except [3,5) which straddles: check exact value
    cov = segment_routing_best_performance(ids, 4, 2, set_size=2)
    assert cov == pytest.approx((6 * 4 + 2) / (7 * 4))
    # paper SRP: m = 1 is always 1 (each token's own experts); constant routing gives 1 for any m
    assert segment_routing_best_performance(ids, 4, 1) == pytest.approx(1.0)
    const = torch.tensor([[0, 1]] * 16)
    assert srp_curve(const, 8, [1, 2, 4, 8, 16, 32]) == {1: 1.0, 2: 1.0, 4: 1.0, 8: 1.0, 16: 1.0}


def test_srp_paper_value_by_hand():
    # k = 1, tokens 0,1,0,1; m = 2 → every window has counts {1, 1}; best set: both experts
    # (τ = 1): matches 2, preds 2·2 = 4, acts 2 → F1 = 4 / 6 per window
    ids = torch.tensor([[0], [1], [0], [1]])
    assert segment_routing_best_performance(ids, 2, 2) == pytest.approx(2 / 3)
    assert segment_counts(ids, 2, 2).tolist() == [[[1, 1], [1, 1], [1, 1]]]


def reference_sch(ids_SK, E, m):
    """SCH(m, c) of one sequence as the released 41_sch_calc.py steps through it: seen experts
    ranked by (activations in [t, t + m), latest use); first uses after them, in slot order."""
    S, K = len(ids_SK), len(ids_SK[0])
    last, stat, total = {}, [0] * E, 0
    for t in range(S):
        ahead = [0] * E
        for row in ids_SK[t:t + m]:
            for e in row:
                if 0 <= e < E:
                    ahead[e] += 1
        rank = {e: i for i, e in enumerate(sorted(last, key=lambda e: (-ahead[e], -last[e])))}
        new = 0
        for e in ids_SK[t]:
            if not 0 <= e < E:
                continue
            if e in rank:
                stat[rank[e]] += 1
            else:
                stat[len(rank) + new] += 1
                new += 1
            total += 1
        for k, e in enumerate(ids_SK[t]):
            if 0 <= e < E:
                last[e] = t * K + k
    out, run = [], 0
    for s in stat:
        run += s
        out.append(run / total)
    return out


@pytest.mark.parametrize("seed", range(8))
def test_sch_matches_the_released_procedure(seed):
    g = torch.Generator().manual_seed(seed)
    E, K, S = 6, 2, 30
    base = torch.randint(0, 3, (S,), generator=g)  # sticky routing: a few experts at a time
    jump = torch.rand(S, generator=g) < 0.3
    ids = torch.stack([torch.randperm(E, generator=g)[:K] if bool(j)
                       else torch.tensor([int(b), int(b) + 3]) for b, j in zip(base, jump)])
    if seed % 2:
        ids[torch.rand(S, K, generator=g) < 0.1] = -1  # empty slots are not activations
    for m in (1, 3, 8):
        assert segment_cache_hit_rate(ids, E, m).tolist() == pytest.approx(
            reference_sch(ids.tolist(), E, m), abs=1e-12)


def test_sch_first_use_is_a_miss_for_small_caches():
    # k = 1, experts 0, 1, 2, 0: each first use sits after the experts seen so far, so a
    # one-expert cache misses experts 1 and 2 although the look-ahead (m = 1) shows them.
    ids = torch.tensor([[0], [1], [2], [0]])
    assert segment_cache_hit_rate(ids, 3, 1).tolist() == pytest.approx([2 / 4, 3 / 4, 1.0])


def test_sch_monotone_and_one_with_all_experts():
    g = torch.Generator().manual_seed(0)
    ids = torch.stack([torch.randperm(8, generator=g)[:2] for _ in range(3 * 40)]).reshape(3, 40, 2)
    for m in (1, 4, 16):
        sch = segment_cache_hit_rate(ids, 8, m)
        assert sch.shape == (8,)
        assert (sch[1:] >= sch[:-1] - 1e-12).all()
        assert sch[-1] == pytest.approx(1.0)
    # m = 1: the cache holds the current token's experts once seen → c >= k misses only the
    # first uses found after the first k experts of a sequence
    firsts = 0
    for seq in ids.tolist():
        seen = []
        for row in seq:
            new = [e for e in row if e not in seen]
            firsts += sum(1 for j in range(len(new)) if len(seen) + j >= 2)
            seen += new
    assert segment_cache_hit_rate(ids, 8, 1)[1] == pytest.approx(1 - firsts / ids.numel())
    # looking further ahead can only make a cache of k experts worse on random routing
    curve = sch_curve(ids, 8, [1, 16])
    assert curve[16][1] < curve[1][1]
    assert 0 <= cache_gain_at(curve[16], 4, 2) <= 1


def test_sch_constant_routing_hits_with_k_experts():
    ids = torch.tensor([[3, 5]] * 20)
    sch = segment_cache_hit_rate(ids, 8, 8)
    assert sch[0] == pytest.approx(0.5) and sch[1] == pytest.approx(1.0)
    assert cache_gain_at(sch, 4, 2) == 1.0


def test_segments_reject_bad_lengths():
    with pytest.raises(ValueError, match="exceeds"):
        segment_routing_best_performance(torch.zeros(4, 2, dtype=torch.long), 2, 5)
    with pytest.raises(ValueError, match=">= 1"):
        segment_cache_hit_rate(torch.zeros(4, 2, dtype=torch.long), 2, 0)


# ----------------------------------------------------------------------------- redundancy/diversity
def _moe_with_duplicates():
    torch.manual_seed(0)
    moe = MoE(16, MoEConfig(num_experts=4, top_k=2, expert_hidden=12)).eval()
    with torch.no_grad():
        for p in (moe.experts.w_in_EDH2, moe.experts.w_out_EHD):
            p[3] = p[1]                                  # expert 3 duplicates expert 1
    return moe


def test_probe_experts_matches_expert_calls():
    moe = _moe_with_duplicates()
    x = torch.randn(2, 5, 16)
    out = probe_experts(moe, x)
    assert out.shape == (4, 10, 16)
    torch.testing.assert_close(out[2], moe.experts.expert(2, x.reshape(10, 16)))


def test_redundancy_finds_duplicated_experts():
    moe = _moe_with_duplicates()
    out = probe_experts(moe, torch.randn(64, 16))
    cos, cka = output_cosine_similarity(out), output_cka(out)
    assert cos[1, 3] == pytest.approx(1.0) and cka[1, 3] == pytest.approx(1.0)
    assert cos[0, 2] < 0.99 and cka[0, 2] < 0.99
    top = merge_candidates(cka, cos, top=2)
    assert (top[0]["i"], top[0]["j"]) == (1, 3) and len(top) == 2
    s = redundancy_summary(out)
    assert s["merge_candidates"][0]["cka"] == pytest.approx(1.0)
    # CKA sees a rotated / rescaled copy as the same expert; cosine does not see rotation
    q, _ = torch.linalg.qr(torch.randn(16, 16, dtype=torch.float64))
    rot = torch.stack([out[0].double(), 3.0 * out[0].double() @ q])
    assert output_cka(rot)[0, 1] == pytest.approx(1.0)


def test_vendi_one_for_identical_experts_and_e_for_orthogonal():
    same = torch.randn(1, 20, 8).expand(5, 20, 8)
    assert expert_output_vendi(same) == pytest.approx(1.0, abs=1e-6)
    assert expert_output_vendi(2.0 * same) == pytest.approx(1.0, abs=1e-6)
    # centred outputs supported on disjoint token sets are orthogonal → VS = E
    orth = torch.zeros(4, 8, 3)
    for e in range(4):
        orth[e, 2 * e, 0], orth[e, 2 * e + 1, 0] = 1.0, -1.0
    assert expert_output_vendi(orth) == pytest.approx(4.0, rel=1e-6)
    moe = _moe_with_duplicates()
    vs = expert_output_vendi(probe_experts(moe, torch.randn(32, 16)))
    assert 1.0 < vs < 4.0


def test_vendi_counts_an_expert_with_constant_output_as_distinct():
    """One definition for train and analyze: a dead expert gets an axis of its own."""
    out = torch.randn(1, 20, 8).expand(3, 20, 8).clone()
    out[2] = 0.5  # constant over the probe: nothing left after centring
    # kernel [[1,1,0],[1,1,0],[0,0,1]]/3: eigenvalues 2/3, 1/3 (a constant expert would be
    # a zero vector and break the cosine kernel)
    expected = math.exp(-(2 / 3 * math.log(2 / 3) + 1 / 3 * math.log(1 / 3)))
    assert expert_output_vendi(out) == pytest.approx(expected, rel=1e-9)
