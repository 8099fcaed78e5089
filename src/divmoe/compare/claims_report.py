"""The seed-claims study's page: verdict table with intervals and per-seed numbers, the runs'
final numbers, loss curves with seed bands per claim; ``summary.md``, ``results.json`` and
``curves.png`` in the study folder, optionally the same text in docs/seed_claims.md."""

from __future__ import annotations

import json
import math
from pathlib import Path

from ..files import atomic_write_text
from .claims_stats import judge
from .claims_study import FINAL_EVAL, INVOCATIONS, jobs
from .seed_claims import CLAIMS, PRESETS, rules_text, variants

# the final numbers of a run: (key in the final evaluation's mean, label)
FINAL_KEYS = [("val_bpb", "val bpb"), ("val_bpb_causal", "causal val bpb"),
              ("train_max_vio", "MaxVio train"), ("max_vio_pooled", "MaxVio val pooled"),
              ("mi_bits", "I(e;dom)"), ("mi_given_token_bits", "I(e;dom|tok)"),
              ("expert_vendi", "expert Vendi"), ("activated_params", "activated params")]
KEEP_HEADING = "## Implementation fidelity"


def _rows(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]


def run_numbers(run: Path) -> dict:
    """A complete run's final numbers (the final evaluation's two-checkpoint mean; MaxVio on
    training batches from the last two metrics rows) and its curves."""
    final = json.loads((run / FINAL_EVAL).read_text())["mean"]
    rows = _rows(run)
    train_vio = [r["train_max_vio"] for r in rows[-2:] if r.get("train_max_vio") is not None]
    summary = json.loads((run / "summary.json").read_text())
    return {**{k: final.get(k) for k, _ in FINAL_KEYS if k in final},
            "activated_params": final.get("activated_params_mean"),
            "train_max_vio": sum(train_vio) / len(train_vio) if train_vio else None,
            "val_bpb_by_domain": final.get("val_bpb_by_domain", {}),
            "wall_time_s": summary.get("wall_time_s"), "params_total": summary.get("params_total"),
            "curve": [(r["step"], r["val_bpb"], r.get("val_bpb_causal", r["val_bpb"]))
                      for r in rows if r["step"] > 0]}


def steps_to(curve: list[tuple[int, float]], target: float) -> float:
    """First step at which a curve of (step, bpb) reaches ``target``, linearly interpolated
    between evaluations; inf when it never does."""
    prev = None
    for step, v in curve:
        if v <= target:
            if prev is None:
                return float(step)
            (s0, v0) = prev
            return s0 + (step - s0) * (v0 - target) / (v0 - v) if v0 != v else float(step)
        prev = (step, v)
    return float("inf")


def log2_speedup(a_curve, b_curve, steps: int, eval_every: int) -> float:
    """log2(steps B took to its final causal bpb / steps A took to it). A that never gets there
    is counted as getting there one evaluation after the end (an upper bound on its speed-up)."""
    target = b_curve[-1][1]
    b_steps = steps_to(b_curve, target)
    a_steps = steps_to(a_curve, target)
    if math.isinf(a_steps):
        a_steps = steps + eval_every
    return math.log2(b_steps / a_steps)


def collect(out: Path, preset: str, seeds: int, complete: list[str]) -> dict:
    """{variant: {seed: numbers}} of the complete runs."""
    done = set(complete)
    by = {}
    for name, _ in jobs(preset, seeds):
        if name in done:
            variant, seed = name.rsplit("-s", 1)
            by.setdefault(variant, {})[int(seed)] = run_numbers(out / name)
    return by


def judge_all(by: dict, preset: str) -> list[dict]:
    settings = dict(kv.split("=", 1) for kv in PRESETS[preset])
    steps, every = int(settings["train.steps"]), int(settings["train.eval_every"])
    results = []
    for claim in CLAIMS:
        a, b = claim.variants
        seeds = sorted(set(by.get(a, {})) & set(by.get(b, {})))
        if len(seeds) < 2:
            results.append({"claim": claim, "seeds": seeds, "verdict": "not run yet",
                            "parts": []})
            continue
        values: dict[str, dict[str, list[float]]] = {}
        for part in claim.parts:
            if part.metric == "speedup":
                sp = [log2_speedup([(s, c) for s, _, c in by[a][i]["curve"]],
                                   [(s, c) for s, _, c in by[b][i]["curve"]], steps, every)
                      for i in seeds]
                values["speedup"] = {a: sp, b: [0.0] * len(seeds)}
            else:
                values[part.metric] = {v: [by[v][i][part.metric] for i in seeds] for v in (a, b)}
        r = judge(claim, values)
        r["seeds"] = seeds
        results.append(r)
    return results


def _fmt(x: float | None, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "n/a"
    return f"{x:,.0f}" if abs(x) >= 1000 else f"{x:.{digits}f}"


def _part_text(p: dict) -> tuple[str, str, str]:
    part, iv = p["part"], p["interval"]
    if part.metric == "speedup":
        what = "log2 speed-up"
        interval = (f"{iv.mean:+.2f} [{iv.low:+.2f}, {iv.high:+.2f}] (×{2 ** iv.mean:.2f}; "
                    f"per seed ×{', ×'.join(f'{2 ** v:.2f}' for v in p['paired'])})")
    elif part.ratio:
        what = f"{part.label} ratio A/B"
        interval = (f"×{math.exp(iv.mean):.3f} [×{math.exp(iv.low):.3f}, ×{math.exp(iv.high):.3f}]"
                    f" (per seed A {', '.join(_fmt(v) for v in p['a'])}; B "
                    f"{', '.join(_fmt(v) for v in p['b'])})")
    else:
        what = f"{part.label} A − B"
        interval = (f"{iv.mean:+.4f} [{iv.low:+.4f}, {iv.high:+.4f}] (per seed "
                    f"{', '.join(f'{v:+.4f}' for v in p['paired'])})")
    rule = {"better": f"better by ≥ {part.delta:g}" if not part.ratio else
            f"{'lower' if part.lower else 'higher'} by ≥ {part.delta:.0%}",
            "no_worse": f"no worse within {part.delta:g}" if not part.ratio else
            f"no more than +{part.delta:.0%}",
            "equal": f"equal within ±{part.delta:g}"}[part.kind]
    if part.metric == "speedup":
        rule = "speed-up ≥ 2×"
    return what, rule, interval


def verdict_table(results: list[dict]) -> str:
    lines = ["| # | claim (source) | A vs B | part | rule | mean [95% CI] | decision | verdict |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        c = r["claim"]
        head = f"| {c.number} | {c.title} ({c.source}): \"{c.quote}\" | {c.variants[0]} vs {c.variants[1]}"
        if not r["parts"]:
            lines.append(f"{head} | | | | | **{r['verdict']}** |")
            continue
        for i, p in enumerate(r["parts"]):
            what, rule, interval = _part_text(p)
            lead = head if i == 0 else "| | | "
            tail = f"**{r['verdict']}**" if i == 0 else ""
            lines.append(f"{lead} | {what} | {rule} | {interval} | {p['decision']} | {tail} |")
    return "\n".join(lines) + "\n"


def runs_table(by: dict) -> str:
    head = ["variant", "seeds"] + [label for _, label in FINAL_KEYS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for v in variants():
        if v.name not in by:
            continue
        seeds = sorted(by[v.name])
        cells = [v.name, str(len(seeds))]
        for key, _ in FINAL_KEYS:
            vals = [by[v.name][s].get(key) for s in seeds]
            vals = [x for x in vals if x is not None]
            if not vals:
                cells.append("n/a")
                continue
            mean = sum(vals) / len(vals)
            sd = (math.sqrt(sum((x - mean) ** 2 for x in vals) / (len(vals) - 1))
                  if len(vals) > 1 else 0.0)
            cells.append(f"{_fmt(mean)} ± {_fmt(sd)}" if key != "activated_params"
                         else _fmt(mean))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_curves(by: dict, results: list[dict], path: Path) -> Path | None:
    """One panel per claim: validation bpb over steps of A and B, mean over seeds with the
    min–max band (causal bpb for expert choice)."""
    from ..report import plots

    shown = [r for r in results if r["seeds"]]
    if not shown:
        return None
    cols = 4
    rows = -(-len(shown) // cols)
    fig, axes = plots.plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows),
                                   constrained_layout=True, squeeze=False)
    for ax in axes.flat[len(shown):]:
        ax.axis("off")
    for ax, r in zip(axes.flat, shown):
        c = r["claim"]
        idx = 2 if c.number == 3 else 1
        later = []  # the values after the first evaluation set the scale (not the early drop)
        for name, colour in zip(c.variants, ("tab:red", "tab:blue")):
            curves = [by[name][s]["curve"] for s in r["seeds"]]
            steps = [p[0] for p in curves[0]]
            vals = [[p[idx] for p in cv] for cv in curves]
            mean = [sum(col) / len(col) for col in zip(*vals)]
            later += [v for cv in vals for v in cv[1:]] or [v for cv in vals for v in cv]
            ax.plot(steps, mean, color=colour, lw=1.5, label=f"{name} (n={len(curves)})")
            ax.fill_between(steps, [min(col) for col in zip(*vals)],
                            [max(col) for col in zip(*vals)], color=colour, alpha=0.2, lw=0)
        ax.set_title(f"{c.number}. {c.title}", fontsize=9)
        ax.set_xlabel("step")
        ax.set_ylabel("causal val bpb" if idx == 2 else "val bpb")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        pad = 0.05 * (max(later) - min(later)) or 0.01
        ax.set_ylim(min(later) - pad, max(later) + pad)
    fig.savefig(path, dpi=110)
    plots.plt.close(fig)
    return path


def write_report(out: Path, preset: str, seeds: int, complete: list[str],
                 docs: Path | None = None, command: str = "") -> dict:
    by = collect(out, preset, seeds, complete)
    results = judge_all(by, preset)
    total = len(jobs(preset, seeds))
    run_wall = sum(n["wall_time_s"] or 0.0 for v in by.values() for n in v.values())
    calls = [json.loads(x) for x in (out / INVOCATIONS).read_text().splitlines() if x.strip()] \
        if (out / INVOCATIONS).is_file() else []
    study_wall = sum(c["end"] - c["start"] for c in calls)
    plot = plot_curves(by, results, out / "curves.png")
    text = (f"# The seed claims, decided\n\n"
            f"{len(complete)} of {total} runs complete ({len(variants(preset))} variants × "
            f"{seeds} seeds, preset `{preset}`). Wall time of the study: "
            f"{study_wall / 3600:.2f} h over {len(calls)} invocation(s); the runs' training "
            f"wall times sum to {run_wall / 3600:.2f} h (single-thread processes, "
            f"{max((c['workers'] for c in calls), default=1)} at a time)."
            + (f" Command: `{command}`." if command else "") + "\n\n"
            + _testbed(out, preset, complete) +
            "## Verdicts\n\n" + verdict_table(results) + "\n## Rules\n\n" + rules_text() +
            "\n## Design\n\n" + "\n".join(f"{c.number}. **{c.title}** — {c.design}."
                                          for c in CLAIMS) +
            f"\n\nEvery run: `{' '.join(PRESETS[preset])}` plus the variant's overrides:\n\n" +
            "\n".join(f"- `{v.name}`: {' '.join(f'`{o}`' for o in v.overrides) or '(base)'}"
                      for v in variants(preset)) +
            "\n\n## Runs (mean ± sd over seeds)\n\n" + runs_table(by) +
            "\nFinal numbers: the full validation split at the last two checkpoints, averaged; "
            "MaxVio train = MaxVio of each training step's whole batch, mean over the last two "
            "evaluation intervals; I(e;dom|tok) = specialisation conditioned on the input "
            "token (0 for a hash router); activated params per token per MoE layer.\n")
    if plot is not None:
        text += "\n![validation bpb per claim, mean and min-max over seeds](curves.png)\n"
    atomic_write_text(out / "summary.md", text)
    atomic_write_text(out / "results.json", json.dumps(_json(results, by), indent=1))
    if docs is not None:
        update_docs_page(docs, text.replace("](curves.png)", "](seed_claims_curves.png)"))
        if plot is not None:
            (docs.parent / "seed_claims_curves.png").write_bytes(plot.read_bytes())
    return {"results": results, "runs": by, "summary": out / "summary.md"}


def _testbed(out: Path, preset: str, complete: list[str]) -> str:
    s = dict(kv.split("=", 1) for kv in PRESETS[preset])
    tokens = int(s["train.steps"]) * int(s["train.batch_size"]) * int(s["model.seq_len"])
    per_token = ""
    if complete:
        final = json.loads((out / complete[0] / FINAL_EVAL).read_text())
        ratio = final["val_bytes"] / final["val_tokens"]
        per_token = (f" ≈ {tokens * ratio / 1e6:.1f} M bytes of text (the BPE averages "
                     f"{ratio:.2f} bytes per token on validation); the final evaluation scores "
                     f"{final['val_tokens']:,} validation tokens ({final['val_bytes']:,} bytes)")
    return (f"**Testbed.** A byte-level BPE of {s['data.bpe_vocab']} tokens learned on the "
            f"training split (`data.tokenizer=bpe`; val bpb stays bits per byte of the text); "
            f"d={s['model.d_model']}, {s['model.n_layers']} MoE layers of "
            f"{s['moe.num_experts']} experts of width {s['moe.expert_hidden']}, top-"
            f"{s['moe.top_k']}, context {s['model.seq_len']} tokens; {s['train.steps']} steps "
            f"of {s['train.batch_size']} sequences = {tokens / 1e6:.2f} M training tokens per "
            f"run{per_token}.\n\n"
            "**Running it** (resumable: repeat the same command after an interruption, or "
            "continue on another machine from the committed records; `--budget S` stops "
            "starting runs after S seconds; `--quick` is the tests' tiny version):\n\n"
            "```bash\nflock /tmp/divmoe-heavy.lock divmoe compare --study seed-claims "
            "--out runs/claims --records benchmarks/results/seed_claims/runs "
            "--docs docs/seed_claims.md\n```\n\n")


def update_docs_page(path: Path, text: str) -> None:
    """Replace the page above its kept section (:data:`KEEP_HEADING`) with ``text``."""
    kept = ""
    if path.is_file():
        old = path.read_text()
        if KEEP_HEADING in old:
            kept = "\n" + old[old.index(KEEP_HEADING):]
    atomic_write_text(path, text + kept)


def _json(results: list[dict], by: dict) -> dict:
    claims = []
    for r in results:
        claims.append({"number": r["claim"].number, "title": r["claim"].title,
                       "variants": list(r["claim"].variants), "seeds": r["seeds"],
                       "verdict": r["verdict"],
                       "parts": [{"metric": p["part"].metric, "kind": p["part"].kind,
                                  "delta": p["part"].delta, "a": p["a"], "b": p["b"],
                                  "paired": p["paired"], "mean": p["interval"].mean,
                                  "low": p["interval"].low, "high": p["interval"].high,
                                  "decision": p["decision"]} for p in r["parts"]]})
    runs = {v: {str(s): {k: x for k, x in n.items() if k != "curve"} for s, n in d.items()}
            for v, d in by.items()}
    return {"claims": claims, "runs": runs}
