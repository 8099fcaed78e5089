"""Swapping a Hugging Face model's sparse MoE blocks for divmoe layers, and back.

:func:`swap_moe_blocks` replaces every supported sparse block of a transformers model, in
place, with a :class:`SwappedMoEBlock`: a divmoe :class:`~divmoe.layer.MoE` carrying the
block's weights (:mod:`divmoe.hf.mapping`), taking and returning what the block does, so the
model runs unchanged, and with ``moe_overrides`` under another routing policy (``top_k``,
``router="dynamic_topp"``, a capacity, ...). Each layer's last :class:`RoutingStats` is kept
on the swapped block. :func:`restore_hf_blocks` writes the layers back into HF blocks: the
original ones when the expert count is unchanged (bit-identical weights when nothing was
trained), new blocks of the family's class when merging or pruning changed it (the model's
config then names the new count, so ``save_pretrained`` writes a model transformers loads).

While swapped, ``output_router_logits`` is not available (the HF gate is gone); the
divmoe stats replace it.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from ..layer import MoE
from .mapping import _block_model_type, find_moe_blocks, moe_from_hf_block, save_to_hf_block

# model_type → the HF config attribute that holds the routed-expert count.
EXPERT_COUNT_ATTR = {"mixtral": "num_local_experts", "qwen2_moe": "num_experts",
                     "qwen3_moe": "num_experts", "olmoe": "num_experts",
                     "deepseek_v3": "n_routed_experts"}


class SwappedMoEBlock(nn.Module):
    """A divmoe layer in the place of an HF sparse block: hidden states in, hidden states out.

    ``moe`` is the divmoe layer (its tensors are the model's state dict now); the original
    block is kept outside the module tree, to receive the weights back on restore.
    """

    def __init__(self, moe: MoE, original: nn.Module):
        super().__init__()
        self.moe = moe
        self.model_type = _block_model_type(original)
        self.__dict__["original"] = original   # not a submodule: no duplicate parameters
        self.last_stats = None

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        out = self.moe(hidden_states)
        self.last_stats = out.stats
        return out.output


def swap_moe_blocks(model: nn.Module, **moe_overrides) -> list[str]:
    """Replace every supported sparse MoE block of ``model`` with a :class:`SwappedMoEBlock`
    (``moe_overrides``: :class:`~divmoe.layer.MoEConfig` fields that change the routing).
    Returns the swapped blocks' qualified names; ValueError if there are none."""
    blocks = [(n, b) for n, b in find_moe_blocks(model) if not isinstance(b, SwappedMoEBlock)]
    if not blocks:
        raise ValueError(f"{type(model).__name__} has no sparse MoE block to swap (supported: "
                         f"{', '.join(sorted(EXPERT_COUNT_ATTR))})")
    for name, block in blocks:
        _block_model_type(block)  # unsupported classes fail before anything is replaced
    for name, block in blocks:
        moe = moe_from_hf_block(block, model.config, check_routing=False,
                                **moe_overrides).train(block.training)
        _set_submodule(model, name, SwappedMoEBlock(moe, block))
    return [n for n, _ in blocks]


def swapped_blocks(model: nn.Module) -> list[tuple[str, SwappedMoEBlock]]:
    """The swapped blocks of ``model``, as ``(qualified name, block)`` in module order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, SwappedMoEBlock)]


@torch.no_grad()
def restore_hf_blocks(model: nn.Module) -> list[str]:
    """Write every swapped layer back into an HF block of its family (see the module
    docstring) and put the blocks back in place. Returns their names."""
    swapped = swapped_blocks(model)
    if not swapped:
        raise ValueError(f"{type(model).__name__} has no swapped blocks (swap_moe_blocks first)")
    counts = {s.moe.config.num_experts for _, s in swapped}
    for name, s in swapped:
        gate = getattr(s.moe.router, "gate", None)
        if gate is None or tuple(gate.weight.shape) != (s.moe.config.num_experts, s.moe.d_model):
            raise ValueError(f"{name}: router={s.moe.config.router!r} cannot be written into an HF "
                             f"block, which holds one linear router row per expert (a merged "
                             f"layer: merge with router_mode='dominant' for an HF model)")
    if len(counts) > 1:
        raise ValueError(f"the swapped layers have different expert counts {sorted(counts)}; an HF "
                         f"config holds one count for every layer")
    experts = counts.pop()
    attr = EXPERT_COUNT_ATTR[swapped[0][1].model_type]
    config = model.config
    if getattr(config, attr) != experts:
        config = copy.deepcopy(model.config)
        setattr(config, attr, experts)
    for name, s in swapped:
        block = s.original
        if getattr(model.config, attr) != experts:
            gate = block.gate.weight
            block = type(block)(config).to(device=gate.device,
                                           dtype=next(block.experts.parameters()).dtype)
            block.gate.to(dtype=gate.dtype)
            block.train(s.original.training)
        save_to_hf_block(s.moe, block, check_routing=False)
        _set_submodule(model, name, block)
    if config is not model.config:
        setattr(model.config, attr, experts)
    return [n for n, _ in swapped]


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)
