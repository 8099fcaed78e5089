"""Processes on this machine, one per rank, that fail (never hang) past a deadline: what
``divmoe bench --distributed`` and the distributed tests run their ranks with."""

from __future__ import annotations

import time

import torch.multiprocessing as mp


def spawn_ranks(fn, nprocs: int, args: tuple, timeout_s: float, what: str) -> None:
    """``fn(rank, *args)`` in ``nprocs`` spawned processes; raises if one fails, and kills them
    all and raises TimeoutError (naming ``what``) if they are not done within ``timeout_s``
    (a collective that hangs)."""
    ctx = mp.spawn(fn, args=args, nprocs=nprocs, join=False)
    deadline = time.monotonic() + timeout_s
    while not ctx.join(timeout=1.0):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
            raise TimeoutError(f"{what}: {nprocs} ranks did not finish within {timeout_s:.0f} s "
                               f"(a collective hung?)")
