"""What a balancing loss may need beyond the RoutingPlan: the layer builds one per forward."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class BalanceContext:
    """Per-forward inputs to balancing losses (all optional; a loss uses what it needs).

    - ``aux_loss_scope``: micro_batch | sequence | global_batch (see ``aux_scope``).
    - ``seq_shape``: (N sequences, S tokens each) for the sequence scope; T = N·S.
    - ``step_counts_E``: routed-slot counts of this optimizer step so far (all micro-batches,
      all data-parallel ranks), *including* the current micro-batch; global_batch scope.
    - ``expert_sizes_E``: parameter count of each routed expert (small_expert_bias).
    - ``dirichlet_alpha_E``: Dirichlet concentration per expert (dirichlet_prior).
    - ``dirichlet_cf_steps``: continued-fraction steps of its Beta CDF, fixed from the config
      so the forward reads nothing back from the device (None: derived from α).
    """

    aux_loss_scope: str = "micro_batch"
    seq_shape: tuple[int, int] | None = None
    step_counts_E: torch.Tensor | None = None
    expert_sizes_E: torch.Tensor | None = None
    dirichlet_alpha_E: torch.Tensor | None = None
    dirichlet_cf_steps: int | None = None
