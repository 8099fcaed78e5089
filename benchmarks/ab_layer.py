"""A/B timing of the MoE layer: this checkout against another commit's, in ONE process.

``divmoe bench`` run twice (once per commit) on a shared 2-core machine swings by ±15 % between
runs; a change of a few percent cannot be seen that way. This script imports the other
commit's package under another name (``divmoe_ab_old``: the package uses relative imports
only), builds the same layer in both with the same weights, and interleaves the timings
(old, new, dense, old, new, dense, ...) so both sides see the same machine state. It
reports medians and, per round, the ratio new / old; the median of those ratios is the
figure to quote.

    git worktree add /tmp/old 7218c2c
    python3 benchmarks/ab_layer.py --old /tmp/old/src --tokens 4096 --rounds 15
"""

from __future__ import annotations

import argparse
import importlib
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

SHAPES = [(512, 1024, 8, 2), (512, 256, 64, 8), (1024, 512, 32, 4)]


def import_old(src: Path):
    root = Path(tempfile.mkdtemp())
    shutil.copytree(src / "divmoe", root / "divmoe_ab_old")
    sys.path.insert(0, str(root))
    return importlib.import_module("divmoe_ab_old.layer")


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--old", type=Path, required=True, help="the other commit's src/ folder")
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    old = import_old(args.old)
    from divmoe import layer as new
    from divmoe.experts import SwiGLU

    print(f"| shape (d,F,E,k) | mode | old ms | new ms | dense ms | new/old (median of rounds) |"
          f" old ×dense | new ×dense |")
    print("|---|---|---|---|---|---|---|---|")
    for d, F, E, k in SHAPES:
        torch.manual_seed(0)
        kw = dict(num_experts=E, top_k=k, expert_hidden=F, balance=[], dispatch="grouped")
        m_old = old.MoE(d, old.MoEConfig(**kw))
        m_new = new.MoE(d, new.MoEConfig(**kw))
        m_new.load_state_dict(m_old.state_dict())
        dense = SwiGLU(d, k * F)
        x = torch.randn(args.tokens, d)
        g = torch.randn(args.tokens, d)
        torch.testing.assert_close(m_new(x).output, m_old(x).output)
        for mode in ("fwd+bwd", "fwd"):
            def run(m, is_moe):
                xi = x.clone().requires_grad_(mode == "fwd+bwd")
                with torch.set_grad_enabled(mode == "fwd+bwd"):
                    y = m(xi).output if is_moe else m(xi)
                    if mode == "fwd+bwd":
                        (y * g).sum().backward()
            cands = {"old": lambda: run(m_old, True), "new": lambda: run(m_new, True),
                     "dense": lambda: run(dense, False)}
            for fn in cands.values():  # warm-up
                fn()
            times = {n: [] for n in cands}
            for _ in range(args.rounds):
                for n, fn in cands.items():
                    times[n].append(timed(fn))
            med = {n: statistics.median(t) * 1e3 for n, t in times.items()}
            ratio = statistics.median(a / b for a, b in zip(times["new"], times["old"]))
            print(f"| {d},{F},{E},{k} | {mode} | {med['old']:.1f} | {med['new']:.1f} | "
                  f"{med['dense']:.1f} | {ratio:.3f} | {med['old'] / med['dense']:.3f} | "
                  f"{med['new'] / med['dense']:.3f} |", flush=True)


if __name__ == "__main__":
    main()
