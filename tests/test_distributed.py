"""global_batch aux loss across data-parallel ranks: two gloo processes on this machine."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from divmoe.balance.aux_scope import aux_loss_global
from divmoe.layer import MoE, MoEConfig
from divmoe.routing import RoutingPlan


def _plan(rank: int) -> RoutingPlan:
    gen = torch.Generator().manual_seed(rank)
    T, E, K = 12, 4, 2
    ids = torch.stack([torch.randperm(E, generator=gen)[:K] for _ in range(T)])
    probs = torch.rand(T, E, generator=gen).softmax(-1)
    return RoutingPlan(ids, torch.ones(T, K), probs, probs.log())


def _worker(rank: int, world: int, init_file: str, out_dir: str):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        plan = _plan(rank)
        balancer = MoE(8, MoEConfig(num_experts=4, expert_hidden=4)).balancer
        counts = balancer.reduce_across_ranks(plan.tokens_per_expert().double())
        loss = aux_loss_global(plan, counts)
        torch.save({"counts": counts, "loss": loss.detach()}, os.path.join(out_dir, f"{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not available")
def test_global_counts_are_summed_over_ranks(tmp_path):
    world = 2
    mp.spawn(_worker, args=(world, str(tmp_path / "init"), str(tmp_path)), nprocs=world, join=True)
    results = [torch.load(tmp_path / f"{r}.pt") for r in range(world)]
    expected = sum(_plan(r).tokens_per_expert().double() for r in range(world))
    for r, res in enumerate(results):
        torch.testing.assert_close(res["counts"], expected)
        # Each rank's loss uses the global f and its own P.
        torch.testing.assert_close(res["loss"], aux_loss_global(_plan(r), expected))
    # Without the all-reduce, rank 0 would see only its own counts.
    assert not torch.equal(_plan(0).tokens_per_expert().double(), expected)
