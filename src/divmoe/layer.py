"""The MoE layer: router → plan → dispatch / experts / combine, plus balance losses and stats.

Forward pass for x[..., D] (T = number of tokens after flattening the leading dims):
  1. Validate x (rank, width, finite values) and flatten to x_TD.
  2. Router: x_TD → RoutingPlan (expert_ids_TK, weights_TK, probs_TE, logits_TE).
  3. Dispatch + grouped experts + combine → routed_TD (fast path or the reference loop).
     router=soft_merge (SMEAR) replaces this step: one expert per sequence whose weights are
     the router-probability-weighted average of all experts' (routing/soft_merge.py).
  4. Shared experts (if any) see every token; their output is added.
  5. Balancing losses from the plan, each times its weight, summed into ``aux_loss``.
  6. RoutingStats: detached per-expert loads, mean probabilities, MaxVio, drops, losses.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .balance import (AUX_LOSS_SCOPES, BALANCE_LOSSES, BALANCERS, CAPACITY_OVERFLOW,
                      BalanceContext, apply_capacity, update_selection_bias)
from .balance.aux_scope import global_counts
from .config import ConfigError, option, validate
from .diagnostics.load import max_vio
from .diversity.regularizers import DIVERSITY_REGULARIZERS, diversity_losses
from .dispatch import DISPATCHERS
from .experts import EXPERT_LAYOUTS, StackedSwiGLU, activated_params
from .routing import ROUTERS
from .routing.soft_merge import SOFT_MERGE_PATHS, group_probs, merge_groups


@dataclass
class MoEConfig:
    num_experts: int = option(8, min=1, help="routed experts E")
    top_k: int = option(2, min=1, help="experts per token k")
    expert_hidden: int = option(128, min=1, help="hidden width of each routed expert")
    expert_layout: str = option("swiglu", choices=sorted(EXPERT_LAYOUTS),
                                help="swiglu = independent SwiGLU experts; lora = low-rank "
                                     "adapters over one frozen dense SwiGLU (LoRAMoE/MoLA)")
    expert_widths: Optional[list[int]] = option(None, help="per-expert hidden widths (HMoE; "
                                                "length num_experts; overrides expert_hidden)")
    lora_rank: int = option(8, min=1, help="adapter rank of lora experts")
    num_shared_experts: int = option(0, min=0, help="shared experts every token passes through")
    router: str = option("topk", choices=sorted(ROUTERS), help="routing algorithm")
    score_func: str = option("softmax", choices=["softmax", "sigmoid"], help="router score function")
    renormalize: bool = option(True, help="renormalise the k selected weights to sum to 1")
    n_groups: int = option(1, min=1, help="expert groups: group-limited topk (DeepSeek-V3); router=grouped (MoGE)")
    topk_groups: int = option(1, min=1, help="groups each token may select from")
    routed_scaling: float = option(1.0, min=0.0, min_exclusive=True, help="scale on routed weights")
    jitter: float = option(0.0, min=0.0, max=1.0, help="multiplicative router input noise at train time")
    balance: list[str] = option(default_factory=lambda: ["aux_loss", "z_loss"],
                                items=BALANCERS, help="balancing losses and controllers")
    aux_loss_weight: float = option(0.01, min=0.0, help="α of aux_loss")
    z_loss_weight: float = option(0.001, min=0.0, help="weight of z_loss")
    aux_loss_scope: str = option("micro_batch", choices=list(AUX_LOSS_SCOPES),
                                 help="tokens aux_loss counts f and P over: micro_batch; sequence "
                                      "(DeepSeek-V3, input [..., S, d]); global_batch (f over all "
                                      "micro-batches and ranks of an optimizer step)")
    capacity_overflow: str = option("drop", choices=list(CAPACITY_OVERFLOW),
                                    help="capacity balancer (C = ceil(capacity_factor·T·top_k/E)): "
                                         "drop overflowing slots, or reroute them to the next-best "
                                         "expert with room")
    small_expert_bias_weight: float = option(0.01, min=0.0,
                                             help="weight of small_expert_bias (HMoE P-Penalty)")
    dirichlet_prior_weight: float = option(0.001, min=0.0, help="weight of dirichlet_prior")
    dirichlet_alpha: float = option(2.0, min=0.0, min_exclusive=True,
                                    help="dirichlet_prior: symmetric concentration α")
    dirichlet_alpha_per_expert: Optional[list[float]] = option(
        None, help="dirichlet_prior: one concentration per expert (overrides dirichlet_alpha)")
    bias_update_rate: float = option(1e-3, min=0.0, help="u of loss_free_bias (per optimizer step)")
    diversity: list[str] = option(default_factory=list, items=DIVERSITY_REGULARIZERS,
                                  help="expert-diversity regularisers added to aux_loss: exclusivity "
                                       "(mean squared cosine between experts' outputs, MMoEEx "
                                       "reading), divergence (-JS between routed experts' "
                                       "softmax outputs); see diversity/regularizers.py")
    exclusivity_weight: float = option(0.1, min=0.0, help="weight of the exclusivity regulariser")
    divergence_weight: float = option(0.1, min=0.0, help="weight of the divergence regulariser")
    diversity_probe_tokens: int = option(64, min=1, help="random tokens per forward on which the "
                                         "diversity regularisers run every expert")
    shared_expert_gate: bool = option(False, help="scale shared experts by sigmoid(x·w) (Qwen2-MoE)")
    shared_expert_hidden: int = option(0, min=0, help="hidden width of the shared-expert MLP "
                                       "(0 = num_shared_experts * expert_hidden; Qwen2-MoE sets its own)")
    capacity_factor: float = option(1.0, min=0.0, min_exclusive=True,
                                    help="expert_choice: C = round(capacity_factor·T·top_k/E) tokens per expert")
    top_p: float = option(0.5, min=0.0, max=1.0, min_exclusive=True,
                          help="dynamic_topp: add experts until their cumulative probability >= top_p "
                               "(top_k caps the count)")
    num_null_experts: int = option(0, min=0, help="null_experts: null (zero, no-FLOP) experts N "
                                                  "added to the gate (AdaMoE); needs >= 1")
    null_target: float = option(0.0, min=0.0, max=1.0,
                                help="null_experts: target share of slots on null experts for "
                                     "null_usage (0 = N/(E+N), AdaMoE's choice)")
    null_usage_weight: float = option(0.01, min=0.0, help="weight of null_usage (router=null_experts)")
    sinkhorn_iters: int = option(20, min=1, help="sinkhorn: maximum Sinkhorn iterations")
    sinkhorn_tol: float = option(1e-3, min=0.0, help="sinkhorn: stop when every column sum is "
                                                     "within this relative tolerance of T/E")
    router_dim: int = option(16, min=1, help="hypersphere: dimension of the routing projection")
    router_temperature: float = option(0.07, min=0.0, min_exclusive=True,
                                       help="hypersphere: cosine scores are divided by this")
    dselect_gamma: float = option(1.0, min=0.0, min_exclusive=True,
                                  help="dselect_k: width γ of the smooth-step function")
    dispatch: str = option("grouped", choices=sorted(DISPATCHERS),
                           help="grouped = fast path; reference = loop over experts")
    recompute_hidden: bool = option(False, help="SwiGLU fast path: keep only the layer input for "
                                    "backward and recompute each chunk's expert hidden there "
                                    "(one more up-projection GEMM: less memory, more time); the "
                                    "reference loop ignores it")

    def check(self, prefix: str = "") -> None:
        if self.expert_widths is not None:
            if len(self.expert_widths) != self.num_experts:
                raise ConfigError(f"{prefix}expert_widths={self.expert_widths} is not allowed: "
                                  f"needs one width per expert, {prefix}num_experts="
                                  f"{self.num_experts}, got {len(self.expert_widths)}")
            if min(self.expert_widths) < 1:
                raise ConfigError(f"{prefix}expert_widths={self.expert_widths} is not allowed: "
                                  f"every width must be an int >= 1")
            if self.expert_layout != "swiglu":
                raise ConfigError(f"{prefix}expert_widths={self.expert_widths} is not allowed "
                                  f"with {prefix}expert_layout={self.expert_layout!r}: only the "
                                  f"'swiglu' layout has per-expert widths (or set it to null)")
        # null_experts chooses k among E real + N null experts.
        max_k = self.num_experts + (self.num_null_experts if self.router == "null_experts" else 0)
        if self.top_k > max_k:
            raise ConfigError(f"{prefix}top_k={self.top_k} is not allowed: must be <= "
                              f"{prefix}num_experts={self.num_experts}"
                              + (f" + {prefix}num_null_experts={self.num_null_experts}"
                                 if self.router == "null_experts" else ""))
        if self.num_experts % self.n_groups:
            raise ConfigError(f"{prefix}n_groups={self.n_groups} is not allowed: must divide "
                              f"{prefix}num_experts={self.num_experts}")
        if self.recompute_hidden and (self.expert_layout != "swiglu" or self.router == "soft_merge"):
            raise ConfigError(f"{prefix}recompute_hidden=True is not allowed with {prefix}"
                              f"expert_layout={self.expert_layout!r}, {prefix}router="
                              f"{self.router!r}: it applies to the SwiGLU dispatch path only "
                              f"(expert_layout=swiglu, any router but soft_merge)")
        if self.topk_groups > self.n_groups:
            raise ConfigError(f"{prefix}topk_groups={self.topk_groups} is not allowed: must be <= "
                              f"{prefix}n_groups={self.n_groups}")
        if self.router == "topk" and self.n_groups > 1 and self.top_k > self.topk_groups * (self.num_experts // self.n_groups):
            raise ConfigError(f"{prefix}top_k={self.top_k} is not allowed: the {self.topk_groups} "
                              f"selected groups hold only "
                              f"{self.topk_groups * (self.num_experts // self.n_groups)} experts")
        self._check_router(prefix)
        self._check_balance(prefix)

    def _check_balance(self, prefix: str) -> None:
        """Cross-field checks of the balancer settings."""
        alphas = self.dirichlet_alpha_per_expert
        if alphas is not None:
            if len(alphas) != self.num_experts:
                raise ConfigError(f"{prefix}dirichlet_alpha_per_expert={alphas} is not allowed: "
                                  f"needs one value per expert, {prefix}num_experts="
                                  f"{self.num_experts}, got {len(alphas)}")
            if min(alphas) <= 0:
                raise ConfigError(f"{prefix}dirichlet_alpha_per_expert={alphas} is not allowed: "
                                  f"every concentration must be > 0")

    def _check_router(self, prefix: str) -> None:
        """Cross-field checks of the router-specific settings."""
        p, r = prefix, self.router
        if self.score_func != "softmax" and r != "topk":
            raise ConfigError(f"{p}score_func={self.score_func!r} is not allowed with "
                              f"{p}router={r!r}: only router=topk supports sigmoid scores")
        if "loss_free_bias" in self.balance and not getattr(ROUTERS[r], "uses_selection_bias", True):
            ok = sorted(n for n, c in ROUTERS.items() if getattr(c, "uses_selection_bias", True))
            raise ConfigError(f"{p}balance={self.balance!r} is not allowed with {p}router={r!r}: "
                              f"loss_free_bias needs a router that selects with a bias "
                              f"({', '.join(ok)})")
        if "null_usage" in self.balance and r != "null_experts":
            raise ConfigError(f"{p}balance={self.balance!r} is not allowed with {p}router={r!r}: "
                              f"null_usage needs router=null_experts")
        if r == "null_experts" and self.num_null_experts < 1:
            raise ConfigError(f"{p}num_null_experts={self.num_null_experts} is not allowed with "
                              f"{p}router='null_experts': must be >= 1")
        if self.null_target >= 1.0:
            raise ConfigError(f"{p}null_target={self.null_target} is not allowed: must be < 1")
        if r == "soft_merge":
            if self.expert_layout != "swiglu" or self.expert_widths is not None:
                raise ConfigError(f"{p}expert_layout={self.expert_layout!r}"
                                  + (f", {p}expert_widths={self.expert_widths}"
                                     if self.expert_widths is not None else "")
                                  + f" is not allowed with {p}router='soft_merge': merging needs "
                                    f"experts of one shape (expert_layout=swiglu, expert_widths="
                                    f"null)")
            if "capacity" in self.balance:
                raise ConfigError(f"{p}balance={self.balance!r} is not allowed with "
                                  f"{p}router='soft_merge': capacity drops token slots, and "
                                  f"soft merging has none (every token runs the merged expert)")
        if r == "grouped" and self.top_k % self.n_groups:
            raise ConfigError(f"{p}top_k={self.top_k} is not allowed with {p}router='grouped': "
                              f"must be divisible by {p}n_groups={self.n_groups} (every group "
                              f"gives each token top_k/n_groups experts)")


@dataclass
class RoutingStats:
    """What one forward pass routed; plain detached tensors for diagnostics."""

    tokens_per_expert: torch.Tensor   # [E] int64, routed slots per expert (soft_merge: float64
                                      # Σ_t p_te, every expert used in proportion to p)
    mean_prob: torch.Tensor           # [E] mean router probability
    max_vio: float
    dropped_slots: int
    num_tokens: int
    losses: dict                      # name → unweighted loss value (float)
    expert_ids: torch.Tensor          # [T, K] int64 chosen experts (−1 = empty slot)
    rerouted_slots: int = 0           # slots the capacity balancer moved to another expert
    activated_params_mean: float = 0.0  # mean over tokens of the parameters each touched
    activated_params_T: Optional[torch.Tensor] = None  # [T] int64, per token (null slots: 0)
    null_slots: int = 0               # slots that chose a null expert (router=null_experts; not drops)


class MoEOutput(NamedTuple):
    output: torch.Tensor      # same shape as the input
    aux_loss: torch.Tensor    # weighted sum of balancing losses (0-dim; add it to the training loss)
    stats: RoutingStats


class SwiGLU(nn.Module):
    """A dense SwiGLU MLP (shared experts; the dense baseline)."""

    def __init__(self, d_model: int, hidden: int):
        super().__init__()
        self.w_in = nn.Linear(d_model, 2 * hidden, bias=False)
        self.w_out = nn.Linear(hidden, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.w_in(x).chunk(2, dim=-1)
        return self.w_out(F.silu(gate) * up)


class MoE(nn.Module):
    """A sparse Mixture-of-Experts MLP usable in any PyTorch model.

    ``MoE(d_model, MoEConfig(...))(x)`` with x of shape [..., d_model] returns a
    :class:`MoEOutput` ``(output, aux_loss, stats)``.
    """

    def __init__(self, d_model: int, config: MoEConfig | None = None, **overrides):
        super().__init__()
        config = config or MoEConfig(**overrides)
        validate(config, "moe.")
        self.config, self.d_model = config, d_model
        c = config
        self.router = ROUTERS[c.router](d_model, c)
        self.experts = EXPERT_LAYOUTS[c.expert_layout](d_model, c)
        self.shared = SwiGLU(d_model, c.shared_expert_hidden or c.num_shared_experts * c.expert_hidden) \
            if c.num_shared_experts else None
        self.shared_gate = nn.Linear(d_model, 1, bias=False) \
            if c.num_shared_experts and c.shared_expert_gate else None
        self._dispatch = DISPATCHERS[c.dispatch]
        if c.dispatch == "grouped" and c.recompute_hidden:
            self._dispatch = functools.partial(self._dispatch, recompute_hidden=True)
        # router=soft_merge (SMEAR) runs one merged expert per sequence instead of dispatch.
        self._soft_merge = SOFT_MERGE_PATHS[c.dispatch] if c.router == "soft_merge" else None
        if self._soft_merge is not None and not isinstance(self.experts, StackedSwiGLU):
            raise ConfigError(f"moe.router='soft_merge' needs the StackedSwiGLU layout, got "
                              f"{type(self.experts).__name__}")
        self._losses = {name: (BALANCE_LOSSES[name], getattr(c, f"{name}_weight"))
                        for name in c.balance if name in BALANCE_LOSSES}
        self._diversity = {name: getattr(c, f"{name}_weight") for name in c.diversity}
        if c.dirichlet_alpha_per_expert is not None:
            alpha_E = torch.tensor(c.dirichlet_alpha_per_expert, dtype=torch.float64)
        else:
            alpha_E = torch.full((c.num_experts,), c.dirichlet_alpha, dtype=torch.float64)
        self._dirichlet_alpha_E = alpha_E
        # Selection-only bias (loss-free balancing; DeepSeek-V3's e_score_correction_bias).
        # A buffer, so it is saved and restored with the model.
        self.register_buffer("selection_bias_E", torch.zeros(c.num_experts))
        self.register_buffer("_load_since_update_E", torch.zeros(c.num_experts), persistent=False)
        # aux_loss_scope=global_batch: routed-slot counts of this optimizer step so far (all
        # micro-batches, all-reduced over ranks); reset by begin_step() / update_balancers().
        self.register_buffer("_step_counts_E", torch.zeros(c.num_experts, dtype=torch.float64),
                             persistent=False)

    @torch.no_grad()
    def begin_step(self) -> None:
        """Start an optimizer step: clear the global-batch counts (call before its first
        micro-batch)."""
        self._step_counts_E.zero_()

    @torch.no_grad()
    def update_balancers(self) -> None:
        """Apply controller updates from the load routed since the last call (call after each
        optimizer step)."""
        if "loss_free_bias" in self.config.balance and self._load_since_update_E.sum() > 0:
            update_selection_bias(self.selection_bias_E, self._load_since_update_E,
                                  self.config.bias_update_rate)
        self._load_since_update_E.zero_()
        self._step_counts_E.zero_()

    def active_params_per_token(self) -> int:
        """Parameters a token touches: router + k routed experts + shared experts (+ the frozen
        base of LoRA experts). Unequal experts (HMoE) count at their mean size, the expectation
        under uniform routing; ``RoutingStats.activated_params_mean`` measures the real value."""
        sizes = self.experts.expert_sizes()
        fixed = self._param_accounting()
        k = 1 if self._soft_merge is not None else self.config.top_k  # one merged expert
        return int(round(fixed["shared_params"] + fixed["router_params"] + fixed["base_params"]
                         + k * sum(sizes) / len(sizes)))

    def _param_accounting(self) -> dict:
        """Parameter counts besides the routed experts, for :func:`activated_params`."""
        shared = sum(p.numel() for m in (self.shared, self.shared_gate) if m is not None
                     for p in m.parameters())
        base = self.experts.base_params() if hasattr(self.experts, "base_params") else 0
        return {"shared_params": shared, "base_params": base,
                "router_params": sum(p.numel() for p in self.router.parameters())}

    def forward(self, x: torch.Tensor, token_ids: torch.Tensor | None = None) -> MoEOutput:
        """``token_ids`` (shape ``x.shape[:-1]``) is needed only by routers that route on ids."""
        x_TD = self._check_input(x)
        if token_ids is not None:
            if tuple(token_ids.shape) != tuple(x.shape[:-1]):
                raise ValueError(f"token_ids shape {tuple(token_ids.shape)} must equal the input's "
                                 f"leading shape {tuple(x.shape[:-1])}")
            token_ids = token_ids.reshape(-1)
        groups = merge_groups(tuple(x.shape)) if self._soft_merge is not None else None
        plan = self.router(x_TD, selection_bias_E=self.selection_bias_E, token_ids_T=token_ids,
                           **({"groups": groups} if groups is not None else {}))
        # Losses and the loss-free bias see the router's choice (`plan`); dispatch and the
        # stats see what ran (`routed`: after the capacity transform, if any).
        routed, rerouted = plan, 0
        if "capacity" in self.config.balance:
            routed, rerouted = apply_capacity(plan, self.config.capacity_factor,
                                              self.config.capacity_overflow, self.config.top_k)
        if self._soft_merge is not None:
            out_TD = self._soft_merge(x_TD, group_probs(plan, groups), self.experts, groups)
        else:
            out_TD = self._dispatch(x_TD, routed, self.experts)
        if self.shared is not None:
            shared_TD = self.shared(x_TD)
            if self.shared_gate is not None:
                shared_TD = torch.sigmoid(self.shared_gate(x_TD)) * shared_TD
            out_TD = out_TD + shared_TD

        aux = x_TD.new_zeros((), dtype=torch.float32)
        losses = {}
        # Every balance loss takes (plan, ctx): ctx carries what the plan alone lacks
        # (sequence shape, step-wide counts, expert sizes, Dirichlet concentrations).
        ctx = self._balance_context(x, plan) if self._losses else None
        for name, (fn, weight) in self._losses.items():
            if plan.num_tokens == 0:  # a mean over no tokens is NaN; nothing to balance
                losses[name] = 0.0
                continue
            value = fn(plan, ctx)
            losses[name] = float(value.detach())
            aux = aux + weight * value
        if self._diversity and self.training and plan.num_tokens:
            # Expert-diversity regularisers: training only, on a random probe of the tokens.
            for name, value in diversity_losses(self.experts, x_TD, routed.expert_ids_TK,
                                                self._diversity,
                                                self.config.diversity_probe_tokens).items():
                losses[name] = float(value.detach())
                aux = aux + self._diversity[name] * value
        stats = self._stats(routed, losses)
        stats.rerouted_slots = rerouted
        if self.training:
            load_E = stats.tokens_per_expert if routed is plan else plan.tokens_per_expert()
            self._load_since_update_E += load_E.to(self._load_since_update_E.dtype)
        return MoEOutput(out_TD.view(x.shape), aux, stats)

    def _balance_context(self, x: torch.Tensor, plan) -> BalanceContext:
        c = self.config
        ctx = BalanceContext(aux_loss_scope=c.aux_loss_scope,
                             dirichlet_alpha_E=self._dirichlet_alpha_E)
        if "aux_loss" in self._losses and c.aux_loss_scope == "sequence":
            if x.dim() < 3:
                raise ValueError(f"aux_loss_scope=sequence needs input [..., S, d_model] with "
                                 f"sequences of S tokens (at least 3-D), got shape "
                                 f"{tuple(x.shape)}")
            ctx.seq_shape = (plan.num_tokens // x.shape[-2] if x.shape[-2] else 0, x.shape[-2])
        if "aux_loss" in self._losses and c.aux_loss_scope == "global_batch":
            # Evaluation may run on one rank only, so only training forwards all-reduce.
            counts_E = global_counts(plan, all_reduce=self.training).to(self._step_counts_E.device)
            ctx.step_counts_E = self._step_counts_E + counts_E
            if self.training:
                self._step_counts_E += counts_E
        if "small_expert_bias" in self._losses and hasattr(self.experts, "expert_sizes"):
            ctx.expert_sizes_E = torch.as_tensor(self.experts.expert_sizes(), dtype=torch.float64)
        return ctx

    def _check_input(self, x: torch.Tensor) -> torch.Tensor:
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
        # One reduction instead of an elementwise isfinite pass (≈4× cheaper, every call): a
        # NaN/inf anywhere makes the sum non-finite; a finite sum that overflows merely sends
        # us to the exact check.
        if not bool(torch.isfinite(x.sum())) and not bool(torch.isfinite(x).all()):
            bad = int((~torch.isfinite(x)).sum())
            raise ValueError(f"MoE input contains {bad} NaN/inf values (shape {tuple(x.shape)})")
        return x.reshape(-1, self.d_model)

    @torch.no_grad()
    def _stats(self, plan, losses: dict) -> RoutingStats:
        counts_E = plan.tokens_per_expert()
        if self._soft_merge is not None:  # every expert used in proportion to p (soft load)
            counts_E = plan.probs_TE.detach().double().sum(0)
        act_mean, act_T = activated_params(plan, self.experts.expert_sizes(),
                                           **self._param_accounting())
        return RoutingStats(
            tokens_per_expert=counts_E,
            mean_prob=plan.probs_TE.detach().float().mean(0) if plan.num_tokens else
            torch.zeros(plan.num_experts),
            max_vio=max_vio(counts_E),
            dropped_slots=int(plan.dropped_slots),
            num_tokens=plan.num_tokens,
            losses=losses,
            expert_ids=plan.expert_ids_TK.detach(),
            activated_params_mean=act_mean,
            activated_params_T=act_T,
            null_slots=plan.num_null_slots,
        )
