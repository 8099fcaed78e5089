"""`divmoe compare`: variants on the same budget → summary.md + report.html (the seed-claims
study: tests/test_seed_claims.py)."""

import json

import pytest
import yaml

from divmoe.cli import main
from divmoe.compare import Variant, load_study, run_compare, specialization_mi
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
