"""Generation tokens/s of a trained run: with and without the KV cache, and the cost of SCMoE
and RoE, interleaved in rounds so every variant sees the same machine state.

    flock /tmp/divmoe-heavy.lock python3 benchmarks/generate_speed.py /work/runs/default \
        --rounds 5 --threads 2 --json speed.json

Each round generates --max-new bytes greedily after the same prompt with every variant;
the report gives each variant's median tokens/s and the median over rounds of its ratio to
plain decoding with the KV cache (docs/after_training.md).
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch

from divmoe.inference import Plain, Roster, SelfContrast, generate, load_run

PROMPT = "The expert network routes each token to"


def variants():
    return {"plain, KV cache": (Plain(), True),
            "plain, no cache": (Plain(), False),
            "SCMoE 0.5,0.1,2, KV cache": (SelfContrast(0.5, 0.1, 2), True),
            "RoE N=2, KV cache": (Roster(2, 0.5), True),
            "RoE N=4, KV cache": (Roster(4, 0.5), True)}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--max-new", type=int, default=None,
                    help="bytes per generation (default: fill the context after the prompt)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = load_run(args.run).model
    prompt = torch.tensor([list(PROMPT.encode())])
    max_new = args.max_new or model.config.seq_len - prompt.shape[1]
    found = {name: [] for name in variants()}
    for name, (method, cache) in variants().items():  # warm-up, not timed
        generate(model, prompt, 4, temperature=0, method=method, use_cache=cache)
    for _ in range(args.rounds):
        for name, (method, cache) in variants().items():
            found[name].append(generate(model, prompt, max_new, temperature=0, method=method,
                                        use_cache=cache).tokens_per_s)
    base = found["plain, KV cache"]
    rows = {name: {"median_tokens_per_s": statistics.median(v),
                   "median_ratio_to_plain_cached": statistics.median(
                       a / b for a, b in zip(v, base)),
                   "tokens_per_s": v} for name, v in found.items()}
    print(f"{args.rounds} rounds, {max_new} new bytes after a {prompt.shape[1]}-byte prompt, "
          f"batch 1, greedy, {args.threads} threads")
    print("| variant | median tokens/s | ratio to plain with KV cache |\n|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['median_tokens_per_s']:.1f} | "
              f"{r['median_ratio_to_plain_cached']:.2f} |")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"run": args.run, "max_new": max_new, "prompt": PROMPT,
                       "threads": args.threads, "rounds": args.rounds, "rows": rows}, fh,
                      indent=1)


if __name__ == "__main__":
    main()
