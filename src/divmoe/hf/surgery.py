"""Merging and pruning the experts of a Hugging Face MoE model through its swapped blocks.

The model is swapped (:func:`divmoe.hf.swap_moe_blocks`, if it is not already), calibrated
on ``batches`` of token ids, and each layer is merged or pruned with the divmoe functions
(:mod:`divmoe.surgery`). Merging keeps the dominant expert's router row for each merged
expert (``router_mode="dominant"``), since an HF block holds one row per expert. Then
:func:`divmoe.hf.restore_hf_blocks` and ``save_pretrained`` give a model that transformers
loads with the smaller expert count::

    merge_hf_experts(model, batches, experts=4)
    restore_hf_blocks(model)
    model.save_pretrained(folder)     # config.json: num_local_experts = 4 (Mixtral)
"""

from __future__ import annotations

import torch
from torch import nn

from ..surgery import calibrate, merge_moe, prune_moe
from .swap import swap_moe_blocks, swapped_blocks


def _calibrated(model: nn.Module, batches: list[torch.Tensor]):
    if not swapped_blocks(model):
        swap_moe_blocks(model)
    blocks = swapped_blocks(model)
    with torch.no_grad():
        calib = calibrate([b.moe for _, b in blocks], lambda ids: model(input_ids=ids), batches)
    return blocks, calib


def merge_hf_experts(model: nn.Module, batches: list[torch.Tensor], experts: int,
                     align: bool = True) -> list[dict]:
    """Merge every sparse layer of ``model`` to ``experts`` experts (MC-SMoE, dominant rows);
    returns each layer's groups and usage."""
    blocks, calib = _calibrated(model, batches)
    infos = []
    for (name, block), cal in zip(blocks, calib):
        block.moe, info = merge_moe(block.moe, cal, experts, "dominant", align)
        infos.append({"block": name, **info})
    return infos


def prune_hf_experts(model: nn.Module, batches: list[torch.Tensor], keep: int,
                     method: str = "frequency") -> list[dict]:
    """Keep ``keep`` experts in every sparse layer of ``model`` (by ``method``: frequency or
    reconstruction); returns each layer's kept experts."""
    blocks, calib = _calibrated(model, batches)
    infos = []
    for (name, block), cal in zip(blocks, calib):
        block.moe, info = prune_moe(block.moe, cal, keep, method)
        infos.append({"block": name, **info})
    return infos
