"""Checkpoints: safetensors weights + the training state to resume, written atomically,
checked when read.

A run keeps its two newest checkpoints, ``RUN/checkpoint/`` and ``RUN/checkpoint.prev/``,
each holding ``model.safetensors``, ``state.pt`` and ``manifest.json`` (size and SHA-256 of
both). A new checkpoint is written into a temporary sibling, fsynced, and renamed into
place; the newest becomes ``.prev``. A crash or a kill at any moment therefore leaves at
least one complete checkpoint, and a failed write (disk full) leaves both untouched.

Reading checks the manifest, then each file's format, then that the weights fit the model;
a damaged checkpoint raises :class:`CheckpointError` naming the file and what is wrong, and
:func:`load_latest` then falls back to the previous complete one (and says so).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..files import file_mode, folder_mode, fsync_folder
from .run_folder import RunError

CHECKPOINT = "checkpoint"
PREVIOUS = "checkpoint.prev"
WEIGHTS, STATE, MANIFEST = "model.safetensors", "state.pt", "manifest.json"
_TEMP_PREFIX = ".checkpoint-"
_STATE_KEYS = ("step", "optimizer", "rng")


class CheckpointError(RunError):
    """A checkpoint that cannot be written or read; the message names the file."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def save_checkpoint(run_dir: Path, weights: dict[str, torch.Tensor], state: dict) -> Path:
    """Write ``weights`` (a model's single-process state dict) and ``state`` as the run's
    newest checkpoint.

    Steps: remove temporaries a killed writer left; write both files and their manifest into
    a fresh temporary folder and fsync them; move the previous checkpoint away, the newest to
    ``.prev`` and the new one into place; fsync the run folder.
    """
    run_dir = Path(run_dir)
    for stale in run_dir.glob(_TEMP_PREFIX + "*"):  # the run lock makes them ours
        shutil.rmtree(stale, ignore_errors=True)
    final, prev = run_dir / CHECKPOINT, run_dir / PREVIOUS
    tmp = Path(tempfile.mkdtemp(prefix=_TEMP_PREFIX, dir=run_dir))
    os.chmod(tmp, folder_mode())  # mkdtemp makes it private; the checkpoint is as readable as the run
    try:
        tensors = {k: v.detach().contiguous() for k, v in weights.items()}
        try:
            save_file(tensors, str(tmp / WEIGHTS))
            torch.save(state, tmp / STATE)
            manifest = {}
            for name in (WEIGHTS, STATE):
                os.chmod(tmp / name, file_mode())  # safetensors writes its file private
                with open(tmp / name, "rb") as fh:
                    os.fsync(fh.fileno())
                manifest[name] = {"bytes": (tmp / name).stat().st_size,
                                  "sha256": _sha256(tmp / name)}
            with open(tmp / MANIFEST, "w") as fh:
                json.dump(manifest, fh)
                fh.flush()
                os.fsync(fh.fileno())
        except (OSError, SafetensorError, RuntimeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
            raise CheckpointError(
                f"could not write the checkpoint of step {state.get('step')} into {run_dir}: "
                f"{reason}; the previous checkpoint is untouched (fix that, then continue "
                f"with --resume)") from None
        if prev.exists():  # renamed first so that it vanishes at once, never half-deleted
            trash = Path(tempfile.mkdtemp(prefix=_TEMP_PREFIX, dir=run_dir))
            os.replace(prev, trash / PREVIOUS)
        if final.exists():
            os.replace(final, prev)
        os.replace(tmp, final)
        fsync_folder(run_dir)
    finally:
        for leftover in run_dir.glob(_TEMP_PREFIX + "*"):
            shutil.rmtree(leftover, ignore_errors=True)
    return final


def checkpoint_candidates(run_dir: Path) -> list[Path]:
    """The run's checkpoint folders that hold both files, newest first (not yet verified)."""
    return [p for p in (Path(run_dir) / CHECKPOINT, Path(run_dir) / PREVIOUS)
            if (p / WEIGHTS).is_file() and (p / STATE).is_file()]


def _check_manifest(ckpt: Path, name: str) -> None:
    """Size and SHA-256 of ``ckpt/name`` against the manifest (checkpoints without one, from
    older divmoe, are checked by format only)."""
    if not (ckpt / MANIFEST).is_file():
        return
    try:
        entry = json.loads((ckpt / MANIFEST).read_text())[name]
        want_bytes, want_sha = int(entry["bytes"]), str(entry["sha256"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{ckpt / MANIFEST}: unreadable ({type(exc).__name__}: {exc})") from None
    path = ckpt / name
    size = path.stat().st_size
    if size != want_bytes:
        raise CheckpointError(f"{path}: {size} bytes, but {want_bytes} were written "
                              f"({'truncated' if size < want_bytes else 'grown'})")
    if _sha256(path) != want_sha:
        raise CheckpointError(f"{path}: content differs from what was written (corrupted)")


def load_weights(ckpt: Path, model: torch.nn.Module, config_name: str = "config.yaml") -> None:
    """Load ``ckpt/model.safetensors`` into ``model``; CheckpointError when the file is damaged
    or holds the weights of another configuration than the model's (``config_name``)."""
    path = Path(ckpt) / WEIGHTS
    _check_manifest(Path(ckpt), WEIGHTS)
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{path}: not a readable safetensors file ({exc}); it is truncated "
                              f"or corrupted") from None
    want = model.state_dict()
    missing = [k for k in want if k not in tensors]
    unexpected = [k for k in tensors if k not in want]
    wrong = [k for k in want if k in tensors and tuple(tensors[k].shape) != tuple(want[k].shape)]

    def first(names):
        return names[0] + (f" (+{len(names) - 1} more)" if len(names) > 1 else "")

    if missing or unexpected or wrong:
        what = (f"{first(wrong)} has shape {tuple(tensors[wrong[0]].shape)}, the configuration "
                f"needs {tuple(want[wrong[0]].shape)}" if wrong else
                f"missing {first(missing)}" if missing else f"unexpected {first(unexpected)}")
        raise CheckpointError(f"{path} holds the weights of another configuration than "
                              f"{config_name}: {what}")
    model.load_state_dict(tensors)


def read_checkpoint(ckpt: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    config_name: str = "config.yaml") -> dict:
    """Load a checkpoint into ``model`` and ``optimizer``; returns the rest of the saved state
    (``rng`` included). CheckpointError naming the file when anything does not fit."""
    ckpt = Path(ckpt)
    load_weights(ckpt, model, config_name)
    path = ckpt / STATE
    _check_manifest(ckpt, STATE)
    try:
        state = torch.load(path, weights_only=True, map_location="cpu")  # any device resumes it
    except Exception as exc:  # noqa: BLE001 - pickle, zip and torch each fail in their own way
        raise CheckpointError(f"{path}: not a readable training state ({type(exc).__name__}: "
                              f"{str(exc).splitlines()[0] if str(exc) else ''}); it is truncated "
                              f"or corrupted") from None
    if not isinstance(state, dict) or any(k not in state for k in _STATE_KEYS):
        raise CheckpointError(f"{path}: not a divmoe training state (needs keys "
                              f"{', '.join(_STATE_KEYS)})")
    try:
        optimizer.load_state_dict(state.pop("optimizer"))
    except (ValueError, KeyError, RuntimeError) as exc:
        raise CheckpointError(f"{path}: its optimizer state does not fit the model of "
                              f"{config_name} ({exc})") from None
    return state


def first_readable(ckpts: list[Path], load: Callable[[Path], object]) -> tuple[Path, object, list]:
    """``load(ckpt)`` on each of ``ckpts`` (newest first) until one reads back whole; returns
    that folder, what ``load`` returned and the CheckpointErrors of the newer ones. When none
    reads back: CheckpointError naming the newest one's problem (and the previous one's)."""
    errors: list[CheckpointError] = []
    for ckpt in ckpts:
        try:
            return ckpt, load(ckpt), errors
        except CheckpointError as exc:
            errors.append(exc)
    if not errors:
        raise CheckpointError("no checkpoint folder to load")
    raise CheckpointError(f"{errors[0]}; no earlier complete checkpoint to fall back to"
                          if len(errors) == 1 else
                          f"{errors[0]}; and the previous one: {errors[1]}")


def load_latest(run_dir: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                log: Callable[[str], None]) -> tuple[Path, dict] | None:
    """Load the newest checkpoint that reads back whole; ``log`` says why a newer one was
    skipped. None when the run has no checkpoint; CheckpointError (the newest one's problem)
    when none of them is usable."""
    candidates = checkpoint_candidates(run_dir)
    if not candidates:
        return None
    config_name = str(Path(run_dir) / "config.yaml")
    ckpt, state, errors = first_readable(
        candidates, lambda c: read_checkpoint(c, model, optimizer, config_name))
    for exc in errors:
        log(f"{exc}; resuming from the previous checkpoint {ckpt} (step {state['step']})")
    return ckpt, state
