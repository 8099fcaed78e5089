"""``divmoe bench --distributed``: a ``divmoe train`` step on W gloo ranks, split into
all-to-all and the rest, with the bytes each rank's token exchanges move.

For each W (default 1, 2, 4) W processes are spawned on this machine, one torch thread each,
and run the training step of the default model (``--set`` applies) with its experts sharded
over all W ranks (``parallel.expert=W``; W=1 is the single-process run, no exchange). The
global batch is the same for every W (``train.batch_size`` sequences of random byte tokens),
each rank stepping on its 1/W share. Per step and rank:

* **step**: wall time of :func:`divmoe.train.train_step`;
* **all-to-all**: wall time inside the token and count exchanges (forward and backward). On
  gloo the call blocks until the peers have sent, so it includes waiting for slower ranks;
* **compute**: step − all-to-all (it still holds the gradient and loss all-reduces);
* **bytes**: rows the exchanges sent to and received from other ranks
  (:func:`divmoe.parallel.all_to_all.metered`).

On a machine with fewer cores than ranks the ranks share cores, so the step times measure
correctness and volume, not a speed-up.
"""

from __future__ import annotations

import datetime
import json
import os
import statistics
import tempfile
import time

import torch
import torch.distributed as dist

from ..parallel.spawn import spawn_ranks

TIMEOUT_S = 300.0


def _rank_main(rank: int, world: int, init_file: str, overrides: list[str], steps: int,
               warmup: int, seed: int, out_dir: str) -> None:
    from ..models import MoETransformer
    from ..parallel.all_to_all import metered
    from ..parallel.ranks import check_run_parallel, init_ranks
    from ..train import load_config
    from ..train.loop import build_optimizer
    from ..train.step import train_step
    from .train import random_batches

    torch.set_num_threads(1)
    cfg = load_config(None, list(overrides))
    ranks = None
    if world > 1:
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                                world_size=world, timeout=datetime.timedelta(seconds=TIMEOUT_S))
        ranks = init_ranks(world)
        check_run_parallel(cfg, ranks)
    torch.manual_seed(seed)
    model = MoETransformer(cfg.model, cfg.moe)
    if ranks is not None:
        model.shard_experts(ranks.expert_group, None)
    model.train()
    optimizer = build_optimizer(model, cfg)
    batches = random_batches(cfg, seed)
    rows = []
    for i in range(warmup + steps):
        batch = batches[i % len(batches)]
        if ranks is not None:
            batch = batch.tensor_split(world)[rank]
        with metered() as m:
            t0 = time.perf_counter()
            train_step(model, optimizer, [batch], cfg.train.grad_clip, ranks=ranks)
            dt = time.perf_counter() - t0
        if i >= warmup:
            rows.append({"step_s": dt, "all_to_all_s": m.seconds, "calls": m.calls,
                         "bytes_sent": m.bytes_sent, "bytes_received": m.bytes_received})
    with open(os.path.join(out_dir, f"{rank}.json"), "w") as f:
        json.dump(rows, f)
    if ranks is not None:
        dist.destroy_process_group()


def bench_distributed(overrides: list[str], worlds: list[int], steps: int, warmup: int,
                      seed: int, log) -> dict:
    """One row per W: medians over the timed steps (per step the slowest rank's step time,
    the ranks' mean all-to-all time, bytes per rank)."""
    from ..train import load_config
    from .train import model_shape

    cfg = load_config(None, list(overrides))
    out = {"config": model_shape(cfg, overrides),
           "steps": steps, "warmup": warmup, "threads_per_rank": 1, "cpus": os.cpu_count(),
           "worlds": []}
    tokens = cfg.train.batch_size * cfg.model.seq_len
    for world in worlds:
        log(f"  [distributed] W={world}: {steps} steps after {warmup} warm-up")
        with tempfile.TemporaryDirectory() as tmp:
            spawn_ranks(_rank_main, world, (world, os.path.join(tmp, "init"), list(overrides),
                                            steps, warmup, seed, tmp),
                        TIMEOUT_S, "bench --distributed")
            per_rank = [json.loads(open(os.path.join(tmp, f"{r}.json")).read())
                        for r in range(world)]
        step_s = [max(r[i]["step_s"] for r in per_rank) for i in range(steps)]
        a2a_s = [statistics.mean(r[i]["all_to_all_s"] for r in per_rank) for i in range(steps)]
        sent = [statistics.mean(r[i]["bytes_sent"] for r in per_rank) for i in range(steps)]
        sent_max = [max(r[i]["bytes_sent"] for r in per_rank) for i in range(steps)]
        med_step, med_a2a = statistics.median(step_s), statistics.median(a2a_s)
        out["worlds"].append({
            "world": world, "median_step_ms": med_step * 1e3,
            "median_all_to_all_ms": med_a2a * 1e3,
            "median_compute_ms": statistics.median(s - a for s, a in zip(step_s, a2a_s)) * 1e3,
            "all_to_all_share": med_a2a / med_step,
            "exchanges_per_step": per_rank[0][0]["calls"],
            "bytes_sent_per_rank": statistics.median(sent),
            "bytes_sent_max_rank": statistics.median(sent_max),
            "bytes_sent_per_token": statistics.median(sent) * world / tokens,
            "tokens_per_s": tokens / med_step, "per_rank": per_rank})
    return out


def format_distributed(res: dict) -> str:
    c = res["config"]
    lines = [f"distributed train step: d={c['d_model']}, {c['n_layers']} layers, E={c['num_experts']}, "
             f"k={c['top_k']}, {c['batch_size']}×{c['seq_len']} tokens per global step, experts over "
             f"all W ranks, 1 thread per rank on {res['cpus']} CPUs; medians of {res['steps']} steps",
             "", "| W | step ms | all-to-all ms | compute ms | all-to-all share | exchanges/step "
             "| bytes sent/rank/step | max rank | bytes sent/token | tokens/s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for w in res["worlds"]:
        lines.append(f"| {w['world']} | {w['median_step_ms']:.0f} | {w['median_all_to_all_ms']:.1f} | "
                     f"{w['median_compute_ms']:.0f} | {w['all_to_all_share']:.1%} | "
                     f"{w['exchanges_per_step']} | {w['bytes_sent_per_rank'] / 2**20:.2f} MiB | "
                     f"{w['bytes_sent_max_rank'] / 2**20:.2f} MiB | {w['bytes_sent_per_token']:.0f} | "
                     f"{w['tokens_per_s']:.0f} |")
    return "\n".join(lines)
