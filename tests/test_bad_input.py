"""Bad input to the CLI gets one line naming what was wrong and what is allowed, before any
work is done (docs/reliability.md lists every case). Checkpoint damage and concurrent runs
are in test_faults.py, the HF mapping's refusals in test_hf_contract.py."""

import json
import os
import stat

import pytest

from divmoe.cli import main
from divmoe.train import load_config, train

from test_train import TINY

SHORT = TINY + ["train.steps=4", "train.eval_every=2"]


def sets(overrides):
    return [a for kv in overrides for a in ("--set", kv)]


def one_line_error(capsys, *needles):
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("divmoe: error: "), err
    for n in needles:
        assert n in err, (n, err)
    return err


@pytest.fixture(scope="module")
def short_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("short") / "run"
    train(run, load_config(None, SHORT), progress=False)
    return run


def test_out_naming_an_existing_file_is_refused_before_any_work(tmp_path, capsys, monkeypatch):
    import divmoe.analyze.core as core

    taken = tmp_path / "taken.txt"
    taken.write_text("mine")
    assert main(["train", "--out", str(taken), "--quiet", *sets(SHORT)]) == 2
    one_line_error(capsys, f"--out {taken} is an existing file, not a folder")
    assert main(["train", "--out", str(taken / "sub"), "--quiet", *sets(SHORT)]) == 2
    one_line_error(capsys, f"{taken} is a file, so no folder can be made under it")
    assert taken.read_text() == "mine"

    def no_work(*a, **k):
        raise AssertionError("analyze loaded the model before checking --out")

    monkeypatch.setattr(core, "load_source", no_work)
    assert main(["analyze", str(tmp_path), "--out", str(taken)]) == 2
    one_line_error(capsys, f"--out {taken} is an existing file")
    cfg = tmp_path / "a.yaml"
    cfg.write_text("moe:\n  top_k: 1\n")
    assert main(["compare", "--out", str(taken), str(cfg), *sets(SHORT)]) == 2
    one_line_error(capsys, f"--out {taken} is an existing file")


def test_resume_with_fewer_steps_than_done_is_refused(short_run, capsys):
    before = (short_run / "config.yaml").read_text()
    assert main(["train", "--out", str(short_run), "--resume", "--quiet",
                 *sets(SHORT + ["train.steps=2"])]) == 2
    one_line_error(capsys, "--resume: train.steps=2 but", "is already at step 4",
                   "train.steps may only stay or grow on resume")
    assert (short_run / "config.yaml").read_text() == before


def test_yaml_syntax_error_names_file_and_line(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("moe:\n  top_k: 2\n  router: [topk\ntrain:\n  steps: 3\n")
    for cmd in (["train", "--out", str(tmp_path / "r")], ["config", "--show-resolved"]):
        assert main(cmd + ["--config", str(bad)]) == 2
        one_line_error(capsys, f"config file '{bad}' is not valid YAML: line ")
    tab = tmp_path / "tab.yaml"
    tab.write_text("moe:\n\ttop_k: 2\n")
    assert main(["config", "--show-resolved", "--config", str(tab)]) == 2
    one_line_error(capsys, "is not valid YAML: line 2, column 1")
    study = tmp_path / "study.yaml"
    study.write_text("variants: {a: [moe.top_k=1]\n")
    assert main(["compare", "--out", str(tmp_path / "c"), "--study", str(study)]) == 2
    one_line_error(capsys, f"study file '{study}' is not valid YAML")


def test_folder_or_non_mapping_as_config(tmp_path, capsys):
    assert main(["config", "--show-resolved", "--config", str(tmp_path)]) == 2
    one_line_error(capsys, f"config file '{tmp_path}' is a folder; give a YAML file")
    lst = tmp_path / "list.yaml"
    lst.write_text("- moe.top_k=1\n")
    assert main(["config", "--show-resolved", "--config", str(lst)]) == 2
    one_line_error(capsys, "must hold a mapping of settings, got list")
    binary = tmp_path / "weights.yaml"
    binary.write_bytes(b"\xff\xfe\x00\x01")
    assert main(["config", "--show-resolved", "--config", str(binary)]) == 2
    one_line_error(capsys, "cannot be read")


def test_config_yaml_of_a_run_edited_into_nonsense(short_run, tmp_path, capsys):
    import shutil

    run = tmp_path / "edited"
    shutil.copytree(short_run, run)
    (run / "config.yaml").write_text("moe: {top_k: 2\n")
    assert main(["train", "--out", str(run), "--resume", "--quiet"]) == 2
    one_line_error(capsys, f"config file '{run / 'config.yaml'}' is not valid YAML")


def test_resume_of_a_folder_without_a_run(tmp_path, capsys):
    assert main(["train", "--out", str(tmp_path / "nothing"), "--resume"]) == 2
    one_line_error(capsys, "holds no run (no config.yaml); start it without --resume")
    assert not (tmp_path / "nothing").exists()


def test_run_files_follow_the_umask(tmp_path):
    """On main the checkpoint folder was always 0o755 and report.html 0o644, whatever the
    umask the rest of the run was written with."""
    old = os.umask(0o027)
    try:
        run = tmp_path / "private"
        train(run, load_config(None, SHORT), progress=False)
    finally:
        os.umask(old)
    modes = {p.relative_to(run).as_posix(): stat.S_IMODE(p.stat().st_mode)
             for p in [run, *run.rglob("*")] if p.name != ".lock"}
    assert {m for p, m in modes.items() if (run / p).is_dir()} == {0o750}, modes
    assert {m for p, m in modes.items() if (run / p).is_file()} == {0o640}, modes
    assert {"checkpoint", "checkpoint/model.safetensors", "report.html"} <= set(modes)


def test_analyze_falls_back_from_a_truncated_checkpoint_and_names_it(short_run, tmp_path,
                                                                     capsys):
    import shutil

    run = tmp_path / "half"
    shutil.copytree(short_run, run)
    weights = run / "checkpoint" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    assert main(["analyze", str(run), "--out", str(tmp_path / "a"), "--max-bytes", "256",
                 "--quiet"]) == 0
    err = capsys.readouterr().err
    assert f"{weights}: " in err and "truncated" in err and "checkpoint.prev" in err
    notes = json.loads((tmp_path / "a" / "analysis.json").read_text())["source"]["notes"]
    assert any("truncated" in n for n in notes)
    # the damaged folder named directly: no silent substitute
    assert main(["analyze", str(run / "checkpoint"), "--out", str(tmp_path / "b")]) == 2
    one_line_error(capsys, f"{weights}: ", "truncated",
                   "no earlier complete checkpoint to fall back to")


def test_analyze_half_downloaded_hf_checkpoint(tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    import torch

    cfg = transformers.MixtralConfig(vocab_size=64, hidden_size=16, intermediate_size=8,
                                     num_hidden_layers=1, num_attention_heads=2,
                                     num_key_value_heads=1, num_local_experts=4,
                                     num_experts_per_tok=2)
    torch.manual_seed(0)
    transformers.MixtralForCausalLM(cfg).save_pretrained(tmp_path / "hf")
    capsys.readouterr()
    weights = tmp_path / "hf" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 3])
    assert main(["analyze", str(tmp_path / "hf"), "--out", str(tmp_path / "o"), "--quiet"]) == 2
    one_line_error(capsys, f"could not load {tmp_path / 'hf'} with transformers")


def test_unwritable_file_in_the_run_is_one_line(short_run, tmp_path, capsys, monkeypatch):
    """An OSError (no permission, disk full outside the checkpoint) names its file."""
    import divmoe.report.html as report_html

    def denied(path, text):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(report_html, "_atomic_write", denied)
    assert main(["report", str(short_run)]) == 2
    one_line_error(capsys, "Permission denied", "report.html")
