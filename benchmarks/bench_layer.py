"""CPU benchmark of the divmoe MoE layer against a dense SwiGLU and Hugging Face's Mixtral block.

Times forward+backward and forward-only (fp32, CPU) of, per shape (d, F, E, k):

* ``dense``            ``SwiGLU(d, k*F)``: the same active FLOPs per token as the MoE (router ignored);
* ``divmoe``           ``MoE(dispatch="grouped")`` with the balance losses off (the layer itself);
* ``divmoe+aux+z``     the same layer with its default ``aux_loss`` + ``z_loss`` on;
* ``divmoe[native]``   diagnostic: the same layer with ``torch._grouped_mm`` forced on (see below);
* ``hf:<impl>``        ``transformers``' ``MixtralSparseMoeBlock`` with each experts implementation
                       this transformers version registers (``config._experts_implementation``:
                       "eager" plus the keys of ``transformers.integrations.moe.ALL_EXPERTS_FUNCTIONS``),
                       skipped with a reason where one cannot run here.

All MoE candidates share one set of weights (the Mixtral block's, copied into divmoe), so every
candidate routes the same tokens to the same experts. Before timing, the script checks that each
MoE candidate gives the same output as the Mixtral block (eager) and prints the max abs diff.

Candidates are interleaved within each repeat (A, B, C, A, B, C, ...) after warm-up; the table
reports medians, the ratio to dense, and divmoe's time divided by each HF variant's (< 1: divmoe
is faster). Progress goes to stderr, the table to stdout, everything to ``--json``.

    python benchmarks/bench_layer.py --tokens 4096 --threads 2 --repeats 5 --json out.json
    python benchmarks/bench_layer.py --quick            # tiny shapes, 1 repeat: a smoke test

``divmoe[native]``: divmoe's ``StackedSwiGLU.grouped`` uses ``torch._grouped_mm`` only if an import-
time probe (``divmoe.experts.swiglu._NATIVE_GROUPED_MM``) succeeds; otherwise it loops over experts
in Python. The row patches that flag to True for its calls only, to show what the native kernel
would give; it is checked for correctness like the others.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Callable

import torch

import divmoe
from divmoe.experts import swiglu as divmoe_swiglu
from divmoe.layer import MoE, MoEConfig, SwiGLU

DEFAULT_SHAPES = [(512, 1024, 8, 2), (512, 256, 64, 8)]
QUICK_SHAPES = [(32, 16, 4, 2), (32, 8, 8, 4)]
MODES = ("fwd+bwd", "fwd")
# Implementations that need CUDA kernels fetched from the Hub: not runnable on a CPU.
CUDA_ONLY_IMPLS = {
    "deepgemm": "CUDA + bf16 DeepGEMM kernel from the Hub; not runnable on CPU fp32",
    "sonicmoe": "CUDA CuteDSL kernel from the Hub (kernels-community/sonic-moe); not runnable on CPU",
}
# batched_mm gathers one [2F, d] weight matrix per (token, slot): cap what that may allocate.
BATCHED_MM_MAX_BYTES = 2 * 1024 ** 3


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- HF side

def load_hf():
    """(MixtralConfig, MixtralSparseMoeBlock, [impl names]) or None with a reason."""
    try:
        import transformers
        from transformers.models.mixtral.configuration_mixtral import MixtralConfig
        from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
    except Exception as exc:  # ImportError, or a broken install
        return None, f"transformers not importable ({type(exc).__name__}: {exc})"
    impls = ["eager"]
    try:
        from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS
        impls += list(ALL_EXPERTS_FUNCTIONS.keys())
    except Exception:  # older transformers: only the eager per-expert loop exists
        pass
    return (transformers.__version__, MixtralConfig, MixtralSparseMoeBlock, impls), None


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


@torch.no_grad()
def copy_mixtral_to_divmoe(block, moe: MoE) -> None:
    """Copy a MixtralSparseMoeBlock's weights into a divmoe MoE with the same (d, F, E, k).

    HF (transformers 5.x): ``block.gate.weight`` [E, d]; ``block.experts.gate_up_proj``
    [E, 2F, d] (gate rows first, then up; used as ``x @ W.T``); ``block.experts.down_proj`` [E, d, F].
    divmoe: ``router.gate.weight`` [E, d]; ``experts.w_in_EDH2`` [E, d, 2F] (gate columns first);
    ``experts.w_out_EHD`` [E, F, d] (used as ``x @ W``).
    """
    moe.router.gate.weight.copy_(block.gate.weight)
    moe.experts.w_in_EDH2.copy_(block.experts.gate_up_proj.transpose(1, 2))
    moe.experts.w_out_EHD.copy_(block.experts.down_proj.transpose(1, 2))


# ----------------------------------------------------------------------------- candidates

@dataclass
class Candidate:
    name: str
    module: torch.nn.Module
    call: Callable[[torch.Tensor], list]   # x → [tensors to backprop through]
    context: Callable = contextlib.nullcontext


@contextlib.contextmanager
def native_grouped_mm():
    saved = divmoe_swiglu._NATIVE_GROUPED_MM
    divmoe_swiglu._NATIVE_GROUPED_MM = True
    try:
        yield
    finally:
        divmoe_swiglu._NATIVE_GROUPED_MM = saved


def build_candidates(shape, tokens: int, hf, seed: int, skipped: list, checks: list):
    d, F, E, k = shape
    torch.manual_seed(seed)
    cands = [Candidate("dense", dense := SwiGLU(d, k * F), lambda x, m=dense: [m(x)])]

    def moe(balance):
        return MoE(d, MoEConfig(num_experts=E, top_k=k, expert_hidden=F, dispatch="grouped",
                                balance=balance))

    plain, with_aux, native = moe([]), moe(["aux_loss", "z_loss"]), moe([])
    blocks = {}
    if hf is not None:
        for impl in hf[3]:
            if impl in CUDA_ONLY_IMPLS:
                skipped.append({"shape": list(shape), "name": f"hf:{impl}", "reason": CUDA_ONLY_IMPLS[impl]})
                continue
            if impl == "batched_mm":
                need = tokens * k * 2 * F * d * 4
                if need > BATCHED_MM_MAX_BYTES:
                    skipped.append({"shape": list(shape), "name": "hf:batched_mm",
                                    "reason": f"gathers a [2F, d] weight per (token, slot): "
                                              f"{need / 2**30:.1f} GiB for the up projection alone "
                                              f"(cap {BATCHED_MM_MAX_BYTES / 2**30:.0f} GiB)"})
                    continue
            blocks[impl] = make_mixtral_block(hf, d, F, E, k, impl, seed)
        ref_block = blocks.get("eager") or next(iter(blocks.values()), None)
        if ref_block is not None:
            for impl, b in blocks.items():  # one set of weights for every HF candidate
                b.load_state_dict(ref_block.state_dict())
            for m in (plain, with_aux, native):
                copy_mixtral_to_divmoe(ref_block, m)
    else:
        with_aux.load_state_dict(plain.state_dict())
        native.load_state_dict(plain.state_dict())

    cands.append(Candidate("divmoe", plain, lambda x, m=plain: [m(x).output]))
    cands.append(Candidate("divmoe+aux+z", with_aux,
                           lambda x, m=with_aux: list(m(x)[:2])))
    cands.append(Candidate("divmoe[native]", native, lambda x, m=native: [m(x).output],
                           context=native_grouped_mm))
    for impl, b in blocks.items():
        cands.append(Candidate(f"hf:{impl}", b,
                               lambda x, m=b: [m(x.view(1, *x.shape)).view(x.shape)]))

    # Correctness: every MoE candidate against the first HF block (eager when available).
    x = torch.randn(tokens, d, generator=torch.Generator().manual_seed(seed + 1))
    ref_name = next((c.name for c in cands if c.name.startswith("hf:")), "divmoe")
    ref_cand = next(c for c in cands if c.name == ref_name)
    results = {}
    for c in cands:
        if c.name == "dense":
            continue
        with torch.no_grad(), c.context():
            try:
                results[c.name] = c.call(x)[0]
            except Exception as exc:
                skipped.append({"shape": list(shape), "name": c.name,
                                "reason": f"failed on first call: {type(exc).__name__}: {exc}"[:300]})
                results[c.name] = None
    cands = [c for c in cands if c.name == "dense" or results.get(c.name) is not None]
    ref = results[ref_cand.name]
    for c in cands:
        if c.name in ("dense", ref_name):
            continue
        diff = float((results[c.name] - ref).abs().max())
        scale = float(ref.abs().max())
        checks.append({"shape": list(shape), "name": c.name, "against": ref_name,
                       "max_abs_diff": diff, "ref_max_abs": scale,
                       "ok": bool(diff <= 1e-4 * max(1.0, scale))})
        log(f"  check {c.name:>16} vs {ref_name}: max|diff| = {diff:.3e} (max|ref| = {scale:.3f})")
    return cands


# ----------------------------------------------------------------------------- timing

def time_call(c: Candidate, x: torch.Tensor, mode: str, grads_out: dict) -> float:
    for p in c.module.parameters():
        p.grad = None
    if mode == "fwd":
        with torch.no_grad(), c.context():
            t0 = time.perf_counter()
            c.call(x)
            return time.perf_counter() - t0
    xg = x.detach().requires_grad_(True)  # the layer below needs dx too
    with c.context():
        t0 = time.perf_counter()
        outs = c.call(xg)
        grads = [grads_out.setdefault(tuple(o.shape), torch.ones_like(o)) if o.dim() else
                 torch.ones((), dtype=o.dtype) for o in outs]
        torch.autograd.backward(outs, grads)
        return time.perf_counter() - t0


def run_shape(shape, args, hf, skipped, checks):
    d, F, E, k = shape
    log(f"shape d={d} F={F} E={E} k={k}, tokens={args.tokens}: building candidates")
    cands = build_candidates(shape, args.tokens, hf, args.seed, skipped, checks)
    for c in cands:
        c.module.train()
    x = torch.randn(args.tokens, d, generator=torch.Generator().manual_seed(args.seed + 2))
    # A fixed, non-trivial upstream gradient (ones for every output of that shape).
    grads_out = {}
    rows = []
    for mode in args.modes:
        times = {c.name: [] for c in cands}
        for w in range(args.warmup):
            for c in cands:
                time_call(c, x, mode, grads_out)
            log(f"  [{mode}] warm-up {w + 1}/{args.warmup} done")
        for r in range(args.repeats):
            for c in cands:  # interleaved: A, B, C, A, B, C, ...
                times[c.name].append(time_call(c, x, mode, grads_out) * 1e3)
            log(f"  [{mode}] repeat {r + 1}/{args.repeats}: "
                + ", ".join(f"{n}={t[-1]:.0f}ms" for n, t in times.items()))
        med = {n: statistics.median(t) for n, t in times.items()}
        hf_names = [n for n in med if n.startswith("hf:")]
        for c in cands:
            row = {"shape": {"d": d, "F": F, "E": E, "k": k}, "tokens": args.tokens, "mode": mode,
                   "name": c.name, "median_ms": med[c.name], "times_ms": times[c.name],
                   "ratio_to_dense": med[c.name] / med["dense"]}
            if c.name.startswith("divmoe"):
                row["ratio_to_hf"] = {h: med[c.name] / med[h] for h in hf_names}
            rows.append(row)
    return rows


def format_table(rows) -> str:
    hf_names = sorted({h for r in rows for h in r.get("ratio_to_hf", {})})
    head = ["shape (d,F,E,k)", "mode", "candidate", "median ms", "/dense"] + \
           [f"divmoe÷{h}" for h in hf_names]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        s = r["shape"]
        cells = [f"{s['d']},{s['F']},{s['E']},{s['k']}", r["mode"], r["name"],
                 f"{r['median_ms']:.1f}", f"{r['ratio_to_dense']:.2f}"]
        cells += [f"{r['ratio_to_hf'][h]:.2f}" if h in r.get("ratio_to_hf", {}) else ""
                  for h in hf_names]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parse_shape(text: str):
    parts = [int(p) for p in text.split(",")]
    if len(parts) != 4 or min(parts) < 1 or parts[3] > parts[2]:
        raise argparse.ArgumentTypeError(f"--shape wants d,F,E,k with k <= E, got {text!r}")
    return tuple(parts)


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--repeats", type=int, default=5, help="timed repeats per candidate (median)")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds before the repeats")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--shape", type=parse_shape, action="append",
                   help="d,F,E,k (repeatable); default 512,1024,8,2 and 512,256,64,8")
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-hf", action="store_true", help="skip the transformers candidates")
    p.add_argument("--json", help="write all results to this file")
    p.add_argument("--quick", action="store_true", help="tiny shapes, 64 tokens, 1 repeat")
    args = p.parse_args(argv)
    if args.quick:
        args.shape = args.shape or QUICK_SHAPES
        args.tokens, args.repeats, args.warmup = min(args.tokens, 64), 1, 1
    args.shape = args.shape or DEFAULT_SHAPES
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    hf, why = (None, "--no-hf given") if args.no_hf else load_hf()
    if hf is None:
        log(f"transformers candidates skipped: {why}")
    else:
        log(f"transformers {hf[0]}: experts implementations {hf[3]}")
    log(f"divmoe native torch._grouped_mm probe: {divmoe_swiglu._NATIVE_GROUPED_MM}")
    skipped, checks, rows = [], [], []
    if hf is None:
        skipped.append({"shape": None, "name": "hf:*", "reason": why})
    t0 = time.perf_counter()
    for shape in args.shape:
        rows += run_shape(shape, args, hf, skipped, checks)
    result = {
        "meta": {"torch": torch.__version__, "transformers": hf[0] if hf else None,
                 "divmoe": getattr(divmoe, "__version__", None), "python": platform.python_version(),
                 "threads": torch.get_num_threads(), "tokens": args.tokens, "repeats": args.repeats,
                 "warmup": args.warmup, "shapes": [list(s) for s in args.shape],
                 "divmoe_native_grouped_mm_probe": divmoe_swiglu._NATIVE_GROUPED_MM,
                 "argv": sys.argv[1:] if argv is None else list(argv),
                 "wall_s": time.perf_counter() - t0},
        "checks": checks, "skipped": skipped, "rows": rows,
    }
    print(format_table(rows))
    for s in skipped:
        print(f"skipped {s['name']} {s['shape'] or ''}: {s['reason']}")
    for c in checks:
        print(f"check {c['shape']} {c['name']} vs {c['against']}: max|diff| = {c['max_abs_diff']:.2e}"
              f"{'' if c['ok'] else '  <-- MISMATCH'}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
        log(f"wrote {args.json}")
    return result


if __name__ == "__main__":
    main()
