"""Open a divmoe run folder for inference: its configuration (with routing settings overridden
for inference, ``--set moe.top_k=1``), its newest complete checkpoint, its tokenizer (bytes, or
the BPE saved as tokenizer.json), its validation split."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..data.mixture import validation_set
from ..data.tokenizer import run_tokenizer
from ..data.user_corpus import load_splits
from ..models import MoETransformer
from ..train.checkpoint import checkpoint_candidates, first_readable, load_weights
from ..train.config import RunConfig, load_config
from ..train.run_folder import RunError


@dataclass
class LoadedRun:
    path: Path
    config: RunConfig
    model: MoETransformer           # in eval mode
    checkpoint: Path                # the folder the weights came from
    tokenizer: object               # ByteTokenizer or the run's BPETokenizer (data.tokenizer)
    notes: list[str] = field(default_factory=list)  # a damaged newer checkpoint, named


def load_run(path: str | Path, overrides: list[str] = (), device: str = "cpu") -> LoadedRun:
    """The model of run folder ``path`` with the weights of its newest checkpoint that reads
    back whole, in eval mode. ``overrides`` (``key=value``) apply on top of the saved
    config.yaml; settings that change the weights' shapes fail with the checkpoint's error."""
    path = Path(path)
    if not path.is_dir():
        raise RunError(f"{path} is not a run folder: it does not exist" if not path.exists()
                       else f"{path} is a file, not a run folder")
    config_path = path / "config.yaml"
    if not config_path.is_file():
        raise RunError(f"{path} is not a divmoe run folder (no config.yaml); give the --out "
                       f"folder of a divmoe train")
    ckpts = checkpoint_candidates(path)
    if not ckpts:
        raise RunError(f"{path} has no checkpoint yet (checkpoint/model.safetensors): the run "
                       f"writes one at its first evaluation; wait for it or train it first")
    cfg = load_config(config_path, list(overrides))
    model = MoETransformer(cfg.model, cfg.moe)
    ckpt, _, errors = first_readable(ckpts, lambda c: load_weights(c, model, str(config_path)))
    notes = [f"{exc}; using the previous checkpoint {ckpt} instead" for exc in errors]
    return LoadedRun(path, cfg, model.to(device).eval(), ckpt, _tokenizer(path, cfg), notes)


def _tokenizer(path: Path, cfg: RunConfig):
    """The run's own tokenizer; a BPE run without its merges cannot be read (never retrain
    them here: other merges would give the weights other tokens)."""
    try:
        tokenizer = run_tokenizer(path, cfg.data)
    except (FileNotFoundError, ValueError) as exc:
        raise RunError(str(exc)) from None
    if tokenizer.name == "bpe" and tokenizer.vocab_size != cfg.model.vocab_size:
        raise RunError(f"{path}: its tokenizer has {tokenizer.vocab_size} tokens but the model "
                       f"model.vocab_size={cfg.model.vocab_size}: tokenizer.json is not this "
                       f"run's")
    return tokenizer


def run_validation(cfg: RunConfig, tokenizer, max_bytes_per_domain: int | None = None,
                   split: str = "val") -> dict[str, torch.Tensor]:
    """The run's evaluation windows per domain (its own corpus, settings and ``tokenizer``, the
    :attr:`LoadedRun.tokenizer`), as ``divmoe train`` evaluates them; ``max_bytes_per_domain``
    caps each domain's text; ``split="train"`` cuts the same windows from the training
    documents (to tune a setting off the validation set)."""
    if split not in ("val", "train"):
        raise ValueError(f"split={split!r} is not allowed: expected val or train")
    train_docs, val_docs = load_splits(cfg.data.corpus, cfg.model.seq_len, cfg.data.val_fraction)
    return validation_set(val_docs if split == "val" else train_docs, cfg.model.seq_len,
                          max_bytes_per_domain or cfg.data.val_bytes_per_domain, tokenizer)
