"""The `divmoe` command."""

from __future__ import annotations

import argparse
import os
import sys



def _cmd_train(args) -> int:
    from .train import load_config, train

    config = None
    if args.config or args.set or not args.resume:
        config = load_config(args.config, args.set)
    result = train(args.out, config, resume=args.resume, progress=not args.quiet)
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun, rank 0 speaks for the run
        return 130 if result.interrupted else 0
    last = result.metrics[-1] if result.metrics else None
    if last:
        by_domain = ", ".join(f"{d} {v:.3f}" for d, v in last["val_bpb_by_domain"].items())
        print(f"step {last['step']}: val_bpb {last['val_bpb']:.3f} ({by_domain})")
    print(f"report: {result.run_dir / 'report.html'}")
    return 130 if result.interrupted else 0


def _cmd_compare(args) -> int:
    from .compare import Variant, load_study, run_compare, run_study

    log = (lambda msg: print(msg, file=sys.stderr, flush=True)) if not args.quiet else (lambda msg: None)
    if args.study == "seed-claims":
        if args.configs or args.set:
            raise ValueError("--study seed-claims takes no CONFIG.yaml files and no --set: its "
                             "settings are fixed (see --preset)")
        preset = "quick" if args.quick else args.preset
        from pathlib import Path
        result = run_study(args.out, preset=preset, seeds=args.seeds, workers=args.workers,
                           budget=args.budget, records=args.records,
                           report_only=args.report_only, log=log,
                           docs=Path(args.docs) if args.docs else None,
                           command=" ".join(["divmoe"] + args.cli_argv) if args.docs else "")
        for r in result["results"]:
            parts = "; ".join(f"{p['part'].label or p['part'].metric} {p['decision']}"
                              for p in r["parts"])
            print(f"claim {r['claim'].number} ({r['claim'].title}): {r['verdict']}"
                  + (f" ({parts})" if parts else ""))
        print(("complete" if result["complete"] else
               "not complete: run the same command again to continue")
              + f"; summary: {args.out}/summary.md")
        return 0
    if args.quick or args.seeds is not None or args.report_only or args.records or args.docs:
        raise ValueError("--quick, --seeds, --preset, --workers, --budget, --records, --docs "
                         "and --report-only apply to --study seed-claims only")
    base, variants = list(args.set), []
    if args.study:
        study_base, variants = load_study(args.study)
        base = study_base + base
    from pathlib import Path
    variants += [Variant(Path(c).stem, config=c) for c in args.configs]
    if not variants:
        raise ValueError("nothing to compare: give CONFIG.yaml files and/or --study FILE.yaml "
                         "(or --study seed-claims)")
    run_compare(args.out, variants, base, log=log, lock=args.lock)
    print(f"summary: {args.out}/summary.md, report: {args.out}/report.html")
    return 0


def _cmd_mixture_search(args) -> int:
    from .compare.runner import _locked
    from .regmix import run_search

    log = (lambda msg: print(msg, file=sys.stderr)) if not args.quiet else (lambda msg: None)
    with _locked(args.lock):
        res = run_search(args.out, proxies=args.proxies, workers=args.workers, target=args.target,
                         regressor=args.regressor, base=args.set, proxy_set=args.proxy_set,
                         seed=args.seed, time_budget=args.time_budget, log=log)
    if not res["complete"]:
        print(f"{res['finished']} of {res['proxies']} proxies finished within --time-budget; "
              f"run the same command again to continue")
        return 3
    fit = res["fit"]
    for r, f in fit["regressors"].items():
        print(f"{r}: cross-validated Spearman {f['cv_spearman']:.3f}")
    print("chosen (" + fit["regressor"] + "): " + ", ".join(
        f"{d} {w:.3f}" for d, w in zip(res["domains"], fit["mixture"])))
    print(f"config: {args.out}/mixture.yaml (divmoe train --config {args.out}/mixture.yaml); "
          f"summary: {args.out}/search.md")
    return 0


def _cmd_generate(args) -> int:
    from .inference.commands import run_generate

    return run_generate(args)


def _cmd_evaluate(args) -> int:
    from .inference.commands import run_evaluate

    return run_evaluate(args)


def _cmd_report(args) -> int:
    from .report import write_report

    print(write_report(args.run))
    return 0


def _cmd_analyze(args) -> int:
    from .analyze import analyze

    result = analyze(args.path, args.out, max_bytes=args.max_bytes, progress=not args.quiet,
                     data=args.data)
    s = result["summary"]

    def f(x):
        return "n/a" if x is None else f"{x:.3f}"

    print(f"MaxVio {f(s['max_vio'])}  I(expert; domain) {f(s['mi_bits'])} bits  "
          f"SRP(m={s['srp_segment_len']}) {f(s['srp'])}  SCH(2k) {f(s['sch_at_2k'])}  "
          f"CKA {f(s['mean_cka'])}  Vendi {f(s['vendi'])}  (means over MoE layers)")
    print(f"analysis: {args.out}/analysis.json, {args.out}/analysis.html")
    return 0


def _cmd_surgery(args) -> int:
    from . import surgery

    if args.command == "merge":
        info = surgery.merge_run(args.run, args.out, args.experts_per_layer, args.router,
                                 not args.no_align, args.calibration_sequences, args.set)
        for layer in info["layers"]:
            print(f"block {layer['block']}: groups {layer['groups']}")
    elif args.command == "prune":
        info = surgery.prune_run(args.run, args.out, args.keep, args.method, args.skip_ratio,
                                 args.calibration_sequences, args.set)
        for layer in info["layers"]:
            print(f"block {layer['block']}: kept {layer['kept']}")
    else:
        surgery.upcycle_run(args.run, args.out, args.experts, args.top_k, args.granularity,
                            args.drop_ratio, args.steps, args.set)
    print(f"new run: {args.out} (continue training: divmoe train --out {args.out} --resume; "
          f"inspect: divmoe analyze {args.out} --out ...)")
    return 0


def _cmd_config(args) -> int:
    from .config import describe, dump_yaml
    from .train import RunConfig, load_config

    if args.show_resolved:
        print(dump_yaml(load_config(args.config, args.set)), end="")
        return 0
    from .registry import components, readers

    rows = components()
    for key, default, allowed, help_ in describe(RunConfig):
        read_by = readers(key[len("moe."):], rows) if key.startswith("moe.") else []
        who = f" [read by: {', '.join(read_by)}]" if read_by else ""
        print(f"{key:28s} {str(default):22s} {allowed:40s} {help_}{who}")
    return 0


def _cmd_list(args) -> int:
    from .registry import format_listing

    print(format_listing())
    return 0


def _cmd_bench(args) -> int:
    from .bench import run

    out = run(args)
    return 1 if any(not c["ok"] for c in out.get("checks", [])) else 0


def _cmd_place(args) -> int:
    from pathlib import Path

    from .parallel.placement import contiguous, cost, round_robin, solve
    from .parallel.traces import load_trace

    if args.simulate and (args.ranks is not None or args.out is not None):
        raise ValueError("--simulate projects to the ranks it lists and writes no placement: "
                         "drop --ranks and --out")
    if not args.simulate and (args.ranks is None or args.out is None):
        raise ValueError("divmoe place needs --ranks N and --out placement.json "
                         "(or --simulate RANKS)")
    if args.out is not None and Path(args.out).is_dir():
        raise ValueError(f"--out {args.out} is a folder; give the placement file's path")
    trace = load_trace(args.source)
    print(f"trace: {trace.num_layers} MoE layers × {trace.num_experts} experts, "
          f"top-{trace.top_k}, d_model {trace.d_model}, {trace.tokens} tokens "
          f"({args.source})")
    if args.save_trace:
        trace.save(args.save_trace)
        print(f"trace: {args.save_trace}")
    if args.simulate:
        from .parallel.simulate import format_projection, project

        try:
            ranks = tuple(int(r) for r in args.simulate.split(","))
        except ValueError:
            raise ValueError(f"--simulate {args.simulate!r}: give rank counts separated by "
                             f"commas, e.g. 8,16,32") from None
        rows = project(trace, ranks, args.experts_per_rank, args.dtype_bytes,
                       args.tokens_per_rank, args.bandwidth_gbs * 1e9, args.time_limit)
        print(format_projection(rows))
        return 0
    solved = solve(trace, args.ranks, time_limit=args.time_limit,
                   traffic_weight=args.traffic_weight)
    print(f"{'placement':<12} {'load max/mean':>13} {'worst layer':>11} "
          f"{'origin B/token':>14} {'follow B/token':>14} {'follow cut':>10} "
          f"{'objective':>9}  method")
    for name, pl in (("contiguous", contiguous(trace, args.ranks)),
                     ("round-robin", round_robin(trace, args.ranks)), ("solved", solved)):
        c = cost(trace, pl, args.dtype_bytes, args.traffic_weight)
        print(f"{name:<12} {c.imbalance:>13.3f} {c.worst_imbalance:>11.3f} "
              f"{c.origin_bytes:>14.0f} {c.follow_bytes:>14.0f} {c.cut_share:>10.3f} "
              f"{c.objective:>9.3f}  {pl.method}")
    shown = ("why", "time_s", "milp_time_s", "status", "mip_gap", "milp_objective",
             "greedy_objective")
    how = "; ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                    for k, v in solved.info.items() if k in shown)
    print(f"solved by {solved.method} ({how})")
    solved.info["source"] = str(args.source)
    solved.save(args.out)
    print(f"placement: {args.out} (divmoe train --set parallel.expert={args.ranks} "
          f"--set parallel.placement={args.out} under torchrun)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="divmoe", description="Mixtures of diverse, balanced experts.")
    sub = p.add_subparsers(dest="command", required=True)

    def add_config_args(sp):
        sp.add_argument("--config", help="YAML file with settings (see `divmoe config`)")
        sp.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override one setting, e.g. --set moe.top_k=4 (repeatable)")

    t = sub.add_parser("train", help="train the small MoE LM on the embedded corpus")
    t.add_argument("--out", required=True, help="run folder (metrics, checkpoint, report)")
    t.add_argument("--resume", action="store_true", help="continue the run in --out")
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    add_config_args(t)
    t.set_defaults(func=_cmd_train)

    an = sub.add_parser("analyze", help="routing/expert diagnostics of a divmoe run or an HF "
                                        "MoE model folder → analysis.json + analysis.html")
    an.add_argument("path", help="divmoe run or checkpoint folder, or a Hugging Face MoE "
                                 "causal-LM folder (config.json + *.safetensors)")
    an.add_argument("--out", required=True, help="folder for analysis.json and analysis.html")
    an.add_argument("--max-bytes", type=int, default=32768, metavar="N",
                    help="validation bytes per domain to run through the model (default 32768)")
    an.add_argument("--data", metavar="PATH", help="route this corpus's validation split instead "
                                                    "of the embedded one (same layouts as data.corpus)")
    an.add_argument("--quiet", action="store_true", help="no progress on stderr")
    an.set_defaults(func=_cmd_analyze)

    pl = sub.add_parser("place", help="expert → rank placement from routing traces (MoETuner "
                                      "integer program) → placement.json; --simulate: project "
                                      "to more ranks")
    pl.add_argument("source", metavar="RUN_OR_TRACE",
                    help="a divmoe run folder (its validation data is routed now), an analyze "
                         "folder or analysis.json, or a trace.json")
    pl.add_argument("--ranks", type=int, help="expert-parallel ranks N (must divide the experts)")
    pl.add_argument("--out", help="placement file to write (placement.json)")
    pl.add_argument("--time-limit", type=float, default=60.0, metavar="S",
                    help="seconds for the MILP (then the better of its best and greedy; "
                         "default 60; --simulate: per rank count)")
    pl.add_argument("--traffic-weight", type=float, default=1.0, metavar="W",
                    help="weight of the cross-rank traffic share against the load max/mean "
                         "(default 1)")
    pl.add_argument("--dtype-bytes", type=int, default=4, help="bytes per value of a token row "
                                                               "(4 = float32, 2 = bf16)")
    pl.add_argument("--save-trace", metavar="FILE", help="also write the routing trace (JSON)")
    pl.add_argument("--simulate", metavar="RANKS", help="instead: project to these rank counts, "
                                                        "e.g. 8,16,32,64,128,256")
    pl.add_argument("--experts-per-rank", type=int, default=2,
                    help="--simulate: experts per rank (measured experts split to reach it)")
    pl.add_argument("--tokens-per-rank", type=int, default=4096,
                    help="--simulate: tokens per rank per step (default 4096)")
    pl.add_argument("--bandwidth-gbs", type=float, default=25.0,
                    help="--simulate: link bandwidth per rank in GB/s (default 25)")
    pl.set_defaults(func=_cmd_place)

    mx = sub.add_parser("mixture", help="data-mixture tools")
    mxs = mx.add_subparsers(dest="mixture_command", required=True)
    ms = mxs.add_parser("search", help="RegMix: train tiny proxies on Dirichlet mixtures, fit a "
                                       "regressor, write the predicted-best mixture as a config")
    ms.add_argument("--out", required=True, help="search folder (proposals, proxies, fit, "
                                                 "mixture.yaml, plots); resumable")
    ms.add_argument("--proxies", type=int, default=32, help="number of proxy mixtures (default 32)")
    ms.add_argument("--workers", type=int, default=2, help="parallel single-thread proxy processes")
    ms.add_argument("--target", default="average", help="'average' (mean per-domain val bpb) or "
                                                        "a domain name")
    ms.add_argument("--regressor", default="best", help="best | linear | lightgbm (default: the "
                                                       "higher cross-validated Spearman)")
    ms.add_argument("--seed", type=int, default=0, help="seed of the mixture draws and the search")
    ms.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="setting for the proxies and the written config (e.g. data.corpus=PATH)")
    ms.add_argument("--proxy-set", action="append", default=[], metavar="KEY=VALUE",
                    help="setting for the proxies only, after the proxy defaults")
    ms.add_argument("--time-budget", type=float, default=None, metavar="SECONDS",
                    help="start no new proxy after this long (exit 3; rerun to continue)")
    ms.add_argument("--lock", metavar="FILE", help="flock FILE while the proxies train")
    ms.add_argument("--quiet", action="store_true", help="no per-proxy progress on stderr")
    ms.set_defaults(func=_cmd_mixture_search)

    def add_decoding_args(sp):
        sp.add_argument("run", help="divmoe run folder (config.yaml + checkpoint/)")
        sp.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="inference routing setting on top of the run's config, e.g. "
                             "--set moe.top_k=1 (repeatable)")
        sp.add_argument("--scmoe", metavar="BETA,ALPHA,WEAK_RANK",
                        help="self-contrast decoding: (1+β)·log p_strong − β·log p_weak where "
                             "p_strong ≥ α·max, weak = each token's expert of rank WEAK_RANK only")
        sp.add_argument("--roe", metavar="N,TAU", help="roster of experts: N routings per token "
                        "sampled by Gumbel-top-k at temperature TAU, distributions averaged")
        sp.add_argument("--seed", type=int, default=0, help="seed of sampling and of RoE's "
                                                            "routings (default 0)")

    g = sub.add_parser("generate", help="continue a prompt with a trained run (KV cache, "
                                        "streamed to the terminal)")
    add_decoding_args(g)
    g.add_argument("--prompt", required=True, help="text to continue (UTF-8)")
    g.add_argument("--max-new", type=int, default=None, metavar="N",
                   help="tokens to generate (bytes for a byte-level run; default: until "
                        "the context is full)")
    g.add_argument("--temperature", type=float, default=1.0, metavar="T",
                   help="sampling temperature; 0 = greedy (default 1)")
    g.add_argument("--top-p", type=float, default=1.0, metavar="P",
                   help="nucleus: sample among the best tokens holding P of the probability "
                        "(default 1 = all)")
    g.add_argument("--no-cache", action="store_true",
                   help="recompute the whole context at every step instead of using the KV cache")
    g.set_defaults(func=_cmd_generate)

    ev = sub.add_parser("evaluate", help="validation bits per byte and greedy next-token "
                                         "accuracy per domain of a run, plain, RoE or SCMoE")
    add_decoding_args(ev)
    ev.add_argument("--max-bytes", type=int, default=None, metavar="N",
                    help="bytes per domain (default: the run's data.val_bytes_per_domain)")
    ev.add_argument("--split", choices=("val", "train"), default="val",
                    help="score the validation split (default) or the same windows cut from the "
                         "training split (to tune --roe/--scmoe off the validation set)")
    ev.add_argument("--batch-size", type=int, default=32, metavar="B",
                    help="validation windows per forward (default 32)")
    ev.add_argument("--json", metavar="FILE", help="also write the numbers to FILE")
    ev.set_defaults(func=_cmd_evaluate)

    r = sub.add_parser("report", help="(re)write RUN/report.html from a run folder")
    r.add_argument("run")
    r.set_defaults(func=_cmd_report)

    cp = sub.add_parser("compare", help="train configurations on the same data/seed/budget and "
                                        "compare them (summary.md, report.html)")
    cp.add_argument("configs", nargs="*", metavar="CONFIG.yaml",
                    help="one variant per file, named by the file's stem")
    cp.add_argument("--out", required=True, help="folder: one run folder per variant + summary")
    cp.add_argument("--study", metavar="FILE.yaml|seed-claims",
                    help="a study file (base: overrides for all; variants: name → overrides), "
                         "or the built-in 'seed-claims' study of ALGORITHMS.md's claims")
    cp.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override applied to every variant (repeatable)")
    cp.add_argument("--preset", choices=["cpu", "cuda", "quick"], default="cpu",
                    help="seed-claims: cpu = the study (about 1.7 h on 2 cores); cuda = a "
                         "larger one for a GPU (use --workers 1); quick = tiny runs for the "
                         "tests")
    cp.add_argument("--quick", action="store_true", help="seed-claims: --preset quick")
    cp.add_argument("--seeds", type=int, default=None,
                    help="seed-claims: seeds per variant (default 5; 2 with --quick)")
    cp.add_argument("--workers", type=int, default=2,
                    help="seed-claims: single-thread runs at a time (default 2)")
    cp.add_argument("--budget", type=float, default=None, metavar="SECONDS",
                    help="seed-claims: start no new run after SECONDS (run again to continue)")
    cp.add_argument("--records", metavar="DIR",
                    help="seed-claims: mirror each finished run's records (no checkpoints) to "
                         "DIR, and take finished runs from it")
    cp.add_argument("--report-only", action="store_true",
                    help="seed-claims: train nothing, write the page from the finished runs")
    cp.add_argument("--docs", metavar="PAGE.md",
                    help="seed-claims: also write the page to PAGE.md (keeping its "
                         "'Implementation fidelity' section) with the curves beside it")
    cp.add_argument("--lock", metavar="FILE", help="flock FILE while each variant trains (share "
                                                 "a machine with other heavy jobs)")
    cp.add_argument("--quiet", action="store_true", help="no per-variant progress on stderr")
    cp.set_defaults(func=_cmd_compare)

    def add_new_run_settings(sp):
        sp.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a train.* or data.* setting of the new run, e.g. --set "
                             "train.steps=200 (how `divmoe train --resume` continues it)")

    def add_calibration(sp):
        sp.add_argument("--calibration-sequences", type=int, default=64, metavar="N",
                        help="training windows the routing statistics are collected on (default 64)")
        add_new_run_settings(sp)

    mg = sub.add_parser("merge", help="merge each MoE layer's experts around the most-used ones "
                                      "(MC-SMoE) → a new run")
    mg.add_argument("run", help="trained divmoe run folder")
    mg.add_argument("--experts-per-layer", type=int, required=True, metavar="M",
                    help="experts each MoE layer keeps after merging")
    mg.add_argument("--out", required=True, help="new run folder")
    mg.add_argument("--router", choices=["remap", "dominant"], default="remap",
                    help="remap: keep every router row, each sending its tokens to its group's "
                         "merged expert (default); dominant: one row per merged expert")
    mg.add_argument("--no-align", action="store_true",
                    help="average without permutation alignment of hidden units")
    add_calibration(mg)
    mg.set_defaults(func=_cmd_surgery)

    pr = sub.add_parser("prune", help="keep K experts per MoE layer by routing frequency or by "
                                      "output reconstruction (NAEE) → a new run")
    pr.add_argument("run", help="trained divmoe run folder")
    pr.add_argument("--keep", type=int, required=True, metavar="K",
                    help="experts each MoE layer keeps (moe.top_k to num_experts)")
    pr.add_argument("--method", choices=["frequency", "reconstruction"], default="frequency",
                    help="frequency: the most-chosen experts (default); reconstruction: the "
                         "subset whose layer output is closest to the full layer's (NAEE)")
    pr.add_argument("--skip-ratio", type=float, default=0.0, metavar="R",
                    help="also skip a token's later experts whose weight is below R times its "
                         "first one's (dynamic skipping; 0 = off)")
    pr.add_argument("--out", required=True, help="new run folder")
    add_calibration(pr)
    pr.set_defaults(func=_cmd_surgery)

    up = sub.add_parser("upcycle", help="turn a dense run (model.moe=false) into an MoE whose "
                                        "experts start from its MLPs → a new run to train on")
    up.add_argument("run", help="trained dense divmoe run folder")
    up.add_argument("--experts", type=int, required=True, metavar="E", help="experts per layer")
    up.add_argument("--top-k", type=int, required=True, metavar="K", help="experts per token")
    up.add_argument("--granularity", type=int, default=1, metavar="G",
                    help="cut the dense MLP into G slices; expert e copies slice e mod G")
    up.add_argument("--drop-ratio", type=float, default=0.0, metavar="R",
                    help="Drop-Upcycling: re-initialise this share of each expert's hidden units")
    up.add_argument("--steps", type=int, default=None, metavar="N",
                    help="train.steps of the new run (default: the dense run's)")
    up.add_argument("--out", required=True, help="new run folder")
    add_new_run_settings(up)
    up.set_defaults(func=_cmd_surgery)

    c = sub.add_parser("config", help="list every setting with its default and allowed values")
    c.add_argument("--show-resolved", action="store_true",
                   help="print the configuration that --config/--set resolve to")
    add_config_args(c)
    c.set_defaults(func=_cmd_config)

    ls = sub.add_parser("list", help="list every router, balancer, expert layout and dispatch "
                                     "kind with a description and the settings it reads")
    ls.set_defaults(func=_cmd_list)

    from .bench import add_arguments as add_bench_arguments
    b = sub.add_parser("bench", help="benchmark the MoE layer against its dense equivalent and "
                                     "peers (time, memory, split; --train: training tokens/s)")
    add_bench_arguments(b)
    b.set_defaults(func=_cmd_bench)
    return p


def main(argv: list[str] | None = None) -> int:
    # Bad settings and bad files are the user's to fix: one line naming what was wrong,
    # not a traceback. ConfigError is a ValueError; an OSError (disk full, no permission)
    # names its file.
    args = build_parser().parse_args(argv)
    args.cli_argv = list(sys.argv[1:] if argv is None else argv)  # what reports quote as the command
    try:
        return args.func(args)
    except Exception as exc:
        from .train import RunError

        if not isinstance(exc, (ValueError, OSError, RunError)):
            raise
        print(f"divmoe: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
