"""What ``divmoe analyze`` can read: a divmoe run/checkpoint folder or an HF MoE causal-LM folder.

Both become an :class:`AnalysisSource`: the model in eval mode, its sparse layers as divmoe
:class:`~divmoe.layer.MoE` modules plus a way to see each layer's input and routing during a
forward pass, and a function that turns a domain's validation text into token windows.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from ..layer import MoE

HF_SEQ_LEN = 128  # tokens per window for HF models (capped by max_position_embeddings)


class AnalyzeError(ValueError):
    """PATH is not something ``divmoe analyze`` can read."""


@dataclass
class AnalysisSource:
    kind: str                                   # "divmoe" | "hf"
    path: Path
    model: nn.Module
    layer_names: list[str]
    moes: list[MoE]                             # divmoe view of each sparse layer
    hook_modules: list[nn.Module]               # the module whose forward is the layer
    seq_len: int
    vocab_size: int
    tokenizer: str                              # "byte" | "bpe" | "hf:<class>" | "byte-fallback"
    notes: list[str] = field(default_factory=list)
    encode: Callable[[bytes], torch.Tensor] | None = None   # domain bytes → 1-D token ids
    forward: Callable[[torch.Tensor], object] | None = None  # tokens [B, S] → anything
    info: dict = field(default_factory=dict)


def _divmoe_run(path: Path) -> tuple[Path, list[Path]] | None:
    """(config.yaml, the checkpoint folders to try, newest first) if ``path`` is a run folder
    or one of its checkpoint folders (then only that one is tried)."""
    from ..train.checkpoint import CHECKPOINT, PREVIOUS, WEIGHTS

    if (path / "config.yaml").is_file():
        ckpts = [c for c in (path / CHECKPOINT, path / PREVIOUS) if (c / WEIGHTS).is_file()]
        if ckpts:
            return path / "config.yaml", ckpts
    if (path.parent / "config.yaml").is_file() and (path / WEIGHTS).is_file():
        return path.parent / "config.yaml", [path]
    return None


def _is_hf_folder(path: Path) -> bool:
    return (path / "config.json").is_file() and (
        any(path.glob("*.safetensors")) or any(path.glob("*.bin")))


def load_source(path: str | Path) -> AnalysisSource:
    """Open PATH as a divmoe run/checkpoint folder or an HF MoE causal-LM folder."""
    path = Path(path)
    if not path.exists():
        raise AnalyzeError(f"{path} does not exist")
    if not path.is_dir():
        raise AnalyzeError(f"{path} is not a folder: expected a divmoe run folder (config.yaml + "
                           f"checkpoint/model.safetensors) or a Hugging Face model folder "
                           f"(config.json + *.safetensors)")
    found = _divmoe_run(path)
    if found is not None:
        return _load_divmoe(path, *found)
    if _is_hf_folder(path):
        return _load_hf(path)
    raise AnalyzeError(
        f"{path} is neither a divmoe run folder (needs config.yaml and "
        f"checkpoint/model.safetensors; a checkpoint folder needs model.safetensors and "
        f"../config.yaml) nor a Hugging Face model folder (needs config.json and *.safetensors)")


# ----------------------------------------------------------------------------- divmoe
def _load_divmoe(path: Path, config_path: Path, ckpts: list[Path]) -> AnalysisSource:
    """The model of ``config_path`` with the weights of the first checkpoint that reads back
    whole (a damaged newer one is named in the notes)."""
    from ..models import MoETransformer
    from ..train.checkpoint import WEIGHTS, CheckpointError, first_readable, load_weights
    from ..train.config import load_config

    cfg = load_config(config_path)
    model = MoETransformer(cfg.model, cfg.moe)
    try:
        ckpt, _, errors = first_readable(ckpts, lambda c: load_weights(c, model, str(config_path)))
    except CheckpointError as exc:
        raise AnalyzeError(str(exc)) from None
    notes = [f"{exc}; analysed the previous checkpoint {ckpt} instead" for exc in errors]
    weights = ckpt / WEIGHTS
    model.eval()
    idx = model.moe_layers
    if not idx:
        raise AnalyzeError(f"{config_path} describes a dense model (model.moe=false): "
                           f"no MoE layers to analyze")
    moes = [model.blocks[i].mlp for i in idx]
    tokenizer = _run_tokenizer(config_path, cfg)

    def encode(data: bytes) -> torch.Tensor:
        if tokenizer.name == "bytes":
            return torch.frombuffer(bytearray(data), dtype=torch.uint8).long()
        # a cap on the bytes may cut a character: drop it, as the training's validation does
        return tokenizer.encode_tensor(data.decode("utf-8", errors="ignore")).long()

    src = AnalysisSource(kind="divmoe", path=path, model=model,
                         layer_names=[f"layer {i}" for i in idx], moes=moes, hook_modules=moes,
                         seq_len=cfg.model.seq_len, vocab_size=cfg.model.vocab_size,
                         tokenizer="byte" if tokenizer.name == "bytes" else tokenizer.name,
                         notes=notes, encode=encode,
                         forward=lambda t: model(t))
    src.info = {"config": str(config_path), "weights": str(weights),
                "num_experts": cfg.moe.num_experts, "top_k": cfg.moe.top_k,
                "router": cfg.moe.router, **model.param_counts()}
    metrics = config_path.parent / "metrics.jsonl"
    if metrics.is_file():
        src.info["metrics"] = str(metrics)
    return src


def _run_tokenizer(config_path: Path, cfg):
    """The run's tokenizer (bytes, or its saved BPE: the model's token ids are its ids)."""
    from ..data.tokenizer import run_tokenizer

    try:
        return run_tokenizer(config_path.parent, cfg.data)
    except (FileNotFoundError, ValueError) as exc:
        raise AnalyzeError(str(exc)) from None


# ----------------------------------------------------------------------------- HF
def _load_hf(path: Path) -> AnalysisSource:
    try:
        from transformers import AutoModelForCausalLM
    except ImportError as exc:  # pragma: no cover - transformers is a dependency of the hf extra
        raise AnalyzeError(f"{path} looks like a Hugging Face model but transformers is not "
                           f"installed: {exc}") from None
    from ..hf import SUPPORTED_MODEL_TYPES, find_moe_blocks, moe_from_hf_block

    try:
        cfg_json = json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise AnalyzeError(f"{path / 'config.json'}: not readable JSON ({exc})") from None
    model_type = cfg_json.get("model_type") if isinstance(cfg_json, dict) else None
    if model_type not in SUPPORTED_MODEL_TYPES:
        archs = ", ".join(cfg_json.get("architectures") or []) if isinstance(cfg_json, dict) else ""
        raise AnalyzeError(f"{path}: HF model_type {model_type!r}{f' ({archs})' if archs else ''} "
                           f"is not a MoE family divmoe maps; supported: "
                           f"{', '.join(SUPPORTED_MODEL_TYPES)}")
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path), local_files_only=True,
                                                     dtype=torch.float32)
    except Exception as exc:  # noqa: BLE001 - surface transformers' reason in one line
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise AnalyzeError(f"could not load {path} with transformers "
                           f"AutoModelForCausalLM: {type(exc).__name__}: {first}") from None
    model.eval()
    blocks = find_moe_blocks(model)
    if not blocks:
        raise AnalyzeError(f"{path}: no sparse MoE blocks found in this "
                           f"{getattr(model.config, 'model_type', '?')} model")
    moes = []
    for name, block in blocks:
        try:
            moes.append(moe_from_hf_block(block, model.config).eval())
        except Exception as exc:  # noqa: BLE001
            raise AnalyzeError(f"{path}: cannot map the MoE block {name} "
                               f"({type(block).__name__}) to divmoe: {exc}") from None
    cfg = model.config
    vocab = int(cfg.vocab_size)
    seq_len = min(HF_SEQ_LEN, int(getattr(cfg, "max_position_embeddings", HF_SEQ_LEN) or HF_SEQ_LEN))
    notes: list[str] = []
    tok_name, encode = "byte-fallback", None
    has_tok = any((path / f).is_file() for f in ("tokenizer.json", "tokenizer.model",
                                                    "tokenizer_config.json", "vocab.json"))
    if has_tok:
        try:
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)

            def tokenize(data: bytes, tok=tok) -> torch.Tensor:
                ids = tok(data.decode("utf-8", errors="ignore"), add_special_tokens=False)["input_ids"]
                return torch.tensor(ids, dtype=torch.long)

            encode = tokenize
            tok_name = f"hf:{type(tok).__name__}"
        except Exception as exc:  # noqa: BLE001
            notes.append(f"the folder's tokenizer could not be loaded ({type(exc).__name__}: "
                         f"{exc}); fell back to byte ids modulo vocab_size={vocab}")
    else:
        notes.append(f"no tokenizer in {path}: token ids are the UTF-8 bytes modulo "
                     f"vocab_size={vocab}, so routing reflects byte inputs, not the model's "
                     f"real tokens")
    if encode is None:
        def encode(data: bytes) -> torch.Tensor:
            return torch.frombuffer(bytearray(data), dtype=torch.uint8).long() % vocab

    def forward(tokens):
        return model(input_ids=tokens, use_cache=False)

    src = AnalysisSource(kind="hf", path=path, model=model,
                         layer_names=[name for name, _ in blocks], moes=moes,
                         hook_modules=[b for _, b in blocks], seq_len=seq_len, vocab_size=vocab,
                         tokenizer=tok_name, notes=notes, encode=encode, forward=forward)
    src.info = {"model_type": cfg.model_type, "architectures": cfg_json.get("architectures"),
                "num_experts": moes[0].config.num_experts, "top_k": moes[0].config.top_k,
                "params_total": sum(p.numel() for p in model.parameters())}
    return src
