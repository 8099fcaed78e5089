"""The resolved configuration of a training run: model, MoE layer, data, optimisation."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import yaml

from ..config import ConfigError, apply_overrides, from_dict, option, to_dict, validate
from ..data.mixture import BATCH_DOMAINS
from ..data.tokenizer import TOKENIZERS
from ..layer import MoEConfig
from ..models import ModelConfig


@dataclass
class DataConfig:
    weights: Optional[dict[str, float]] = option(None, help="domain → mixture weight (null = by size)")
    temperature: float = option(1.0, min=0.0, min_exclusive=True,
                                help="mixture temperature over domain sizes (>1 flattens)")
    batch_domains: str = option("mixed", choices=BATCH_DOMAINS,
                                help="mixed = every sequence draws its domain; single = every "
                                     "micro-batch draws one domain for all its sequences "
                                     "(domain-homogeneous micro-batches)")
    tokenizer: str = option("bytes", choices=TOKENIZERS,
                            help="bytes = one token per UTF-8 byte; bpe = a byte-level BPE of "
                                 "bpe_vocab tokens learned on the training split when the run "
                                 "starts, saved as tokenizer.json in the run folder (model."
                                 "vocab_size is set from it); val_bpb stays bits per byte")
    bpe_vocab: int = option(2048, min=257, help="bpe: vocabulary size (256 bytes + merges)")
    val_bytes_per_domain: int = option(32768, min=1, help="validation bytes per domain per eval")
    corpus: Optional[str] = option(None, help="the user's corpus: a folder of per-domain subfolders, "
                                              "a .yaml of domain: glob, or a .jsonl of text+domain "
                                              "(null = the embedded corpus)")
    val_fraction: float = option(0.05, min=0.0, max=1.0, min_exclusive=True,
                                 help="user corpus: validation share of each domain's bytes")
    mixing: str = option("static", choices=("static", "dynamic"),
                         help="static = fixed weights; dynamic = re-weight from routing (seed 002)")
    mix_every: int = option(40, min=1, help="dynamic mixing: steps between weight updates")
    mix_eta: float = option(10.0, min=0.0, help="dynamic mixing: step size of the log-weight update")
    mix_smoothing: float = option(0.05, min=0.0, max=1.0,
                                  help="dynamic mixing: share of the uniform mixture mixed in")


@dataclass
class TrainConfig:
    steps: int = option(400, min=1, help="optimizer steps")
    batch_size: int = option(32, min=1, help="sequences per micro-batch")
    grad_accum: int = option(1, min=1, help="micro-batches per optimizer step (gradient "
                                            "accumulation); a step sees grad_accum·batch_size sequences")
    lr: float = option(3e-3, min=0.0, min_exclusive=True, help="peak learning rate")
    min_lr_ratio: float = option(0.1, min=0.0, max=1.0, help="final lr as a fraction of peak (cosine)")
    warmup_steps: int = option(30, min=0, help="linear warmup steps")
    weight_decay: float = option(0.1, min=0.0, help="AdamW weight decay on matrices")
    grad_clip: float = option(1.0, min=0.0, help="global grad-norm clip (0 = off)")
    eval_every: int = option(80, min=1, help="evaluate + checkpoint every n steps")
    eval_batch_size: int = option(32, min=1, help="sequences per validation batch")
    seed: int = option(0, min=0, help="seed for weights and data order")
    threads: int = option(0, min=0, help="torch CPU threads (0 = torch default)")


@dataclass
class ParallelConfig:
    expert: int = option(1, min=1, help="under torchrun: ranks each MoE layer's experts are "
                                        "sharded over (expert parallelism); the W ranks form "
                                        "W/expert data-parallel replicas")
    device: str = option("cpu", choices=("cpu", "cuda"),
                         help="where the model trains: cpu, or cuda (the CUDA device; under "
                              "torchrun cuda:LOCAL_RANK). Data are drawn on the CPU and moved")
    placement: Optional[str] = option(None, help="under torchrun: expert → rank placement file "
                                                 "written by `divmoe place` (null = experts "
                                                 "[r·E/n, (r+1)·E/n) on rank r)")


@dataclass
class RunConfig:
    model: ModelConfig = option(default_factory=ModelConfig)
    moe: MoEConfig = option(default_factory=MoEConfig)
    data: DataConfig = option(default_factory=DataConfig)
    train: TrainConfig = option(default_factory=TrainConfig)
    # How the run is laid out over processes, not what it computes: it may change on resume.
    parallel: ParallelConfig = option(default_factory=ParallelConfig)


def load_config(path: str | Path | None = None, overrides: list[str] = (),
                base: dict | None = None) -> RunConfig:
    """Defaults ← ``base`` mapping ← YAML file ← ``key=value`` overrides, then validated."""
    data = dict(base or {})
    if path is not None:
        loaded = read_yaml_file(path, "config file")
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {str(path)!r} must hold a mapping of settings, got "
                              f"{type(loaded).__name__}")
        data = _merge(data, loaded)
    data = apply_overrides(data, list(overrides))
    return validate(from_dict(RunConfig, data))


def read_yaml_file(path: str | Path, what: str):
    """The parsed content of a YAML file (an empty file is ``{}``); ConfigError naming the file
    when it is missing, a folder, unreadable or not YAML (with the line of the mistake)."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{what} {str(path)!r} is a folder; give a YAML file")
    if not path.is_file():
        raise ConfigError(f"{what} {str(path)!r} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{what} {str(path)!r} cannot be read: {exc}") from None
    try:
        return yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{what} {str(path)!r} is not valid YAML:{where}: {problem}") from None


def _merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def same_run(a: RunConfig, b: RunConfig) -> bool:
    """Whether ``a`` continues the run of ``b``: equal but for its length (``train.steps``), its
    process layout (``parallel``) and, with a BPE, ``model.vocab_size`` (set from the run's
    tokenizer.json when it started)."""
    da, db = to_dict(a), to_dict(b)
    for d in (da, db):
        d["train"]["steps"] = d["parallel"] = None
        if d["data"]["tokenizer"] != "bytes":
            d["model"]["vocab_size"] = None
    return da == db
