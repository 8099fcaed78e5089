"""``divmoe bench --quick``: runs in seconds and gives well-formed JSON and tables. No timing claims."""

import argparse
import json
import math

import pytest
import torch

from divmoe.bench import MODES, QUICK_SHAPES
from divmoe.cli import main as cli_main


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "quick.json"
    threads = torch.get_num_threads()
    try:
        rc = cli_main(["bench", "--quick", "--train", "--threads", "1", "--json", str(out)])
    finally:
        torch.set_num_threads(threads)
    return rc, json.loads(out.read_text())


def _shape(r):
    return (r["shape"]["d"], r["shape"]["F"], r["shape"]["E"], r["shape"]["k"])


def test_quick_rows_cover_every_shape_mode_and_candidate(quick):
    rc, result = quick
    assert rc == 0
    rows = result["rows"]
    assert {_shape(r) for r in rows} == set(QUICK_SHAPES)
    assert result["meta"]["tokens"] == [64] and result["meta"]["repeats"] == 1
    # the exact command line, for the docs
    assert result["meta"]["command"].startswith("divmoe bench --quick --train --threads 1 --json")
    # transformers is a dev dependency; torch 2.13 has torch._grouped_mm on CPU
    expected = {"dense", "divmoe", "torch:grouped_mm", "hf:eager", "hf:grouped_mm"}
    for shape in QUICK_SHAPES:
        for mode in MODES:
            names = {r["name"] for r in rows if r["mode"] == mode and _shape(r) == shape}
            assert expected <= names, (shape, mode, names)


def test_quick_times_memory_split_are_finite(quick):
    _, result = quick
    for r in result["rows"]:
        assert len(r["times_ms"]) == 1
        for t in r["times_ms"] + [r["median_ms"], r["ratio_to_dense"]]:
            assert math.isfinite(t) and t > 0, r
        for v in r.get("speedup_over", {}).values():
            assert math.isfinite(v) and v > 0, r
        # useful expert FLOPs (6·k·d·F per token, ×3 with backward) over the median time
        d, F, _, k = _shape(r)
        flops = 6 * 64 * k * d * F * (3 if r["mode"] == "fwd+bwd" else 1)
        assert r["tflops"] == pytest.approx(flops / (r["median_ms"] * 1e-3) / 1e12)
        assert r["fraction_of_matmul"] == pytest.approx(r["tflops"] / result["meta"]["matmul_tflops"])
        if r["name"] == "dense":
            assert r["ratio_to_dense"] == pytest.approx(1.0)
    assert result["meta"]["matmul_tflops"] > 0 and result["meta"]["matmul_n"] == 256
    mem = result["memory"]
    assert {(_shape(m), m["name"]) for m in mem} >= {(s, "divmoe") for s in QUICK_SHAPES}
    assert all(m["peak_bytes"] > 0 for m in mem)
    for s in result["split"]:
        assert set(s["share"]) == {"router", "dispatch", "experts", "combine", "other"}
        assert all(0 <= v <= 1 for v in s["share"].values())
        assert s["share"]["experts"] > 0 and s["share"]["router"] > 0
        assert sum(s["share"].values()) == pytest.approx(1.0, abs=0.05)


def test_quick_train_and_targets(quick):
    _, result = quick
    t = result["train"]
    assert set(t["models"]) == {"moe", "dense"}
    for m in t["models"].values():
        assert m["tokens_per_s"] > 0 and len(m["step_ms"]) == 2
    assert t["moe_over_dense_tokens_per_s"] == pytest.approx(
        t["models"]["moe"]["tokens_per_s"] / t["models"]["dense"]["tokens_per_s"])
    names = {x["target"] for x in result["targets"]}
    assert {"fwd+bwd time / dense", "peak fwd+bwd memory / dense",
            "training tokens/s MoE / dense"} <= names
    for x in result["targets"]:  # each verdict follows from its value and limit
        op, limit = x["limit"].split()
        assert x["met"] == (x["value"] <= float(limit) if op == "<=" else x["value"] >= float(limit)), x


def test_quick_divmoe_matches_mixtral_block(quick):
    _, result = quick
    for name in ("divmoe", "torch:grouped_mm"):
        checks = [c for c in result["checks"] if c["name"] == name]
        assert len(checks) == len(QUICK_SHAPES) and all(c["against"] == "hf:eager" for c in checks)
    for c in result["checks"]:
        assert c["ok"] and c["max_abs_diff"] < 1e-4, c


def test_skips_are_explained(quick):
    """On CPU the CUDA-only HF experts implementations are skipped, each with its reason."""
    _, result = quick
    skipped = {s["name"]: s["reason"] for s in result["skipped"]}
    assert {"hf:deepgemm", "hf:sonicmoe", "divmoe[triton]"} <= set(skipped), skipped
    assert all("CUDA" in skipped[n] for n in ("hf:deepgemm", "hf:sonicmoe", "divmoe[triton]"))


def test_table_for_people(quick, capsys):
    from divmoe.bench import format_tables
    _, result = quick
    text = format_tables(result)
    assert "| shape (d,ffn,E,k) | tokens | mode | candidate |" in text
    assert "| target | where | value | limit | met |" in text


def test_cuda_adds_the_fine_grained_shape_and_gpu_targets(monkeypatch):
    from divmoe.bench import runner
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    args = runner.add_arguments(argparse.ArgumentParser()).parse_args(["--device", "cuda"])
    runs = runner.resolve(args).runs
    assert runs[-1] == runner.FINE_GRAINED and len(runs) == 7 and args.dtype == "bf16"
    given = runner.add_arguments(argparse.ArgumentParser()).parse_args(
        ["--device", "cuda", "--shape", "8,8,4,2"])
    assert runner.resolve(given).runs == [((8, 8, 4, 2), 4096), ((8, 8, 4, 2), 16384)]
    fine = dict(zip("dFEk", runner.FINE_GRAINED[0]))
    rows = [{"shape": fine, "tokens": 32768, "mode": "fwd+bwd", "name": name,
             "ratio_to_dense": ratio, "speedup_over": {"hf:grouped_mm": speedup}}
            for name, ratio, speedup in [("divmoe", 1.3, 1.1), ("divmoe[triton]", 1.1, 1.5)]]
    memory = [{"shape": fine, "tokens": 32768, "name": "divmoe[triton]", "ratio_to_dense": 1.05}]
    targets = runner.evaluate_targets({"meta": {"device": "cuda"}, "rows": rows,
                                       "memory": memory, "split": [], "train": None})
    got = {t["target"]: t["met"] for t in targets}
    assert got == {"fwd+bwd time / dense": False, "divmoe faster than hf:grouped_mm (×)": False,
                   "divmoe[triton] fwd+bwd time / dense": True,
                   "divmoe[triton] divmoe faster than hf:grouped_mm (×)": True,
                   "divmoe[triton] peak fwd+bwd memory / dense": True}


def test_gpu_check_script_parses_and_names_files_that_exist():
    import re
    import subprocess
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    script = root / "benchmarks" / "gpu_check.sh"
    subprocess.run(["bash", "-n", str(script)], check=True)
    named = set(re.findall(r"tests/test_\w+\.py", script.read_text()))
    assert named == {"tests/test_cuda.py", "tests/test_triton_dispatch.py"}
    assert all((root / n).is_file() for n in named)


def test_wrapper_script_and_bad_shape():
    from pathlib import Path
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_layer.py"
    assert "divmoe.bench" in script.read_text()
    with pytest.raises(SystemExit):
        cli_main(["bench", "--shape", "1,2,3"])


def test_extra_candidates_include_heterogeneous_experts_on_the_fast_path(tmp_path):
    out = tmp_path / "extra.json"
    threads = torch.get_num_threads()
    try:
        rc = cli_main(["bench", "--quick", "--extra", "--no-hf", "--no-st-moe", "--no-memory",
                       "--no-split", "--threads", "1", "--json", str(out)])
    finally:
        torch.set_num_threads(threads)
    assert rc == 0
    rows = json.loads(out.read_text())["rows"]
    names = {r["name"] for r in rows}
    assert {"divmoe+aux+z", "divmoe[loop]", "divmoe[recompute]", "divmoe[hetero]"} <= names
    assert all(math.isfinite(r["median_ms"]) for r in rows if r["name"] == "divmoe[hetero]")


def test_distributed_bench_counts_the_exchanges(capsys):
    """W=1 exchanges nothing; on 2 ranks each MoE layer makes one count exchange and four row
    exchanges per step (tokens out and back, forward and backward), and what the ranks sent
    is what they received."""
    from divmoe.bench.distributed import bench_distributed

    tiny = ["model.d_model=16", "model.n_layers=2", "model.n_heads=2", "model.seq_len=8",
            "moe.num_experts=4", "moe.expert_hidden=8", "train.batch_size=4"]
    res = bench_distributed(tiny, [1, 2], steps=1, warmup=1, seed=0, log=lambda m: None)
    one, two = res["worlds"]
    assert (one["exchanges_per_step"], one["bytes_sent_per_rank"]) == (0, 0)
    assert two["exchanges_per_step"] == 2 * 5
    ranks = [r[0] for r in two["per_rank"]]
    assert sum(r["bytes_sent"] for r in ranks) == sum(r["bytes_received"] for r in ranks) > 0
    # at most every slot row (2 layers, k=2, 16 fp32) four times, plus a count row per layer
    # and rank (32 tokens); about half of the slots have their expert on the other rank
    upper = 2 * 4 * 2 * 16 * 4 + 2 * 2 * 2 * 8 / 32
    assert 0.25 * upper < two["bytes_sent_per_token"] <= upper
