"""divmoe.hf: HF sparse MoE blocks (random weights, built from tiny configs) as oracles."""

import importlib
import types

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

from divmoe.hf import (SUPPORTED_MODEL_TYPES, find_moe_blocks, load_hf_moe_block,  # noqa: E402
                       moe_config_from_hf, moe_from_hf_block, moes_from_hf_model,
                       save_to_hf_block)
from divmoe.layer import MoE, MoEConfig  # noqa: E402

D, E, K, I = 32, 8, 2, 16

# model_type → (config class, module, block class, extra config kwargs)
FAMILIES = {
    "mixtral": ("MixtralConfig", "mixtral", "MixtralSparseMoeBlock",
                dict(intermediate_size=I, num_local_experts=E)),
    "qwen2_moe": ("Qwen2MoeConfig", "qwen2_moe", "Qwen2MoeSparseMoeBlock",
                  dict(moe_intermediate_size=I, shared_expert_intermediate_size=24, num_experts=E,
                       norm_topk_prob=False)),
    "qwen3_moe": ("Qwen3MoeConfig", "qwen3_moe", "Qwen3MoeSparseMoeBlock",
                  dict(moe_intermediate_size=I, num_experts=E, norm_topk_prob=True)),
    "olmoe": ("OlmoeConfig", "olmoe", "OlmoeSparseMoeBlock",
              dict(intermediate_size=I, num_experts=E, norm_topk_prob=False)),
    "deepseek_v3": ("DeepseekV3Config", "deepseek_v3", "DeepseekV3MoE",
                    dict(moe_intermediate_size=I, n_routed_experts=E, n_group=4, topk_group=2,
                         routed_scaling_factor=2.5, n_shared_experts=2, norm_topk_prob=True)),
}
# HF routers compute probabilities in float32 (DeepSeek-V3 even its logits, from float32-cast
# inputs and weights), so in float64 the sigmoid family agrees only to float32 rounding.
TOL64 = {"deepseek_v3": 1e-5}


def hf_block(model_type, seed=0, **extra):
    cfg_cls, module, block_cls, kw = FAMILIES[model_type]
    try:
        mod = importlib.import_module(f"transformers.models.{module}.modeling_{module}")
        config = getattr(transformers, cfg_cls)(hidden_size=D, num_experts_per_tok=K,
                                                **{**kw, **extra})
        block_type = getattr(mod, block_cls)
    except (ImportError, AttributeError) as err:
        pytest.skip(f"{model_type} not available in transformers {transformers.__version__}: {err}")
    config._experts_implementation = "eager"
    torch.manual_seed(seed)
    block = block_type(config)
    with torch.no_grad():
        for name, p in block.named_parameters():
            fan_in = p.shape[-1]
            p.normal_(0.0, (3.0 if name == "gate.weight" else 1.0) / fan_in ** 0.5)
        bias = getattr(block.gate, "e_score_correction_bias", None)
        if bias is not None:
            bias.normal_(0.0, 0.1)
    return config, block.eval()


def hf_choices(block, x):
    """HF's chosen expert set per token, sorted: [T, K]."""
    logits, weights, idx = block.gate(x.reshape(-1, x.shape[-1]))
    return idx.sort(dim=-1).values


@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_matches_hf_block_float64(model_type):
    config, block = hf_block(model_type)
    block.double()
    moe = moe_from_hf_block(block, config).eval()
    assert next(moe.parameters()).dtype == torch.float64
    torch.manual_seed(1)
    x = torch.randn(2, 7, D, dtype=torch.float64)
    with torch.no_grad():
        want = block(x.clone())
        got = moe(x)
    tol = TOL64.get(model_type, 1e-10)
    torch.testing.assert_close(got.output, want, atol=tol, rtol=tol)
    assert torch.equal(got.stats.expert_ids.sort(dim=-1).values, hf_choices(block, x))
    # both dispatch paths agree with the oracle
    ref = moe_from_hf_block(block, config, dispatch="reference").eval()
    with torch.no_grad():
        torch.testing.assert_close(ref(x).output, want, atol=tol, rtol=tol)


@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_matches_hf_block_float32(model_type):
    config, block = hf_block(model_type, seed=3)
    moe = moe_from_hf_block(block, config).eval()
    x = torch.randn(2, 7, D)
    with torch.no_grad():
        want, got = block(x.clone()), moe(x)
    torch.testing.assert_close(got.output, want, atol=1e-5, rtol=1e-5)
    assert torch.equal(got.stats.expert_ids.sort(dim=-1).values, hf_choices(block, x))


def test_config_semantics():
    c = {mt: moe_config_from_hf(hf_block(mt)[0]) for mt in ("mixtral", "qwen2_moe", "olmoe",
                                                              "deepseek_v3")}
    assert (c["mixtral"].renormalize, c["olmoe"].renormalize, c["qwen2_moe"].renormalize) \
        == (True, False, False)
    q = c["qwen2_moe"]
    assert (q.num_shared_experts, q.shared_expert_hidden, q.shared_expert_gate) == (1, 24, True)
    ds = c["deepseek_v3"]
    assert (ds.score_func, ds.n_groups, ds.topk_groups, ds.routed_scaling, ds.num_shared_experts,
            ds.expert_hidden, ds.top_k, ds.jitter) == ("sigmoid", 4, 2, 2.5, 2, I, K, 0.0)
    assert moe_config_from_hf(hf_block("mixtral")[0], dispatch="reference").dispatch == "reference"


def test_deepseek_negative_bias_corner_case():
    """Selected groups whose experts all have score + bias < 0: with the -inf group mask
    (transformers 5.x, divmoe) no expert from a masked group is chosen; a 0.0 fill (older
    transformers) would pick masked experts here."""
    config, block = hf_block("deepseek_v3", seed=5, topk_group=1)
    block.double()
    with torch.no_grad():
        block.gate.e_score_correction_bias.fill_(-2.0)   # every score + bias < 0
    moe = moe_from_hf_block(block, config).eval()
    x = torch.randn(3, 5, D, dtype=torch.float64)
    with torch.no_grad():
        want, got = block(x.clone()), moe(x)
    torch.testing.assert_close(got.output, want, atol=1e-5, rtol=1e-5)
    ids = hf_choices(block, x)
    assert torch.equal(got.stats.expert_ids.sort(dim=-1).values, ids)
    group_size = E // config.n_group
    assert bool(((ids // group_size) == (ids[:, :1] // group_size)).all())  # one group per token


def test_save_to_hf_block_roundtrip():
    config, block = hf_block("qwen2_moe")
    block.double()
    torch.manual_seed(7)
    moe = MoE(D, moe_config_from_hf(config)).double().eval()
    save_to_hf_block(moe, block)
    x = torch.randn(4, 3, D, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(block(x.clone()), moe(x).output, atol=1e-10, rtol=1e-10)
    back = load_hf_moe_block(block, MoE(D, moe_config_from_hf(config)).double())
    for (n1, t1), (n2, t2) in zip(moe.state_dict().items(), back.state_dict().items()):
        assert n1 == n2 and torch.equal(t1, t2), n1


def test_per_expert_module_list_layout():
    """transformers 4.x stored experts as nn.ModuleList of MLPs (Mixtral: w1 gate, w3 up, w2
    down); the loader accepts that layout too."""
    config, block = hf_block("mixtral")
    fused = block.experts
    mlps = nn.ModuleList()
    for e in range(E):
        mlp = nn.Module()
        mlp.act_fn = nn.SiLU()
        gate, up = fused.gate_up_proj[e].detach().chunk(2, dim=0)
        for n, w in (("w1", gate), ("w3", up), ("w2", fused.down_proj[e].detach())):
            setattr(mlp, n, nn.Linear(w.shape[1], w.shape[0], bias=False))
            getattr(mlp, n).weight.data.copy_(w)
        mlps.append(mlp)
    want = moe_from_hf_block(block, config)
    block.experts = mlps
    got = moe_from_hf_block(block, config)
    for (n1, t1), (n2, t2) in zip(want.state_dict().items(), got.state_dict().items()):
        assert torch.equal(t1, t2), n1


def test_unsupported_model_type():
    with pytest.raises(ValueError, match="unsupported HF model_type 'llama'.*mixtral"):
        moe_config_from_hf(transformers.LlamaConfig())
    with pytest.raises(ValueError, match="unsupported HF MoE block Linear"):
        load_hf_moe_block(nn.Linear(2, 2), MoE(2, num_experts=2, top_k=1, expert_hidden=2))
    assert set(SUPPORTED_MODEL_TYPES) >= {"mixtral", "qwen2_moe", "olmoe", "deepseek_v3"}


def test_errors_name_tensor_and_shapes():
    config, block = hf_block("mixtral")
    wrong = MoE(D, moe_config_from_hf(config, expert_hidden=I + 1))
    with pytest.raises(ValueError, match=r"experts\.gate_up_proj has shape \(8, 32, 32\), "
                                         r"expected \(8, 34, 32\)"):
        load_hf_moe_block(block, wrong)
    with pytest.raises(ValueError, match=r"gate\.weight has shape \(8, 32\), expected \(8, 16\)"):
        load_hf_moe_block(block, MoE(16, moe_config_from_hf(config)))
    with pytest.raises(ValueError, match="moe.config.top_k=3 but .* top_k=2"):
        load_hf_moe_block(block, MoE(D, moe_config_from_hf(config, top_k=3)))
    with pytest.raises(ValueError, match="model_type is 'olmoe'"):
        moe_from_hf_block(block, hf_block("olmoe")[0])
    q_config, q_block = hf_block("qwen2_moe")
    with pytest.raises(ValueError, match="shared expert"):
        load_hf_moe_block(q_block, MoE(D, moe_config_from_hf(q_config, num_shared_experts=0)))
    with pytest.raises(ValueError, match="shared_expert_gate=False but .* shared_expert_gate=True"):
        load_hf_moe_block(q_block, MoE(D, moe_config_from_hf(q_config, shared_expert_gate=False)))
    if "expert_widths" in MoEConfig.__dataclass_fields__:
        hetero = MoE(D, moe_config_from_hf(config, expert_widths=[I] * E))
        with pytest.raises(ValueError, match="StackedSwiGLU experts only"):
            load_hf_moe_block(block, hetero)
    with pytest.raises(ValueError, match="hidden_act='gelu' is not supported"):
        moe_config_from_hf(types.SimpleNamespace(**{**config.to_dict(), "hidden_act": "gelu"}))


def test_find_moe_blocks_in_causal_lm():
    cfg = transformers.MixtralConfig(vocab_size=64, hidden_size=D, intermediate_size=I,
                                     num_hidden_layers=3, num_attention_heads=4,
                                     num_key_value_heads=2, num_local_experts=E,
                                     num_experts_per_tok=K)
    torch.manual_seed(0)
    model = transformers.MixtralForCausalLM(cfg).eval()
    blocks = find_moe_blocks(model)
    assert [n for n, _ in blocks] == [f"model.layers.{i}.mlp" for i in range(3)]
    assert all(type(b).__name__ == "MixtralSparseMoeBlock" for _, b in blocks)
    assert find_moe_blocks(nn.Sequential(nn.Linear(2, 2))) == []
    moes = moes_from_hf_model(model)
    x = torch.randn(2, 5, D)
    with torch.no_grad():
        for (name, block), (name2, moe) in zip(blocks, moes):
            assert name == name2
            torch.testing.assert_close(moe.eval()(x).output, block(x.clone()), atol=1e-5, rtol=1e-5)


def test_find_moe_blocks_skips_dense_layers():
    cfg_kw = dict(vocab_size=64, hidden_size=D, intermediate_size=24, moe_intermediate_size=I,
                  num_hidden_layers=3, first_k_dense_replace=1, num_attention_heads=4,
                  num_key_value_heads=4, n_routed_experts=E, num_experts_per_tok=K, n_group=2,
                  topk_group=1, n_shared_experts=1, q_lora_rank=None, kv_lora_rank=8,
                  qk_rope_head_dim=4, qk_nope_head_dim=4, v_head_dim=8)
    try:
        cfg = transformers.DeepseekV3Config(**cfg_kw)
        model = transformers.DeepseekV3ForCausalLM(cfg)
    except (AttributeError, TypeError, ValueError) as err:
        pytest.skip(f"tiny DeepseekV3ForCausalLM not buildable here: {err}")
    assert [n for n, _ in find_moe_blocks(model)] == ["model.layers.1.mlp", "model.layers.2.mlp"]


def test_bf16_deepseek_block_with_float32_router():
    """A bf16 DeepSeek-V3 block whose router stays float32 (as its checkpoints ship) converts
    into a bf16 layer with a float32 router, and both compute the same on bf16 input."""
    config, block = hf_block("deepseek_v3", seed=3)
    block.to(torch.bfloat16)
    block.gate.float()
    moe = moe_from_hf_block(block, config).eval()
    assert moe.router.gate.weight.dtype == torch.float32
    assert moe.experts.w_in_EDH2.dtype == torch.bfloat16
    x = torch.randn(2, 5, D, dtype=torch.bfloat16)
    with torch.no_grad():
        want, got = block(x.clone()), moe(x)
    assert got.output.dtype == torch.bfloat16
    torch.testing.assert_close(got.output.float(), want.float(), atol=3e-2, rtol=3e-2)
    assert torch.equal(got.stats.expert_ids.sort(dim=-1).values, hf_choices(block, x))
