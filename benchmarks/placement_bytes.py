"""Measured all-to-all bytes of expert parallelism, default placement against a placement
file, next to the prediction of :mod:`divmoe.parallel.placement` (``origin`` model).

    divmoe place runs/default --ranks 2 --out placement.json
    torchrun --nproc-per-node 2 benchmarks/placement_bytes.py runs/default \\
        --placement placement.json --max-bytes 8192

Every rank loads the run's checkpoint, shards the experts over all the ranks (first the
default contiguous split, then the placement) and runs the first ``--max-bytes`` validation
bytes of every domain forward (the windows ``divmoe analyze`` routes), each batch's
sequences split over the ranks as divmoe's evaluation splits them, inside
:func:`divmoe.parallel.metered`. The prediction uses the trace of the same tokens
(gathered from the ranks' routing), so measured and predicted differ only by the traffic
model's assumption that a token's rank is independent of its experts. Rank 0 prints one
row per placement and, with ``--json``, writes them.
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.distributed as dist

from divmoe.analyze.core import validation_windows
from divmoe.analyze.source import load_source
from divmoe.parallel import metered
from divmoe.parallel.placement import Placement, cost, load_placement, rank_loads
from divmoe.parallel.traces import RoutingTrace


def measure(run: str, placement: Placement | None, max_bytes: int, batch_size: int) -> dict:
    rank, world = dist.get_rank(), dist.get_world_size()
    src = load_source(run)
    model, E = src.model, int(src.info["num_experts"])
    if placement is not None:
        placement.check_run(model.moe_layers, E, world, "--placement")
    model.shard_experts(dist.group.WORLD, placement.experts_by_rank if placement else None)
    ids = [[] for _ in src.moes]
    hooks = [m.register_forward_hook(lambda mod, a, out, li=li: ids[li].append(
        out.stats.expert_ids.cpu())) for li, m in enumerate(src.moes)]
    windows, _ = validation_windows(src, max_bytes)
    with torch.no_grad(), metered() as moved:
        for d in sorted(windows):
            for batch in windows[d].split(batch_size):
                model(batch.tensor_split(world)[rank])
    for h in hooks:
        h.remove()
    gathered = [None] * world
    dist.all_gather_object(gathered, ({"sent": moved.bytes_sent, "received": moved.bytes_received}, [torch.cat(i) for i in ids]))
    if rank:
        return {}
    trace = RoutingTrace.from_expert_ids(
        [torch.cat([g[1][li] for g in gathered]) for li in range(len(src.moes))],
        model.moe_layers, src.moes[0].d_model, E)
    if placement is None:
        per = E // world
        placement = Placement(world, E, {b: [list(range(r * per, (r + 1) * per))
                                             for r in range(world)] for b in model.moe_layers})
    c = cost(trace, placement)
    row = c.row_bytes
    leave = (world - 1) / world
    load_r = rank_loads(trace, placement.rank_of(trace.layers), world).sum(0)
    # received: rows for the rank's experts from the other ranks' tokens, load·(N−1)/N, and
    # the outputs of its own tokens' slots on other ranks, (total − load)/N
    predicted_recv = (load_r * leave + (trace.load_LE.sum() - load_r) / world) * row
    measured = [g[0] for g in gathered]
    return {"placement": placement.method or "placed", "ranks": world, "tokens": trace.tokens,
            "measured_bytes_per_token": sum(m["sent"] for m in measured) / trace.tokens,
            "predicted_bytes_per_token": c.origin_bytes,
            "measured_received_by_rank": [m["received"] for m in measured],
            "predicted_received_by_rank": predicted_recv.tolist(),
            "load_max_over_mean": c.imbalance}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run")
    p.add_argument("--placement", required=True)
    p.add_argument("--max-bytes", type=int, default=8192)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--json")
    args = p.parse_args()
    dist.init_process_group("gloo")
    try:
        rows = [measure(args.run, None, args.max_bytes, args.batch_size),
                measure(args.run, load_placement(args.placement), args.max_bytes,
                        args.batch_size)]
    finally:
        dist.destroy_process_group()
    if not rows[0]:
        return
    rows[0]["placement"] = "contiguous (default)"
    for r in rows:
        print(f"{r['placement']:<24} tokens {r['tokens']}  bytes/token measured "
              f"{r['measured_bytes_per_token']:.1f} predicted {r['predicted_bytes_per_token']:.1f}"
              f"  received by rank (MB) measured "
              f"{[round(x / 1e6, 2) for x in r['measured_received_by_rank']]} predicted "
              f"{[round(x / 1e6, 2) for x in r['predicted_received_by_rank']]}  "
              f"load max/mean {r['load_max_over_mean']:.3f}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=1)


if __name__ == "__main__":
    main()
