"""`divmoe compare`: variants on the same budget → summary.md + report.html; seed-claims study."""

import json

import pytest
import yaml

from divmoe.cli import main
from divmoe.compare import CLAIMS, Variant, load_study, run_compare, specialization_mi
from divmoe.compare import seed_claims as SC
from divmoe.config import ConfigError

TINY = ["model.d_model=16", "model.n_layers=1", "model.n_heads=2", "model.seq_len=32",
        "moe.num_experts=4", "moe.top_k=2", "moe.expert_hidden=16",
        "train.steps=4", "train.batch_size=4", "train.eval_every=2", "train.warmup_steps=1",
        "train.eval_batch_size=32", "data.val_bytes_per_domain=512", "train.threads=1"]


def test_compare_two_configs_writes_table_and_report(tmp_path, capsys):
    a, b = tmp_path / "topk.yaml", tmp_path / "lfb.yaml"
    a.write_text(yaml.safe_dump({"moe": {"router": "topk"}}))
    b.write_text(yaml.safe_dump({"moe": {"balance": ["z_loss", "loss_free_bias"],
                                         "diversity": ["exclusivity"]}}))
    out = tmp_path / "cmp"
    args = ["compare", "--out", str(out), str(a), str(b)] + [x for kv in TINY for x in ("--set", kv)]
    assert main(args) == 0
    err = capsys.readouterr().err
    assert "topk: trained" in err and "lfb: trained" in err
    summary = (out / "summary.md").read_text()
    header = summary.splitlines()[2]
    for col in ("variant", "val bpb", "bpb english", "MaxVio", "spec. MI (bits)", "expert Vendi",
                "activated params", "tokens/s"):
        assert col in header, col
    assert "| topk |" in summary and "| lfb |" in summary
    report = (out / "report.html").read_text()
    assert report.count("<img") >= 2 and "<table>" in report and "lfb" in report
    rows = [json.loads(l) for l in (out / "lfb" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["expert_vendi"] >= 1.0 and len(rows[-1]["expert_vendi_by_layer"]) == 1
    assert (yaml.safe_load((out / "lfb" / "config.yaml").read_text())["moe"]["diversity"]
            == ["exclusivity"])
    # Finished variants are not retrained.
    assert main(args) == 0
    err = capsys.readouterr().err
    assert "topk: done" in err and "lfb: done" in err


def test_interrupted_variant_is_resumed(tmp_path):
    from divmoe.train import load_config, train

    v = Variant("a", ["train.steps=4"])
    train(tmp_path / "a", load_config(None, TINY), progress=False, stop_after=2)
    logs = []
    summaries = run_compare(tmp_path, [v], TINY, log=logs.append)
    assert logs[0].startswith("a: resumed") and summaries[0]["step"] == 4
    with pytest.raises(ConfigError, match="different configuration"):
        run_compare(tmp_path, [Variant("a", ["moe.top_k=1"])], TINY)


def test_study_file_and_errors(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump({"base": ["train.steps=3"],
                                    "variants": {"k1": ["moe.top_k=1"], "k2": {"moe": {"top_k": 2}}}}))
    base, vs = load_study(path)
    assert base == ["train.steps=3"] and [v.name for v in vs] == ["k1", "k2"]
    assert vs[1].overrides == ["moe.top_k=2"] and vs[1].resolve(base).moe.top_k == 2
    with pytest.raises(ConfigError, match="distinct"):
        run_compare(tmp_path / "x", [Variant("a"), Variant("a")])
    with pytest.raises(ConfigError, match="moe.router"):   # checked before any training
        run_compare(tmp_path / "y", [Variant("ok"), Variant("bad", ["moe.router=nope"])])
    assert not (tmp_path / "y" / "ok").exists()
    assert main(["compare", "--out", str(tmp_path / "z")]) == 2


def test_specialization_mi_from_routing():
    # Layer 0: expert = domain (1 bit for 2 equally likely domains); layer 1: independent.
    routing = {"counts": [[[5, 0], [0, 5]], [[3, 3], [3, 3]]]}
    assert specialization_mi(routing) == pytest.approx(0.5)
    assert specialization_mi(None) is None


def _fake(name, bpb, **kw):
    rows = kw.pop("rows", [{"step": 0, "val_bpb": 8.0}, {"step": 10, "val_bpb": bpb}])
    return {"name": name, "val_bpb": bpb, "rows": rows, **kw}


def test_seed_claims_verdicts_from_numbers():
    claim1, claim3, claim7 = CLAIMS[0], CLAIMS[2], CLAIMS[6]
    runs = {"loss_free_bias": [_fake("a", 3.00, max_vio=0.2), _fake("a", 3.01, max_vio=0.3)],
            "topk": [_fake("b", 3.00, max_vio=0.9, expert_vendi=2.0),
                     _fake("b", 3.02, max_vio=0.8, expert_vendi=2.5)]}
    assert SC.judge(claim1, runs)["verdict"] == "reproduced"
    runs["loss_free_bias"] = [_fake("a", 3.5, max_vio=0.2), _fake("a", 3.6, max_vio=0.3)]
    assert SC.judge(claim1, runs)["verdict"] == "not reproduced"   # val loss much worse
    runs["loss_free_bias"] = [_fake("a", 3.0, max_vio=0.95), _fake("a", 3.0, max_vio=0.5)]
    assert SC.judge(claim1, runs)["verdict"] == "inconclusive"     # seeds disagree
    runs["diversity_exclusivity"] = [_fake("d", 3.0, expert_vendi=1.5), _fake("d", 3.0, expert_vendi=2.0)]
    assert SC.judge(claim7, runs)["verdict"] == "not reproduced"
    # Steps to target: expert_choice reaches 1.02 × topk's final bpb at step 10, topk at 20.
    curve = lambda *pts: [{"step": s, "val_bpb": v} for s, v in pts]
    runs["expert_choice"] = [_fake("e", 2.9, rows=curve((0, 8), (10, 3.0), (20, 2.9)))]
    runs["topk"] = [_fake("b", 3.0, rows=curve((0, 8), (10, 3.5), (20, 3.0)))]
    r = SC.judge(claim3, runs)
    assert r["verdict"] == "reproduced" and "10 vs topk 20" in r["numbers"]
    runs["expert_choice"] = [_fake("e", 3.5, rows=curve((0, 8), (10, 4.0), (20, 3.5)))]
    assert SC.judge(claim3, runs)["verdict"] == "not reproduced"   # never reaches the target


def test_seed_claims_variants_are_valid_configs():
    for quick in (True, False):
        base = SC.QUICK if quick else SC.BASE
        vs = SC.variants(quick)
        assert {n for c in CLAIMS for n in c.variants} <= {v.name for v in vs}
        for v in vs:
            cfg = v.resolve(base)
            assert cfg.train.grad_accum * cfg.train.batch_size == int(
                dict(kv.split("=") for kv in base)["train.batch_size"])
        het = next(v for v in vs if v.name == "heterogeneous").resolve(base).moe
        assert sum(het.expert_widths) == het.num_experts * het.expert_hidden


@pytest.mark.slow
def test_seed_claims_quick_end_to_end(tmp_path, capsys):
    out = tmp_path / "sc"
    assert main(["compare", "--out", str(out), "--study", "seed-claims", "--quick", "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert printed.count("claim ") == 7 and "wall time" in printed
    text = (out / "summary.md").read_text()
    assert text.count("| **") == 7 and "## Runs" in text
    assert "<img" in (out / "report.html").read_text()
