"""The MoE layer: one straight path for every router, balancer, expert layout and execution.

Forward pass for x[..., D] (T = number of tokens after flattening the leading dims):
  1. Validate x (rank, width, dtype, finite values) and flatten to x_TD.
  2. Route: the router maps x_TD to a RoutingPlan (expert_ids_TK, weights_TK, probs_TE,
     logits_TE); the Balancer's selection bias, if any, changes only which experts it picks.
  3. Plan transforms (capacity, ...) rewrite the plan. Losses and the bias see the router's
     choice (``plan``); execution and the stats see what runs (``routed``).
  4. Execute ``routed`` with the strategy chosen once in ``__init__`` (grouped dispatch,
     the reference loop, soft merging; see :mod:`divmoe.dispatch`).
  5. Shared experts (if any) see every token; their output is added.
  6. Balance losses (the Balancer) and diversity regularisers, weighted, sum to ``aux_loss``.
  7. RoutingStats: detached tensors, read on the host only by whoever consumes them.

Nothing in this forward reads a tensor on the host except the row counts that dropless
dispatch needs to size its expert GEMMs (one read per call of the default layer).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch
from torch import nn

from .balance import PLAN_TRANSFORMS, Balancer
from .balance.loss_free import max_vio
from .config import validate
from .dispatch import execution_for
from .diversity.regularizers import DiversityRegularizers
from .experts import EXPERT_LAYOUTS, SwiGLU
from .experts.accounting import activated_params_per_token
from .moe_config import MoEConfig
from .routing import ROUTERS


@dataclass
class RoutingStats:
    """What one forward pass routed, as detached tensors (0-dim where a number): reading one
    on the host (``float(stats.max_vio)``) is the consumer's choice, not the layer's."""

    tokens_per_expert: torch.Tensor   # [E] int64, routed slots per expert (soft_merge: float64
                                      # Σ_t p_te, every expert used in proportion to p)
    mean_prob: torch.Tensor           # [E] mean router probability
    max_vio: torch.Tensor             # MaxVio of tokens_per_expert
    dropped_slots: torch.Tensor       # empty slots that are not null-expert choices
    num_tokens: int
    losses: dict                      # name → unweighted loss value
    expert_ids: torch.Tensor          # [T, K] int64 chosen experts (−1 = empty slot)
    rerouted_slots: torch.Tensor | int = 0   # slots the capacity balancer moved to another expert
    activated_params_mean: torch.Tensor | float = 0.0  # mean over tokens of parameters touched
    activated_params_T: Optional[torch.Tensor] = None  # [T] int64, per token (null slots: 0)
    null_slots: torch.Tensor | int = 0  # slots that chose a null expert (not drops)


class MoEOutput(NamedTuple):
    output: torch.Tensor      # same shape as the input
    aux_loss: torch.Tensor    # weighted sum of balancing losses (0-dim; add it to the training loss)
    stats: RoutingStats


class MoE(nn.Module):
    """A sparse Mixture-of-Experts MLP usable in any PyTorch model.

    ``MoE(d_model, MoEConfig(...))(x)`` with x of shape [..., d_model] returns a
    :class:`MoEOutput` ``(output, aux_loss, stats)``. In training, call :meth:`begin_step`
    before an optimizer step's first micro-batch and :meth:`update_balancers` after the
    optimizer step (``MoETransformer`` forwards both to every layer).

    ``process_group``: shard the experts over the ranks of this torch.distributed group or
    1-D ``DeviceMesh`` (expert parallelism, :mod:`divmoe.parallel`; :meth:`shard_experts`).
    Every rank builds the full layer from the same seed and keeps its experts, so
    initialisation equals the single-process layer's; the router, shared experts and balance
    state are replicated.
    """

    def __init__(self, d_model: int, config: MoEConfig | None = None, process_group=None,
                 **overrides):
        super().__init__()
        if isinstance(d_model, bool) or not isinstance(d_model, int) or d_model < 1:
            raise ValueError(f"MoE d_model={d_model!r} is not allowed: expected an int >= 1")
        config = config or MoEConfig(**overrides)
        validate(config, "moe.")
        self.config, self.d_model = config, d_model
        c = config
        router_cls = ROUTERS[c.router]
        self.router = router_cls(d_model, c)
        self.transforms = [PLAN_TRANSFORMS[name](c) for name in c.balance
                           if name in PLAN_TRANSFORMS]
        self.experts = EXPERT_LAYOUTS[c.expert_layout].build(d_model, c)
        expert_sizes = self.experts.expert_sizes()  # all E experts, also when sharded
        self.execute = execution_for(c, router_cls)
        self.shard = None  # this rank's ShardMap once the experts are sharded
        shared_hidden = c.shared_expert_hidden or c.num_shared_experts * c.expert_hidden
        self.shared = SwiGLU(d_model, shared_hidden) if c.num_shared_experts else None
        self.shared_gate = nn.Linear(d_model, 1, bias=False) \
            if c.num_shared_experts and c.shared_expert_gate else None
        self.balancer = Balancer(c, expert_sizes)
        self.diversity = DiversityRegularizers(c)
        # Parameter accounting, counted once: what every token touches besides its experts.
        self._fixed_params = sum(p.numel() for m in (self.router, self.shared, self.shared_gate)
                                 if m is not None for p in m.parameters())
        self.register_buffer("_expert_sizes_E",
                             torch.tensor(expert_sizes, dtype=torch.int64),
                             persistent=False)
        # The loss-free bias lives in the Balancer; its checkpoint key stays `selection_bias_E`.
        self.register_state_dict_post_hook(_bias_key_out)
        self.register_load_state_dict_pre_hook(_bias_key_in)
        if process_group is not None:
            self.shard_experts(process_group)

    def shard_experts(self, group, experts_by_rank: list[list[int]] | None = None) -> None:
        """Keep only this rank's experts and run the layer expert-parallel over ``group`` (a
        process group or a 1-D ``DeviceMesh``). Rank r keeps ``experts_by_rank[r]`` (global
        expert ids; default: [r·E/W, (r+1)·E/W)). The full layer's weights at this moment are
        where the shard comes from, so load a checkpoint before sharding, not after."""
        import torch.distributed as dist

        from .parallel import ExpertParallel, check_expert_parallel, check_placement
        from .parallel.expert_shards import shard_map

        if self.shard is not None:
            raise RuntimeError("MoE.shard_experts: the experts are already sharded")
        if hasattr(group, "get_group"):  # a DeviceMesh dimension
            group = group.get_group()
        c = self.config
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        check_expert_parallel(c, world)
        if experts_by_rank is None:
            per_rank = c.num_experts // world
            experts_by_rank = [list(range(r * per_rank, (r + 1) * per_rank))
                               for r in range(world)]
        check_placement(experts_by_rank, c.num_experts, world)
        ids = experts_by_rank[rank]
        self.shard = shard_map(self.experts, ids)
        with torch.random.fork_rng(devices=[]):  # later parameters initialise as in one process
            self.experts = self.experts.select(ids)
        self.execute = ExpertParallel(group, c.num_experts, self.execute, experts_by_rank)

    @property
    def selection_bias_E(self) -> torch.Tensor:
        return self.balancer.selection_bias_E

    def begin_step(self) -> None:
        """Start an optimizer step (before its first micro-batch): see :class:`Balancer`."""
        self.balancer.begin_step()

    def update_balancers(self) -> None:
        """Apply controller updates (loss-free bias) after each optimizer step."""
        self.balancer.update()

    def active_params_per_token(self) -> int:
        """Parameters a token touches: router + k routed experts + shared experts (LoRA experts:
        each with the frozen base it runs inside). Unequal experts (HMoE) count at their mean size, the expectation
        under uniform routing; ``RoutingStats.activated_params_mean`` measures the real value."""
        mean_size = float(self._expert_sizes_E.double().mean())
        k = self.router.experts_per_token()
        return int(round(self._fixed_params + k * (self.experts.base_params() + mean_size)))

    def forward(self, x: torch.Tensor, token_ids: torch.Tensor | None = None) -> MoEOutput:
        """``token_ids`` (shape ``x.shape[:-1]``) is needed only by routers that route on ids."""
        x_TD, token_ids_T, seq_len = self._flatten(x, token_ids)
        plan = self.router(x_TD, selection_bias_E=self.balancer.selection_bias(),
                           token_ids_T=token_ids_T, seq_len=seq_len)
        routed = plan
        for transform in self.transforms:
            routed = transform(routed)
        out_TD = self.execute(x_TD, routed, self.experts)
        if self.shared is not None:
            shared_TD = self.shared(x_TD)
            if self.shared_gate is not None:
                shared_TD = torch.sigmoid(self.shared_gate(x_TD)) * shared_TD
            out_TD = out_TD + shared_TD

        if self.training:
            self.balancer.observe(plan)
        aux, losses = self.balancer.losses(plan, tuple(x.shape))
        div_aux, div_losses = self.diversity(self.experts, x_TD, routed, self.training)
        aux = aux + div_aux
        if plan.num_tokens == 0:
            # An empty batch still reaches every parameter, with zero gradient (never None:
            # under DDP a parameter without a gradient is the unused-parameter trap).
            zero = sum(p.sum() for p in self.parameters() if p.requires_grad) * 0.0
            out_TD, aux = out_TD + zero.to(out_TD.dtype), aux + zero.float()
        return MoEOutput(out_TD.view(x.shape), aux, self._stats(routed, {**losses, **div_losses}))

    def _flatten(self, x: torch.Tensor, token_ids: torch.Tensor | None):
        """Check the input and return (x_TD, token_ids_T, seq_len): seq_len is S for input
        [..., S, d] (at least 3-D), None for [T, d]."""
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"MoE input must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() < 1:
            raise ValueError(f"MoE input must have rank >= 1 with last dim d_model={self.d_model}, "
                             f"got a scalar")
        if x.shape[-1] != self.d_model:
            raise ValueError(f"MoE input width is {x.shape[-1]} but d_model={self.d_model} "
                             f"(input shape {tuple(x.shape)})")
        if not x.is_floating_point():
            raise ValueError(f"MoE input must be floating point, got {x.dtype}")
        weight_dtype = self._expert_dtype()
        if x.dtype != weight_dtype:
            raise ValueError(f"MoE input dtype is {x.dtype} but the layer's expert weights are "
                             f"{weight_dtype}: cast one to the other (x.to({weight_dtype}) or "
                             f"moe.to({x.dtype}))")
        check_finite(x)
        if token_ids is not None:
            if tuple(token_ids.shape) != tuple(x.shape[:-1]):
                raise ValueError(f"token_ids shape {tuple(token_ids.shape)} must equal the input's "
                                 f"leading shape {tuple(x.shape[:-1])}")
            token_ids = token_ids.reshape(-1)
        seq_len = x.shape[-2] if x.dim() >= 3 else None
        return x.reshape(-1, self.d_model), token_ids, seq_len

    def _expert_dtype(self) -> torch.dtype:
        for p in self.experts.parameters():
            return p.dtype
        return torch.get_default_dtype()

    @torch.no_grad()
    def _stats(self, plan, losses: dict) -> RoutingStats:
        counts_E = plan.expert_load()
        ids_TK = plan.expert_ids_TK.detach()
        act_T = activated_params_per_token(ids_TK, self._expert_sizes_E, self._fixed_params,
                                           self.experts.base_params())
        T = plan.num_tokens
        return RoutingStats(
            tokens_per_expert=counts_E,
            mean_prob=plan.probs_TE.detach().float().mean(0) if T else
            torch.zeros(plan.num_experts, device=ids_TK.device),
            max_vio=max_vio(counts_E),
            dropped_slots=plan.dropped_slots,
            num_tokens=T,
            losses=losses,
            expert_ids=ids_TK,
            rerouted_slots=plan.rerouted_slots,
            activated_params_mean=act_T.double().mean() if T else
            torch.zeros((), dtype=torch.float64, device=ids_TK.device),
            activated_params_T=act_T,
            null_slots=plan.num_null_slots,
        )


def check_finite(x: torch.Tensor) -> None:
    """Refuse NaN/inf input without a host read: ``torch._assert_async`` of one float64 sum
    (NaN/inf anywhere makes it non-finite; finite fp32/bf16/fp16 values cannot overflow it).
    On CPU it raises at once and we name the count; on CUDA it is queued with the kernels and
    fails at the next synchronisation as a device-side assert naming this message."""
    try:
        torch._assert_async(torch.isfinite(x.sum(dtype=torch.float64)),
                            "MoE input contains NaN/inf values")
    except RuntimeError:
        bad = int((~torch.isfinite(x)).sum())
        raise ValueError(f"MoE input contains {bad} NaN/inf values (shape {tuple(x.shape)})"
                         ) from None


def _bias_key_out(module, state_dict, prefix, local_metadata) -> None:
    state_dict[prefix + "selection_bias_E"] = state_dict.pop(prefix + "balancer.selection_bias_E")


def _bias_key_in(module, state_dict, prefix, local_metadata, strict, missing_keys,
                 unexpected_keys, error_msgs) -> None:
    if prefix + "selection_bias_E" in state_dict:
        state_dict[prefix + "balancer.selection_bias_E"] = state_dict.pop(prefix + "selection_bias_E")


__all__ = ["MoE", "MoEConfig", "MoEOutput", "RoutingStats", "SwiGLU"]
