"""Calibration: what each MoE layer of a model sees and chooses on a sample of text.

The statistics every transform here starts from: per layer, how often each expert is
chosen (MC-SMoE's usage frequency, the frequency-pruning baseline) and a sample of the
layer's inputs (to compare experts' outputs, align their hidden units and score a pruned
layer's reconstruction, NAEE).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..layer import MoE
from ..routing.plan import count_per_expert


@dataclass
class LayerCalibration:
    counts_E: torch.Tensor   # [E] int64, top-k slots that chose each expert, over all tokens
    x_TD: torch.Tensor       # [T, D] a sample of the layer's inputs (the first max_tokens)


@torch.no_grad()
def calibrate(moes: list[MoE], forward, batches: list[torch.Tensor],
              max_tokens: int = 4096) -> list[LayerCalibration]:
    """Run ``forward(batch)`` over ``batches`` (the model that holds ``moes``, in eval mode)
    and return one :class:`LayerCalibration` per layer of ``moes``."""
    if not moes:
        raise ValueError("calibrate: the model has no MoE layers")
    counts = [torch.zeros(m.config.num_experts, dtype=torch.int64) for m in moes]
    inputs: list[list[torch.Tensor]] = [[] for _ in moes]
    kept = [0] * len(moes)

    def hook_for(li: int):
        def hook(module: nn.Module, args, output):
            counts[li] += count_per_expert(output.stats.expert_ids, len(counts[li])).cpu()
            if kept[li] < max_tokens:
                x_TD = args[0].detach().reshape(-1, module.d_model)[: max_tokens - kept[li]]
                inputs[li].append(x_TD.cpu())
                kept[li] += x_TD.shape[0]
        return hook

    hooks = [m.register_forward_hook(hook_for(li)) for li, m in enumerate(moes)]
    try:
        for batch in batches:
            forward(batch)
    finally:
        for h in hooks:
            h.remove()
    return [LayerCalibration(c, torch.cat(x)) for c, x in zip(counts, inputs)]


def run_calibration_batches(cfg, tokenizer, sequences: int,
                            batch_size: int = 32) -> list[torch.Tensor]:
    """``sequences`` training windows of a run's corpus ([b, seq_len] inputs) in the run's
    ``tokenizer``, drawn with a seed the run did not train on (``train.seed + 1``), so
    validation text stays unseen."""
    from ..data.mixture import MixtureSampler
    from ..data.user_corpus import load_splits

    train_docs, _ = load_splits(cfg.data.corpus, cfg.model.seq_len, cfg.data.val_fraction)
    sampler = MixtureSampler(train_docs, cfg.model.seq_len, seed=cfg.train.seed + 1,
                             weights=cfg.data.weights, temperature=cfg.data.temperature,
                             tokenizer=tokenizer)
    out, step = [], 0
    while sequences > 0:
        n = min(batch_size, sequences)
        out.append(sampler.batch(step, n)[0][:, :-1])
        sequences, step = sequences - n, step + 1
    return out
