"""Scopes of the Switch/GShard load-balancing loss L = α · E · Σ_i f_i · P_i.

f_i = fraction of routed slots that went to expert i (no gradient), P_i = mean router
probability of expert i; both equal 1/E under perfectly uniform routing, so L = α there.
What changes between scopes is the set of tokens f and P are counted over:

- ``micro_batch`` (the common implementation): f and P over the T tokens of one forward.
- ``sequence`` (DeepSeek-V3's complementary sequence-wise balance loss, arXiv 2412.19437
  §2.1.2): f and P per sequence, loss averaged over sequences. DeepSeek-V3 writes
  f_i = E/(K·S) · count_i and L = α Σ_i f_i P_i; with no empty slots that is our
  E · Σ_i (count_i / (K·S)) · P_i.
- ``global_batch`` (Qiu et al. 2025, "Demons in the Detail: On Implementing Load Balancing
  Loss for Training Specialized Mixture-of-Expert Models", arXiv 2501.11873): f_i from
  the counts of the whole global batch (every micro-batch of the optimizer step, summed
  over data-parallel ranks), P_i still from the current micro-batch:
  L = α · E · Σ_i f_i^global · P_i.

  Exact global f needs every micro-batch's counts before the first micro-batch's loss.
  Under gradient accumulation ``aux_loss_global_counts`` picks how they are had:

  - ``running`` (default): the paper's buffer. Qiu et al. synchronise f across the
    data-parallel ranks at every micro-batch and, when the global batch is reached by
    gradient accumulation, keep a buffer that accumulates the counts of the micro-batches
    of the step (the paper calls the result an approximation of the global batch). Here the
    buffer is ``Balancer.step_counts_E``, all-reduced over ranks at the Balancer's one
    reduction point (``Balancer.reduce_across_ranks``); micro-batch j's loss uses
    counts(0..j) — the counts so far, including its own. Micro-batch 0 therefore sees only
    its own counts (plain micro-batch balance, over the ranks), the last one the exact
    global f. We read the paper's summaries, not its code: whether its buffer includes the
    current micro-batch is our reading.
  - ``counting_pass``: exact. Before the step's first backward, ``train_step`` runs a
    forward without gradients over every micro-batch (``MoETransformer.count_step``) that only
    fills the buffer; every micro-batch's loss then uses the whole step's counts. The router
    does not change within a step, so these are the counts of the step's own routing, and a
    step of n equal micro-batches gives the gradient of one batch of n·B sequences. Costs
    one more forward per step; the random-number stream is restored after the pass, so
    routing in the pass equals routing in the step when jitter is on.

  With one micro-batch both equal the micro-batch scope over the ranks. The buffer is reset
  by ``MoE.begin_step()`` (the training loop calls it before each optimizer step;
  ``update_balancers()`` also clears it). In evaluation the scope is the micro-batch (no step
  is accumulating).
"""

from __future__ import annotations

import torch

from ..routing.plan import RoutingPlan

SCOPES = ("micro_batch", "sequence", "global_batch")
GLOBAL_COUNTS = ("running", "counting_pass")


def aux_loss_micro_batch(plan: RoutingPlan) -> torch.Tensor:
    E = plan.num_experts
    counts_E = plan.tokens_per_expert().to(plan.probs_TE.dtype)
    f_E = counts_E / counts_E.sum().clamp_min(1)
    return E * (f_E * plan.probs_TE.mean(dim=0)).sum()


def aux_loss_sequence(plan: RoutingPlan, num_sequences: int, seq_len: int) -> torch.Tensor:
    """E · mean_n Σ_i f_{n,i} · P_{n,i}, with f and P computed within sequence n."""
    E, T = plan.num_experts, plan.num_tokens
    if num_sequences * seq_len != T:
        raise ValueError(f"sequence scope: {num_sequences} sequences × {seq_len} tokens != "
                         f"{T} routed tokens")
    ids_NSK = plan.expert_ids_TK.reshape(num_sequences, seq_len, -1)
    valid = ids_NSK >= 0
    counts_NE = torch.zeros(num_sequences, E + 1, dtype=plan.probs_TE.dtype,
                            device=ids_NSK.device)
    # Empty slots go to a spare column E that is cut off.
    counts_NE.scatter_add_(1, torch.where(valid, ids_NSK, E).reshape(num_sequences, -1),
                           torch.ones_like(ids_NSK, dtype=counts_NE.dtype)
                           .reshape(num_sequences, -1))
    counts_NE = counts_NE[:, :E]
    f_NE = counts_NE / counts_NE.sum(dim=1, keepdim=True).clamp_min(1)
    P_NE = plan.probs_TE.reshape(num_sequences, seq_len, E).mean(dim=1)
    return E * (f_NE * P_NE).sum(dim=1).mean()


def aux_loss_global(plan: RoutingPlan, step_counts_E: torch.Tensor) -> torch.Tensor:
    """E · Σ_i f_i^global · P_i; ``step_counts_E`` = counts of the global batch so far."""
    counts_E = step_counts_E.detach().to(plan.probs_TE.dtype)
    f_E = counts_E / counts_E.sum().clamp_min(1)
    return plan.num_experts * (f_E * plan.probs_TE.mean(dim=0)).sum()

