"""Fault injection: `divmoe train` killed (SIGKILL) at chosen and at random moments, a full
disk during a checkpoint write, damaged or deleted checkpoints, two processes on one --out.
Every survivor must finish with the metrics and weights of an uninterrupted run.

The default suite runs a short sequence (4 kills, one per phase); ``-m slow`` runs the long
one (30 kills, 6 of them after random delays).
"""

import json
import os
import random
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from divmoe.cli import main
from divmoe.train import CheckpointError, load_config, train

from test_train import TINY, read_metrics, strip_timing

CHILD = Path(__file__).with_name("fault_child.py")
RUN = TINY + ["train.steps=24", "train.eval_every=4"]         # 7 evaluations and checkpoints
LONG = TINY + ["train.steps=300", "train.eval_every=4"]       # 76: work left after 30 kills


def set_args(overrides):
    return [a for kv in overrides for a in ("--set", kv)]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run of RUN: its metrics rows and final weights."""
    run = tmp_path_factory.mktemp("ref") / "full"
    result = train(run, load_config(None, RUN), progress=False)
    return strip_timing(result.metrics), load_file(str(run / "checkpoint" / "model.safetensors"))


def assert_same_as(run: Path, metrics, weights):
    assert strip_timing(read_metrics(run)) == metrics
    got = load_file(str(run / "checkpoint" / "model.safetensors"))
    assert got.keys() == weights.keys() and all(torch.equal(got[k], weights[k]) for k in got)
    summary = json.loads((run / "summary.json").read_text())
    assert not summary["interrupted"] and summary["steps"] == metrics[-1]["step"]
    assert not list(run.glob(".checkpoint-*")), "temporary checkpoint folders left behind"


def child(run: Path, overrides, phase="none", n=1, env=None):
    """A `divmoe train` subprocess with one fault armed; resumes when the run has a config."""
    args = ["train", "--out", str(run), "--quiet"]
    args += ["--resume"] if (run / "config.yaml").exists() else set_args(overrides)
    return subprocess.Popen([sys.executable, str(CHILD), phase, str(n), "--", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


def checkpoint_step(run: Path):
    for name in ("checkpoint", "checkpoint.prev"):
        try:
            return torch.load(run / name / "state.pt", weights_only=True)["step"]
        except (OSError, RuntimeError, EOFError):
            continue
    return None


def kill_and_resume(run: Path, overrides, plan, rng):
    """Run ``plan`` ((phase, n) or ("time", None) for a kill after a random delay) one
    process per entry, each resuming the last, then one clean process to the end.
    Returns a log of (what, return code, checkpoint step afterwards) and the resume count."""
    log, resumes = [], 0
    for phase, n in plan:
        resumes += (run / "config.yaml").exists()
        if phase == "time":
            proc = child(run, overrides)
            delay = rng.uniform(0.3, 4.0)  # from import (~2.5 s) to ~30 steps of training
            try:
                proc.wait(timeout=delay)
            except subprocess.TimeoutExpired:
                proc.kill()
            proc.communicate(timeout=120)
            what = f"random kill after {delay:.2f} s"
        else:
            proc = child(run, overrides, phase, n)
            _, err = proc.communicate(timeout=300)
            # the armed fault fired: the process died of SIGKILL, not of an error
            assert proc.returncode == -9, f"{phase} {n}: exit {proc.returncode}: {err[-2000:]}"
            what = f"{phase} #{n}"
        log.append((what, proc.returncode, checkpoint_step(run)))
    resumes += (run / "config.yaml").exists()
    proc = child(run, overrides)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-2000:]
    assert "val_bpb" in out
    return log, resumes


def report(name, log, resumes):
    kills = sum(rc == -9 for _, rc, _ in log)
    print(f"\n{name}: {kills} SIGKILLs survived ({len(log)} faulted processes), "
          f"{resumes} resumes, final metrics and weights equal to the uninterrupted run")
    for what, rc, step in log:
        print(f"  {what}: exit {rc}, newest complete checkpoint at step {step}")
    return kills


def test_sigkill_at_every_phase_then_resume_equals_uninterrupted(tmp_path, reference):
    run = tmp_path / "killed"
    plan = [("ckpt-files", 2),   # step-4 checkpoint half written → resumes from step 0
            ("step", 6),         # inside step 6's optimizer step → from step 4
            ("eval", 2),         # mid-evaluation at step 12 → from step 8
            ("ckpt-swap", 2)]    # step-16 checkpoint: newest moved to .prev, new one not in place
    log, resumes = kill_and_resume(run, RUN, plan, random.Random(0))
    assert [step for _, _, step in log] == [0, 4, 8, 12]
    kills = report("short fault injection", log, resumes)
    assert kills == 4 and resumes == 4
    assert_same_as(run, *reference)


@pytest.mark.slow
def test_thirty_sigkills_then_resume_equals_uninterrupted(tmp_path):
    full = train(tmp_path / "full", load_config(None, LONG), progress=False)
    weights = load_file(str(tmp_path / "full" / "checkpoint" / "model.safetensors"))
    rng = random.Random(12)
    plan = []
    for _ in range(6):
        plan += [("ckpt-files", 2), ("step", rng.randint(1, 9)), ("eval", 2), ("ckpt-swap", 2),
                 ("time", None)]
    log, resumes = kill_and_resume(tmp_path / "killed", LONG, plan, rng)
    kills = report("long fault injection", log, resumes)
    assert kills >= 24
    assert_same_as(tmp_path / "killed", strip_timing(full.metrics), weights)


def test_second_train_on_the_same_out_refuses_and_the_first_is_unharmed(tmp_path, reference,
                                                                       capsys):
    run, go = tmp_path / "shared", tmp_path / "go"
    first = child(run, RUN, "wait", 2, env={"DIVMOE_FAULT_GO": str(go)})
    deadline = time.time() + 120
    while not (run / "metrics.jsonl").exists() and time.time() < deadline:
        time.sleep(0.05)  # the first holds the lock from before its first evaluation
    # the second, as a new run and as a resume (flock excludes across processes and open files)
    assert main(["train", "--out", str(run), "--quiet", *set_args(RUN)]) == 2
    assert main(["train", "--out", str(run), "--quiet", "--resume"]) == 2
    errs = capsys.readouterr().err.strip().splitlines()
    assert len(errs) == 2 and all(f"{run} is in use by another divmoe train (pid {first.pid}"
                                  in e for e in errs), errs
    go.touch()
    _, err = first.communicate(timeout=300)
    assert first.returncode == 0, err[-2000:]
    assert_same_as(run, *reference)


def test_disk_full_during_checkpoint_write(tmp_path, reference, monkeypatch, capsys):
    import divmoe.train.checkpoint as ckpt

    writes, save_file = [], ckpt.save_file

    def full_disk(tensors, path, *a, **k):
        writes.append(path)
        if len(writes) == 3:  # the step-8 checkpoint: half a file, then ENOSPC
            Path(path).write_bytes(b"\0" * 100)
            raise OSError(28, "No space left on device", path)
        save_file(tensors, path, *a, **k)

    monkeypatch.setattr(ckpt, "save_file", full_disk)
    run = tmp_path / "full-disk"
    assert main(["train", "--out", str(run), "--quiet", *set_args(RUN)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"divmoe: error: could not write the checkpoint of step 8 into {run}: No space "
                   f"left on device; the previous checkpoint is untouched (fix that, then "
                   f"continue with --resume)")
    assert checkpoint_step(run) == 4 and not list(run.glob(".checkpoint-*"))
    monkeypatch.setattr(ckpt, "save_file", save_file)  # space freed
    train(run, None, resume=True, progress=False)
    assert_same_as(run, *reference)


def stopped_run(tmp_path, name, stop_after=10):
    """A run stopped at step 10: checkpoint at step 10, checkpoint.prev at step 8."""
    run = tmp_path / name
    train(run, load_config(None, RUN), progress=False, stop_after=stop_after)
    return run


def truncate(path: Path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def flip_bytes(path: Path):
    data = bytearray(path.read_bytes())
    for i in range(len(data) // 3, len(data) // 3 + 64):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage, file, why", [
    (truncate, "model.safetensors", "truncated"),
    pytest.param(flip_bytes, "model.safetensors", "corrupted", marks=pytest.mark.slow),
    pytest.param(truncate, "state.pt", "truncated", marks=pytest.mark.slow),
    (flip_bytes, "state.pt", "corrupted"),
])
def test_damaged_newest_checkpoint_falls_back_to_the_previous(tmp_path, reference, capsys,
                                                              damage, file, why):
    run = stopped_run(tmp_path, "damaged")
    damage(run / "checkpoint" / file)
    capsys.readouterr()
    train(run, None, resume=True, progress=False)
    err = capsys.readouterr().err
    assert f"{run / 'checkpoint' / file}: " in err and why in err
    assert f"resuming from the previous checkpoint {run / 'checkpoint.prev'} (step 8)" in err
    assert_same_as(run, *reference)


@pytest.mark.parametrize("file", ["model.safetensors", "state.pt"])
def test_damaged_checkpoints_without_manifest_are_named(tmp_path, file):
    """Checkpoints of older divmoe have no manifest: the file's own format check names it."""
    run = stopped_run(tmp_path, "old", stop_after=4)
    for ckpt in ("checkpoint", "checkpoint.prev"):
        (run / ckpt / "manifest.json").unlink()
    truncate(run / "checkpoint" / file)
    (run / "checkpoint.prev" / file).write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match=rf"{file}: not a readable .*truncated or corrupted"):
        train(run, None, resume=True, progress=False)


def test_weights_of_another_configuration(tmp_path, reference, capsys):
    run = stopped_run(tmp_path, "mixed")
    other = tmp_path / "other"
    train(other, load_config(None, RUN + ["moe.num_experts=6", "train.steps=1",
                                          "train.eval_every=1"]), progress=False)
    for name in ("model.safetensors", "manifest.json"):  # a whole, valid checkpoint, other model
        (run / "checkpoint" / name).write_bytes((other / "checkpoint" / name).read_bytes())
    capsys.readouterr()
    train(run, None, resume=True, progress=False)
    err = capsys.readouterr().err
    assert (f"{run / 'checkpoint' / 'model.safetensors'} holds the weights of another "
            f"configuration than {run / 'config.yaml'}: ") in err
    # the first tensor whose shape differs (its name depends on the layer's layout)
    assert re.search(r"\S+ \(\+\d+ more\) has shape \(6\b.*, the configuration needs \(4\b", err)
    assert_same_as(run, *reference)
    # without a previous checkpoint it is a one-line error, and analyze says the same
    run = stopped_run(tmp_path, "mixed-alone")
    import shutil

    shutil.rmtree(run / "checkpoint.prev")
    (run / "checkpoint" / "model.safetensors").write_bytes(
        (other / "checkpoint" / "model.safetensors").read_bytes())
    (run / "checkpoint" / "manifest.json").unlink()
    assert main(["train", "--out", str(run), "--resume", "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert "holds the weights of another configuration" in err and len(err.splitlines()) == 1
    assert "no earlier complete checkpoint to fall back to" in err
    assert main(["analyze", str(run), "--out", str(tmp_path / "a"), "--quiet"]) == 2
    assert "holds the weights of another configuration" in capsys.readouterr().err


def test_deleted_checkpoint_folders(tmp_path, reference, capsys):
    import shutil

    run = stopped_run(tmp_path, "deleted")
    shutil.rmtree(run / "checkpoint")
    capsys.readouterr()
    train(run, None, resume=True, progress=False)  # checkpoint.prev (step 8) is still there
    assert_same_as(run, *reference)
    run = stopped_run(tmp_path, "deleted-both")
    shutil.rmtree(run / "checkpoint")
    shutil.rmtree(run / "checkpoint.prev")
    assert main(["train", "--out", str(run), "--resume", "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"divmoe: error: --resume: {run} has metrics up to step 8 but no checkpoint "
                   f"(checkpoint/ and checkpoint.prev/ are gone), so it cannot continue; remove "
                   f"{run} to start over, or choose another --out")


def test_torn_metrics_line_is_dropped_on_resume(tmp_path, reference):
    run = stopped_run(tmp_path, "torn")
    with open(run / "metrics.jsonl", "a") as fh:
        fh.write('{"step": 12, "train_loss": 5.')  # the process died mid-append
    train(run, None, resume=True, progress=False)
    assert_same_as(run, *reference)


def test_killed_before_the_first_checkpoint_resumes_from_step_zero(tmp_path, reference):
    run = tmp_path / "early"
    run.mkdir()
    train(tmp_path / "cfg", load_config(None, RUN), progress=False, stop_after=0)
    (run / "config.yaml").write_text((tmp_path / "cfg" / "config.yaml").read_text())
    train(run, None, resume=True, progress=False)
    assert_same_as(run, *reference)
