"""The built-in ``seed-claims`` study: re-run, at small scale, the claims listed in ALGORITHMS.md.

Every variant trains the same small byte-level LM on the embedded 4-domain corpus with the
same data order, seed and token budget (``BASE`` / ``QUICK``); with ``seeds=2`` every variant
runs under train.seed 0 and 1 (weights and data order both change with the seed) and the
verdicts look at the paired per-seed differences.

Verdict rules (``judge_*``):
  * a directional claim ("lower MaxVio", "higher MI", "fewer steps") is *reproduced* when the
    paired difference has the claimed sign for every seed and the mean difference is larger
    than the tolerance (0, except activated params: 1% of the baseline's); *not reproduced* when it has the opposite sign for every seed (or is
    within tolerance for every seed: no effect); *inconclusive* when seeds disagree;
  * a "no worse / similar val loss" side condition holds when every seed's paired val-bpb
    difference is ≤ 0.02 bpb, or the mean difference is within the noise tolerance
    max(0.02 bpb, 2 × the largest seed-to-seed spread of the runs compared) and that
    tolerance is ≤ 0.1 bpb (with more seed noise the mean says nothing: *unclear*);
  * a claim is reproduced when its main part is reproduced and its side condition holds, not
    reproduced when the main part is not reproduced or the side condition clearly fails
    (val bpb worse by more than the tolerance for every seed), inconclusive otherwise.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

from ..files import check_output_folder
from .runner import (Variant, markdown_table, train_variant, variant_summary, write_report_html,
                     TABLE_NOTES)

# ~1 min per run on one core: 2 MoE layers of 8 SwiGLU experts, d=64, 64-byte context.
BASE = ["model.d_model=64", "model.n_layers=2", "model.n_heads=2", "model.seq_len=64",
        "moe.num_experts=8", "moe.top_k=2", "moe.expert_hidden=64",
        "train.steps=400", "train.batch_size=16", "train.eval_every=25", "train.warmup_steps=20",
        "train.eval_batch_size=64", "data.val_bytes_per_domain=4096", "train.threads=1"]
QUICK = ["model.d_model=16", "model.n_layers=1", "model.n_heads=2", "model.seq_len=32",
         "moe.num_experts=4", "moe.top_k=2", "moe.expert_hidden=16",
         "train.steps=8", "train.batch_size=4", "train.eval_every=4", "train.warmup_steps=2",
         "train.eval_batch_size=32", "data.val_bytes_per_domain=512", "train.threads=1"]


def _hetero_widths(E: int, h: int) -> str:
    """Widths with mean h (so the expected activated params equal the homogeneous pool's):
    pairs (h/2, 3h/2), (3h/4, 5h/4) repeated."""
    pattern = [h // 2, 3 * h // 2, 3 * h // 4, 5 * h // 4]
    widths = [pattern[i % 4] for i in range(E)]
    widths[-1] += E * h - sum(widths)
    return "[" + ",".join(map(str, widths)) + "]"


def variants(quick: bool = False) -> list[Variant]:
    base = QUICK if quick else BASE
    opts = dict(kv.split("=", 1) for kv in base)
    E, h, bs = int(opts["moe.num_experts"]), int(opts["moe.expert_hidden"]), int(opts["train.batch_size"])
    ga = 4 if bs % 4 == 0 else 2
    return [
        Variant("topk", []),
        Variant("loss_free_bias", ["moe.balance=[z_loss, loss_free_bias]"]),
        Variant("ga_micro_batch", [f"train.grad_accum={ga}", f"train.batch_size={bs // ga}",
                                   "moe.aux_loss_scope=micro_batch"]),
        Variant("ga_global_batch", [f"train.grad_accum={ga}", f"train.batch_size={bs // ga}",
                                    "moe.aux_loss_scope=global_batch"]),
        Variant("expert_choice", ["moe.router=expert_choice", "moe.balance=[z_loss]"]),
        Variant("dynamic_topp", ["moe.router=dynamic_topp", "moe.top_p=0.5"]),
        Variant("null_experts", ["moe.router=null_experts", "moe.num_null_experts=2",
                                 "moe.balance=[aux_loss, z_loss, null_usage]"]),
        Variant("heterogeneous", [f"moe.expert_widths={_hetero_widths(E, h)}"]),
        Variant("diversity_exclusivity", ["moe.diversity=[exclusivity]"]),
    ]


@dataclass
class Claim:
    number: int
    title: str
    source: str
    criterion: str
    variants: tuple[str, str]          # (claimed better, baseline)


CLAIMS = [
    Claim(1, "loss_free_bias vs aux_loss", "Auxiliary-Loss-Free Load Balancing",
          "MaxVio(loss_free_bias) < MaxVio(topk with aux_loss) and val bpb no worse",
          ("loss_free_bias", "topk")),
    Claim(2, "global_batch vs micro_batch aux loss (grad_accum ≥ 2)", "Demons in the Detail",
          "specialisation MI(global_batch) > MI(micro_batch), same grad_accum and batch",
          ("ga_global_batch", "ga_micro_batch")),
    Claim(3, "expert_choice vs topk", "Expert Choice Routing",
          "steps to reach target val bpb = 1.02 × topk's final val bpb: expert_choice < topk",
          ("expert_choice", "topk")),
    Claim(4, "dynamic_topp vs top-2", "Harder Tasks Need More Experts",
          "activated params(dynamic_topp, p=0.5, k_max=2) < top-2's at similar val bpb",
          ("dynamic_topp", "topk")),
    Claim(5, "null_experts vs top-2", "AdaMoE",
          "activated params(null_experts, 2 null of 10, k=2) < top-2's at similar val bpb",
          ("null_experts", "topk")),
    Claim(6, "heterogeneous vs homogeneous experts", "HMoE",
          "val bpb(heterogeneous, same mean width) < homogeneous with activated params ≤ 1.02 × "
          "homogeneous's", ("heterogeneous", "topk")),
    Claim(7, "diversity regulariser on vs off", "MMoEEx",
          "expert-output Vendi(exclusivity, weight 0.1) > off, val bpb no worse",
          ("diversity_exclusivity", "topk")),
]

BPB_FLOOR = 0.02
NOISE_MAX = 0.1   # seed noise above this (bpb) cannot establish "similar val loss" from the mean


def steps_to(rows: list[dict], target: float) -> float:
    """First evaluated step whose val bpb ≤ target (inf if never)."""
    for r in rows:
        if r["step"] > 0 and r["val_bpb"] <= target:
            return float(r["step"])
    return float("inf")


def _direction(diffs: list[float], better: int, tol: float) -> str:
    """``better`` = −1 when lower is the claim, +1 when higher. Returns yes / no / mixed."""
    signed = [d * better for d in diffs]
    mean = sum(signed) / len(signed)
    if all(s > 0 for s in signed) and mean > tol:
        return "yes"
    if all(s <= tol for s in signed) and mean <= tol and (all(s < 0 for s in signed) or
                                                          all(abs(s) <= tol for s in signed)):
        return "no"
    return "mixed"


def _loss_side(bpb_a: list[float], bpb_b: list[float], tol: float) -> str:
    """"Val bpb no worse": holds when every seed's paired difference is within the floor, or the
    mean is within the tolerance and that tolerance is small enough to mean something
    (≤ NOISE_MAX bpb); fails when every seed is worse beyond the tolerance."""
    diffs = [a - b for a, b in zip(bpb_a, bpb_b)]
    mean = sum(diffs) / len(diffs)
    if all(d <= BPB_FLOOR for d in diffs) or (mean <= tol and tol <= NOISE_MAX):
        return "holds"
    if all(d > tol for d in diffs):
        return "fails"
    return "unclear"


def _bpb_tol(*groups: list[float]) -> float:
    spread = max((max(g) - min(g) for g in groups if len(g) > 1), default=0.0)
    return max(BPB_FLOOR, 2 * spread)


def judge(claim: Claim, runs: dict[str, list[dict]]) -> dict:
    """Numbers and verdict of one claim from per-seed summaries ``runs[variant] = [seed0, ...]``."""
    a_name, b_name = claim.variants
    A, B = runs[a_name], runs[b_name]
    bpb_a, bpb_b = [s["val_bpb"] for s in A], [s["val_bpb"] for s in B]
    tol = _bpb_tol(bpb_a, bpb_b)
    n = claim.number
    side = "holds"
    if n == 1:
        key, better, mtol, label = "max_vio", -1, 0.0, "MaxVio"
    elif n == 2:
        key, better, mtol, label = "mi_bits", +1, 0.0, "MI (bits)"
        side = None
    elif n == 3:
        key, better, mtol, label = "steps_to_target", -1, 0.0, "steps to target"
        side = None
    elif n in (4, 5):
        key, better, mtol, label = "activated_params", -1, 0.0, "activated params"
    elif n == 6:
        key, better, mtol, label = "val_bpb", -1, 0.0, "val bpb"
        side = None
    else:
        key, better, mtol, label = "expert_vendi", +1, 0.0, "expert Vendi"
    if n == 3:
        for i, (sa, sb) in enumerate(zip(A, B)):
            target = 1.02 * sb["val_bpb"]
            sa["steps_to_target"] = steps_to(sa["rows"], target)
            sb["steps_to_target"] = steps_to(sb["rows"], target)
    va, vb = [s.get(key) for s in A], [s.get(key) for s in B]
    if any(v is None for v in va + vb):
        return {"claim": claim, "verdict": "inconclusive", "numbers": f"{label}: not logged",
                "a": va, "b": vb}
    diffs = [x - y for x, y in zip(va, vb)]
    if n == 3:
        diffs = [(-1e9 if x < y else 1e9 if x > y else 0.0) if math.isinf(x) or math.isinf(y)
                 else x - y for x, y in zip(va, vb)]
    if n in (4, 5):  # a saving counts only beyond 1% of the baseline's activated params
        mtol = 0.01 * sum(vb) / len(vb)
    main = _direction(diffs, better, mtol)
    extra = []
    if n == 6:  # equal activated params is part of the setting, check it held
        act_a = [s.get("activated_params") for s in A]
        act_b = [s.get("activated_params") for s in B]
        if None not in act_a + act_b:
            ratio = sum(act_a) / sum(act_b)
            extra.append(f"activated params ratio {ratio:.3f}")
            if ratio > 1.02:
                side = "fails" if main == "yes" else side
    if side is not None and n != 6:
        side = _loss_side(bpb_a, bpb_b, tol)
    if main == "yes" and side in (None, "holds"):
        verdict = "reproduced"
    elif main == "no" or side == "fails":
        verdict = "not reproduced"
    else:
        verdict = "inconclusive"
    fmt = (lambda v: f"{v:.0f}" if n == 3 or v > 100 or math.isinf(v) else f"{v:.3f}")
    numbers = (f"{label}: {a_name} {', '.join(fmt(v) for v in va)} vs {b_name} "
               f"{', '.join(fmt(v) for v in vb)}")
    if n != 6:
        numbers += (f"; val bpb {', '.join(f'{v:.3f}' for v in bpb_a)} vs "
                    f"{', '.join(f'{v:.3f}' for v in bpb_b)} (tolerance {tol:.3f})")
    if n == 3:
        numbers += "; targets " + ", ".join(f"{1.02 * v:.3f}" for v in bpb_b)
    if extra:
        numbers += "; " + "; ".join(extra)
    return {"claim": claim, "verdict": verdict, "numbers": numbers, "main": main, "side": side}


def claims_markdown(results: list[dict]) -> str:
    lines = ["| # | claim (source) | criterion | numbers (per seed) | verdict |",
             "|---|---|---|---|---|"]
    for r in results:
        c = r["claim"]
        lines.append(f"| {c.number} | {c.title} ({c.source}) | {c.criterion} | {r['numbers']} "
                     f"| **{r['verdict']}** |")
    return "\n".join(lines) + "\n"


def run_seed_claims(out: str | Path, quick: bool = False, seeds: int | None = None,
                    progress: bool = False, log=print, lock: str | Path | None = None) -> dict:
    """Train every variant for every seed (resumably) into ``OUT/<variant>-s<seed>/``, then write
    ``OUT/summary.md`` (claims table + per-run table) and ``OUT/report.html``."""
    out = check_output_folder(out)
    seeds = seeds if seeds is not None else (1 if quick else 2)
    base = QUICK if quick else BASE
    vs = variants(quick)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    per_variant: dict[str, list[dict]] = {v.name: [] for v in vs}
    all_summaries, trained = [], 0
    for seed in range(seeds):
        for v in vs:
            sv = Variant(f"{v.name}-s{seed}", v.overrides + [f"train.seed={seed}"])
            t0 = time.perf_counter()
            how = train_variant(out, sv, base, progress=progress, lock=lock)
            log(f"{sv.name}: {how} ({time.perf_counter() - t0:.0f} s)")
            trained += how != "done"
            s = variant_summary(out / sv.name)
            per_variant[v.name].append(s)
            all_summaries.append(s)
    wall = time.perf_counter() - t_start
    train_wall = sum(s["wall_time_s"] or 0.0 for s in all_summaries)
    results = [judge(c, per_variant) for c in CLAIMS]
    mode = "--quick" if quick else "full"
    head = (f"# seed-claims study ({mode})\n\nClaims of `ALGORITHMS.md` re-run at small scale: "
            f"{len(vs)} variants × {seeds} seed(s), each `{' '.join(base)}` plus the variant's "
            f"overrides. Wall time of this invocation {wall:.0f} s ({trained} of "
            f"{len(all_summaries)} runs trained by it, the rest reused); sum of the runs' "
            f"wall times (training + evaluation) {train_wall:.0f} s.\n\n## Claims\n\n")
    scale = ("the --quick setting: a few steps of a tiny model; verdicts are plumbing, not evidence"
             if quick else "400 steps of a 2-layer d=64 byte LM")
    text = head + claims_markdown(results) + "\n" + _RULES.format(scale=scale) + "\n## Runs\n\n" + \
        markdown_table(all_summaries) + "\n" + TABLE_NOTES + "\n\n## Variants\n\n" + \
        "\n".join(f"- `{v.name}`: {' '.join(v.overrides) or '(base)'}" for v in vs) + "\n"
    (out / "summary.md").write_text(text)
    claims_html = "<h2>Claims</h2><table><tr><th>#</th><th>claim</th><th>criterion</th>" \
                  "<th>numbers</th><th>verdict</th></tr>" + "".join(
                      f"<tr><td>{r['claim'].number}</td><td>{_h(r['claim'].title)}</td>"
                      f"<td>{_h(r['claim'].criterion)}</td><td>{_h(r['numbers'])}</td>"
                      f"<td><b>{r['verdict']}</b></td></tr>" for r in results) + "</table>"
    write_report_html(out, all_summaries, title=f"seed-claims study ({mode})", extra_html=claims_html)
    return {"results": results, "summaries": all_summaries, "wall_time_s": wall,
            "train_wall_time_s": train_wall}


def _h(s: str) -> str:
    import html
    return html.escape(s)


_RULES = ("Verdicts: a directional claim is *reproduced* when the paired difference has the "
          "claimed sign for every seed (and the val-bpb side condition holds: every seed's paired "
          f"difference ≤ {BPB_FLOOR} bpb, or the mean difference ≤ tolerance = max({BPB_FLOOR} "
          f"bpb, 2 × largest seed spread) with that tolerance ≤ {NOISE_MAX} bpb); *not reproduced* when it has the "
          "opposite sign (or no effect) for every seed, or val bpb is worse beyond the "
          "tolerance for every seed; *inconclusive* when seeds disagree or the val-bpb condition is "
          "unclear. Not reproduced is a "
          "finding at this scale ({scale}), not a failure.\n")
