"""``MoEConfig``: the settings of one MoE layer, flat (``moe.top_p``), each read by the
components that declare it.

The keys stay flat because a YAML file reads best that way (``moe: {router: dynamic_topp,
top_p: 0.5}``) and old configs keep working. Ownership is explicit all the same: every
router (``Router.settings``), balance term (``BALANCERS[name].settings``), expert layout
(``EXPERT_LAYOUTS[name].settings``), diversity regulariser and dispatch kind names the
fields it reads, and :meth:`MoEConfig.check` runs the cross-field check of each component the
config selects — the layer knows none of them. ``divmoe list`` and ``divmoe config`` print
from the same declarations (:mod:`divmoe.registry`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from .balance import (AUX_LOSS_SCOPES, BALANCERS, CAPACITY_OVERFLOW, CAPACITY_PRIORITY,
                      GLOBAL_COUNTS)
from .config import option
from .dispatch import DISPATCHERS, check_dispatch
from .diversity.regularizers import DIVERSITY_REGULARIZERS
from .experts import EXPERT_LAYOUTS
from .routing import ROUTERS

# Fields the layer itself reads (every router, layout and balancer sees their effect).
LAYER_SETTINGS = ("num_experts", "expert_layout", "num_shared_experts", "shared_expert_gate",
                  "shared_expert_hidden", "router", "balance", "diversity", "dispatch")


@dataclass
class MoEConfig:
    num_experts: int = option(8, min=1, help="routed experts E")
    top_k: int = option(2, min=1, help="experts per token k")
    expert_hidden: int = option(128, min=1, help="hidden width of each routed expert")
    expert_layout: str = option("swiglu", choices=sorted(EXPERT_LAYOUTS),
                                help="swiglu = independent SwiGLU experts; gelu = independent "
                                     "GELU MLPs (GShard/Switch); lora = low-rank adapters over "
                                     "one frozen dense SwiGLU (LoRAMoE/MoLA)")
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
                                items=sorted(BALANCERS),
                                help="balancing losses, controllers and plan transforms")
    aux_loss_weight: float = option(0.01, min=0.0, help="α of aux_loss")
    z_loss_weight: float = option(0.001, min=0.0, help="weight of z_loss")
    routing_entropy_weight: float = option(1e-4, min=0.0, help="weight of routing_entropy "
                                           "(dynamic top-p's dynamic loss)")
    aux_loss_scope: str = option("micro_batch", choices=list(AUX_LOSS_SCOPES),
                                 help="tokens aux_loss counts f and P over: micro_batch; sequence "
                                      "(DeepSeek-V3, input [..., S, d]); global_batch (f over all "
                                      "micro-batches and ranks of an optimizer step)")
    aux_loss_global_counts: str = option("running", choices=list(GLOBAL_COUNTS),
                                         help="global_batch under grad_accum: running = micro-"
                                              "batch j uses the counts of micro-batches 0..j "
                                              "(the paper's buffer); counting_pass = every "
                                              "micro-batch uses the whole step's counts, from "
                                              "a no-grad forward over the step first (exact, "
                                              "one more forward per step)")
    capacity_overflow: str = option("drop", choices=list(CAPACITY_OVERFLOW),
                                    help="capacity: drop the slots past an expert's capacity, "
                                         "reroute them to the next-best expert with room, or "
                                         "expand each token's candidates and keep the best "
                                         "within capacity (Expanded Drop)")
    capacity_priority: str = option("position", choices=list(CAPACITY_PRIORITY),
                                    help="capacity: which slots a full expert keeps: position "
                                         "(first choices first, then token order; GShard) or "
                                         "score (the highest router scores: Capacity-Aware "
                                         "Token Drop)")
    capacity_expand: float = option(2.0, min=1.0,
                                    help="capacity_overflow=expand: candidates per token = "
                                         "ceil(capacity_expand·top_k) best experts, cut to "
                                         "each expert's capacity by score (Expanded Drop)")
    small_expert_bias_weight: float = option(0.01, min=0.0,
                                             help="weight of small_expert_bias (HMoE P-Penalty)")
    dirichlet_prior_weight: float = option(0.01, min=0.0, help="weight of dirichlet_prior (at "
                                           "initialisation its router gradient per unit weight "
                                           "is about aux_loss's, so 0.01 matches aux_loss_weight)")
    dirichlet_alpha: float = option(2.0, min=0.0, min_exclusive=True,
                                    help="dirichlet_prior: symmetric concentration α")
    dirichlet_alpha_per_expert: Optional[list[float]] = option(
        None, help="dirichlet_prior: one concentration per expert (overrides dirichlet_alpha)")
    bias_update_rate: float = option(1e-3, min=0.0, help="u of loss_free_bias (per optimizer step)")
    diversity: list[str] = option(default_factory=list, items=sorted(DIVERSITY_REGULARIZERS),
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
                                    help="capacity: each expert accepts C = ceil(capacity_factor·"
                                         "T·top_k/E) routed slots; expert_choice: each expert "
                                         "picks C = round(capacity_factor·T·top_k/E) tokens")
    top_p: float = option(0.5, min=0.0, max=1.0, min_exclusive=True,
                          help="dynamic_topp: add experts until their cumulative probability >= top_p "
                               "(top_k caps the count; the paper has no cap: top_k=num_experts)")
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
    router_rows: int = option(0, min=0, help="merged_topk: the original router rows R kept by "
                              "divmoe merge; each routes to its group's merged expert (the "
                              "layer's expert_of_row_R buffer, saved with the weights)")
    skip_ratio: float = option(0.0, min=0.0, max=1.0,
                               help="dynamic_skip: skip a slot whose weight is below skip_ratio "
                                    "times the token's first weight (NAEE dynamic skipping)")
    dispatch: str = option("grouped", choices=sorted(DISPATCHERS),
                           help="grouped = fast path; reference = loop over experts; triton = "
                                "fused Triton kernels on CUDA (divmoe[gpu]); auto = triton "
                                "for CUDA inputs when installed, else grouped")
    recompute_hidden: bool = option(False, help="SwiGLU fast path: keep only the layer input for "
                                    "backward and recompute each chunk's expert hidden there "
                                    "(one more up-projection GEMM: less memory, more time); the "
                                    "reference loop ignores it")

    def check(self, prefix: str = "") -> None:
        """Each selected component checks its own cross-field rules."""
        ROUTERS[self.router].check(self, prefix)
        layout = EXPERT_LAYOUTS[self.expert_layout]
        if layout.check is not None:
            layout.check(self, prefix)
        for name in self.balance:
            if BALANCERS[name].check is not None:
                BALANCERS[name].check(self, prefix)
        check_dispatch(self, prefix)
