"""The ranks of a distributed training run: W = replicas × expert-parallel size.

``divmoe train`` under ``torchrun`` arranges its W processes as a ``DeviceMesh`` of shape
(replicas, expert): the ranks of one row (consecutive ranks) shard every MoE layer's
experts among them (expert parallelism, ``parallel.expert`` of them); the ranks of one
column hold the same experts. Every rank trains on its own shard of each global batch, so
the non-expert parameters are data-parallel over all W ranks and each expert's parameters
over the ``replicas`` ranks that hold it.

Gradients (:func:`sync_gradients`): every rank's loss is the mean over its own tokens, and
the run's loss is the mean of the W ranks' (their shards are equal), so every gradient is
summed over the ranks that hold the parameter and divided by W. An expert's gradient on
one rank already sums the contributions of every rank of its expert-parallel group (their
tokens came to it through the all-to-all); the sum over its replicas completes it. Dividing
it by the replicas only, as a data-parallel wrapper unaware of the experts would, makes
expert gradients ``expert`` times too large.
"""

from __future__ import annotations

import datetime
import os
import pickle
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..config import ConfigError


@dataclass
class Ranks:
    world: int
    rank: int
    expert: int              # ranks sharing one copy of the experts (expert-parallel size)
    mesh: object             # DeviceMesh (replica, expert)
    owns_group: bool = False  # init_ranks created the process group (and should end it)

    @property
    def replicas(self) -> int:
        return self.world // self.expert

    @property
    def is_writer(self) -> bool:
        """Rank 0 writes the run folder; the others only compute."""
        return self.rank == 0

    @property
    def expert_group(self):
        return self.mesh.get_group("expert")

    @property
    def replica_group(self):
        return self.mesh.get_group("replica")

    def sum(self, t: torch.Tensor, group=None) -> torch.Tensor:
        """``t`` summed over the ranks of ``group`` (default: all), a new tensor."""
        t = t.clone()
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
        return t

    def agree(self, fn, *args, **kwargs):
        """Run ``fn`` on the writer only and return its result on every rank; if it raised
        there, raise the same error on every rank (so no rank waits in a collective for a
        rank that has stopped)."""
        box = [None]
        if self.is_writer:
            try:
                box[0] = ("ok", fn(*args, **kwargs))
            except Exception as exc:  # noqa: BLE001 - re-raised on every rank below
                box[0] = ("error", exc)
        try:
            dist.broadcast_object_list(box, src=0)
        except (pickle.PicklingError, TypeError):
            box[0] = ("error", RuntimeError("rank 0 failed (its error could not be sent)"))
        kind, value = box[0]
        if kind == "error":
            raise value
        return value


def launched_distributed() -> bool:
    """True under ``torchrun`` (or any launcher that sets WORLD_SIZE) with more than one rank."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_ranks(expert: int, timeout_s: float = 600.0) -> Ranks:
    """Join the run's process group (gloo on CPU, nccl on CUDA; rank and world size from the
    launcher's environment, unless a group is already initialised) and build the mesh."""
    owns_group = not dist.is_initialized()
    if owns_group:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    world, rank = dist.get_world_size(), dist.get_rank()
    if world % expert:
        raise ConfigError(f"parallel.expert={expert} does not divide the {world} ranks; allowed: "
                          f"a divisor of {world} "
                          f"({', '.join(str(d) for d in range(1, world + 1) if world % d == 0)})")
    from torch.distributed.device_mesh import init_device_mesh

    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    mesh = init_device_mesh(device, (world // expert, expert), mesh_dim_names=("replica", "expert"))
    return Ranks(world, rank, expert, mesh, owns_group)


def expert_parameter_names(model: torch.nn.Module) -> set[str]:
    """Names of the parameters that live in a sharded MoE layer's experts."""
    from ..layer import MoE

    names = set()
    for prefix, m in model.named_modules():
        if isinstance(m, MoE) and m.shard is not None:
            names.update(f"{prefix}.experts.{n}" for n, _ in m.experts.named_parameters())
    return names


def sync_gradients(model: torch.nn.Module, ranks: Ranks) -> None:
    """Sum every gradient over the ranks holding its parameter and divide by W (module doc).
    One flat all-reduce per group of parameters."""
    experts = expert_parameter_names(model)
    by_group = {"world": [], "replica": []}
    for name, p in model.named_parameters():
        if p.grad is not None:
            by_group["replica" if name in experts else "world"].append(p.grad)
    for key, grads in by_group.items():
        if not grads:
            continue
        group = ranks.replica_group if key == "replica" else None
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
        flat /= ranks.world
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()


def clip_grad_norm(model: torch.nn.Module, max_norm: float, ranks: Ranks) -> torch.Tensor:
    """``torch.nn.utils.clip_grad_norm_`` over the whole model, sharded experts included:
    replicated gradients count once, each expert's once (summed over its expert group)."""
    experts = expert_parameter_names(model)
    dense_sq = torch.zeros((), dtype=torch.float64)
    expert_sq = torch.zeros((), dtype=torch.float64)
    grads = []
    for name, p in model.named_parameters():
        if p.grad is None:
            continue
        grads.append(p.grad)
        sq = p.grad.detach().double().pow(2).sum()
        if name in experts:
            expert_sq += sq
        else:
            dense_sq += sq
    if experts:
        expert_sq = ranks.sum(expert_sq, ranks.expert_group)
    total = (dense_sq + expert_sq).sqrt()
    coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
    for g in grads:
        g.mul_(coef.to(g.dtype))
    return total.float()


def check_run_parallel(cfg, ranks: Ranks) -> None:
    """Refuse, naming the setting, what this run cannot do on ``ranks``."""
    from .expert_parallel import check_expert_parallel

    if ranks.expert > 1 and cfg.model.moe:
        check_expert_parallel(cfg.moe, ranks.expert)
    b = cfg.train.batch_size
    if b % ranks.world:
        raise ConfigError(f"train.batch_size={b} must be divisible by the {ranks.world} ranks: "
                          f"each rank trains on batch_size/ranks sequences of every "
                          f"micro-batch (equal shards keep the loss the single-process mean)")
    if ranks.expert > 1 and not cfg.model.moe:
        raise ConfigError(f"parallel.expert={ranks.expert} needs MoE layers, but model.moe is "
                          f"false")
