"""Hugging Face sparse MoE blocks ↔ divmoe :class:`~divmoe.layer.MoE`.

Semantics of each supported family (read from transformers 5.x ``modeling_*.py``):

============  ==========  ===========  ==================  ==========  ====================
family        score       renormalise  groups / bias       scaling     shared experts
============  ==========  ===========  ==================  ==========  ====================
mixtral       softmax     always       —                   1           —
qwen2_moe     softmax     norm_topk    —                   1           1 MLP of width
                                                                       shared_expert_inter-
                                                                       mediate_size, gated
                                                                       by sigmoid(x·w)
qwen3_moe     softmax     norm_topk    —                   1           —
olmoe         softmax     norm_topk    —                   1           —
deepseek_v3   sigmoid     norm_topk    n_group/topk_group  routed_     n_shared_experts ×
                                       (group score = sum  scaling_    moe_intermediate_size
                                       of top-2), e_score_ factor
                                       correction_bias
                                       (selection only)
============  ==========  ===========  ==================  ==========  ====================

Weight layouts (HF → divmoe), all copies through views so the same table serves both
directions:

* ``gate.weight`` [E, d]                         → ``router.gate.weight`` [E, d]
* ``experts.gate_up_proj`` [E, 2I, d] (gate rows first; ``[E, d, 2I]`` when the experts
  class is declared ``is_transposed``)           → ``experts.w_in_EDH2`` [E, d, 2I]
* ``experts.down_proj`` [E, d, I] (``[E, I, d]`` transposed) → ``experts.w_out_EHD`` [E, I, d]
* per-expert ``nn.ModuleList`` experts (transformers 4.x: ``gate_proj/up_proj/down_proj``,
  Mixtral ``w1/w3/w2``) are accepted too.
* shared ``gate_proj``/``up_proj`` [S, d] → ``shared.w_in.weight`` rows [:S] / [S:];
  ``down_proj`` [d, S] → ``shared.w_out.weight``; ``shared_expert_gate.weight`` [1, d] →
  ``shared_gate.weight``.
* ``gate.e_score_correction_bias`` [E] → ``selection_bias_E``.

Known differences (none affect the forward output at equal precision):

* Router precision: every HF router computes probabilities in float32 (DeepSeek-V3 even
  computes the logits from float32-cast inputs and weights); divmoe computes the logits in
  the module dtype and the scores in float32. In float64 the DeepSeek-V3 outputs therefore
  agree to float32 rounding (~1e-7 relative), the softmax families to ~1e-15.
* Mixtral's ``router_jitter_noise`` multiplies the *expert* inputs too (in place); divmoe's
  ``jitter`` perturbs only the router input. The mapping sets ``jitter=0`` (eval semantics).
* DeepSeek-V3 group masking: transformers 5.x masks the experts of non-selected groups with
  ``-inf`` before the top-k, exactly like divmoe. Older releases (4.5x) used ``0.0``, which
  differs only when a selected group holds fewer than k experts with ``score + bias > 0``
  (then a masked expert with fill 0.0 can win); with ``-inf`` a masked expert never wins.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import torch
from torch import nn

from ..experts import StackedSwiGLU
from ..layer import MoE, MoEConfig

__all__ = ["SUPPORTED_MODEL_TYPES", "moe_config_from_hf", "load_hf_moe_block",
           "save_to_hf_block", "moe_from_hf_block", "find_moe_blocks", "moes_from_hf_model"]


# ----------------------------------------------------------------------------- configs

def _attr(cfg: Any, *names: str, default: Any = dataclasses.MISSING) -> Any:
    for name in names:
        value = getattr(cfg, name, None)
        if value is not None:
            return value
    if default is not dataclasses.MISSING:
        return default
    raise ValueError(f"HF config of model_type={getattr(cfg, 'model_type', '?')!r} has none of "
                     f"the attributes {', '.join(names)}")


def _mixtral(c) -> dict:
    return dict(num_experts=_attr(c, "num_local_experts", "num_experts"),
                top_k=c.num_experts_per_tok, expert_hidden=c.intermediate_size,
                score_func="softmax", renormalize=True,
                balance=["aux_loss"], aux_loss_weight=_attr(c, "router_aux_loss_coef", default=0.0))


def _qwen_olmoe(expert_hidden_attr: str) -> Callable[[Any], dict]:
    def build(c) -> dict:
        return dict(num_experts=_attr(c, "num_experts", "num_local_experts"),
                    top_k=c.num_experts_per_tok, expert_hidden=_attr(c, expert_hidden_attr),
                    score_func="softmax", renormalize=bool(_attr(c, "norm_topk_prob", default=False)),
                    balance=["aux_loss"],
                    aux_loss_weight=_attr(c, "router_aux_loss_coef", default=0.0))
    return build


def _qwen2_moe(c) -> dict:
    kw = _qwen_olmoe("moe_intermediate_size")(c)
    shared = int(_attr(c, "shared_expert_intermediate_size", default=0))
    if shared:  # HF always builds the shared expert and its sigmoid gate
        kw.update(num_shared_experts=1, shared_expert_hidden=shared, shared_expert_gate=True)
    return kw


def _deepseek_v3(c) -> dict:
    n_shared = int(_attr(c, "n_shared_experts", default=0) or 0)
    return dict(num_experts=_attr(c, "n_routed_experts", "num_local_experts"),
                top_k=c.num_experts_per_tok, expert_hidden=c.moe_intermediate_size,
                score_func="sigmoid", renormalize=bool(_attr(c, "norm_topk_prob", default=True)),
                n_groups=int(_attr(c, "n_group", default=1) or 1),
                topk_groups=int(_attr(c, "topk_group", default=1) or 1),
                routed_scaling=float(_attr(c, "routed_scaling_factor", default=1.0)),
                num_shared_experts=n_shared,
                # DeepSeek-V3 balances with the selection bias (auxiliary-loss-free).
                balance=["loss_free_bias"])


@dataclasses.dataclass(frozen=True)
class _Family:
    config_fn: Callable[[Any], dict]
    block_classes: tuple[str, ...]      # class names of the sparse block across versions
    score_func: str
    shared: str | None = None           # attribute of the shared MLP on the block
    shared_gate: str | None = None      # attribute of the shared expert's sigmoid gate


_FAMILIES: dict[str, _Family] = {
    "mixtral": _Family(_mixtral, ("MixtralSparseMoeBlock",), "softmax"),
    "qwen2_moe": _Family(_qwen2_moe, ("Qwen2MoeSparseMoeBlock",), "softmax",
                         shared="shared_expert", shared_gate="shared_expert_gate"),
    "qwen3_moe": _Family(_qwen_olmoe("moe_intermediate_size"), ("Qwen3MoeSparseMoeBlock",),
                         "softmax"),
    "olmoe": _Family(_qwen_olmoe("intermediate_size"), ("OlmoeSparseMoeBlock",), "softmax"),
    "deepseek_v3": _Family(_deepseek_v3, ("DeepseekV3MoE",), "sigmoid", shared="shared_experts"),
}
SUPPORTED_MODEL_TYPES: tuple[str, ...] = tuple(sorted(_FAMILIES))
_BLOCK_CLASS_TO_TYPE = {cls: mt for mt, fam in _FAMILIES.items() for cls in fam.block_classes}


def _family(model_type: str) -> _Family:
    if model_type not in _FAMILIES:
        raise ValueError(f"unsupported HF model_type {model_type!r}; supported: "
                         f"{', '.join(SUPPORTED_MODEL_TYPES)}")
    return _FAMILIES[model_type]


def moe_config_from_hf(hf_config: Any, **overrides: Any) -> MoEConfig:
    """The :class:`MoEConfig` whose layer computes what the HF family's sparse block computes.

    ``hf_config`` is a ``transformers`` ``PretrainedConfig`` (or anything with the same
    attributes and a ``model_type``). Jitter is off (HF jitter is train-time only);
    ``overrides`` replace any field afterwards (e.g. ``dispatch="reference"``).
    """
    model_type = getattr(hf_config, "model_type", None)
    fam = _family(model_type)
    act = getattr(hf_config, "hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise ValueError(f"HF config hidden_act={act!r} is not supported: divmoe experts are "
                         f"SwiGLU (hidden_act='silu')")
    kw = fam.config_fn(hf_config)
    kw.update(router="topk", jitter=0.0)
    kw.update(overrides)
    return MoEConfig(**kw)


# ----------------------------------------------------------------------------- weights

def _block_model_type(block: nn.Module) -> str:
    name = type(block).__name__
    if name in _BLOCK_CLASS_TO_TYPE:
        return _BLOCK_CLASS_TO_TYPE[name]
    raise ValueError(f"unsupported HF MoE block {name}; supported: "
                     + ", ".join(f"{cls} ({mt})" for cls, mt in sorted(_BLOCK_CLASS_TO_TYPE.items())))


def _check_semantics(block: nn.Module, model_type: str, moe: MoE) -> None:
    """Reject a divmoe config that routes differently from the block (weights alone would
    copy fine and silently compute something else)."""
    fam, c, gate = _FAMILIES[model_type], moe.config, block.gate
    want: dict[str, Any] = {"router": "topk", "score_func": fam.score_func}
    top_k = getattr(gate, "top_k", getattr(block, "top_k", None))
    if top_k is not None:
        want["top_k"] = int(top_k)
    if model_type == "mixtral":
        want["renormalize"] = True
    elif hasattr(gate, "norm_topk_prob") or hasattr(block, "norm_topk_prob"):
        want["renormalize"] = bool(getattr(gate, "norm_topk_prob",
                                           getattr(block, "norm_topk_prob", None)))
    if model_type == "deepseek_v3":
        want["n_groups"] = int(getattr(gate, "num_group", getattr(gate, "n_group", 1)))
        want["topk_groups"] = int(gate.topk_group)
        want["routed_scaling"] = float(gate.routed_scaling_factor)
    else:
        want.update(n_groups=1, routed_scaling=1.0)
    if fam.shared_gate is not None:
        want["shared_expert_gate"] = (getattr(block, fam.shared_gate, None) is not None
                                      and _shared_width(block, fam) > 0)
    for key, value in want.items():
        have = getattr(c, key)
        same = abs(have - value) <= 1e-12 * abs(value) if isinstance(value, float) else have == value
        if not same:
            raise ValueError(f"moe.config.{key}={have!r} but the HF {type(block).__name__} routes "
                             f"with {key}={value!r}; build the layer with "
                             f"moe_config_from_hf(hf_config)")


def _shared_width(block: nn.Module, fam: _Family) -> int:
    """Width of the block's shared expert; 0 when it has none. A zero-width one (HF builds it
    for ``shared_expert_intermediate_size=0``) adds exactly zero, so it counts as none."""
    hf_shared = getattr(block, fam.shared, None) if fam.shared else None
    return 0 if hf_shared is None else int(hf_shared.gate_proj.weight.shape[0])


_SILU_PROBE = torch.linspace(-8.0, 8.0, 161, dtype=torch.float64)


def _check_silu(act: Any, where: str) -> None:
    """divmoe experts compute silu(x·W_gate) ⊙ (x·W_up): refuse any other activation, checked
    on values (classes differ across transformers releases: nn.SiLU, SiLUActivation...)."""
    if act is None:
        raise ValueError(f"HF {where} has no act_fn, so its activation cannot be checked; "
                         f"divmoe maps SwiGLU (SiLU) experts only")
    try:
        same = torch.allclose(act(_SILU_PROBE.clone()), torch.nn.functional.silu(_SILU_PROBE),
                              rtol=1e-6, atol=1e-9)
    except Exception:  # noqa: BLE001 - an activation that cannot even run on a tensor
        same = False
    if not same:
        raise ValueError(f"HF {where} uses the activation {type(act).__name__}; divmoe experts "
                         f"are SwiGLU (SiLU gate), so this block cannot be mapped")


def _check_no_bias(module: nn.Module | None, where: str) -> None:
    for name in ("bias", "gate_up_proj_bias", "down_proj_bias"):
        if isinstance(getattr(module, name, None), torch.Tensor):
            raise ValueError(f"HF {where}.{name} is set: divmoe routers and experts have no "
                             f"biases, so this block cannot be mapped")
    if getattr(module, "has_bias", False):
        raise ValueError(f"HF {where} has biases (has_bias=True): divmoe experts have none")


def _check_expert_function(block: nn.Module, fam: _Family) -> None:
    """Refuse what the weights do not carry: another activation, biases anywhere."""
    _check_no_bias(block.gate, "gate")
    experts = block.experts
    mlps = ([(f"experts.{e}", m) for e, m in enumerate(experts)]
            if isinstance(experts, nn.ModuleList) else [])
    if _shared_width(block, fam):
        mlps.append((fam.shared, getattr(block, fam.shared)))
    if not isinstance(experts, nn.ModuleList):
        _check_no_bias(experts, "experts")
        _check_silu(getattr(experts, "act_fn", None), "experts")
    for where, mlp in mlps:
        _check_silu(getattr(mlp, "act_fn", None), where)
        for proj in ("w1", "w2", "w3", "gate_proj", "up_proj", "down_proj"):
            if hasattr(mlp, proj):
                _check_no_bias(getattr(mlp, proj), f"{where}.{proj}")
    if fam.shared_gate and _shared_width(block, fam):
        _check_no_bias(getattr(block, fam.shared_gate, None), fam.shared_gate)


def _expert_pairs(hf_experts: nn.Module, moe: MoE) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    if not isinstance(moe.experts, StackedSwiGLU):
        raise ValueError(f"moe.experts is a {type(moe.experts).__name__}; HF blocks map onto "
                         f"StackedSwiGLU experts only (expert_layout='swiglu', no expert_widths)")
    w_in, w_out, H = moe.experts.w_in_EDH2, moe.experts.w_out_EHD, moe.experts.hidden
    if isinstance(hf_experts, nn.ModuleList):  # transformers 4.x: one MLP module per expert
        pairs = []
        for e, mlp in enumerate(hf_experts):
            names = ("w1", "w3", "w2") if hasattr(mlp, "w1") else ("gate_proj", "up_proj", "down_proj")
            views = (w_in[e, :, :H].T, w_in[e, :, H:].T, w_out[e].T)
            pairs += [(f"experts.{e}.{n}.weight", getattr(mlp, n).weight, v)
                      for n, v in zip(names, views)]
        if len(hf_experts) != moe.config.num_experts:
            raise ValueError(f"HF block has {len(hf_experts)} experts but "
                             f"moe.config.num_experts={moe.config.num_experts}")
        return pairs
    if getattr(hf_experts, "is_transposed", False):  # [E, d, 2I] and [E, I, d]
        return [("experts.gate_up_proj", hf_experts.gate_up_proj, w_in),
                ("experts.down_proj", hf_experts.down_proj, w_out)]
    return [("experts.gate_up_proj", hf_experts.gate_up_proj, w_in.transpose(1, 2)),
            ("experts.down_proj", hf_experts.down_proj, w_out.transpose(1, 2))]


def _pairs(block: nn.Module, moe: MoE, check_routing: bool = True
           ) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """(HF name, HF tensor, divmoe view of the same shape) for every copied tensor;
    ``check_routing=False`` copies weights into a block that routes otherwise (writing back a
    layer whose routing the user changed)."""
    if not isinstance(moe, MoE):
        raise ValueError(f"expected a divmoe.layer.MoE, got {type(moe).__name__}")
    model_type = _block_model_type(block)
    fam = _FAMILIES[model_type]
    if check_routing:
        _check_semantics(block, model_type, moe)
    _check_expert_function(block, fam)
    pairs = [("gate.weight", block.gate.weight, moe.router.gate.weight)]
    pairs += _expert_pairs(block.experts, moe)
    bias = getattr(block.gate, "e_score_correction_bias", None)
    if bias is not None:
        pairs.append(("gate.e_score_correction_bias", bias, moe.selection_bias_E))

    width = _shared_width(block, fam)
    hf_shared = getattr(block, fam.shared) if width else None
    if width and moe.shared is None:
        raise ValueError(f"HF block has a shared expert (block.{fam.shared}, width {width}) but "
                         f"moe.config.num_shared_experts=0")
    if not width and moe.shared is not None:
        raise ValueError(f"moe has a shared expert of width {moe.shared.w_out.weight.shape[1]} "
                         f"but the HF block has none")
    if width:
        S = moe.shared.w_out.weight.shape[1]
        w_in = moe.shared.w_in.weight
        pairs += [(f"{fam.shared}.gate_proj.weight", hf_shared.gate_proj.weight, w_in[:S]),
                  (f"{fam.shared}.up_proj.weight", hf_shared.up_proj.weight, w_in[S:]),
                  (f"{fam.shared}.down_proj.weight", hf_shared.down_proj.weight,
                   moe.shared.w_out.weight)]
        hf_gate = getattr(block, fam.shared_gate, None) if fam.shared_gate else None
        if hf_gate is not None:
            pairs.append((f"{fam.shared_gate}.weight", hf_gate.weight, moe.shared_gate.weight))

    for name, hf_t, ours in pairs:
        if tuple(hf_t.shape) != tuple(ours.shape):
            raise ValueError(f"HF tensor {name} has shape {tuple(hf_t.shape)}, expected "
                             f"{tuple(ours.shape)} for the divmoe layer (num_experts="
                             f"{moe.config.num_experts}, d_model={moe.d_model}, expert_hidden="
                             f"{moe.config.expert_hidden})")
    return pairs


@torch.no_grad()
def load_hf_moe_block(block: nn.Module, moe: MoE, check_routing: bool = True) -> MoE:
    """Copy the weights of an HF sparse MoE block into ``moe`` (in place; returns ``moe``).

    Raises ValueError for an unsupported block class, a config whose routing differs from
    the block's (unless ``check_routing=False``: another routing policy on the same
    weights), or any tensor whose shape does not fit (naming it and both shapes).
    """
    for _, hf_t, ours in _pairs(block, moe, check_routing):
        ours.copy_(hf_t)
    return moe


@torch.no_grad()
def save_to_hf_block(moe: MoE, block: nn.Module, check_routing: bool = True) -> nn.Module:
    """The reverse of :func:`load_hf_moe_block`: write ``moe``'s weights into ``block``
    (``check_routing=False``: also when ``moe`` routes otherwise than the block)."""
    for _, hf_t, ours in _pairs(block, moe, check_routing):
        hf_t.copy_(ours)
    return block


def moe_from_hf_block(block: nn.Module, hf_config: Any, check_routing: bool = True,
                      **overrides: Any) -> MoE:
    """A new :class:`MoE` computing what ``block`` computes, with its weights and dtypes: the
    experts' dtype for the layer, the gate's for the router (DeepSeek-V3 checkpoints keep a
    float32 router in a bf16 model; the divmoe router then computes in float32 too).
    ``check_routing=False`` lets ``overrides`` route otherwise than the block."""
    block_type = _block_model_type(block)
    if getattr(hf_config, "model_type", None) != block_type:
        raise ValueError(f"block {type(block).__name__} is a {block_type!r} block but the config's "
                         f"model_type is {getattr(hf_config, 'model_type', None)!r}")
    moe = MoE(int(hf_config.hidden_size), moe_config_from_hf(hf_config, **overrides))
    expert_dtype = next(block.experts.parameters()).dtype
    moe.to(device=block.gate.weight.device, dtype=expert_dtype)
    moe.router.to(dtype=block.gate.weight.dtype)
    return load_hf_moe_block(block, moe, check_routing)


# ----------------------------------------------------------------------------- models

def _looks_like_sparse_block(module: nn.Module) -> bool:
    if type(module).__name__ in _BLOCK_CLASS_TO_TYPE:
        return True
    gate, experts = getattr(module, "gate", None), getattr(module, "experts", None)
    return (isinstance(gate, nn.Module) and isinstance(getattr(gate, "weight", None), torch.Tensor)
            and isinstance(experts, nn.Module)
            and (hasattr(experts, "gate_up_proj") or isinstance(experts, nn.ModuleList)))


def find_moe_blocks(hf_model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The sparse MoE blocks of an HF model, as ``(qualified name, block)`` in module order.

    A block is a known sparse-block class or any module with a ``gate`` (holding a
    ``weight``) and ``experts`` (fused ``gate_up_proj`` or a ``ModuleList``); modules inside
    a found block are not searched. Dense MLP layers (e.g. DeepSeek-V3's first
    ``first_k_dense_replace`` layers) are skipped.
    """
    found: list[tuple[str, nn.Module]] = []
    for name, module in hf_model.named_modules():
        if any(name.startswith(prefix + ".") for prefix, _ in found):
            continue
        if _looks_like_sparse_block(module):
            found.append((name, module))
    return found


def moes_from_hf_model(hf_model: nn.Module, **overrides: Any) -> list[tuple[str, MoE]]:
    """``(name, MoE)`` for every supported sparse block of ``hf_model`` (weights copied)."""
    return [(name, moe_from_hf_block(block, hf_model.config, **overrides))
            for name, block in find_moe_blocks(hf_model)]
