"""Expert placement: routing traces, the MILP against brute force and a known optimum, the
greedy fallback, placement.json validation, the simulator, the byte counter, and
`divmoe train --set parallel.placement=...` on two gloo ranks equal to one process."""

import importlib.util
import itertools
import json
import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from divmoe.cli import main
from divmoe.config import ConfigError
from divmoe.models import MoETransformer
from divmoe.parallel import exchange, metered
from divmoe.parallel.expert_parallel import check_placement
from divmoe.parallel.placement import (Placement, _cost, _Edges, contiguous, cost, greedy,
                                       load_placement, round_robin, solve)
from divmoe.parallel.simulate import project, split_experts
from divmoe.parallel.traces import RoutingTrace, TraceError, load_trace, route_run
from divmoe.train import load_config, train
from divmoe.train.loop import _placement

from spawn import run_ranks
from test_distributed_train import _flat

needs_scipy = pytest.mark.skipif(importlib.util.find_spec("scipy") is None,
                                 reason="the MILP needs scipy (the placement extra)")


def _known_trace():
    """Top-1, 4 experts, 2 layers: loads [30, 30, 10, 10] in both; the tokens of layer-0
    expert 0 go on to experts 0 and 3, those of 1 to 1 and 2, 3 → 0, 2 → 1. Balanced and
    with no pair split only as {0, 3} | {1, 2} in both layers."""
    pairs = [(0, 0)] * 20 + [(0, 3)] * 10 + [(1, 1)] * 20 + [(1, 2)] * 10 + [(3, 0)] * 10 \
        + [(2, 1)] * 10
    ids = torch.tensor(pairs)
    return RoutingTrace.from_expert_ids([ids[:, :1], ids[:, 1:]], [0, 1], 8, 4)


def _random_trace(seed, E=4, K=2, L=3, T=200):
    g = torch.Generator().manual_seed(seed)
    probs = torch.softmax(torch.randn(E, generator=g) * 1.5, 0).expand(T, E)
    ids = [torch.multinomial(probs, K, generator=g) for _ in range(L)]
    ids[1][: T // 2] = (ids[0][: T // 2] + 1) % E  # half the tokens follow layer 0's choice
    return RoutingTrace.from_expert_ids(ids, list(range(L)), 8, E)


def test_trace_counts_homes_next_layer_and_other_slots():
    ids0 = torch.tensor([[2, 0], [1, -1], [-1, -1]])
    ids1 = torch.tensor([[1, 3], [0, 2], [3, -1]])
    t = RoutingTrace.from_expert_ids([ids0, ids1], [1, 3], 16, 4)
    assert t.tokens == 3 and t.top_k == 2 and t.layers == [1, 3]
    np.testing.assert_array_equal(t.load_LE, [[1, 1, 1, 0], [1, 1, 1, 2]])
    nxt = np.zeros((4, 4))
    nxt[2, 1] = nxt[2, 3] = nxt[1, 0] = nxt[1, 2] = 1  # the third token has no home at layer 0
    np.testing.assert_array_equal(t.next_PEE[0], nxt)
    within0 = np.zeros((4, 4))
    within0[2, 0] = 1
    within1 = np.zeros((4, 4))
    within1[1, 3] = within1[0, 2] = 1
    np.testing.assert_array_equal(t.within_LEE, [within0, within1])
    assert RoutingTrace.from_json(json.loads(json.dumps(t.to_json())), "x").to_json() == t.to_json()


@needs_scipy
def test_milp_finds_the_known_optimum():
    trace = _known_trace()
    solved = solve(trace, 2)
    assert solved.method == "milp (optimal)"
    assert solved.experts_by_rank == {0: [[0, 3], [1, 2]], 1: [[0, 3], [1, 2]]}
    c = cost(trace, solved)
    assert c.imbalance == 1.0 and c.cut_share == 0.0
    # only the entry into layer 0 crosses: each token's one slot leaves its rank w.p. 1/2
    assert c.follow_rows == pytest.approx(0.5) and c.follow_bytes == pytest.approx(0.5 * 8 * 4)
    assert c.origin_rows == pytest.approx(2 * 2 * 0.5)  # 2 layers, there and back, 1/2 leave
    assert cost(trace, contiguous(trace, 2)).objective == pytest.approx(1.5 + 0.5)
    assert cost(trace, round_robin(trace, 2)).objective == pytest.approx(1.0 + 0.5)


def _brute_force(trace, N):
    E = trace.num_experts
    layer_choices = [r for r in itertools.product(range(N), repeat=E)
                     if all(r.count(q) == E // N for q in range(N))]
    edges = _Edges.of(trace)
    return min(_cost(trace, np.array(rk), N, edges).objective
               for rk in itertools.product(layer_choices, repeat=trace.num_layers))


@needs_scipy
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_milp_equals_brute_force_and_greedy_is_valid(seed):
    trace = _random_trace(seed)
    best = _brute_force(trace, 2)
    solved = solve(trace, 2)
    assert solved.method == "milp (optimal)"
    assert cost(trace, solved).objective == pytest.approx(best)
    fallback = greedy(trace, 2)
    for ids in fallback.experts_by_rank.values():
        check_placement(ids, 4, 2)
    assert cost(trace, fallback).objective >= best - 1e-12


def test_greedy_fallback_when_the_milp_is_too_large():
    trace = _known_trace()
    placed = solve(trace, 2, max_variables=1)
    assert placed.method == "greedy" and "variables" in placed.info["why"]
    for ids in placed.experts_by_rank.values():
        check_placement(ids, 4, 2)
    assert cost(trace, placed).objective == pytest.approx(1.0)  # one swap reaches it here


def test_ranks_must_divide_the_experts():
    with pytest.raises(ConfigError, match="--ranks 3.*divide the trace's 4 experts"):
        solve(_known_trace(), 3)


def test_placement_file_round_trip_and_run_checks(tmp_path):
    p = Placement(2, 4, {0: [[3, 0], [2, 1]], 1: [[1, 2], [0, 3]]}, "test")
    p.save(tmp_path / "p.json")
    back = load_placement(tmp_path / "p.json")
    assert back.experts_by_rank == p.experts_by_rank and back.ranks == 2
    back.check_run([0, 1], 4, 2, "p.json")
    with pytest.raises(ConfigError, match="on 2 ranks.*parallel.expert=4"):
        back.check_run([0, 1], 8, 4, "p.json")
    with pytest.raises(ConfigError, match="4 experts per layer.*moe.num_experts=8"):
        back.check_run([0, 1], 8, 2, "p.json")
    with pytest.raises(ConfigError, match=r"blocks \[0, 1\].*are \[1, 3\]"):
        back.check_run([1, 3], 4, 2, "p.json")


GOOD = {"format": "divmoe.placement/1", "ranks": 2, "num_experts": 4,
        "layers": {"0": [[0, 1], [2, 3]]}}


@pytest.mark.parametrize("content,message", [
    ("not json", "not readable JSON"),
    (json.dumps({**GOOD, "format": "x"}), "not a placement file"),
    (json.dumps({**GOOD, "ranks": 0}), "ranks must be an integer >= 1"),
    (json.dumps({**GOOD, "layers": {}}), "layers must map"),
    (json.dumps({**GOOD, "layers": {"a": [[0, 1], [2, 3]]}}), "'a' is not a block index"),
    (json.dumps({**GOOD, "layers": {"0": [[0, 1], [2, "3"]]}}), "lists of expert ids"),
    (json.dumps({**GOOD, "layers": {"0": [[0, 1], [1, 3]]}}), "missing \\[2\\]"),
    (json.dumps({**GOOD, "layers": {"0": [[0, 1, 2], [3]]}}), "gives rank 0 3 experts"),
    (json.dumps({**GOOD, "layers": {"0": [[0, 1, 2, 3]]}}), "lists 1 ranks"),
])
def test_bad_placement_files_are_refused(tmp_path, content, message):
    path = tmp_path / "p.json"
    path.write_text(content)
    with pytest.raises(ConfigError, match=message):
        load_placement(path)
    with pytest.raises(ConfigError, match="does not exist"):
        load_placement(tmp_path / "missing.json")


def test_load_trace_sources_and_errors(tmp_path):
    t = _known_trace()
    t.save(tmp_path / "trace.json")
    assert load_trace(tmp_path / "trace.json").to_json() == t.to_json()
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "analysis.json").write_text(json.dumps(
        {"layers": [], "summary": {}, "placement_trace": t.to_json()}))
    assert load_trace(tmp_path / "a").to_json() == t.to_json()
    (tmp_path / "old.json").write_text(json.dumps({"layers": [], "summary": {}}))
    with pytest.raises(TraceError, match="older divmoe analyze"):
        load_trace(tmp_path / "old.json")
    bad = {**t.to_json(), "load": [[1, 2], [3, 4]]}
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    with pytest.raises(TraceError, match="load must be"):
        load_trace(tmp_path / "bad.json")


def test_split_experts_keeps_what_a_coarse_placement_costs():
    trace = _random_trace(0)
    big = split_experts(trace, 2)
    assert big.num_experts == 8 and big.load_LE.sum() == pytest.approx(trace.load_LE.sum())
    assert big.next_PEE.sum() == pytest.approx(trace.next_PEE.sum())
    # contiguous on the split trace keeps each expert's two halves together: the same cost
    a, b = cost(trace, contiguous(trace, 2)), cost(big, contiguous(big, 2))
    assert (a.imbalance, a.follow_rows, a.origin_rows) == pytest.approx(
        (b.imbalance, b.follow_rows, b.origin_rows))


def test_projection_rows():
    rows = project(_random_trace(1), ranks=(2, 4), experts_per_rank=2, time_limit=2)
    assert [(r.ranks, r.placement) for r in rows] == [
        (n, p) for n in (2, 4) for p in ("contiguous", "round-robin", "solved")]
    for r in rows:
        assert r.a2a_ms_per_layer >= r.a2a_ms_balanced > 0 and r.imbalance >= 1
    assert len({r.origin_bytes for r in rows if r.ranks == 4}) == 1  # placement-independent
    with pytest.raises(ConfigError, match="not a multiple"):
        project(_random_trace(1), ranks=(3,))


@needs_scipy
def test_place_cli(tmp_path, capsys):
    _known_trace().save(tmp_path / "trace.json")
    assert main(["place", str(tmp_path / "trace.json"), "--ranks", "2",
                 "--out", str(tmp_path / "p.json")]) == 0
    out = capsys.readouterr().out
    assert "round-robin" in out and "milp (optimal)" in out
    assert load_placement(tmp_path / "p.json").experts_by_rank[0] == [[0, 3], [1, 2]]
    assert main(["place", str(tmp_path / "trace.json"), "--ranks", "3",
                 "--out", str(tmp_path / "q.json")]) == 2
    assert "divide" in capsys.readouterr().err
    assert main(["place", str(tmp_path / "trace.json"), "--ranks", "2", "--simulate", "8"]) == 2
    assert "drop --ranks and --out" in capsys.readouterr().err
    assert main(["place", str(tmp_path / "trace.json"), "--ranks", "2"]) == 2
    assert "needs --ranks N and --out" in capsys.readouterr().err


def _bytes_worker(rank, world, out_dir):
    send = [(rank + 1) * s for s in range(world)]
    recv = [(r + 1) * rank for r in range(world)]
    x = torch.ones(sum(send), 3, dtype=torch.float64, requires_grad=True)
    y = exchange(x, send, recv)  # outside any meter: not counted
    with metered() as outer:
        y = exchange(x, send, recv)
        with metered() as inner:
            y.sum().backward()
    counted = lambda m: {"sent": m.bytes_sent, "received": m.bytes_received, "exchanges": m.calls}
    torch.save({"outer": counted(outer), "inner": counted(inner)},
               os.path.join(out_dir, f"{rank}.pt"))


def test_meters_nest_and_count_rows_to_and_from_other_ranks(tmp_path):
    world, row = 2, 3 * 8
    run_ranks(_bytes_worker, world, str(tmp_path))
    for r in range(world):
        res = torch.load(tmp_path / f"{r}.pt")
        sent = sum((r + 1) * s for s in range(world) if s != r) * row
        received = sum((q + 1) * r for q in range(world) if q != r) * row
        assert res["inner"] == {"sent": received, "received": sent, "exchanges": 1}  # backward
        assert res["outer"] == {"sent": sent + received, "received": received + sent,
                                "exchanges": 2}


# ------------------------------------------------------------------ the training wiring
TINY = ["model.d_model=32", "model.n_layers=2", "model.n_heads=2", "model.seq_len=32",
        "moe.num_experts=4", "moe.expert_hidden=32", "moe.top_k=2",
        "moe.balance=[aux_loss,z_loss,loss_free_bias]", "moe.aux_loss_scope=global_batch",
        "train.steps=2", "train.batch_size=4", "train.eval_every=2",
        "train.eval_batch_size=8", "data.val_bytes_per_domain=1024", "train.threads=1",
        "train.warmup_steps=1"]
COMPARED = ("train_loss", "val_loss", "val_bpb_by_domain", "max_vio_by_layer", "expert_load",
            "expert_vendi")
PLACED = {0: [[3, 0], [2, 1]], 1: [[1, 2], [0, 3]]}  # not contiguous, not in id order


def _train_rank(rank, world, out, settings, held_file):
    from divmoe.layer import MoE

    shard, held = MoE.shard_experts, []

    def spy(self, group, experts_by_rank=None):  # which experts this rank was given
        held.append(experts_by_rank[rank])
        shard(self, group, experts_by_rank)

    MoE.shard_experts = spy
    train(out, load_config(None, settings), progress=False, report=False)
    with open(f"{held_file}.{rank}", "w") as fh:
        json.dump(held, fh)


def _rows(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_placed_two_rank_run_equals_single_process(tmp_path):
    single = tmp_path / "single"
    train(single, load_config(None, TINY), progress=False, report=False)
    Placement(2, 4, PLACED).save(tmp_path / "p.json")
    placed = tmp_path / "placed"
    run_ranks(_train_rank, 2, str(placed), TINY + ["parallel.expert=2",
                                                  f"parallel.placement={tmp_path / 'p.json'}"],
              str(tmp_path / "held"), timeout_s=240)
    for r in range(2):  # each rank held its placed experts, in the placed order
        assert json.loads((tmp_path / f"held.{r}").read_text()) == [PLACED[0][r], PLACED[1][r]]
    a, b = _rows(single), _rows(placed)
    assert [r["step"] for r in a] == [r["step"] for r in b] == [0, 2]
    for ra, rb in zip(a, b):
        for key in COMPARED:
            if ra[key] is None:
                assert rb[key] is None
                continue
            assert np.allclose(_flat(rb[key]), _flat(ra[key]), rtol=2e-4, atol=1e-6), key
    # the trace of the run routes every token through both MoE blocks
    trace = route_run(single, max_bytes=256)
    assert trace.layers == [0, 1] and trace.load_LE.sum(1).tolist() == [2 * trace.tokens] * 2


def test_placement_is_checked_against_the_run(tmp_path):
    cfg = load_config(None, TINY + [f"parallel.placement={tmp_path / 'p.json'}"])
    model = MoETransformer(cfg.model, cfg.moe)
    Placement(2, 4, {0: PLACED[0]}).save(tmp_path / "p.json")
    with pytest.raises(ConfigError, match=r"MoE blocks \[0\].*are \[0, 1\]"):
        _placement(cfg, model, SimpleNamespace(expert=2))
    Placement(2, 4, PLACED).save(tmp_path / "p.json")
    assert _placement(cfg, model, SimpleNamespace(expert=2)) == PLACED
    with pytest.raises(ConfigError, match="parallel.expert=4"):
        _placement(cfg, model, SimpleNamespace(expert=4))
    with pytest.raises(ConfigError, match="applies under torchrun"):
        train(tmp_path / "run", cfg, progress=False, report=False)
