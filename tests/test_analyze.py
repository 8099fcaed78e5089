"""divmoe analyze on a tiny divmoe run and a tiny HF Mixtral saved to disk (no downloads)."""

import json

import pytest
import torch

from divmoe.analyze import AnalyzeError, analyze
from divmoe.cli import main
from divmoe.parallel.traces import load_trace
from divmoe.train import load_config, train

from test_train import TINY

LAYER_KEYS = {"name", "load", "routing", "counts_by_domain", "specialization", "srp",
              "srp_coverage_k", "srp_coverage_2k", "sch", "redundancy", "vendi"}
SUMMARY_KEYS = {"max_vio", "cv", "mi_bits", "nmi", "srp", "sch_at_k", "sch_at_2k",
                "sch_gain_at_2k", "mean_cka", "vendi"}


def check_outputs(out, n_layers, E):
    data = json.loads((out / "analysis.json").read_text())
    assert {"source", "model", "data", "summary", "layers"} <= set(data)
    assert SUMMARY_KEYS <= set(data["summary"])
    assert len(data["layers"]) == n_layers
    domains = data["data"]["domains"]
    assert len(domains) >= 3
    for lay in data["layers"]:
        assert LAYER_KEYS <= set(lay)
        assert len(lay["load"]["load"]) == E and sum(lay["load"]["load"]) == pytest.approx(1)
        counts = torch.tensor(lay["counts_by_domain"])
        assert counts.shape == (E, len(domains))
        assert counts.sum() == lay["routing"]["slots"] - lay["routing"]["dropped_slots"]
        assert 0 <= lay["specialization"]["nmi"] <= 1
        assert lay["srp"]["segment_lens"][0] == 1 and lay["srp"]["values"][0] == pytest.approx(1)
        for vals in lay["sch"]["values"]:
            assert vals[-1] == pytest.approx(1.0)
            assert all(b >= a - 1e-12 for a, b in zip(vals, vals[1:]))
        cka = torch.tensor(lay["redundancy"]["cka"])
        assert cka.shape == (E, E) and torch.allclose(cka.diagonal(), torch.ones(E, dtype=cka.dtype))
        assert 1 <= lay["vendi"] <= E + 1e-6
        assert lay["redundancy"]["merge_candidates"]
    html = (out / "analysis.html").read_text()
    assert html.startswith("<!DOCTYPE html>") and "data:image/png;base64," in html
    for section in ("Expert load", "SRP", "SCH", "CKA", "Vendi", "merge candidates"):
        assert section in html
    return data


def test_analyze_divmoe_run(tmp_path, capsys):
    run = tmp_path / "run"
    train(run, load_config(None, TINY), progress=False)
    out = tmp_path / "analysis"
    assert main(["analyze", str(run), "--out", str(out), "--max-bytes", "1024"]) == 0
    printed = capsys.readouterr()
    assert "SRP" in printed.out and "analyze:" in printed.err   # progress on stderr
    data = check_outputs(out, n_layers=2, E=4)
    assert data["source"]["kind"] == "divmoe" and data["source"]["tokenizer"] == "byte"
    assert data["data"]["tokens_by_domain"] == {d: 1024 for d in data["data"]["domains"]}
    assert len(data["training_load"]["steps"]) == 4            # from metrics.jsonl
    # the routing trace `divmoe place` reads: every token through both MoE blocks
    trace = load_trace(out)
    assert trace.layers == [0, 1] and trace.tokens == sum(data["data"]["tokens_by_domain"].values())
    assert trace.load_LE.sum(1).tolist() == [trace.tokens * 2] * 2  # top-2, no empty slots
    assert trace.load_LE.tolist() == [[sum(c) for c in lay["counts_by_domain"]]
                                      for lay in data["layers"]]
    # the checkpoint folder itself works too
    analyze(run / "checkpoint", tmp_path / "a2", max_bytes=512, progress=False)
    assert (tmp_path / "a2" / "analysis.json").is_file()


def test_analyze_hf_mixtral(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.MixtralConfig(vocab_size=300, hidden_size=32, intermediate_size=16,
                                     num_hidden_layers=2, num_attention_heads=4,
                                     num_key_value_heads=2, num_local_experts=6,
                                     num_experts_per_tok=2, max_position_embeddings=64)
    torch.manual_seed(0)
    transformers.MixtralForCausalLM(cfg).save_pretrained(tmp_path / "hf")
    data = analyze(tmp_path / "hf", tmp_path / "out", max_bytes=1024, progress=False)
    check_outputs(tmp_path / "out", n_layers=2, E=6)
    assert data["source"]["kind"] == "hf" and data["source"]["tokenizer"] == "byte-fallback"
    assert any("no tokenizer" in n for n in data["source"]["notes"])
    assert "no tokenizer" in (tmp_path / "out" / "analysis.html").read_text()
    assert data["model"]["layers"] == ["model.layers.0.mlp", "model.layers.1.mlp"]
    assert data["hf_check"]["max_abs_diff_divmoe_vs_hf_block"] < 1e-4


def test_analyze_rejects_other_folders(tmp_path, capsys):
    with pytest.raises(AnalyzeError, match="neither a divmoe run folder"):
        analyze(tmp_path, tmp_path / "out", progress=False)
    assert main(["analyze", str(tmp_path / "missing"), "--out", str(tmp_path / "o")]) == 2
    assert "does not exist" in capsys.readouterr().err
