"""Hugging Face MoE blocks as oracles for divmoe, and weight mapping both ways.

Supported ``model_type``: mixtral, olmoe, qwen2_moe, qwen3_moe, deepseek_v3 (see
:mod:`divmoe.hf.mapping` for each family's routing semantics and tensor layouts).
Importing this package does not import ``transformers``; the functions only read
attributes of HF configs and modules.

Example (no hub access needed: a tiny model with random weights)::

    import torch
    from transformers import MixtralConfig, MixtralForCausalLM
    from divmoe.hf import find_moe_blocks, moe_from_hf_block

    cfg = MixtralConfig(vocab_size=64, hidden_size=32, intermediate_size=16,
                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                        num_local_experts=8, num_experts_per_tok=2)
    model = MixtralForCausalLM(cfg).eval()
    name, block = find_moe_blocks(model)[0]          # 'model.layers.0.mlp'
    moe = moe_from_hf_block(block, cfg).eval()       # divmoe.layer.MoE, same weights
    x = torch.randn(2, 7, 32)
    torch.testing.assert_close(moe(x).output, block(x), atol=1e-5, rtol=1e-5)
"""

from .mapping import (SUPPORTED_MODEL_TYPES, find_moe_blocks, load_hf_moe_block,
                      moe_config_from_hf, moe_from_hf_block, moes_from_hf_model,
                      save_to_hf_block)
from .surgery import merge_hf_experts, prune_hf_experts
from .swap import SwappedMoEBlock, restore_hf_blocks, swap_moe_blocks, swapped_blocks


__all__ = ["SUPPORTED_MODEL_TYPES", "moe_config_from_hf", "load_hf_moe_block",
           "save_to_hf_block", "moe_from_hf_block", "find_moe_blocks", "moes_from_hf_model",
           "swap_moe_blocks", "restore_hf_blocks", "swapped_blocks", "SwappedMoEBlock",
           "merge_hf_experts", "prune_hf_experts"]
