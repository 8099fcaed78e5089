"""What the layer benchmark runs: divmoe's MoE and its peers, built with matching shapes.

Per shape (d, F, E, k):

* ``dense``          ``SwiGLU(d, k*F)``: the same active FLOPs per token as the MoE (router ignored);
                     the limit a sparse layer can reach.
* ``divmoe``         ``MoE(dispatch="grouped", balance=[])``: the layer itself.
* ``divmoe[triton]`` the same layer with ``dispatch="triton"`` (the fused Triton kernels), on
                     CUDA when triton is installed (``divmoe[gpu]``).
* ``torch:grouped_mm`` ``torch._grouped_mm`` called directly on divmoe's router and weights:
                     gather rows by expert, two grouped GEMMs around the SwiGLU, weighted
                     ``index_add``; no host read, no hand-written backward (autograd). A copy of
                     divmoe's weights; where ``_grouped_mm`` fails on the device and dtype it is
                     skipped with the error.
* ``hf:<impl>``      ``transformers``' ``MixtralSparseMoeBlock`` with each experts implementation
                     this transformers version registers ("eager" + the keys of
                     ``transformers.integrations.moe.ALL_EXPERTS_FUNCTIONS``); CUDA-only ones skipped
                     off CUDA, ``batched_mm`` skipped where its per-(token, slot) weight gather would
                     not fit the memory cap.
* ``st-moe``         ``st_moe_pytorch.MoE`` (lucidrains) if importable: same d, E, k and expert
                     width F, but GEGLU experts with biases and capacity-based dispatch (capacity
                     factor 1.25, all k routes kept: threshold 0), in sequences of 1024 tokens. Not
                     the same function, so not in the correctness check.
* ``--extra``        adds ``divmoe+aux+z`` (default balance losses on), ``divmoe[loop]`` (the
                     per-expert loop fallback of ``grouped_mm``, native kernel off),
                     ``divmoe[recompute]`` (``recompute_hidden=True``: no expert hidden kept for
                     backward) and ``divmoe[hetero]`` (HMoE widths F/2 and 3F/2 alternating: the same mean
                     width, two buckets; its own weights, so not in the correctness check).

All Mixtral-compatible candidates share one set of weights (the Mixtral block's, copied into
divmoe), so they route the same tokens to the same experts; :func:`check_outputs` compares them.
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as nnf

from ..dispatch import triton_installed
from ..experts import SwiGLU
from ..experts import grouped_mm as divmoe_gmm
from ..hf import load_hf_moe_block
from ..layer import MoE, MoEConfig
from ..routing.plan import count_per_expert

# Implementations that need CUDA kernels fetched from the Hub.
CUDA_ONLY_IMPLS = {
    "deepgemm": "CUDA + bf16 DeepGEMM kernel from the Hub",
    "sonicmoe": "CUDA CuteDSL kernel from the Hub (kernels-community/sonic-moe)",
}
# batched_mm gathers one [2F, d] weight matrix per (token, slot): cap what that may allocate.
BATCHED_MM_MAX_BYTES = 2 * 1024 ** 3
# st-moe builds dense [b, n, E, C] dispatch/combine tensors (C = 1.25·n·k/E): cap one of them.
ST_MOE_SEQ = 1024
ST_MOE_MAX_BYTES = 2 * 1024 ** 3
# Peers whose absence is not worth a line per shape: checked once.
_CHECKED: dict = {}


@dataclass
class Candidate:
    name: str
    module: torch.nn.Module
    call: Callable[[torch.Tensor], list]   # x_TD → [tensors to backprop through]
    context: Callable = contextlib.nullcontext
    same_function: bool = True             # computes the Mixtral block's function (checked)
    info: dict = field(default_factory=dict)


def load_hf():
    """((version, MixtralConfig, MixtralSparseMoeBlock, [impl names]), None) or (None, reason)."""
    try:
        import transformers
        from transformers.models.mixtral.configuration_mixtral import MixtralConfig
        from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
    except Exception as exc:  # ImportError, or a broken install
        return None, f"transformers not importable ({type(exc).__name__}: {exc})"
    impls = ["eager"]
    try:
        from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS
        impls += [k for k in ALL_EXPERTS_FUNCTIONS.keys() if k != "eager"]
    except Exception:  # older transformers: only the eager per-expert loop exists
        pass
    return (transformers.__version__, MixtralConfig, MixtralSparseMoeBlock, impls), None


def load_st_moe():
    """(module, version) or (None, reason)."""
    try:
        import st_moe_pytorch
        from importlib.metadata import version
        return st_moe_pytorch, version("st-moe-pytorch")
    except Exception as exc:
        return None, f"st_moe_pytorch not importable ({type(exc).__name__}); pip install st-moe-pytorch"


def make_mixtral_block(hf, d: int, F: int, E: int, k: int, impl: str, seed: int):
    """A MixtralSparseMoeBlock with random weights (no download), experts implementation ``impl``."""
    _, MixtralConfig, MixtralSparseMoeBlock, _ = hf
    cfg = MixtralConfig(hidden_size=d, intermediate_size=F, num_local_experts=E,
                        num_experts_per_tok=k, num_attention_heads=max(1, d // 64),
                        num_key_value_heads=max(1, d // 64), num_hidden_layers=1, vocab_size=32)
    cfg._experts_implementation = impl
    block = MixtralSparseMoeBlock(cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # HF leaves these as torch.empty until a PreTrainedModel initialises them
        block.gate.weight.normal_(0.0, d ** -0.5, generator=g)
        block.experts.gate_up_proj.normal_(0.0, d ** -0.5, generator=g)
        block.experts.down_proj.normal_(0.0, F ** -0.5, generator=g)
    return block


@contextlib.contextmanager
def native_grouped_mm(on: bool):
    saved = divmoe_gmm._NATIVE_GROUPED_MM
    divmoe_gmm._NATIVE_GROUPED_MM = on
    try:
        yield
    finally:
        divmoe_gmm._NATIVE_GROUPED_MM = saved


class TorchGroupedMM(torch.nn.Module):
    """``torch._grouped_mm`` called directly: divmoe's router and expert weights, no divmoe
    dispatch. The peer a user writing their own layer on torch's kernel would get."""

    def __init__(self, moe: MoE):
        super().__init__()
        self.moe = moe  # its router and expert weights; its dispatch is never called

    def forward(self, x_TD: torch.Tensor) -> torch.Tensor:
        plan = self.moe.router(x_TD)
        ids_TK = plan.expert_ids_TK  # top-k routing: no empty slots
        T, K = ids_TK.shape
        experts = self.moe.experts
        order_S = torch.argsort(ids_TK.reshape(-1), stable=True)
        offs_E = count_per_expert(ids_TK, experts.num_experts).cumsum(0).to(torch.int32)
        token_S = order_S // K
        h = torch._grouped_mm(x_TD.index_select(0, token_S), experts.w_in_EDH2, offs=offs_E)
        gate, up = h.chunk(2, dim=-1)
        y = torch._grouped_mm(nnf.silu(gate) * up, experts.w_out_EHD, offs=offs_E)
        y = y * plan.weights_TK.reshape(-1).index_select(0, order_S).to(y.dtype)[:, None]
        return x_TD.new_zeros(x_TD.shape).index_add(0, token_S, y)


def _skip(skipped, shape, tokens, name, reason):
    skipped.append({"shape": list(shape), "tokens": tokens, "name": name, "reason": reason})


def build_candidates(shape, tokens: int, *, hf, st_moe, extra: bool, device, dtype, seed: int,
                     skipped: list) -> list[Candidate]:
    d, F, E, k = shape
    torch.manual_seed(seed)
    dense = SwiGLU(d, k * F)
    cands = [Candidate("dense", dense, lambda x, m=dense: [m(x)], same_function=False)]

    def moe(balance, **kw):
        return MoE(d, MoEConfig(num_experts=E, top_k=k, expert_hidden=F, dispatch="grouped",
                                balance=balance, **kw))

    plain = moe([])
    mine = [("divmoe", plain, lambda x, m=plain: [m(x).output], contextlib.nullcontext)]
    if extra:
        aux, loop, rec = moe(["aux_loss", "z_loss"]), moe([]), moe([], recompute_hidden=True)
        mine += [("divmoe+aux+z", aux, lambda x, m=aux: list(m(x)[:2]), contextlib.nullcontext),
                 ("divmoe[loop]", loop, lambda x, m=loop: [m(x).output],
                  lambda: native_grouped_mm(False)),
                 ("divmoe[recompute]", rec, lambda x, m=rec: [m(x).output],
                  contextlib.nullcontext)]

    blocks = {}
    if hf is not None:
        for impl in hf[3]:
            if impl in CUDA_ONLY_IMPLS and device.type != "cuda":
                _skip(skipped, shape, tokens, f"hf:{impl}", CUDA_ONLY_IMPLS[impl] + "; needs CUDA")
                continue
            if impl == "batched_mm":
                need = tokens * k * 2 * F * d * torch.finfo(dtype).bits // 8
                if need > BATCHED_MM_MAX_BYTES:
                    _skip(skipped, shape, tokens, "hf:batched_mm",
                          f"gathers a [2F, d] weight per (token, slot): {need / 2**30:.1f} GiB for "
                          f"the up projection alone (cap {BATCHED_MM_MAX_BYTES / 2**30:.0f} GiB)")
                    continue
            try:  # a Hub-kernel implementation may refuse at construction (offline, no kernel)
                blocks[impl] = make_mixtral_block(hf, d, F, E, k, impl, seed)
            except Exception as exc:
                _skip(skipped, shape, tokens, f"hf:{impl}",
                      f"could not build: {type(exc).__name__}: {exc}"[:300])
        ref_block = blocks.get("eager") or next(iter(blocks.values()), None)
        if ref_block is not None:
            for b in blocks.values():  # one set of weights for every HF candidate
                b.load_state_dict(ref_block.state_dict())
            for _, m, _, _ in mine:
                load_hf_moe_block(ref_block, m)  # the one HF weight mapping (divmoe.hf)
    if not blocks:  # no HF reference: the divmoe variants still share one set of weights
        for _, m, _, _ in mine[1:]:
            m.load_state_dict(plain.state_dict())

    if device.type != "cuda":
        _skip(skipped, shape, tokens, "divmoe[triton]", "needs CUDA")
    elif not triton_installed():
        _skip(skipped, shape, tokens, "divmoe[triton]", "triton not installed: pip install "
              "'divmoe[gpu]'")
    else:
        tri = MoE(d, MoEConfig(num_experts=E, top_k=k, expert_hidden=F, dispatch="triton",
                               balance=[]))
        tri.load_state_dict(plain.state_dict())
        mine.append(("divmoe[triton]", tri, lambda x, m=tri: [m(x).output],
                     contextlib.nullcontext))
    for name, m, call, ctx in mine:
        cands.append(Candidate(name, m, call, context=ctx))
    if hasattr(torch, "_grouped_mm"):
        direct = TorchGroupedMM(copy.deepcopy(plain))
        cands.append(Candidate("torch:grouped_mm", direct, lambda x, m=direct: [m(x)]))
    else:
        _skip(skipped, shape, tokens, "torch:grouped_mm", "this torch has no torch._grouped_mm")
    if extra and F >= 2:
        widths = [F // 2 if e % 2 == 0 else F + (F - F // 2) for e in range(E)]
        if E % 2:  # keep the mean width F: the last expert takes the odd one out
            widths[-1] = F
        het = MoE(d, MoEConfig(num_experts=E, top_k=k, expert_widths=widths, dispatch="grouped",
                               balance=[]))
        cands.append(Candidate("divmoe[hetero]", het, lambda x, m=het: [m(x).output],
                               same_function=False, info={"expert_widths": widths}))
    for impl, b in blocks.items():
        cands.append(Candidate(f"hf:{impl}", b,
                               lambda x, m=b: [m(x.view(1, *x.shape)).view(x.shape)]))

    if st_moe is not None:
        seq = min(ST_MOE_SEQ, tokens)
        cap = max(4, int(seq * k * 1.25 / E))
        need = tokens * E * cap * torch.finfo(dtype).bits // 8
        if tokens % seq:
            _skip(skipped, shape, tokens, "st-moe", f"tokens {tokens} not a multiple of {seq}")
        elif need > ST_MOE_MAX_BYTES:
            _skip(skipped, shape, tokens, "st-moe",
                  f"dense dispatch tensor [b, n, E, C] would be {need / 2**30:.1f} GiB "
                  f"(cap {ST_MOE_MAX_BYTES / 2**30:.0f} GiB)")
        else:
            try:
                st = st_moe.MoE(dim=d, num_experts=E, gating_top_n=k,
                                expert_hidden_mult=(F + 0.5) * 3 / (2 * d),  # int(d·m·2/3) = F
                                threshold_train=0.0, threshold_eval=0.0,
                                capacity_factor_train=1.25 * k, capacity_factor_eval=1.25 * k,
                                balance_loss_coef=1e-2, router_z_loss_coef=1e-3)
                hidden = st.experts.experts[0].net[-1].in_features
                assert hidden == F, (hidden, F)
                cands.append(Candidate(
                    "st-moe", st,
                    lambda x, m=st, s=seq: [m(x.view(-1, s, x.shape[-1]))[0].reshape(x.shape)],
                    same_function=False, info={"seq": seq, "capacity": cap}))
            except Exception as exc:
                _skip(skipped, shape, tokens, "st-moe",
                      f"could not build: {type(exc).__name__}: {exc}"[:300])
    for c in cands:
        c.module.to(device=device, dtype=dtype)
    return cands


@torch.no_grad()
def check_outputs(cands: list[Candidate], x: torch.Tensor, shape, tokens, skipped: list,
                  checks: list, log) -> list[Candidate]:
    """Run every candidate once (dropping those that fail) and compare every Mixtral-function
    candidate with the first HF block (eager when available; else divmoe). Returns the survivors."""
    results = {}
    for c in cands:
        with c.context():
            try:
                results[c.name] = c.call(x)[0]
            except Exception as exc:
                _skip(skipped, shape, tokens, c.name,
                      f"failed on first call: {type(exc).__name__}: {exc}"[:300])
    cands = [c for c in cands if c.name in results]
    same = [c for c in cands if c.same_function]
    ref_name = next((c.name for c in same if c.name.startswith("hf:")), "divmoe")
    ref = results[ref_name].float()
    tol = 1e-4 if x.dtype == torch.float32 else 2e-2
    for c in same:
        if c.name == ref_name:
            continue
        diff = float((results[c.name].float() - ref).abs().max())
        scale = float(ref.abs().max())
        checks.append({"shape": list(shape), "tokens": tokens, "name": c.name, "against": ref_name,
                       "max_abs_diff": diff, "ref_max_abs": scale,
                       "ok": bool(diff <= tol * max(1.0, scale))})
        log(f"  check {c.name:>14} vs {ref_name}: max|diff| = {diff:.3e} (max|ref| = {scale:.3f})")
    return cands
