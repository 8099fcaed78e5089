"""Short training runs: every router, balancer and expert layout trains end to end.

Each entry of RUNS is one ``divmoe.train.train(...)`` run on the embedded corpus with the
same seed and model (BASE below) plus the entry's settings. The script writes
``docs/short_runs.md`` (a table: name | settings | final val_bpb | MaxVio | mean activated
params | tokens/s | wall s) and ``short_runs.json`` beside the run folders.

    OMP_NUM_THREADS=1 flock /tmp/divmoe-heavy.lock python scripts/short_runs.py

Options: ``--out DIR`` (run folders; default runs/short_runs), ``--only NAME ...``,
``--steps N`` (override for a quick check), ``--no-doc`` (do not rewrite docs/short_runs.md).
A run that fails is recorded with its error and the script goes on.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

BASE = ["model.d_model=64", "model.n_layers=2", "model.n_heads=4", "model.seq_len=128",
        "moe.num_experts=8", "moe.top_k=2", "moe.expert_hidden=64",
        "train.steps=120", "train.batch_size=16", "train.eval_every=120",
        "train.warmup_steps=12", "train.eval_batch_size=32", "train.seed=0", "train.threads=1",
        "data.val_bytes_per_domain=8192"]

# Heterogeneous widths with the same mean width (64) as the homogeneous experts.
HETERO = "moe.expert_widths=[32,32,48,48,80,80,96,96]"

# name → settings on top of BASE (the default balance is [aux_loss, z_loss], micro-batch scope).
RUNS: dict[str, list[str]] = {
    # routers
    "topk": [],
    "topk_sigmoid": ["moe.score_func=sigmoid", "moe.n_groups=2", "moe.topk_groups=1"],
    "expert_choice": ["moe.router=expert_choice"],
    "dynamic_topp": ["moe.router=dynamic_topp", "moe.top_k=4", "moe.top_p=0.5"],
    "null_experts": ["moe.router=null_experts", "moe.top_k=3", "moe.num_null_experts=4",
                     "moe.balance=[aux_loss,z_loss,null_usage]"],
    "grouped": ["moe.router=grouped", "moe.n_groups=2"],
    "sinkhorn": ["moe.router=sinkhorn"],
    "hash": ["moe.router=hash"],
    "hypersphere": ["moe.router=hypersphere"],
    "dselect_k": ["moe.router=dselect_k"],
    "soft_merge": ["moe.router=soft_merge"],
    # balancers (default topk router)
    "no_balance": ["moe.balance=[]"],
    "aux_loss(micro_batch)": ["moe.balance=[aux_loss]"],
    "aux_loss(sequence)": ["moe.balance=[aux_loss]", "moe.aux_loss_scope=sequence"],
    "aux_loss(global_batch)": ["moe.balance=[aux_loss]", "moe.aux_loss_scope=global_batch",
                               "train.grad_accum=2", "train.batch_size=8"],
    "z_loss": ["moe.balance=[z_loss]"],
    "loss_free_bias": ["moe.balance=[loss_free_bias]"],
    "capacity(drop)": ["moe.balance=[aux_loss,z_loss,capacity]", "moe.capacity_overflow=drop"],
    "capacity(reroute)": ["moe.balance=[aux_loss,z_loss,capacity]",
                          "moe.capacity_overflow=reroute"],
    "small_expert_bias": ["moe.balance=[aux_loss,z_loss,small_expert_bias]", HETERO],
    "dirichlet_prior": ["moe.balance=[z_loss,dirichlet_prior]"],
    # expert layouts (default topk router, aux_loss + z_loss)
    "swiglu_hetero": [HETERO],
    "lora": ["moe.expert_layout=lora", "moe.lora_rank=8"],
    "shared_experts": ["moe.num_shared_experts=1"],
}
# null experts as a layout are the null_experts router row.


NOTES = [
    "- One seed, 120 steps, a tiny model: these runs show that every name trains end to end "
    "and give a first look at load balance and activated parameters. No seed replicates were run, so "
    "run-to-run noise is not measured: the val_bpb column is not a ranking.",
    "- Activated params differ by design: `dynamic_topp` and `null_experts` choose a variable "
    "number of real experts; `capacity(drop)` drops slots (fewer parameters touched); "
    "`shared_experts` adds an always-on expert; `lora` counts the frozen dense base plus "
    "adapters; `swiglu_hetero` / `small_expert_bias` use unequal widths at the same mean "
    "width (small_expert_bias pushes tokens to the small experts); `soft_merge` touches one "
    "(merged) expert plus the router. `dselect_k` starts as a dense gate and only becomes "
    "sparse once its smooth steps saturate, so after 120 steps most tokens still touch "
    "nearly every expert (and it is the slowest row): its val_bpb is that of a nearly "
    "dense model.",
    "- `soft_merge` (SMEAR) routes once per sequence from the sequence's mean representation. "
    "In a causal LM that lets the merged weights see later tokens of the same sequence (a "
    "leak of E numbers per sequence and layer), so its val_bpb is not strictly comparable; "
    "its active width is one expert (hidden 64) against two for top-2 rows.",
    "- `expert_choice` and `capacity(reroute)` are balanced by construction (MaxVio 0); "
    "for `soft_merge` MaxVio is computed on the soft load Σ_t p_te.",
    "- `aux_loss(global_batch)` runs 2 micro-batches of 8 sequences per step (the same "
    "16 sequences per step as the other rows) so the global-batch counts span micro-batches.",
]


def run_one(name: str, settings: list[str], out: Path, steps: int | None) -> dict:
    from divmoe.train import load_config, train

    overrides = BASE + settings + ([f"train.steps={steps}", f"train.eval_every={steps}"]
                                   if steps else [])
    run_dir = out / name.replace("(", "_").replace(")", "")
    if run_dir.exists():
        shutil.rmtree(run_dir)
    row = {"name": name, "settings": settings}
    t0 = time.perf_counter()
    try:
        cfg = load_config(None, overrides)
        result = train(run_dir, cfg, progress=False)
        final = result.metrics[-1]
        summary = json.loads((run_dir / "summary.json").read_text())
        row.update(ok=True, step=final["step"], val_bpb=final["val_bpb"],
                   max_vio=final.get("max_vio"),
                   activated_params_mean=final.get("activated_params_mean"),
                   tokens_per_s=final.get("tokens_per_s"),
                   params_total=summary.get("params_total"),
                   params_active=summary.get("params_active"))
    except Exception as exc:  # recorded, not hidden: the table shows the failure
        row.update(ok=False, error=f"{type(exc).__name__}: {exc}",
                   traceback=traceback.format_exc())
    row["wall_s"] = time.perf_counter() - t0
    return row


def _fmt(x, spec):
    return "—" if x is None else format(x, spec)


def write_doc(rows: list[dict], path: Path, command: str, total_s: float) -> None:
    lines = [
        "# Short runs: every router, balancer and expert layout trains end to end",
        "",
        "Written by `scripts/short_runs.py`. Each row is one `divmoe.train.train(...)` run on the "
        "embedded corpus, same seed (0) and model: d_model 64, 2 layers (both MoE), 4 heads, "
        "E = 8 experts of hidden width 64, top_k 2, 120 steps of batch 16 × 128 bytes "
        "(aux_loss(global_batch): 2 micro-batches of 8 per step, same tokens per step), "
        "lr 3e-3 cosine, 1 CPU thread. Default balance is `[aux_loss, z_loss]` "
        "(micro-batch scope); a row's settings are added to that.",
        "",
        "Command:",
        "",
        "```",
        command,
        "```",
        "",
        "Columns: **val_bpb** = validation bits per byte at the last step (all 4 domains); "
        "**MaxVio** = (max load − mean load) / mean load, evaluation batches, mean over the MoE "
        "layers (for soft_merge the load is the soft load Σ_t p_te); **act. params** = "
        "`activated_params_mean` of the last evaluation: parameters of the MoE layer each token "
        "touched (distinct real experts + router + shared experts + LoRA base), mean over the "
        "2 MoE layers; **tokens/s** = training tokens per second over the run (1 thread, "
        "machine shared with other jobs, so only a rough comparison); **wall s** = the whole "
        "run including the two evaluations.",
        "",
        "| name | settings | final val_bpb | MaxVio | act. params | tokens/s | wall s |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        settings = "<br>".join(f"`{s}`" for s in r["settings"]) or "(defaults)"
        if r.get("ok"):
            lines.append(f"| {r['name']} | {settings} | {r['val_bpb']:.4f} | "
                         f"{_fmt(r['max_vio'], '.3f')} | "
                         f"{_fmt(r['activated_params_mean'], ',.0f')} | "
                         f"{_fmt(r['tokens_per_s'], ',.0f')} | {r['wall_s']:.0f} |")
        else:
            err = r["error"].replace("|", "\\|").splitlines()[0][:160]
            lines.append(f"| {r['name']} | {settings} | FAILED: {err} | | | | {r['wall_s']:.0f} |")
    failed = [r["name"] for r in rows if not r.get("ok")]
    lines += ["", f"{len(rows) - len(failed)} of {len(rows)} runs trained end to end"
              + (f"; failed: {', '.join(failed)}" if failed else "") + f"; total {total_s / 60:.1f} min."]
    lines += ["", "## Reading the table", "", *NOTES]
    path.write_text("\n".join(lines) + "\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "runs" / "short_runs"))
    ap.add_argument("--only", nargs="*", help="run only these names")
    ap.add_argument("--steps", type=int, help="override train.steps (quick check)")
    ap.add_argument("--no-doc", action="store_true", help="do not rewrite docs/short_runs.md")
    ap.add_argument("--doc-only", action="store_true",
                    help="rewrite docs/short_runs.md from OUT/short_runs.json without training")
    args = ap.parse_args(argv)
    command = "OMP_NUM_THREADS=1 flock /tmp/divmoe-heavy.lock python scripts/short_runs.py"
    if args.doc_only:
        rows = json.loads((Path(args.out) / "short_runs.json").read_text())
        write_doc(rows, ROOT / "docs" / "short_runs.md", command, sum(r["wall_s"] for r in rows))
        return 0
    names = args.only or list(RUNS)
    unknown = [n for n in names if n not in RUNS]
    if unknown:
        ap.error(f"unknown run {unknown[0]!r}; known: {', '.join(RUNS)}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows, t0 = [], time.perf_counter()
    for name in names:
        row = run_one(name, RUNS[name], out, args.steps)
        rows.append(row)
        status = f"val_bpb {row['val_bpb']:.4f}" if row.get("ok") else f"FAILED {row['error']}"
        print(f"{name:24s} {status}  ({row['wall_s']:.0f} s)", flush=True)
    (out / "short_runs.json").write_text(json.dumps(rows, indent=1))
    if not args.no_doc:
        write_doc(rows, ROOT / "docs" / "short_runs.md", command, time.perf_counter() - t0)
    return 0 if all(r.get("ok") for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
