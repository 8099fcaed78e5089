"""Checkpoints: safetensors weights + the training state to resume, written atomically.

A checkpoint is a folder ``RUN/checkpoint/`` holding ``model.safetensors`` and
``state.pt``. It is written to a temporary sibling and renamed into place, so a crash
leaves either the old checkpoint or the new one, never a half-written mix.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

CHECKPOINT = "checkpoint"


def save_checkpoint(run_dir: Path, model: torch.nn.Module, state: dict) -> Path:
    run_dir = Path(run_dir)
    final = run_dir / CHECKPOINT
    tmp = Path(tempfile.mkdtemp(prefix=".checkpoint-", dir=run_dir))
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; the checkpoint is as readable as the run
    try:
        tensors = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
        save_file(tensors, str(tmp / "model.safetensors"))
        torch.save(state, tmp / "state.pt")
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        old = run_dir / (CHECKPOINT + ".old")
        if final.exists():
            if old.exists():
                shutil.rmtree(old)
            os.replace(final, old)
        os.replace(tmp, final)
        if old.exists():
            shutil.rmtree(old)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def find_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint folder (falls back to ``.old`` after a crash mid-swap)."""
    for name in (CHECKPOINT, CHECKPOINT + ".old"):
        path = Path(run_dir) / name
        if (path / "model.safetensors").is_file() and (path / "state.pt").is_file():
            return path
    return None


def load_checkpoint(path: Path, model: torch.nn.Module) -> dict:
    model.load_state_dict(load_file(str(Path(path) / "model.safetensors")))
    return torch.load(Path(path) / "state.pt", weights_only=True)
