"""Merge, prune, dynamic skipping and upcycling (divmoe.surgery): each transform against the
model it came from."""

import json

import pytest
import torch

from equivalence import assert_same_forward_backward, pair
from divmoe.cli import main
from divmoe.config import ConfigError
from divmoe.layer import MoE, MoEConfig
from divmoe.models import MoETransformer
from divmoe.surgery import LayerCalibration, merge_moe, prune_moe, upcycle_model
from divmoe.surgery.merge import group_experts, unit_permutation
from divmoe.surgery.prune import reconstruction_subset
from divmoe.surgery.upcycle import upcycled_config
from divmoe.train import load_config, train
from test_train import TINY

D = 16


def _layer(**kw):
    torch.manual_seed(0)
    return MoE(D, MoEConfig(num_experts=4, top_k=2, expert_hidden=8, **kw)).eval()


@torch.no_grad()
def _copy_expert(moe, src, dst, perm=None):
    """Expert ``dst`` := expert ``src``, its hidden units permuted by ``perm``."""
    w_in, w_out = moe.experts.w_in_EDH2, moe.experts.w_out_EHD
    H = w_out.shape[1]
    p = torch.arange(H) if perm is None else perm
    w_in[dst] = torch.cat([w_in[src][:, :H][:, p], w_in[src][:, H:][:, p]], dim=1)
    w_out[dst] = w_out[src][p]


def _twins():
    """Experts 2, 3 compute what 0, 1 compute, with their hidden units in another order."""
    moe = _layer()
    g = torch.Generator().manual_seed(1)
    _copy_expert(moe, 0, 2, torch.randperm(8, generator=g))
    _copy_expert(moe, 1, 3, torch.randperm(8, generator=g))
    return moe


def test_merging_identical_experts_changes_nothing():
    moe, x = _twins(), torch.randn(64, D)
    calib = LayerCalibration(torch.tensor([10, 9, 2, 1]), x)
    merged, info = merge_moe(moe, calib, experts=2)
    assert info["groups"] == [[0, 2], [1, 3]]
    assert merged.config.num_experts == 2 and merged.config.router == "merged_topk"
    assert merged.router.expert_of_row_R.tolist() == [0, 1, 0, 1]
    torch.testing.assert_close(merged(x).output, moe(x).output, atol=1e-5, rtol=1e-5)
    # Without alignment the permuted twins average into another function.
    unaligned, _ = merge_moe(moe, calib, experts=2, align=False)
    assert not torch.allclose(unaligned(x).output, moe(x).output, atol=1e-3)


def test_merge_dominant_rows_keep_one_row_per_expert():
    moe, x = _twins(), torch.randn(64, D)
    merged, _ = merge_moe(moe, LayerCalibration(torch.tensor([10, 9, 2, 1]), x), experts=2,
                          router_mode="dominant")
    assert merged.config.router == "topk"
    torch.testing.assert_close(merged.router.gate.weight, moe.router.gate.weight[[0, 1]])
    with pytest.raises(ConfigError, match="below moe.top_k=2"):
        merge_moe(moe, LayerCalibration(torch.tensor([10, 9, 2, 1]), x), 1, "dominant")


def test_grouping_and_permutation():
    sim = torch.eye(4)
    sim[2, 1] = sim[3, 0] = 0.9
    assert group_experts(torch.tensor([5.0, 4.0, 1.0, 0.0]), sim, 2) == [[0, 3], [1, 2]]
    w_in, w_out = torch.randn(D, 16), torch.randn(8, D)
    p = torch.randperm(8)
    moved_in = torch.cat([w_in[:, :8][:, p], w_in[:, 8:][:, p]], 1)
    found = unit_permutation(w_in, w_out, moved_in, w_out[p])
    assert torch.equal(p[found], torch.arange(8))  # undoes the shuffle


def test_merged_router_fast_path_equals_reference():
    torch.manual_seed(0)
    fast, ref = pair(D, router="merged_topk", num_experts=2, router_rows=4, top_k=2,
                     expert_hidden=8)
    rows = torch.tensor([0, 0, 1, 1])
    fast.router.expert_of_row_R.copy_(rows)
    ref.router.expert_of_row_R.copy_(rows)
    x = torch.randn(40, D)
    ids = fast(x).stats.expert_ids
    assert bool((ids[:, 0] == ids[:, 1]).any())  # some tokens send both slots to one expert
    assert_same_forward_backward(fast, ref, x, atol=1e-5, rtol=1e-5)


def _unused_expert_tokens(moe, n=400, unused=3):
    x = torch.randn(n, D)
    ids = moe(x).stats.expert_ids
    return x[~(ids == unused).any(-1)]


@pytest.mark.parametrize("method", ["frequency", "reconstruction"])
def test_pruning_an_unused_expert_changes_nothing(method):
    moe = _layer()
    x = _unused_expert_tokens(moe)
    counts = torch.stack([(moe(x).stats.expert_ids == e).sum() for e in range(4)])
    pruned, info = prune_moe(moe, LayerCalibration(counts, x), keep=3, method=method)
    assert info["kept"] == [0, 1, 2]
    torch.testing.assert_close(pruned(x).output, moe(x).output, atol=1e-5, rtol=1e-5)
    if method == "reconstruction":
        assert info["reconstruction_mse"] < 1e-10 and info["search"] == "exhaustive"
    # Pruning a used expert does change the output.
    used, _ = prune_moe(moe, LayerCalibration(torch.tensor([0, 5, 5, 5]), x), 3, "frequency")
    assert not torch.allclose(used(x).output, moe(x).output, atol=1e-3)


def test_reconstruction_greedy_for_many_subsets(monkeypatch):
    import divmoe.surgery.prune as prune

    moe = _layer()
    x = _unused_expert_tokens(moe)
    monkeypatch.setattr(prune, "EXHAUSTIVE_LIMIT", 1)
    kept, err, search = reconstruction_subset(moe, x, 3)
    assert (kept, search) == ([0, 1, 2], "greedy") and err < 1e-10


def test_dynamic_skip():
    moe, x = _layer(), torch.randn(50, D)
    off, _ = prune_moe(moe, LayerCalibration(torch.ones(4), x), keep=4, skip_ratio=0.0)
    torch.testing.assert_close(off(x).output, moe(x).output)
    on, _ = prune_moe(moe, LayerCalibration(torch.ones(4), x), keep=4, skip_ratio=0.999)
    assert "dynamic_skip" in on.config.balance
    plan = moe.router(x)
    w_TK, ids_TK = plan.weights_TK, plan.expert_ids_TK
    first = w_TK.argmax(-1)
    want = torch.stack([w_TK[t, first[t]] * moe.experts.expert(int(ids_TK[t, first[t]]), x[t:t + 1])[0]
                        for t in range(len(x))])
    out = on(x)
    torch.testing.assert_close(out.output, want, atol=1e-5, rtol=1e-5)  # only the first slot ran
    assert int(out.stats.null_slots) == len(x) and int(out.stats.dropped_slots) == 0
    mid, _ = prune_moe(moe, LayerCalibration(torch.ones(4), x), keep=4, skip_ratio=0.5)
    ratio = w_TK.min(-1).values / w_TK.max(-1).values
    assert int(mid(x).stats.null_slots) == int((ratio < 0.5).sum()) > 0


def _dense():
    cfg = load_config(None, TINY + ["model.moe=false"])
    torch.manual_seed(0)
    return cfg, MoETransformer(cfg.model, cfg.moe).eval()


def test_upcycled_copies_reproduce_the_dense_model():
    cfg, dense = _dense()
    tokens = torch.randint(0, 256, (3, 32))
    up = upcycle_model(dense, upcycled_config(cfg, experts=4, top_k=2))
    assert up.moe_layers == [0, 1]
    torch.testing.assert_close(up(tokens).logits, dense(tokens).logits, atol=1e-5, rtol=1e-5)
    dropped = upcycle_model(dense, upcycled_config(cfg, 4, 2), drop_ratio=0.5)
    w_in = dropped.blocks[0].mlp.experts.w_in_EDH2
    dense_in = dense.blocks[0].mlp.w_in.weight.T
    H = dense_in.shape[1] // 2
    same_units = (w_in[:, :, :H] == dense_in[:, :H]).all(1).float().mean(-1)
    assert torch.allclose(same_units, torch.full((4,), 0.5))   # half of each expert's units redrawn
    assert not torch.allclose(dropped(tokens).logits, dense(tokens).logits, atol=1e-3)


def test_upcycle_granularity_slices():
    cfg, dense = _dense()
    up_cfg = upcycled_config(cfg, experts=4, top_k=2, granularity=2)
    up = upcycle_model(dense, up_cfg)
    H = dense.blocks[0].mlp.w_out.weight.shape[1]
    assert up_cfg.moe.expert_hidden == H // 2 and up_cfg.moe.routed_scaling == 2.0
    w_out = up.blocks[1].mlp.experts.w_out_EHD
    torch.testing.assert_close(w_out[3], dense.blocks[1].mlp.w_out.weight.T[H // 2:])
    with pytest.raises(ConfigError, match="multiple of --granularity"):
        upcycled_config(cfg, experts=3, top_k=2, granularity=2)
    with pytest.raises(ConfigError, match="dense run"):
        upcycled_config(load_config(None, TINY), 4, 2)


def test_commands_write_runs_that_train_and_analyze(tmp_path, capsys):
    short = TINY + ["train.steps=4", "train.eval_every=4"]
    train(tmp_path / "moe", load_config(None, short), progress=False, report=False)
    train(tmp_path / "dense", load_config(None, short + ["model.moe=false"]), progress=False,
          report=False)
    assert main(["merge", str(tmp_path / "moe"), "--experts-per-layer", "3",
                 "--out", str(tmp_path / "merged"), "--calibration-sequences", "8",
                 "--set", "train.warmup_steps=1"]) == 0
    assert load_config(tmp_path / "merged" / "config.yaml").train.warmup_steps == 1
    assert main(["prune", str(tmp_path / "moe"), "--keep", "2", "--method", "reconstruction",
                 "--skip-ratio", "0.2", "--out", str(tmp_path / "pruned"),
                 "--calibration-sequences", "8"]) == 0
    assert main(["upcycle", str(tmp_path / "dense"), "--experts", "4", "--top-k", "2",
                 "--steps", "2", "--out", str(tmp_path / "up")]) == 0
    info = json.loads((tmp_path / "merged" / "surgery.json").read_text())
    assert info["transform"] == "merge" and len(info["layers"]) == 2
    for name, experts in (("merged", 3), ("pruned", 2), ("up", 4)):
        run = tmp_path / name
        assert main(["train", "--out", str(run), "--resume", "--quiet",
                     "--config", str(run / "config.yaml"), "--set", "train.steps=2"]) == 0
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in rows] == [0, 2]
        assert len(rows[0]["expert_load"][0]) == experts
        assert main(["analyze", str(run), "--out", str(tmp_path / f"an-{name}"), "--quiet",
                     "--max-bytes", "512"]) == 0
    capsys.readouterr()
    assert main(["merge", str(tmp_path / "moe"), "--experts-per-layer", "3",
                 "--out", str(tmp_path / "merged")]) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert main(["upcycle", str(tmp_path / "moe"), "--experts", "4", "--top-k", "2",
                 "--out", str(tmp_path / "x")]) == 2
    assert "needs a dense run" in capsys.readouterr().err
    assert main(["prune", str(tmp_path / "moe"), "--keep", "2", "--set", "moe.top_k=1",
                 "--out", str(tmp_path / "y")]) == 2
    assert "only train.* and data.*" in capsys.readouterr().err
