"""Reading a trained run and writing a transformed one as a run folder of its own.

A transformed run is an ordinary run at step 0: ``config.yaml`` (the source's, with the
layer settings the transform changed), ``checkpoint/`` (the new weights, a fresh optimizer
state), ``surgery.json`` (what was done, from what) and, for a BPE run, the source's
``tokenizer.json`` (the weights only mean something with those merges). ``divmoe train --out
NEW --resume`` evaluates it at step 0 and trains it for ``train.steps`` steps; ``divmoe analyze
NEW`` reads it.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from ..config import ConfigError, dump_yaml, to_dict
from ..data.tokenizer import TOKENIZER_FILE
from ..files import atomic_write_text, check_output_folder
from ..models import MoETransformer
from ..train.checkpoint import checkpoint_candidates
from ..train.config import RunConfig, load_config
from ..train.run_folder import RunError, locked_run

SURGERY = "surgery.json"


def rewrite_moe_layers(run: str | Path, out: str | Path, edit, info: dict,
                       calibration_sequences: int, settings: list[str], verb: str) -> dict:
    """Calibrate every MoE layer of a run's model, replace each by ``edit(moe, calibration)
    -> (new_moe, layer_info)`` and write the result as a new run with ``info`` (+ the source,
    the calibration size and each layer's info) in surgery.json, which it returns."""
    from ..inference.run_loading import load_run
    from .calibrate import calibrate, run_calibration_batches

    source = load_run(run)
    cfg, model = source.config, source.model
    idx = model.moe_layers
    if not idx:
        raise ConfigError(f"{run} is a dense model (model.moe=false): nothing to {verb}")
    moes = [model.blocks[i].mlp for i in idx]
    calib = calibrate(moes, model,
                      run_calibration_batches(cfg, source.tokenizer, calibration_sequences))
    layers = []
    for i, moe, cal in zip(idx, moes, calib):
        model.blocks[i].mlp, layer_info = edit(moe, cal)
        layers.append({"block": i, **layer_info})
    cfg = with_training_settings(dataclasses.replace(cfg, moe=model.blocks[idx[0]].mlp.config),
                                 settings)
    info = {**info, "source": str(Path(run).resolve()),
            "calibration_sequences": calibration_sequences, "layers": layers}
    write_run(out, cfg, model, info, source.tokenizer)
    return info


def with_training_settings(cfg: RunConfig, overrides: list[str]) -> RunConfig:
    """``cfg`` with ``key=value`` overrides of its ``train.*`` / ``data.*`` settings (how the
    new run continues); the model's settings come from its weights and stay as they are."""
    for item in overrides:
        key = item.split("=", 1)[0].strip()
        if not key.startswith(("train.", "data.")):
            raise ConfigError(f"--set {item!r}: only train.* and data.* settings of the new run "
                              f"can be set (the model and layer settings follow from its weights)")
        if key in ("data.tokenizer", "data.bpe_vocab"):
            raise ConfigError(f"--set {item!r}: the new run keeps the source's tokenizer (its "
                              f"embeddings are of those tokens); only other train.* and data.* "
                              f"settings can be set")
    return load_config(None, list(overrides), base=to_dict(cfg)) if overrides else cfg


def write_run(out: str | Path, cfg: RunConfig, model: MoETransformer, info: dict,
              tokenizer) -> Path:
    """Write ``model`` (built from ``cfg``) as a new run at step 0 in ``out``, with ``info``
    in ``surgery.json`` and the source run's ``tokenizer`` (a BPE is saved as tokenizer.json,
    so the new run loads, evaluates and resumes with the merges it was trained on). Refuses a
    folder that already holds a run."""
    from ..train.checkpoint import save_checkpoint
    from ..train.loop import build_optimizer

    out = check_output_folder(out)
    if (out / "config.yaml").exists() or checkpoint_candidates(out):
        raise RunError(f"--out {out} already holds a run; choose another folder")
    out.mkdir(parents=True, exist_ok=True)
    with locked_run(out):
        atomic_write_text(out / "config.yaml", dump_yaml(cfg))
        state = {"step": 0, "loss_sum": 0.0, "loss_count": 0, "train_time": 0.0,
                 "tokens_seen": 0, "elapsed": 0.0, "rng": torch.get_rng_state(),
                 "optimizer": build_optimizer(model, cfg).state_dict()}
        if tokenizer.name == "bpe":  # before the weights: a run with a checkpoint has its merges
            tokenizer.save(out / TOKENIZER_FILE)
        save_checkpoint(out, model.state_dict(), state)
        atomic_write_text(out / SURGERY, json.dumps(info, indent=1))
    return out
