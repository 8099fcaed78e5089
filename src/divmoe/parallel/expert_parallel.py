"""Expert parallelism: the experts of a layer sharded over the ranks of a process group, the
token slots exchanged with all-to-all — one more execution strategy of the layer.

With W ranks and E experts, rank r holds E/W experts (``E % W == 0``): by default
[r·E/W, (r+1)·E/W), or the ids a placement gives it (:func:`check_placement`). Per layer
call, every rank:
  1. sorts its routed slots by expert position (rank by rank, each rank's experts in its
     order), as dropless dispatch does, and counts them;
  2. exchanges the per-expert counts (an all-to-all of [W, E/W] integers), so each rank
     knows how many rows it will receive from each other rank, for each of its experts;
  3. sends every slot's token row to the rank holding its expert (all-to-all, uneven
     splits; ranks with no tokens take part with zero rows);
  4. runs its local experts on the rows received with the layer's local execution (the fused
     fast path or the reference loop), each row its own unit of work with weight 1;
  5. sends the expert outputs back (the reverse all-to-all) and combines them at the source,
     weighted by the plan.
Backward runs the two exchanges in reverse, so every rank calls the same collectives in the
same order whether or not it has tokens. Host reads: the two count lists that size the
exchanges, plus the local dispatch's row counts.

Routing is per rank: a router sees its rank's tokens only, so batch-dependent routers
(expert_choice, sinkhorn) and the capacity transform decide over the rank's token set
(:data:`TOKEN_SETS`). What cannot run sharded is refused by :func:`check_expert_parallel`.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ..config import ConfigError
from ..routing.plan import RoutingPlan
from .all_to_all import exchange, exchange_counts

# What set of tokens each batch-dependent component decides over under expert parallelism.
TOKEN_SETS = {"expert_choice": "the rank's tokens (each expert takes its top-C of them)",
              "sinkhorn": "the rank's tokens (balanced over the rank's batch)",
              "capacity": "the rank's tokens (capacity C per expert and rank)"}
# Why what cannot run sharded is refused (kind, name): "*" is every name of that kind.
REFUSED = {("router", "soft_merge"): "a merged expert averages the weights of every expert, "
                                     "which no rank holds",
           ("diversity", "*"): "the regularisers run every expert on the same probe tokens, "
                               "and each rank holds only its own experts"}
_SHARDED = {("balancer", "aux_loss"): "micro_batch and sequence scopes: the rank's tokens; "
                                      "global_batch: counts summed over all ranks",
            ("balancer", "loss_free_bias"): "loads summed over all ranks before each update: "
                                            "one bias on every rank",
            ("expert_layout", "lora"): "sharded by expert; the frozen base is replicated",
            ("expert_layout", "swiglu"): "sharded by expert (stacked or width buckets)",
            ("dispatch", "*"): "runs the rank's local experts on the rows it receives"}


def under_expert_parallelism(kind: str, name: str) -> str:
    """What a component does when the experts are sharded over ranks (for ``divmoe list``)."""
    for key in ((kind, name), (kind, "*")):
        if key in REFUSED:
            return "refused: " + REFUSED[key]
    if name in TOKEN_SETS:
        return "decides over " + TOKEN_SETS[name]
    for key in ((kind, name), (kind, "*")):
        if key in _SHARDED:
            return _SHARDED[key]
    return "per token, as in one process"


def check_expert_parallel(cfg, world: int, prefix: str = "moe.") -> None:
    """Refuse, naming the setting and why, what cannot run with experts on ``world`` ranks."""
    if cfg.num_experts % world:
        raise ConfigError(f"{prefix}num_experts={cfg.num_experts} is not allowed with expert "
                          f"parallelism over {world} ranks: each rank holds num_experts/ranks "
                          f"experts, so {world} must divide it")
    if ("router", cfg.router) in REFUSED:
        raise ConfigError(f"{prefix}router={cfg.router!r} is not allowed with expert "
                          f"parallelism: {REFUSED[('router', cfg.router)]}")
    if cfg.diversity:
        raise ConfigError(f"{prefix}diversity={cfg.diversity!r} is not allowed with expert "
                          f"parallelism: {REFUSED[('diversity', '*')]}")


def check_placement(experts_by_rank: list[list[int]], num_experts: int, world: int) -> None:
    """Refuse a placement that does not give each of the ``world`` ranks E/W distinct experts."""
    if len(experts_by_rank) != world:
        raise ConfigError(f"expert placement lists {len(experts_by_rank)} ranks, but the "
                          f"experts are sharded over {world}")
    per_rank = num_experts // world
    for r, ids in enumerate(experts_by_rank):
        if len(ids) != per_rank:
            raise ConfigError(f"expert placement gives rank {r} {len(ids)} experts; each rank "
                              f"holds num_experts/ranks = {per_rank}")
    flat = sorted(e for ids in experts_by_rank for e in ids)
    if flat != list(range(num_experts)):
        missing = sorted(set(range(num_experts)) - set(flat))
        raise ConfigError(f"expert placement must place every expert 0..{num_experts - 1} "
                          f"exactly once; " + (f"missing {missing}" if missing else
                                               "some expert is placed twice"))


class ExpertParallel:
    """The execution strategy: ``ExpertParallel(group, num_experts, local, experts_by_rank)
    (x_TD, plan, experts)`` with ``experts`` this rank's shard (its experts in the order of
    ``experts_by_rank[rank]``) and ``local`` the execution run on it."""

    def __init__(self, group, num_experts: int, local, experts_by_rank: list[list[int]]):
        self.group, self.local = group, local
        self.world = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.experts_per_rank = num_experts // self.world
        order = [e for ids in experts_by_rank for e in ids]
        # global expert id → its position in rank order (identity for the default placement)
        position = torch.empty(num_experts, dtype=torch.int64)
        position[torch.tensor(order)] = torch.arange(num_experts)
        self.position_E = None if order == list(range(num_experts)) else position

    @torch.compiler.disable(reason="expert parallelism: data-dependent all-to-all splits")
    def __call__(self, x_TD: torch.Tensor, plan: RoutingPlan, experts) -> torch.Tensor:
        W, E_loc = self.world, self.experts_per_rank
        E = W * E_loc
        K = plan.expert_ids_TK.shape[1]
        ids_S = plan.expert_ids_TK.reshape(-1)
        if self.position_E is not None:
            ids_S = torch.where(ids_S < 0, ids_S,
                                self.position_E.to(ids_S.device)[ids_S.clamp_min(0)])
        key_S = torch.where(ids_S < 0, E, ids_S)  # empty slots last, then cut off
        order_S = torch.argsort(key_S, stable=True)
        counts_E = torch.zeros(E + 1, dtype=torch.int64, device=x_TD.device)
        counts_E = counts_E.scatter_add_(0, key_S, torch.ones_like(key_S))[:E]
        recv_WE = exchange_counts(counts_E.view(W, E_loc), self.group)
        counts, recv = counts_E.tolist(), recv_WE.tolist()  # the exchange sizes
        send_splits = [sum(counts[r * E_loc:(r + 1) * E_loc]) for r in range(W)]
        recv_splits = [sum(row) for row in recv]
        rows_R = order_S[:sum(send_splits)]
        token_R = rows_R // K
        weight_R = plan.weights_TK.reshape(-1).index_select(0, rows_R).to(x_TD.dtype)

        x_recv = exchange(x_TD.index_select(0, token_R), send_splits, recv_splits, self.group)
        n_recv = sum(recv_splits)
        local_ids = torch.arange(E_loc, device=x_TD.device).repeat(W).repeat_interleave(
            recv_WE.reshape(-1), output_size=n_recv)
        unit = x_TD.new_zeros(()).expand(n_recv, E_loc)  # no memory: dispatch reads the shape
        local_plan = RoutingPlan(local_ids.unsqueeze(1), x_recv.new_ones(n_recv, 1), unit, unit)
        y_recv = self.local(x_recv, local_plan, experts)
        if n_recv == 0:
            # Nothing to compute here, but backward must still reach the exchange (the other
            # ranks wait for this rank in it) and the local experts (zero, not None, gradients).
            y_recv = y_recv + x_recv.sum() * 0 + sum(p.sum() for p in experts.parameters()
                                                      if p.requires_grad) * 0
        y_back = exchange(y_recv, recv_splits, send_splits, self.group)
        return x_TD.new_zeros(x_TD.shape).index_add(0, token_R, y_back * weight_R[:, None])
