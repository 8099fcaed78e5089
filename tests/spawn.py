"""Run a function on W gloo ranks in spawned processes, failing (never hanging) on a timeout."""

import datetime
import os
import tempfile

import torch.distributed as dist

from divmoe.parallel.spawn import spawn_ranks

TIMEOUT_S = 120


def _entry(rank, world, init_file, fn, args):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=TIMEOUT_S))
    try:
        fn(rank, world, *args)
    finally:
        dist.destroy_process_group()


def run_ranks(fn, world: int, *args, timeout_s: float = TIMEOUT_S) -> None:
    """``fn(rank, world, *args)`` on ``world`` ranks of a fresh gloo group; raises if any rank
    fails or the whole run takes longer than ``timeout_s`` (its processes are then killed)."""
    init_file = os.path.join(tempfile.mkdtemp(), "init")
    spawn_ranks(_entry, world, (world, init_file, fn, args), timeout_s, "test")
