"""``divmoe bench``: the MoE layer against its dense equivalent and its peers, in one process.

For every shape (d, F, E, k) and token count: build the candidates (see
:mod:`divmoe.bench.candidates`), check that the Mixtral-function ones agree, then time ``fwd+bwd``
and ``fwd`` with the candidates interleaved within each repeat (A, B, C, A, B, C, ...) after
warm-up, and report medians, TFLOP/s of useful expert FLOPs and their fraction of this
device's measured dense matmul rate; then peak memory of one fwd+bwd per candidate and the
router/dispatch/experts/combine split of divmoe's layer (see :mod:`divmoe.bench.measure`).
On CUDA the default shapes add a fine-grained production one (:data:`FINE_GRAINED`).
``--train`` adds training tokens/s of the default MoE model vs its dense twin
(:mod:`divmoe.bench.train`). The targets of the speed issue are checked against the same run.
A table goes to stdout, progress to stderr, everything to ``--json``.
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time

import torch

DEFAULT_SHAPES = [(512, 1024, 8, 2), (512, 256, 64, 8), (1024, 512, 32, 4)]
DEFAULT_TOKENS = [4096, 16384]
QUICK_SHAPES = [(32, 16, 4, 2), (32, 8, 8, 4)]
# DeepSeek/Qwen-style fine-grained experts at a production batch: CUDA only (too big for CPU).
FINE_GRAINED = ((2048, 768, 128, 8), 32768)
QUICK_TRAIN = ["model.d_model=32", "model.n_layers=1", "model.n_heads=2", "model.seq_len=16",
               "moe.expert_hidden=16", "train.batch_size=2"]
MODES = ("fwd+bwd", "fwd")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

# Targets of the speed issue, checked against the same run.
TARGET_DENSE_TIME = 1.18      # divmoe fwd+bwd ≤ 1.18 × dense, every shape and token count
TARGET_VS_HF = {"hf:grouped_mm": 1.9, "hf:eager": 4.0}   # divmoe faster by ≥ this at E=64, k=8
TARGET_OVERHEAD = 0.10        # router + dispatch + combine ≤ 10 % of layer time at E=64, k=8
TARGET_MEMORY = 1.2           # peak fwd+bwd memory ≤ 1.2 × dense
TARGET_TRAIN = 0.85           # MoE training tokens/s ≥ 0.85 × dense
# Targets of the GPU issue (CUDA runs, bf16): for each divmoe dispatch measured.
TARGET_GPU_DENSE_TIME = 1.15  # fwd+bwd ≤ 1.15 × dense, default and fine-grained shapes
TARGET_GPU_VS_HF = {"hf:grouped_mm": 1.2}  # faster by ≥ this at the fine-grained shape
TARGET_GPU_MEMORY = 1.1       # peak fwd+bwd memory ≤ 1.1 × dense


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def parse_shape(text: str):
    try:
        parts = [int(p) for p in text.split(",")]
    except ValueError:
        parts = []
    if len(parts) != 4 or min(parts) < 1 or parts[3] > parts[2]:
        raise argparse.ArgumentTypeError(f"--shape wants d,ffn,E,k with k <= E, got {text!r}")
    return tuple(parts)


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--shape", type=parse_shape, action="append", metavar="d,ffn,E,k",
                   help="layer shape (repeatable); default 512,1024,8,2 512,256,64,8 1024,512,32,4 "
                        "(and 2048,768,128,8 at 32768 tokens on CUDA)")
    p.add_argument("--tokens", type=int, action="append", metavar="N",
                   help="tokens per call (repeatable); default 4096 and 16384")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats per candidate (median)")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds before the repeats")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch default)")
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    p.add_argument("--device", default="cpu", help="cpu or cuda[:i]")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="default fp32 on CPU, bf16 on CUDA")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-hf", action="store_true", help="skip the transformers candidates")
    p.add_argument("--no-st-moe", action="store_true", help="skip st-moe-pytorch")
    p.add_argument("--extra", action="store_true",
                   help="also divmoe+aux+z and divmoe[loop] (grouped_mm's loop fallback)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    p.add_argument("--no-split", action="store_true", help="skip the divmoe time split")
    p.add_argument("--no-layer", action="store_true", help="skip the layer benchmark (with --train)")
    p.add_argument("--train", action="store_true",
                   help="also training tokens/s: default MoE model vs dense of equal active params")
    p.add_argument("--train-steps", type=int, default=8, help="timed steps per model (--train)")
    p.add_argument("--distributed", action="store_true",
                   help="instead of the layer benchmark: a training step on W gloo ranks with the "
                        "experts sharded over them, split into all-to-all and compute, with the "
                        "bytes exchanged per rank (--worlds, --train-steps, --set apply)")
    p.add_argument("--worlds", type=_worlds, default=[1, 2, 4], metavar="W,W,...",
                   help="process counts for --distributed (default 1,2,4)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="config override for the --train models, e.g. --set moe.top_k=4")
    p.add_argument("--profile", action="store_true",
                   help="also a torch.profiler top-ops table of dense and the HF peers")
    p.add_argument("--json", help="write all results to this file")
    p.add_argument("--quick", action="store_true",
                   help="tiny shapes, 64 tokens, 1 repeat, tiny --train model: a smoke test")
    return p


def _worlds(text: str) -> list[int]:
    try:
        worlds = [int(w) for w in text.split(",")]
    except ValueError:
        worlds = []
    if not worlds or min(worlds) < 1:
        raise argparse.ArgumentTypeError(f"--worlds {text!r}: expected process counts ≥ 1 "
                                         f"separated by commas, e.g. 1,2,4")
    return worlds


def resolve(args: argparse.Namespace) -> argparse.Namespace:
    if args.quick:
        args.shape = args.shape or QUICK_SHAPES
        args.tokens = args.tokens or [64]
        args.repeats, args.warmup = 1, 1
        args.train_steps = min(args.train_steps, 2)
        args.set = QUICK_TRAIN + list(args.set)
    args.device = torch.device(args.device)
    # (shape, tokens) pairs: every shape at every token count, plus the fine-grained shape at its
    # own batch when neither was given on CUDA.
    args.runs = [(shape, tokens) for tokens in args.tokens or DEFAULT_TOKENS
                 for shape in args.shape or DEFAULT_SHAPES]
    if args.device.type == "cuda" and args.shape is None and args.tokens is None:
        args.runs.append(FINE_GRAINED)
    args.shape = args.shape or DEFAULT_SHAPES
    args.tokens = args.tokens or DEFAULT_TOKENS
    if args.dtype is None:
        args.dtype = "bf16" if args.device.type == "cuda" else "fp32"
    if min(args.tokens) < 1 or args.repeats < 1 or args.warmup < 0:
        raise ValueError("--tokens and --repeats must be >= 1, --warmup >= 0")
    if args.device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda given but torch.cuda.is_available() is False")
    return args


def machine() -> dict:
    model = platform.processor() or platform.machine()
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        model = next((ln.split(":", 1)[1].strip() for ln in out.splitlines()
                      if ln.startswith("Model name")), model)
    except (OSError, subprocess.SubprocessError):
        pass
    info = {"cpu": model, "cores": os.cpu_count(), "python": platform.python_version(),
            "torch": torch.__version__, "platform": platform.platform()}
    try:
        import transformers
        info["transformers"] = transformers.__version__
    except Exception:
        info["transformers"] = None
    try:
        import triton
        info["triton"] = triton.__version__
    except Exception:
        info["triton"] = None
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        info["compute_capability"] = list(torch.cuda.get_device_capability())
    return info


def loadavg():
    try:
        return list(os.getloadavg())
    except OSError:
        return None


def expert_flops(shape, tokens: int, mode: str) -> float:
    """Useful expert FLOPs of one call: k experts of 3 d×F GEMMs per token (router excluded),
    ×3 with the backward (∂input and ∂weight GEMMs). The dense twin does the same work."""
    d, F, _, k = shape
    return 6.0 * tokens * k * d * F * (3 if mode == "fwd+bwd" else 1)


def run_layer(shape, tokens, args, hf, st_moe, out):
    from .candidates import build_candidates, check_outputs
    from .measure import peak_memory, profile_top_ops, split_layer, time_call

    d, F, E, k = shape
    dev, dtype = args.device, DTYPES[args.dtype]
    key = {"shape": {"d": d, "F": F, "E": E, "k": k}, "tokens": tokens}
    log(f"shape d={d} F={F} E={E} k={k}, tokens={tokens}: building candidates "
        f"(load average {loadavg()})")
    cands = build_candidates(shape, tokens, hf=hf, st_moe=st_moe, extra=args.extra, device=dev,
                             dtype=dtype, seed=args.seed, skipped=out["skipped"])
    for c in cands:
        c.module.train()
    x = torch.randn(tokens, d, generator=torch.Generator().manual_seed(args.seed + 2)).to(dev, dtype)
    cands = check_outputs(cands, x, shape, tokens, out["skipped"], out["checks"], log)
    grads_out = {}
    for mode in args.modes:
        times = {c.name: [] for c in cands}
        load0 = loadavg()
        for w in range(args.warmup):
            for c in cands:
                time_call(c, x, mode, grads_out)
        for r in range(args.repeats):
            for c in cands:  # interleaved: A, B, C, A, B, C, ...
                times[c.name].append(time_call(c, x, mode, grads_out) * 1e3)
            log(f"  [{mode}] repeat {r + 1}/{args.repeats}: "
                + ", ".join(f"{n}={t[-1]:.0f}ms" for n, t in times.items()))
        load1 = loadavg()
        med = {n: statistics.median(t) for n, t in times.items()}
        flops = expert_flops(shape, tokens, mode)
        for c in cands:
            tflops = flops / (med[c.name] * 1e-3) / 1e12
            row = {**key, "mode": mode, "name": c.name, "median_ms": med[c.name],
                   "times_ms": times[c.name], "ratio_to_dense": med[c.name] / med["dense"],
                   "tflops": tflops, "fraction_of_matmul": tflops / out["meta"]["matmul_tflops"],
                   "loadavg_before": load0, "loadavg_after": load1}
            if c.info:
                row["info"] = c.info
            if c.name.startswith("divmoe"):
                # speed-up of divmoe over each peer: peer time / divmoe time (> 1: divmoe faster)
                row["speedup_over"] = {n: med[n] / med[c.name] for n in med
                                       if not n.startswith("divmoe") and n != "dense"}
            out["rows"].append(row)
    if not args.no_memory:
        mem = {}
        for c in cands:
            mem[c.name] = peak_memory(c, x, grads_out)
        for c in cands:
            out["memory"].append({**key, "name": c.name, "peak_bytes": mem[c.name],
                                  "ratio_to_dense": mem[c.name] / mem["dense"]
                                  if mem["dense"] else None})
        log("  peak MiB: " + ", ".join(f"{n}={b / 2**20:.0f}" for n, b in mem.items()))
    if not args.no_split:
        c = next(c for c in cands if c.name == "divmoe")
        s = split_layer(c, x, grads_out)
        s.update(key)
        out["split"].append(s)
        log("  split: " + ", ".join(f"{n}={v:.0%}" for n, v in s["share"].items()))
    if args.profile:
        for c in cands:
            if c.name != "divmoe":
                out["profiles"].append({**key, "name": c.name,
                                        "top_ops": profile_top_ops(c, x, grads_out)})
    del cands, x


def evaluate_targets(out) -> list[dict]:
    """The speed issue's targets on CPU; on CUDA the GPU issue's, for divmoe and divmoe[triton]."""
    res = []

    def add(target, where, value, limit, met):
        res.append({"target": target, "where": where, "value": value, "limit": limit,
                    "met": None if value is None else bool(met)})

    def where(r):
        s = r["shape"]
        return f"({s['d']},{s['F']},{s['E']},{s['k']}) T={r['tokens']}"

    def label(name, target):
        return target if name == "divmoe" else f"{name} {target}"

    if out["meta"]["device"].startswith("cuda"):
        names, dense_time, vs_hf, memory = (("divmoe", "divmoe[triton]"), TARGET_GPU_DENSE_TIME,
                                            TARGET_GPU_VS_HF, TARGET_GPU_MEMORY)
        peer_shape = list(FINE_GRAINED[0])
    else:
        names, dense_time, vs_hf, memory = ("divmoe",), TARGET_DENSE_TIME, TARGET_VS_HF, TARGET_MEMORY
        peer_shape = None  # E=64, k=8
    for r in out["rows"]:
        if r["name"] in names and r["mode"] == "fwd+bwd":
            add(label(r["name"], "fwd+bwd time / dense"), where(r), r["ratio_to_dense"],
                f"<= {dense_time}", r["ratio_to_dense"] <= dense_time)
            sh = [r["shape"][n] for n in "dFEk"]
            if (sh == peer_shape) if peer_shape else (sh[2:] == [64, 8]):
                for peer, lim in vs_hf.items():
                    v = r["speedup_over"].get(peer)
                    add(label(r["name"], f"divmoe faster than {peer} (×)"), where(r), v,
                        f">= {lim}", v is not None and v >= lim)
    if peer_shape is None:
        for s in out["split"]:
            if s["shape"]["E"] == 64 and s["shape"]["k"] == 8 and s["share"]:
                v = sum(s["share"][p] for p in ("router", "dispatch", "combine"))
                add("router+dispatch+combine share of layer", where(s), v, f"<= {TARGET_OVERHEAD}",
                    v <= TARGET_OVERHEAD)
    for m in out["memory"]:
        if m["name"] in names and m["ratio_to_dense"] is not None:
            add(label(m["name"], "peak fwd+bwd memory / dense"), where(m), m["ratio_to_dense"],
                f"<= {memory}", m["ratio_to_dense"] <= memory)
    if out.get("train"):
        v = out["train"]["moe_over_dense_tokens_per_s"]
        add("training tokens/s MoE / dense", "default MoETransformer", v, f">= {TARGET_TRAIN}",
            v >= TARGET_TRAIN)
    return res


def _sh(s):
    return f"{s['d']},{s['F']},{s['E']},{s['k']}"


def format_tables(out) -> str:
    parts = []
    if out["rows"]:
        lines = ["| shape (d,ffn,E,k) | tokens | mode | candidate | median ms | ×dense | "
                 "divmoe speed-up over it | TFLOP/s | of matmul |",
                 "|---|---|---|---|---|---|---|---|---|"]
        for r in out["rows"]:
            div = next((x for x in out["rows"] if x["name"] == "divmoe" and x["mode"] == r["mode"]
                        and x["shape"] == r["shape"] and x["tokens"] == r["tokens"]), None)
            sp = div["speedup_over"].get(r["name"]) if div else None
            lines.append(f"| {_sh(r['shape'])} | {r['tokens']} | {r['mode']} | {r['name']} | "
                         f"{r['median_ms']:.1f} | {r['ratio_to_dense']:.2f} | "
                         f"{'' if sp is None else f'{sp:.2f}'} | {r['tflops']:.3g} | "
                         f"{r['fraction_of_matmul']:.1%} |")
        parts.append("\n".join(lines))
    if out["memory"]:
        lines = ["| shape | tokens | candidate | peak fwd+bwd MiB | ×dense |", "|---|---|---|---|---|"]
        for m in out["memory"]:
            ratio = "" if m["ratio_to_dense"] is None else f"{m['ratio_to_dense']:.2f}"
            lines.append(f"| {_sh(m['shape'])} | {m['tokens']} | {m['name']} | "
                         f"{m['peak_bytes'] / 2**20:.1f} | {ratio} |")
        parts.append("\n".join(lines))
    if out["split"]:
        names = ("router", "dispatch", "experts", "combine", "other")
        lines = ["| shape | tokens | profiled ms | " + " | ".join(names)
                 + " | router+dispatch+combine |", "|---|---|---|" + "---|" * (len(names) + 1)]
        for s in out["split"]:
            sh = s["share"]
            lines.append(f"| {_sh(s['shape'])} | {s['tokens']} | {s['profiled_ms']:.0f} | "
                         + " | ".join(f"{sh.get(n, 0):.1%}" for n in names)
                         + f" | {sum(sh.get(n, 0) for n in ('router', 'dispatch', 'combine')):.1%} |")
        parts.append("\n".join(lines))
    if out.get("train"):
        t = out["train"]
        lines = ["| model | params total | params active | median step ms | tokens/s |",
                 "|---|---|---|---|---|"]
        for n, m in t["models"].items():
            lines.append(f"| {n} | {m['params_total']} | {m['params_active']} | "
                         f"{m['median_step_ms']:.1f} | {m['tokens_per_s']:.0f} |")
        lines.append(f"\nMoE / dense training tokens/s: {t['moe_over_dense_tokens_per_s']:.2f}")
        parts.append("\n".join(lines))
    if out["targets"]:
        lines = ["| target | where | value | limit | met |", "|---|---|---|---|---|"]
        for t in out["targets"]:
            v = "n/a" if t["value"] is None else f"{t['value']:.3f}"
            met = "n/a" if t["met"] is None else ("yes" if t["met"] else "**no**")
            lines.append(f"| {t['target']} | {t['where']} | {v} | {t['limit']} | {met} |")
        parts.append("\n".join(lines))
    for s in out["skipped"]:
        parts.append(f"skipped {s['name']} {s.get('shape') or ''} T={s.get('tokens')}: {s['reason']}")
    for c in out["checks"]:
        parts.append(f"check {c['shape']} T={c['tokens']} {c['name']} vs {c['against']}: "
                     f"max|diff| = {c['max_abs_diff']:.2e}{'' if c['ok'] else '  <-- MISMATCH'}")
    return "\n\n".join(parts)


def run(args: argparse.Namespace, argv=None) -> dict:
    import json

    from ..experts import grouped_mm
    from .candidates import load_hf, load_st_moe

    args = resolve(args)
    if args.distributed:
        return _run_distributed(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    hf, why = (None, "--no-hf given") if args.no_hf else load_hf()
    st_moe, st_info = (None, "--no-st-moe given") if args.no_st_moe else load_st_moe()
    out = {"meta": {**machine(), "threads": torch.get_num_threads(), "device": str(args.device),
                    "dtype": args.dtype, "tokens": args.tokens, "repeats": args.repeats,
                    "warmup": args.warmup, "shapes": [list(s) for s in args.shape],
                    "modes": list(args.modes), "runs": [[list(s), t] for s, t in args.runs],
                    "divmoe_native_grouped_mm": grouped_mm._NATIVE_GROUPED_MM,
                    "st_moe": st_info if st_moe is not None else None,
                    "command": shlex.join(["divmoe", "bench", *argv]) if argv is not None
                    else shlex.join(["divmoe", *getattr(args, "cli_argv", sys.argv[1:])]),
                    "loadavg_start": loadavg()},
           "checks": [], "skipped": [], "rows": [], "memory": [], "split": [], "profiles": [],
           "train": None, "targets": []}
    if hf is None:
        out["skipped"].append({"shape": None, "tokens": None, "name": "hf:*", "reason": why})
    else:
        log(f"transformers {hf[0]}: experts implementations {hf[3]}")
    if st_moe is None:
        out["skipped"].append({"shape": None, "tokens": None, "name": "st-moe", "reason": st_info})
    t0 = time.perf_counter()
    if not args.no_layer:
        from .measure import matmul_tflops
        n = 256 if args.quick else (8192 if args.device.type == "cuda" else 1024)
        out["meta"]["matmul_tflops"] = matmul_tflops(args.device, DTYPES[args.dtype], n)
        out["meta"]["matmul_n"] = n
        log(f"dense {args.dtype} matmul {n}³: {out['meta']['matmul_tflops']:.2f} TFLOP/s")
        for shape, tokens in args.runs:
            run_layer(shape, tokens, args, hf, st_moe, out)
    if args.train:
        from .train import bench_train
        log(f"train: default MoETransformer vs dense (load average {loadavg()})")
        out["train"] = bench_train(args.set, args.train_steps, max(1, args.warmup), args.seed, log,
                                   args.device)
    out["meta"]["loadavg_end"] = loadavg()
    out["meta"]["wall_s"] = time.perf_counter() - t0
    out["targets"] = evaluate_targets(out)
    print(format_tables(out))
    if args.profile or not args.no_split:
        for s in out["split"]:
            if s["shape"]["E"] >= 32:
                print(f"\ntop ops, divmoe fwd+bwd {_sh(s['shape'])} T={s['tokens']}:\n{s['top_ops']}")
    for p in out["profiles"]:
        print(f"\ntop ops, {p['name']} fwd+bwd {_sh(p['shape'])} T={p['tokens']}:\n{p['top_ops']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
        log(f"wrote {args.json}")
    return out


def _run_distributed(args: argparse.Namespace) -> dict:
    import json

    from .distributed import bench_distributed, format_distributed

    log(f"distributed: W in {args.worlds} (load average {loadavg()})")
    out = {"meta": {**machine(), "command": shlex.join(["divmoe", *getattr(args, "cli_argv", sys.argv[1:])]),
                    "loadavg_start": loadavg()},
           "distributed": bench_distributed(args.set, args.worlds, args.train_steps,
                                            max(1, args.warmup), args.seed, log)}
    out["meta"]["loadavg_end"] = loadavg()
    print(format_distributed(out["distributed"]))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
        log(f"wrote {args.json}")
    return out


def main(argv=None) -> dict:
    p = add_arguments(argparse.ArgumentParser(prog="divmoe bench", description=__doc__.split("\n\n")[0]))
    args = p.parse_args(argv)
    return run(args, argv)
