"""divmoe.hf.swap_moe_blocks / restore_hf_blocks and merge/prune on tiny random HF causal LMs
built from configs (no downloads), saved with save_pretrained and reloaded by transformers."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from divmoe.hf import (SwappedMoEBlock, merge_hf_experts, prune_hf_experts,  # noqa: E402
                       restore_hf_blocks, swap_moe_blocks, swapped_blocks)
from divmoe.hf.swap import EXPERT_COUNT_ATTR  # noqa: E402

E = 4
COMMON = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, num_experts_per_tok=2)
# model_type → (config class, causal-LM class, family settings)
MODELS = {
    "mixtral": ("MixtralConfig", "MixtralForCausalLM",
                dict(intermediate_size=16, num_local_experts=E)),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM",
                  dict(moe_intermediate_size=16, shared_expert_intermediate_size=24,
                       num_experts=E, norm_topk_prob=False, intermediate_size=16)),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM",
                  dict(moe_intermediate_size=16, num_experts=E, norm_topk_prob=True,
                       intermediate_size=16, head_dim=8)),
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM", dict(intermediate_size=16, num_experts=E)),
    "deepseek_v3": ("DeepseekV3Config", "DeepseekV3ForCausalLM",
                    dict(intermediate_size=24, moe_intermediate_size=16, n_routed_experts=E,
                         n_group=2, topk_group=2, n_shared_experts=1, first_k_dense_replace=0,
                         q_lora_rank=None, kv_lora_rank=8, qk_rope_head_dim=4,
                         qk_nope_head_dim=4, v_head_dim=8, num_key_value_heads=4)),
}


def tiny(model_type, seed=0, **extra):
    cfg_cls, lm_cls, kw = MODELS[model_type]
    try:
        config = getattr(transformers, cfg_cls)(**{**COMMON, **kw, **extra})
        torch.manual_seed(seed)
        model = getattr(transformers, lm_cls)(config)
    except (AttributeError, TypeError, ValueError) as err:
        pytest.skip(f"tiny {lm_cls} not buildable in transformers {transformers.__version__}: {err}")
    with torch.no_grad():  # routers of unit scale, so tokens prefer some experts clearly
        for name, p in model.named_parameters():
            if name.endswith("gate.weight"):
                p.normal_(0.0, p.shape[-1] ** -0.5)
    return model.eval()


def tokens(seed=0, shape=(4, 12)):
    return torch.randint(0, 64, shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("model_type", sorted(MODELS))
def test_swap_then_restore_is_bit_identical(model_type):
    model = tiny(model_type)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ids = tokens()
    with torch.no_grad():
        want = model(input_ids=ids).logits
        names = swap_moe_blocks(model)
        assert names and all(isinstance(model.get_submodule(n), SwappedMoEBlock) for n in names)
        got = model(input_ids=ids).logits
        stats = [b.last_stats for _, b in swapped_blocks(model)]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert all(s.num_tokens == ids.numel() for s in stats)
    assert restore_hf_blocks(model) == names
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)
    assert not swapped_blocks(model)


def test_swap_with_overrides_changes_routing_and_restores():
    model = tiny("mixtral")
    ids = tokens()
    with torch.no_grad():
        want = model(input_ids=ids).logits
        swap_moe_blocks(model, top_k=1)
        assert all(b.moe.config.top_k == 1 for _, b in swapped_blocks(model))
        assert not torch.allclose(model(input_ids=ids).logits, want, atol=1e-4)
        restore_hf_blocks(model)
        torch.testing.assert_close(model(input_ids=ids).logits, want)
    with pytest.raises(ValueError, match="no swapped blocks"):
        restore_hf_blocks(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    swap_moe_blocks(model, router="dynamic_topp", top_p=0.5, top_k=2)
    with torch.no_grad():
        model(input_ids=ids)
    restore_hf_blocks(model)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_remapped_merge_cannot_be_restored():
    from divmoe.surgery import LayerCalibration, merge_moe

    model = tiny("mixtral")
    swap_moe_blocks(model)
    for _, block in swapped_blocks(model):
        calib = LayerCalibration(torch.tensor([4, 3, 2, 1]), torch.randn(16, 32))
        block.moe, _ = merge_moe(block.moe, calib, 2, router_mode="remap")
    with pytest.raises(ValueError, match="router_mode='dominant'"):
        restore_hf_blocks(model)


@pytest.mark.parametrize("model_type,how", [("mixtral", "merge"), ("qwen2_moe", "prune"),
                                            ("deepseek_v3", "merge"), ("olmoe", "prune")])
def test_merge_or_prune_then_save_and_reload(tmp_path, model_type, how):
    # Group-limited routing fixes the experts per group: DeepSeek-V3 here with one group.
    model = tiny(model_type, **(dict(n_group=1, topk_group=1) if model_type == "deepseek_v3" else {}))
    batches = [tokens(s) for s in range(3)]
    if how == "merge":
        infos = merge_hf_experts(model, batches, experts=2)
        assert sorted(e for g in infos[0]["groups"] for e in g) == list(range(E))
    else:
        infos = prune_hf_experts(model, batches, keep=2, method="reconstruction")
        assert len(infos[0]["kept"]) == 2
    ids = tokens(9)
    with torch.no_grad():
        want = model(input_ids=ids).logits    # the swapped, smaller divmoe model
    restore_hf_blocks(model)
    attr = EXPERT_COUNT_ATTR[model_type]
    assert getattr(model.config, attr) == 2
    model.save_pretrained(tmp_path)
    loaded = type(model).from_pretrained(tmp_path).eval()
    assert getattr(loaded.config, attr) == 2
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, want, atol=1e-5, rtol=1e-5)


def test_group_limited_routing_cannot_be_merged():
    from divmoe.config import ConfigError

    model = tiny("deepseek_v3")
    with pytest.raises(ConfigError, match="n_groups=2 is not supported"):
        merge_hf_experts(model, [tokens()], experts=2)
