"""The mixture study of docs/mixtures.md: RegMix against fixed and dynamic mixtures.

At the default model and budget (only ``train.eval_every`` and ``train.threads`` changed:
neither alters what is trained), for seeds 0..S-1:

* ``proportional`` (the default: by size), ``temp0.5`` (``data.temperature=0.5``),
  ``uniform`` (equal weights), ``dynamic`` (``data.mixing=dynamic``),
* ``regmix``: the mixture ``divmoe mixture search`` picks (search in ``OUT/search``),
* ``random0..R-1`` (seed 0 only): mixtures from the same proposal distribution (another
  seed), trained at full size; ``bestrandom`` repeats the best of them (by seed-0 average
  bpb) on the other seeds.

Resumable and time-boxed: each invocation runs whatever is not finished, ``--workers``
single-thread runs at a time, and starts nothing new after ``--budget`` seconds; run it
again (under the machine's lock) until it prints "complete". Then it writes
``OUT/summary.md`` and ``OUT/results.json``.

    flock /tmp/divmoe-heavy.lock python scripts/mixture_study.py --out runs/mixtures --budget 420
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import math
import multiprocessing
import sys
import time
from pathlib import Path

import numpy as np

from divmoe.compare.runner import Variant, _finished, train_variant
from divmoe.regmix import draw_mixtures, run_search
from divmoe.regmix.runner import _train_sizes

FULL = ["train.eval_every=200", "train.threads=1"]
FIXED = {"proportional": [], "temp0.5": ["data.temperature=0.5"],
         "uniform": None,  # filled with equal weights once the domains are known
         "dynamic": ["data.mixing=dynamic"]}
# two-sided 95% Student t quantiles by degrees of freedom
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


def _weights_override(domains, w) -> list[str]:
    return ["data.weights=" + json.dumps({d: round(float(x), 6) for d, x in zip(domains, w)})]


def _init_worker():
    import torch

    torch.set_num_threads(1)


def _train(runs: str, name: str, overrides: list[str], deadline: float) -> str:
    from divmoe.train import load_config

    if time.time() > deadline and not _finished(Path(runs) / name, load_config(None, overrides).train.steps):
        return "skipped"
    return train_variant(Path(runs), Variant(name, overrides))


def _run_batch(runs: Path, jobs: dict[str, list[str]], workers: int, deadline: float) -> dict[str, str]:
    ctx = multiprocessing.get_context("spawn")
    out = {}
    with cf.ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker) as pool:
        futs = {pool.submit(_train, str(runs), n, o, deadline): n for n, o in jobs.items()}
        for f in cf.as_completed(futs):
            out[futs[f]] = f.result()
            if out[futs[f]] != "skipped":
                print(f"{futs[f]}: {out[futs[f]]}", flush=True)
    return out


def _final(run: Path) -> dict:
    s = json.loads((run / "summary.json").read_text())
    by = s["final"]["val_bpb_by_domain"]
    return {"avg": float(np.mean(list(by.values()))), "by_domain": by, "wall_time_s": s["wall_time_s"],
            "params_active": s["params_active"]}


def _ci(xs: list[float]) -> tuple[float, float]:
    m = float(np.mean(xs))
    if len(xs) < 2:
        return m, float("nan")
    return m, T975[len(xs) - 1] * float(np.std(xs, ddof=1)) / math.sqrt(len(xs))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--randoms", type=int, default=3)
    ap.add_argument("--proxies", type=int, default=24)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--budget", type=float, default=420, help="start nothing new after SECONDS")
    ap.add_argument("--set", action="append", default=[], help="extra settings for every run "
                                                               "(a quick check: train.steps=20)")
    ap.add_argument("--proxy-set", action="append", default=[])
    ap.add_argument("--report-only", action="store_true",
                    help="train nothing; tabulate the runs finished so far (seeds may differ per arm)")
    args = ap.parse_args(argv)
    t0 = time.time()
    deadline = t0 + args.budget
    base = list(args.set)
    sizes, _ = _train_sizes(base)
    domains = sorted(sizes)
    runs = args.out / "runs"
    arms = dict(FIXED, uniform=_weights_override(domains, [1.0] * len(domains)))

    # 1. the search (cheap; its proxies run first so the regmix arm can start)
    res = run_search(args.out / "search", proxies=args.proxies, workers=args.workers, base=base,
                     proxy_set=args.proxy_set, seed=0,
                     time_budget=0.0 if args.report_only else max(1.0, deadline - time.time()))
    if not res["complete"]:
        print(f"search: {res['finished']}/{res['proxies']} proxies; run again", flush=True)
        return 3
    arms["regmix"] = _weights_override(domains, res["fit"]["mixture"])
    randoms = draw_mixtures(sizes, args.randoms, seed=1)
    for i, w in enumerate(randoms):
        arms[f"random{i}"] = _weights_override(domains, w)

    # 2. full-size runs, seed by seed (seed 0 of every arm first)
    def job(arm, seed):
        return base + FULL + arms[arm] + [f"train.seed={seed}"]

    def done(name):  # finished: summary.json written by a run that was not interrupted
        try:
            return not json.loads((runs / name / "summary.json").read_text())["interrupted"]
        except OSError:
            return False

    first = {f"{a}-s0": job(a, 0) for a in arms}
    if not args.report_only:
        status = _run_batch(runs, first, args.workers, deadline)
        if "skipped" in status.values():
            print("not complete: run again", flush=True)
            return 3
    finished_randoms = [f"random{i}" for i in range(args.randoms) if done(f"random{i}-s0")]
    rand_avg = {r: _final(runs / f"{r}-s0")["avg"] for r in finished_randoms}
    best = min(rand_avg, key=rand_avg.get) if rand_avg else None
    if best is not None:
        arms["bestrandom"] = arms[best]
    # the arms the RegMix question needs most first, both later seeds of each together
    order = ["regmix", "proportional", "uniform", "bestrandom", "temp0.5", "dynamic"]
    later = {f"{a}-s{s}": job(a, s) for a in order if a in arms for s in range(1, args.seeds)}
    if not args.report_only:
        status = _run_batch(runs, later, args.workers, deadline)
        if "skipped" in status.values():
            print("not complete: run again", flush=True)
            return 3

    # 3. the table
    def seeds_of(arm):
        if arm == "bestrandom":
            names = [f"{best}-s0"] + [f"bestrandom-s{s}" for s in range(1, args.seeds)]
        else:
            names = [f"{arm}-s{s}" for s in range(args.seeds)]
        return [runs / n for n in names if done(n)]

    table, full_wall, params_active = {}, [], None
    for arm in ["regmix", "proportional", "temp0.5", "uniform", "dynamic", "bestrandom"]:
        if arm not in arms or not seeds_of(arm):
            continue
        finals = [_final(r) for r in seeds_of(arm)]
        full_wall += [f["wall_time_s"] for f in finals]
        params_active = finals[0]["params_active"]
        table[arm] = {"avg": _ci([f["avg"] for f in finals]),
                      "by_domain": {d: _ci([f["by_domain"][d] for f in finals]) for d in domains},
                      "seeds": [f["avg"] for f in finals], "n": len(finals)}
    from divmoe.train import load_config
    cfg = load_config(None, job("proportional", 0))
    full_tokens = cfg.train.steps * cfg.train.batch_size * cfg.train.grad_accum * cfg.model.seq_len
    full_flops = 6.0 * params_active * full_tokens
    compute = {"search_core_s": res["proxy_core_seconds"], "full_run_core_s": float(np.mean(full_wall)),
               "search_flops": res["proxy_train_flops"], "full_run_flops": full_flops}
    compute["fraction_time"] = compute["search_core_s"] / compute["full_run_core_s"]
    compute["fraction_flops"] = compute["search_flops"] / full_flops
    transfer = _rank_transfer(res, sizes, runs, [a for a in arms if a not in ("dynamic", "bestrandom")])
    results = {"domains": domains, "table": table, "transfer": transfer, "random_seed0_avg": rand_avg, "best_random": best,
               "search": {k: res[k] for k in ("proxies", "observed", "prior")},
               "regressors": {r: {k: v for k, v in f.items() if k != "oof"}
                              for r, f in res["fit"]["regressors"].items()},
               "regressor": res["fit"]["regressor"], "regmix_mixture": dict(zip(domains, res["fit"]["mixture"])),
               "random_mixtures": {f"random{i}": dict(zip(domains, w.tolist())) for i, w in enumerate(randoms)},
               "compute": compute, "seeds": args.seeds, "set": base}
    (args.out / "results.json").write_text(json.dumps(results, indent=1))
    (args.out / "summary.md").write_text(_markdown(results))
    print((args.out / "summary.md").read_text())
    if not args.report_only:
        print("complete")
    return 0


def _rank_transfer(res: dict, sizes: dict, runs: Path, arms: list[str]) -> dict:
    """RegMix's premise, checked: do the regressors fitted on the proxies rank the static
    mixtures trained at full size (seed 0) in the order of their full-size average bpb?"""
    import yaml

    from divmoe.data import mixture_weights
    from divmoe.regmix.regression import REGRESSORS, lightgbm_available, make_regressor, spearman

    doms = res["domains"]
    X = np.array([[row["weights"][d] for d in doms] for row in res["rows"]])
    y = np.array(res["observed"])
    names = [a for a in arms if (runs / f"{a}-s0" / "summary.json").is_file()]
    W, full = [], []
    for n in names:
        data = yaml.safe_load((runs / f"{n}-s0" / "config.yaml").read_text())["data"]
        w = mixture_weights(sizes, temperature=data["temperature"], weights=data["weights"])
        W.append([w[d] for d in doms])
        full.append(_final(runs / f"{n}-s0")["avg"])
    out = {"mixtures": names, "full_size_avg": full}
    for r in REGRESSORS:
        if r == "lightgbm" and not lightgbm_available():
            continue
        pred = make_regressor(r).fit(X, y).predict(np.array(W))
        out[r] = {"predicted": pred.tolist(), "spearman": spearman(pred, np.array(full))}
    return out


def _markdown(r: dict) -> str:
    doms = r["domains"]
    head = "| mixture | avg val bpb | " + " | ".join(doms) + " |"
    lines = [head, "|" + "---|" * (2 + len(doms))]
    for arm, row in r["table"].items():
        m, h = row["avg"]
        cells = [f"{row['by_domain'][d][0]:.3f} ± {row['by_domain'][d][1]:.3f}" for d in doms]
        lines.append(f"| {arm} | **{m:.4f} ± {h:.4f}** | " + " | ".join(cells) + " |")
    c = r["compute"]
    lines += ["", f"Mean ± 95% t-interval half-width over the seeds each arm has (n: "
              + ", ".join(f"{a} {row['n']}" for a, row in r["table"].items()) + "). avg = mean of the "
              f"per-domain validation bpb. bestrandom = {r['best_random']} (seed-0 averages: "
              + ", ".join(f"{k} {v:.4f}" for k, v in r["random_seed0_avg"].items()) + ").", "",
              f"Search: {r['search']['proxies']} proxies, regressor {r['regressor']} ("
              + ", ".join(f"{k}: CV Spearman {v['cv_spearman']:.3f}" for k, v in r["regressors"].items())
              + f"); compute {c['search_core_s']:.0f} core-s = {100 * c['fraction_time']:.1f}% of one "
              f"full run ({c['full_run_core_s']:.0f} core-s), {100 * c['fraction_flops']:.1f}% of its "
              f"training FLOPs (6·active params·tokens).", "",
              "RegMix mixture: " + ", ".join(f"{d} {w:.3f}" for d, w in r["regmix_mixture"].items()),
              "", "Rank transfer (seed 0, mixtures trained at full size): full-size avg bpb vs the "
              "proxy regressors' predictions", "",
              "| mixture | full-size avg bpb | " + " | ".join(
                  f"{k} predicted" for k in r["transfer"] if k not in ("mixtures", "full_size_avg")) + " |",
              "|---|---|" + "---|" * (len(r["transfer"]) - 2)]
    t = r["transfer"]
    regs = [k for k in t if k not in ("mixtures", "full_size_avg")]
    for i, n in enumerate(t["mixtures"]):
        lines.append(f"| {n} | {t['full_size_avg'][i]:.4f} | "
                     + " | ".join(f"{t[k]['predicted'][i]:.4f}" for k in regs) + " |")
    lines += ["", "Spearman(predicted, full-size): " + ", ".join(f"{k} {t[k]['spearman']:.3f}" for k in regs)]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
