"""The HF mapping's contract (docs/reliability.md): every attribute of a sparse block that
changes its output is mapped (the outputs agree) or refused (a ValueError naming it). One test
per refused attribute; HF blocks with random weights from tiny configs, no downloads."""

import json

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

from divmoe.analyze import AnalyzeError, analyze  # noqa: E402
from divmoe.hf import load_hf_moe_block, moe_config_from_hf, moe_from_hf_block  # noqa: E402
from divmoe.layer import MoE  # noqa: E402

from test_hf import D, E, FAMILIES, I, hf_block  # noqa: E402


def refused(block, config, match):
    with pytest.raises(ValueError, match=match):
        moe_from_hf_block(block, config)
    # loading into a layer built from a clean (SiLU, bias-free) config is refused the same way
    with pytest.raises(ValueError, match=match):
        load_hf_moe_block(block, MoE(D, moe_config_from_hf(hf_block(config.model_type)[0])))


@pytest.mark.parametrize("act", ["gelu", "gelu_pytorch_tanh", "relu"])
@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_expert_activation_other_than_silu_is_refused(model_type, act):
    """On main a GELU block converted silently (relative error ~0.15)."""
    config, block = hf_block(model_type, hidden_act=act)
    config.hidden_act = "silu"  # the config may say SiLU; the block's own act_fn decides
    refused(block, config, "experts uses the activation")


@pytest.mark.parametrize("model_type", ["qwen2_moe", "deepseek_v3"])
def test_shared_expert_activation_other_than_silu_is_refused(model_type):
    config, block = hf_block(model_type)
    shared = "shared_expert" if model_type == "qwen2_moe" else "shared_experts"
    getattr(block, shared).act_fn = nn.GELU()
    refused(block, config, f"{shared} uses the activation GELU")


def test_silu_spelled_swish_is_mapped():
    config, block = hf_block("mixtral", hidden_act="swish")
    moe = moe_from_hf_block(block, config).eval()
    x = torch.randn(2, 5, D)
    with torch.no_grad():
        torch.testing.assert_close(moe(x).output, block(x.clone()), atol=1e-5, rtol=1e-5)


def test_router_bias_is_refused():
    config, block = hf_block("mixtral")
    block.gate.bias = nn.Parameter(torch.randn(E))
    refused(block, config, r"gate\.bias is set")


def test_fused_expert_biases_are_refused():
    config, block = hf_block("mixtral")
    block.experts.gate_up_proj_bias = nn.Parameter(torch.zeros(E, 2 * I))
    refused(block, config, r"experts\.gate_up_proj_bias is set")
    config, block = hf_block("olmoe")
    block.experts.has_bias = True
    refused(block, config, r"has biases \(has_bias=True\)")


@pytest.mark.parametrize("proj", ["gate_proj", "up_proj", "down_proj"])
def test_shared_expert_bias_is_refused(proj):
    config, block = hf_block("qwen2_moe")
    lin = getattr(block.shared_expert, proj)
    lin.bias = nn.Parameter(torch.zeros(lin.weight.shape[0]))
    refused(block, config, rf"shared_expert\.{proj}\.bias is set")


def test_shared_expert_gate_bias_is_refused():
    config, block = hf_block("qwen2_moe")
    block.shared_expert_gate.bias = nn.Parameter(torch.zeros(1))
    refused(block, config, r"shared_expert_gate\.bias is set")


def _module_list(block, act=nn.SiLU, bias_on=None):
    fused, mlps = block.experts, nn.ModuleList()
    for e in range(E):
        mlp = nn.Module()
        mlp.act_fn = act()
        gate, up = fused.gate_up_proj[e].detach().chunk(2, dim=0)
        for n, w in (("w1", gate), ("w3", up), ("w2", fused.down_proj[e].detach())):
            setattr(mlp, n, nn.Linear(w.shape[1], w.shape[0], bias=(n == bias_on)))
        mlps.append(mlp)
    block.experts = mlps
    return block


def test_per_expert_modules_with_another_activation_or_bias_are_refused():
    config, block = hf_block("mixtral")
    refused(_module_list(block, act=nn.GELU), config, r"experts\.0 uses the activation GELU")
    config, block = hf_block("mixtral")
    refused(_module_list(block, bias_on="w2"), config, r"experts\.0\.w2\.bias is set")
    config, block = hf_block("mixtral")
    block = _module_list(block)
    del block.experts[0].act_fn
    refused(block, config, r"experts\.0 has no act_fn")


@pytest.mark.parametrize("key, value, model_type", [
    ("top_k", 3, "mixtral"), ("renormalize", False, "mixtral"), ("renormalize", True, "olmoe"),
    ("score_func", "sigmoid", "qwen3_moe"), ("n_groups", 2, "deepseek_v3"),
    ("topk_groups", 1, "deepseek_v3"), ("routed_scaling", 1.0, "deepseek_v3"),
    ("shared_expert_gate", False, "qwen2_moe")])
def test_routing_attribute_that_differs_is_refused(key, value, model_type):
    config, block = hf_block(model_type)
    moe = MoE(D, moe_config_from_hf(config, **{key: value}))
    with pytest.raises(ValueError, match=rf"moe\.config\.{key}={value!r} but"):
        load_hf_moe_block(block, moe)


def _zero_width_shared_block(model_type):
    import importlib

    cfg_cls, module, block_cls, kw = FAMILIES[model_type]
    extra = ({"shared_expert_intermediate_size": 0} if model_type == "qwen2_moe"
             else {"n_shared_experts": 0})
    config = getattr(transformers, cfg_cls)(hidden_size=D, num_experts_per_tok=2, **{**kw, **extra})
    config._experts_implementation = "eager"
    mod = importlib.import_module(f"transformers.models.{module}.modeling_{module}")
    torch.manual_seed(0)
    block = getattr(mod, block_cls)(config).eval()
    with torch.no_grad():
        for p in block.parameters():
            if p.numel():
                p.normal_(0.0, 0.3)
    return config, block


@pytest.mark.parametrize("model_type", ["qwen2_moe", "deepseek_v3"])
def test_zero_width_shared_expert_maps_to_none(model_type):
    """On main qwen2_moe with shared_expert_intermediate_size=0 was refused with
    "shared_expert_gate=False but ... routes with shared_expert_gate=True"."""
    config, block = _zero_width_shared_block(model_type)
    moe = moe_from_hf_block(block, config).eval()
    assert moe.shared is None
    x = torch.randn(2, 5, D)
    with torch.no_grad():
        torch.testing.assert_close(moe(x).output, block(x.clone()), atol=1e-5, rtol=1e-5)


def test_analyze_names_an_unsupported_family_and_lists_the_supported(tmp_path):
    """On main a MoE family outside the mapping got "no sparse MoE blocks found"."""
    hf = tmp_path / "granite"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps({"model_type": "granitemoe",
                                                "architectures": ["GraniteMoeForCausalLM"]}))
    (hf / "model.safetensors").write_bytes(b"")
    with pytest.raises(AnalyzeError, match=r"model_type 'granitemoe' \(GraniteMoeForCausalLM\) "
                                           r"is not a MoE family divmoe maps; supported: "
                                           r"deepseek_v3, mixtral, olmoe, qwen2_moe, qwen3_moe"):
        analyze(hf, tmp_path / "out", progress=False)
    (hf / "config.json").write_text("{not json")
    with pytest.raises(AnalyzeError, match=r"config\.json: not readable JSON"):
        analyze(hf, tmp_path / "out", progress=False)
