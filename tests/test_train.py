"""`divmoe train` end to end on a tiny model: files, resume equality, errors."""

import json

import pytest
import torch
import yaml

from divmoe.cli import main
from divmoe.config import ConfigError
from divmoe.train import RunError, load_config, train

TINY = ["model.d_model=16", "model.n_layers=2", "model.n_heads=2", "model.seq_len=32",
        "moe.num_experts=4", "moe.top_k=2", "moe.expert_hidden=16",
        "train.steps=12", "train.batch_size=4", "train.eval_every=4", "train.warmup_steps=2",
        "train.eval_batch_size=16", "data.val_bytes_per_domain=1024", "train.threads=1"]

TIMING_KEYS = {"tokens_per_s", "elapsed_s"}


def strip_timing(rows):
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in rows]


def read_metrics(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_train_writes_every_artifact(tmp_path):
    run = tmp_path / "run"
    result = train(run, load_config(None, TINY), progress=False)
    for name in ("config.yaml", "metrics.jsonl", "routing.json", "summary.json", "report.html",
                 "checkpoint/model.safetensors", "checkpoint/state.pt"):
        assert (run / name).is_file(), name
    rows = read_metrics(run)
    assert [r["step"] for r in rows] == [0, 4, 8, 12]
    required = {"step", "train_loss", "val_loss", "val_bpb", "val_bpb_by_domain", "max_vio",
                "tokens_per_s", "expert_load", "activated_params_mean"}
    assert required <= set(rows[-1])
    # 4 experts of 3·16·16 params, top_k=2, router 16·4: at most 2 experts + router per token
    assert 0 < rows[-1]["activated_params_mean"] <= 2 * 3 * 16 * 16 + 16 * 4
    assert "activated MoE-layer params per token" in (run / "report.html").read_text()
    assert len(rows[-1]["val_bpb_by_domain"]) >= 3
    assert len(rows[-1]["expert_load"]) == 2 and len(rows[-1]["expert_load"][0]) == 4
    assert rows[-1]["val_bpb"] < rows[0]["val_bpb"]  # it learns something even in 12 steps
    routing = json.loads((run / "routing.json").read_text())
    assert len(routing["counts"]) == 2 and len(routing["counts"][0][0]) == len(routing["domains"])
    # MaxVio over the pooled validation set: from the last evaluation's counts, all domains
    pooled = [[sum(c) for c in layer] for layer in routing["counts"]]
    vio = [(max(load) - sum(load) / len(load)) / (sum(load) / len(load)) for load in pooled]
    assert rows[-1]["max_vio_pooled"] == pytest.approx(sum(vio) / len(vio), rel=1e-12)
    assert rows[-1]["max_vio_pooled_by_layer"] == pytest.approx(vio, rel=1e-12)
    # MaxVio of the training batches: none before the first step, then a real number
    assert rows[0]["train_max_vio"] is None and rows[-1]["train_max_vio"] > 0
    resolved = yaml.safe_load((run / "config.yaml").read_text())
    assert resolved["moe"]["num_experts"] == 4 and resolved["train"]["steps"] == 12
    assert "<img" in (run / "report.html").read_text()
    assert result.metrics == rows


def test_resumed_run_equals_uninterrupted(tmp_path):
    cfg = load_config(None, TINY + ["moe.jitter=0.1"])  # jitter exercises the saved RNG state
    full = train(tmp_path / "full", cfg, progress=False)
    part = train(tmp_path / "part", cfg, progress=False, stop_after=6)  # between two evals
    assert part.interrupted and [r["step"] for r in part.metrics] == [0, 4]
    resumed = train(tmp_path / "part", None, resume=True, progress=False)
    assert strip_timing(read_metrics(tmp_path / "part")) == strip_timing(full.metrics)
    assert strip_timing(resumed.metrics) == strip_timing(full.metrics)


def test_dense_baseline_trains(tmp_path):
    result = train(tmp_path / "dense", load_config(None, TINY + ["model.moe=false"]), progress=False)
    assert result.metrics[-1]["max_vio"] is None and result.metrics[-1]["train_max_vio"] is None
    assert not (tmp_path / "dense" / "routing.json").exists()
    summary = json.loads((tmp_path / "dense" / "summary.json").read_text())
    assert summary["model"] == "dense" and summary["params_total"] == summary["params_active"]


def test_existing_run_is_not_overwritten(tmp_path):
    cfg = load_config(None, TINY + ["train.steps=2", "train.eval_every=2"])
    train(tmp_path / "r", cfg, progress=False)
    with pytest.raises(RunError, match="already holds a run"):
        train(tmp_path / "r", cfg, progress=False)
    with pytest.raises(RunError, match="holds no run"):
        train(tmp_path / "other", None, resume=True, progress=False)


def test_resume_refuses_a_different_config(tmp_path):
    cfg = load_config(None, TINY + ["train.steps=2", "train.eval_every=2"])
    train(tmp_path / "r", cfg, progress=False)
    with pytest.raises(ConfigError, match="only train.steps may change"):
        train(tmp_path / "r", load_config(None, TINY + ["moe.top_k=1"]), resume=True, progress=False)


def test_cli_errors_name_key_value_and_allowed(tmp_path, capsys):
    assert main(["train", "--out", str(tmp_path / "x"), "--set", "moe.router=nope"]) == 2
    err = capsys.readouterr().err
    assert "moe.router='nope'" in err and "topk" in err
    assert main(["train", "--out", str(tmp_path / "x"), "--set", "model.widht=3"]) == 2
    assert "unknown key 'model.widht'" in capsys.readouterr().err
    assert main(["train", "--out", str(tmp_path / "x"), "--set", "data.weights={klingon: 1}"]) == 2
    assert "klingon" in capsys.readouterr().err
    assert main(["train", "--out", str(tmp_path / "x"), "--config", str(tmp_path / "none.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_cli_config_file_and_set(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text("moe:\n  num_experts: 6\ntrain:\n  steps: 3\n")
    assert main(["config", "--show-resolved", "--config", str(path), "--set", "train.steps=5"]) == 0
    out = yaml.safe_load(capsys.readouterr().out)
    assert out["moe"]["num_experts"] == 6 and out["train"]["steps"] == 5


def test_cli_train_and_report(tmp_path, capsys):
    out = tmp_path / "cli"
    args = ["train", "--out", str(out), "--quiet"] + [a for kv in TINY for a in ("--set", kv)]
    assert main(args + ["--set", "train.steps=4"]) == 0
    assert "val_bpb" in capsys.readouterr().out
    assert main(["report", str(out)]) == 0


def test_dense_baseline_matches_active_width():
    from divmoe.layer import MoEConfig
    from divmoe.models.transformer import dense_equivalent_hidden

    assert dense_equivalent_hidden(MoEConfig(top_k=2, expert_hidden=64)) == 128
    assert dense_equivalent_hidden(MoEConfig(top_k=2, expert_hidden=64, num_shared_experts=1)) == 192
    assert dense_equivalent_hidden(MoEConfig(top_k=2, expert_hidden=64, num_shared_experts=1,
                                             shared_expert_hidden=24)) == 152
    assert dense_equivalent_hidden(MoEConfig(num_experts=4, top_k=2,
                                             expert_widths=[32, 96, 64, 64])) == 128


def test_ctrl_c_stops_at_a_step_boundary_and_resumes_exactly(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    overrides = TINY + ["train.steps=120", "train.eval_every=10"]
    full = train(tmp_path / "full", load_config(None, overrides), progress=False)
    run = tmp_path / "cut"
    args = [sys.executable, "-m", "divmoe.cli", "train", "--out", str(run), "--quiet"]
    args += [a for kv in overrides for a in ("--set", kv)]
    proc = subprocess.Popen(args, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        metrics = run / "metrics.jsonl"
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 2:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "continue with --resume" in err
    train(run, None, resume=True, progress=False)
    assert strip_timing(read_metrics(run)) == strip_timing(full.metrics)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_cuda_device_without_cuda_is_refused(tmp_path, capsys):
    assert main(["train", "--out", str(tmp_path / "r"), "--set", "parallel.device=cuda",
                 "--set", "train.steps=1"]) == 2
    assert "parallel.device=cuda: no CUDA device is visible" in capsys.readouterr().err
    assert not (tmp_path / "r" / "metrics.jsonl").exists()
