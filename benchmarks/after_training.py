"""Measure merge, prune and dynamic skipping on a trained run, and plot upcycling curves.

Writes every transformed model as a run folder (the same functions as ``divmoe merge`` /
``divmoe prune``), then measures each against the source model in ONE process: validation
bits per byte per domain, total and activated parameters (configured and measured on the
validation tokens), and inference tokens/s (eval-mode forward of a fixed batch, timings of
all models interleaved round by round; medians and the median per-round ratio to the
source). Run it under the heavy-job lock on a shared machine:

    flock /tmp/divmoe-heavy.lock python benchmarks/after_training.py measure \\
        /work/runs/default --work /work/runs/after --out benchmarks/results/after_training.json
    python benchmarks/after_training.py plot-upcycle --dense RUN --upcycled RUN... \\
        --scratch RUN [--dense-long RUN] --out docs/upcycling_curves.png
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from divmoe.data.mixture import validation_set
from divmoe.data.user_corpus import load_splits
from divmoe.surgery import merge_run, prune_run
from divmoe.surgery.run_io import load_run
from divmoe.train import load_config
from divmoe.train.loop import evaluate

# name → (function, keyword arguments, the equivalent command's arguments)
VARIANTS = {
    "merge-6": (merge_run, dict(experts=6), "merge RUN --experts-per-layer 6"),
    "merge-4": (merge_run, dict(experts=4), "merge RUN --experts-per-layer 4"),
    "merge-4-dominant": (merge_run, dict(experts=4, router_mode="dominant"),
                         "merge RUN --experts-per-layer 4 --router dominant"),
    "merge-4-no-align": (merge_run, dict(experts=4, align=False),
                         "merge RUN --experts-per-layer 4 --no-align"),
    "prune-6-frequency": (prune_run, dict(keep=6, method="frequency"),
                          "prune RUN --keep 6 --method frequency"),
    "prune-6-reconstruction": (prune_run, dict(keep=6, method="reconstruction"),
                               "prune RUN --keep 6 --method reconstruction"),
    "prune-4-frequency": (prune_run, dict(keep=4, method="frequency"),
                          "prune RUN --keep 4 --method frequency"),
    "prune-4-reconstruction": (prune_run, dict(keep=4, method="reconstruction"),
                               "prune RUN --keep 4 --method reconstruction"),
    "skip-0.3": (prune_run, dict(keep=8, skip_ratio=0.3), "prune RUN --keep 8 --skip-ratio 0.3"),
    "skip-0.5": (prune_run, dict(keep=8, skip_ratio=0.5), "prune RUN --keep 8 --skip-ratio 0.5"),
    "prune-6-reconstruction-skip-0.3": (
        prune_run, dict(keep=6, method="reconstruction", skip_ratio=0.3),
        "prune RUN --keep 6 --method reconstruction --skip-ratio 0.3"),
}


def measure(args) -> None:
    source = Path(args.run)
    work = Path(args.work)
    runs = {"source": source}
    for name in args.variants or list(VARIANTS):
        fn, kw, _ = VARIANTS[name]
        if not (work / name / "config.yaml").exists():
            fn(source, work / name, **kw)
        runs[name] = work / name
    cfg, _ = load_run(source)
    _, val_docs = load_splits(cfg.data.corpus, cfg.model.seq_len, cfg.data.val_fraction)
    val = validation_set(val_docs, cfg.model.seq_len, cfg.data.val_bytes_per_domain)
    models = {name: load_run(path)[1] for name, path in runs.items()}
    rows = {}
    for name, model in models.items():
        ev = evaluate(model, val, cfg.train.eval_batch_size, probe_tokens_per_domain=0).row
        rows[name] = {"val_bpb": ev["val_bpb"], "val_bpb_by_domain": ev["val_bpb_by_domain"],
                      **model.param_counts(),
                      "activated_params_measured": _activated_measured(model, val),
                      "command": "divmoe " + VARIANTS[name][2].replace("RUN", str(source))
                      + f" --out {runs[name]}" if name in VARIANTS else None}
        model.eval()
    batch = torch.cat([v[: args.batch, :-1] for v in val.values()])[: args.batch]
    times = {n: [] for n in models}
    with torch.no_grad():
        for m in models.values():
            m(batch)  # warm-up
        for _ in range(args.rounds if not args.no_timing else 0):
            for n, m in models.items():
                t0 = time.perf_counter()
                m(batch)
                times[n].append(time.perf_counter() - t0)
    tokens = batch.numel()
    for n in models:
        ratios = [s / t for s, t in zip(times["source"], times[n])]
        rows[n].update(tokens_per_s=tokens / statistics.median(times[n]) if times[n] else None,
                       speed_vs_source=statistics.median(ratios) if ratios else None)
    unigram = json.loads((source / "summary.json").read_text())["unigram_bpb"]["all"]
    out = {"source": str(source), "threads": torch.get_num_threads(), "batch_tokens": tokens,
           "rounds": args.rounds, "unigram_bpb": unigram, "rows": rows}
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(table(out))


@torch.no_grad()
def _activated_measured(model, val) -> float:
    """Mean over MoE layers of the parameters each validation token touched in the layer
    (null/skipped slots touch none), over the first 64 windows of each domain."""
    batch = torch.cat([v[:64, :-1] for v in val.values()])
    stats = model(batch).stats
    return float(sum(float(s.activated_params_mean) for s in stats) / len(stats))


def table(out: dict) -> str:
    rows = out["rows"]
    domains = list(rows["source"]["val_bpb_by_domain"])
    # "gain kept": the share of the source's gain over the unigram baseline that is left.
    base, src = out["unigram_bpb"], rows["source"]["val_bpb"]
    head = ["variant", "val bpb", "gain kept", *domains, "params total", "params active",
            "MoE-layer params/token (measured)", "tokens/s", "× source"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for n, r in rows.items():
        lines.append("| " + " | ".join([
            n, f"{r['val_bpb']:.3f}", f"{(base - r['val_bpb']) / (base - src):.0%}",
            *[f"{r['val_bpb_by_domain'][d]:.3f}" for d in domains],
            f"{r['params_total']:,}", f"{r['params_active']:,}",
            f"{r['activated_params_measured']:,.0f}",
            *([f"{r['tokens_per_s']:,.0f}", f"{r['speed_vs_source']:.2f}"]
              if r["tokens_per_s"] is not None else ["not timed", "–"])]) + " |")
    return "\n".join(lines)


def _curve(run: Path, token_offset: int = 0):
    cfg = load_config(run / "config.yaml")
    tokens_per_step = cfg.train.batch_size * cfg.train.grad_accum * cfg.model.seq_len
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()
            if line.strip()]
    return ([token_offset + r["step"] * tokens_per_step for r in rows], [r["val_bpb"] for r in rows])


def plot_upcycle(args) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dense_x, dense_y = _curve(Path(args.dense))
    fig, ax = plt.subplots(figsize=(7, 4.2))
    ax.plot(dense_x, dense_y, "o-", label=f"dense ({Path(args.dense).name})")
    for run in args.upcycled:
        x, y = _curve(Path(run), dense_x[-1])
        info = json.loads((Path(run) / "surgery.json").read_text())
        ax.plot(x, y, "o-", label=f"upcycled at {dense_x[-1]:,} tokens: E={info['experts']}, "
                                  f"k={info['top_k']}, g={info['granularity']}, drop ratio "
                                  f"{info['drop_ratio']} ({Path(run).name})")
    tails = list(dense_y[1:])
    for run, label in [(args.scratch, "MoE from scratch")] + [(r, "dense, longer") for r in args.dense_long]:
        x, y = _curve(Path(run))
        ax.plot(x, y, "o--", label=f"{label} ({Path(run).name})")
        tails += y[1:]
    ax.set_xlabel("training tokens (dense + continued)")
    ax.set_ylabel("validation bits per byte")
    ax.set_ylim(min(tails) - 0.1, max(tails) + 0.1)  # step 0 (≈8 bpb) would flatten the rest
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    print(args.out)


def runs_table(args) -> None:
    """Last evaluation of each run (per-domain val bpb), its training tokens and parameters."""
    lines = []
    for run in map(Path, args.runs):
        cfg = load_config(run / "config.yaml")
        last = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x][-1]
        summary = json.loads((run / "summary.json").read_text())
        tokens = last["step"] * cfg.train.batch_size * cfg.train.grad_accum * cfg.model.seq_len
        if not lines:
            domains = list(last["val_bpb_by_domain"])
            head = ["run", "steps", "tokens", "val bpb", *domains, "params total", "params active"]
            lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        lines.append("| " + " | ".join([
            run.name, str(last["step"]), f"{tokens:,}", f"{last['val_bpb']:.3f}",
            *[f"{last['val_bpb_by_domain'][d]:.3f}" for d in domains],
            f"{summary['params_total']:,}", f"{summary['params_active']:,}"]) + " |")
    print("\n".join(lines))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("measure")
    m.add_argument("run")
    m.add_argument("--work", required=True, help="folder for the transformed runs")
    m.add_argument("--out", required=True, help="JSON results")
    m.add_argument("--variants", nargs="*", choices=sorted(VARIANTS))
    m.add_argument("--batch", type=int, default=32, help="sequences per timed forward")
    m.add_argument("--rounds", type=int, default=15)
    m.add_argument("--no-timing", action="store_true", help="quality and parameters only")
    m.set_defaults(func=measure)
    u = sub.add_parser("plot-upcycle")
    u.add_argument("--dense", required=True)
    u.add_argument("--upcycled", nargs="+", required=True)
    u.add_argument("--scratch", required=True)
    u.add_argument("--dense-long", nargs="*", default=[], help="dense runs trained longer")
    u.add_argument("--out", required=True)
    u.set_defaults(func=plot_upcycle)
    r = sub.add_parser("table", help="the markdown table of a measure JSON")
    r.add_argument("json")
    r.set_defaults(func=lambda a: print(table(json.loads(Path(a.json).read_text()))))
    t = sub.add_parser("runs-table")
    t.add_argument("runs", nargs="+")
    t.set_defaults(func=runs_table)
    args = p.parse_args(argv)
    args.func(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
