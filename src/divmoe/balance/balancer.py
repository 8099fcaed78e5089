"""The Balancer: the one owner of a layer's balance state.

It holds

- the balance **state**, in buffers so it is saved, restored and moved with the model:
  the loss-free selection bias ``selection_bias_E`` (saved; the layer's checkpoint key
  stays ``selection_bias_E``), the load routed since the last bias update and this
  optimizer step's routed-slot counts (global-batch aux loss);
- the **loss weights**, an explicit map from each loss in ``moe.balance`` to the config
  field that weights it (:data:`divmoe.balance.BALANCERS`);
- the per-expert inputs of its losses: Dirichlet concentrations, expert sizes.

What a training loop needs, in order: :meth:`begin_step` before an optimizer step's first
micro-batch; with ``aux_loss_global_counts=counting_pass`` (``counts_step_first``), a
counting pass — ``counting = True``, a forward over every micro-batch without gradients,
:meth:`end_counting`; the layer's forward calls :meth:`observe` (training only) and then
:meth:`losses`; :meth:`update` after the optimizer step. Every cross-rank reduction the
balancers need goes through :meth:`reduce_across_ranks`, so data and expert parallelism
plug in at that one place.

No host reads: losses and counts stay tensors; the bias update is a masked tensor op.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from . import BALANCERS
from .context import BalanceContext
from .dirichlet import cf_steps
from .loss_free import update_selection_bias


class Balancer(nn.Module):
    def __init__(self, cfg, expert_sizes: list[int]):
        super().__init__()
        E = cfg.num_experts
        terms = {name: BALANCERS[name] for name in cfg.balance}
        # loss name → (unweighted loss fn, weight): the weights are named per term, not guessed.
        self.loss_terms = {name: (t.impl, float(getattr(cfg, t.weight)))
                           for name, t in terms.items() if t.kind == "loss"}
        self.uses_bias = "loss_free_bias" in terms
        self.bias_update_rate = cfg.bias_update_rate
        self.aux_loss_scope = cfg.aux_loss_scope
        self.global_scope = "aux_loss" in self.loss_terms and cfg.aux_loss_scope == "global_batch"
        # aux_loss_global_counts=counting_pass (aux_scope.py): a forward without gradients over
        # the step's micro-batches fills step_counts_E first (``counting``); after it the
        # counts are complete and the step's real forwards leave them alone.
        self.counts_step_first = self.global_scope and cfg.aux_loss_global_counts == "counting_pass"
        self.counting = False
        self.counts_complete = False
        self.process_group = None  # ranks whose tokens count as one batch (None: the default group)
        alpha = cfg.dirichlet_alpha_per_expert or [cfg.dirichlet_alpha] * E
        self.register_buffer("dirichlet_alpha_E", torch.tensor(alpha, dtype=torch.float64),
                             persistent=False)
        self.dirichlet_cf_steps = cf_steps(alpha)
        self.register_buffer("expert_sizes_E", torch.tensor(expert_sizes, dtype=torch.float64),
                             persistent=False)
        # Selection-only bias (loss-free balancing; DeepSeek-V3's e_score_correction_bias).
        self.register_buffer("selection_bias_E", torch.zeros(E))
        self.register_buffer("load_since_update_E", torch.zeros(E), persistent=False)
        self.register_buffer("step_counts_E", torch.zeros(E, dtype=torch.float64),
                             persistent=False)

    def selection_bias(self) -> torch.Tensor | None:
        """The bias the router adds to its scores for selection (None when nothing uses it)."""
        return self.selection_bias_E if self.uses_bias else None

    def reduce_across_ranks(self, counts_E: torch.Tensor) -> torch.Tensor:
        """Sum per-expert counts over the ranks of :attr:`process_group` (identity in a single
        process): the one place balance state crosses ranks."""
        if dist.is_available() and dist.is_initialized():
            counts_E = counts_E.clone()
            dist.all_reduce(counts_E, op=dist.ReduceOp.SUM, group=self.process_group)
        return counts_E

    @torch.no_grad()
    def observe(self, plan) -> None:
        """Record a training forward's routing: the router's choice (before any plan transform)
        feeds the loss-free bias and the step's global-batch counts."""
        counts_E = plan.tokens_per_expert()
        if self.counting:  # the counting pass: the step's counts, nothing else
            if self.global_scope:
                self.step_counts_E += self.reduce_across_ranks(counts_E.to(torch.float64))
            return
        if self.uses_bias:
            self.load_since_update_E += counts_E.to(self.load_since_update_E.dtype)
        if self.global_scope and not self.counts_complete:
            self.step_counts_E += self.reduce_across_ranks(counts_E.to(torch.float64))

    def context(self, plan, input_shape: tuple[int, ...]) -> BalanceContext:
        """What the losses need beyond the plan (see :class:`BalanceContext`); ``input_shape``
        is the layer input's, [..., S, d] when the tokens form sequences of S."""
        ctx = BalanceContext(aux_loss_scope=self.aux_loss_scope,
                             dirichlet_alpha_E=self.dirichlet_alpha_E,
                             dirichlet_cf_steps=self.dirichlet_cf_steps,
                             expert_sizes_E=self.expert_sizes_E)
        if self.aux_loss_scope == "sequence" and "aux_loss" in self.loss_terms:
            if len(input_shape) < 3:
                raise ValueError(f"aux_loss_scope=sequence needs input [..., S, d_model] with "
                                 f"sequences of S tokens (at least 3-D), got shape "
                                 f"{tuple(input_shape)}")
            seq_len = input_shape[-2]
            ctx.seq_shape = (plan.num_tokens // seq_len if seq_len else 0, seq_len)
        if self.aux_loss_scope == "global_batch" and self.training:
            # Includes this micro-batch (observe ran), and the whole step after a counting pass.
            ctx.step_counts_E = self.step_counts_E
        elif self.aux_loss_scope == "global_batch":
            ctx.aux_loss_scope = "micro_batch"
        return ctx

    def losses(self, plan, input_shape: tuple[int, ...]) -> tuple[torch.Tensor, dict]:
        """(weighted sum, {name: unweighted detached value}) of the balance losses of a plan."""
        aux = plan.probs_TE.new_zeros((), dtype=torch.float32)
        values = {}
        if not self.loss_terms:
            return aux, values
        if plan.num_tokens == 0:  # a mean over no tokens is NaN; nothing to balance
            return aux, {name: aux.detach() for name in self.loss_terms}
        ctx = self.context(plan, input_shape)
        for name, (fn, weight) in self.loss_terms.items():
            value = fn(plan, ctx)
            values[name] = value.detach()
            aux = aux + weight * value
        return aux, values

    @torch.no_grad()
    def begin_step(self) -> None:
        """Start an optimizer step: clear the global-batch counts."""
        self.step_counts_E.zero_()
        self.counts_complete = False

    def end_counting(self) -> None:
        """End the counting pass: the step's counts are complete."""
        self.counting = False
        self.counts_complete = True

    @torch.no_grad()
    def update(self) -> None:
        """After an optimizer step: move the loss-free bias from the load routed since the last
        update (summed over ranks, so every rank moves it identically), then start afresh."""
        if self.uses_bias:
            # No tokens since the last update (only evaluation ran): every load equals the
            # mean, 0, so sign(mean − load) is 0 and the bias does not move.
            update_selection_bias(self.selection_bias_E,
                                  self.reduce_across_ranks(self.load_since_update_E),
                                  self.bias_update_rate)
        self.load_since_update_E.zero_()
        self.step_counts_E.zero_()
        self.counts_complete = False
