"""One optimizer step of the LM: the step ``divmoe train``, ``divmoe bench --train`` and the
tests all run.

Per step: set the learning rate (if given), clear gradients, start the Balancer's step
(and, for ``moe.aux_loss_global_counts=counting_pass``, count the step's routing in a
forward without gradients), then for every micro-batch forward with targets (the model
computes the cross-entropy) and backward (ce + aux) / n, summing each MoE layer's
routed-slot counts over the micro-batches (the training batch's load); one finite check of
the step's loss (the step's only host read), gradient-norm clip, optimizer step, balancer
update.

With ``ranks`` (a distributed run, :mod:`divmoe.parallel.ranks`) each rank passes its own
shard of every micro-batch; after the backward passes the gradients are reduced over the
ranks, the loss is averaged over them (so every rank makes the same finite check and
reports the run's loss), and the clip uses the norm of the whole model's gradient.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import torch

from ..balance.loss_free import max_vio


class StepResult(NamedTuple):
    loss: torch.Tensor   # mean cross-entropy over the micro-batches (nats, detached, 0-dim)
    stats: list          # RoutingStats of the last micro-batch, one per MoE block
    load_LE: torch.Tensor  # [L MoE blocks, E] float64 routed slots of the whole step's batch
                           # (all micro-batches, all ranks): its MaxVio is the Loss-Free
                           # Balancing paper's MaxVio_batch


def batch_max_vio(load_LE: torch.Tensor) -> torch.Tensor:
    """Mean over MoE layers of MaxVio of a training batch's loads (0-dim float64 tensor)."""
    return torch.stack([max_vio(load_E) for load_E in load_LE]).mean()


def train_step(model, optimizer: torch.optim.Optimizer, micro_batches: Sequence[torch.Tensor],
               grad_clip: float = 0.0, lr: float | None = None, ranks=None) -> StepResult:
    """``micro_batches``: token windows [B, S+1] each (inputs ``[:, :-1]``, targets ``[:, 1:]``).

    Raises FloatingPointError, before the optimizer step, if the loss is not finite: the
    parameters are left as they were.
    """
    if lr is not None:
        for group in optimizer.param_groups:
            group["lr"] = lr
    optimizer.zero_grad(set_to_none=True)
    model.begin_step()  # global-batch balancing counts start afresh each step
    n = len(micro_batches)
    if n > 1:  # with one micro-batch its running counts are already the step's
        model.count_step([tokens[:, :-1] for tokens in micro_batches])
    ce_sum = total_sum = load_LE = 0.0
    stats = []
    for tokens in micro_batches:
        out = model(tokens[:, :-1], tokens[:, 1:])
        loss = out.loss + out.aux_loss
        (loss / n).backward()
        ce_sum = ce_sum + out.loss.detach()
        total_sum = total_sum + loss.detach()
        stats = out.stats
        if stats:
            load_LE = load_LE + torch.stack([s.tokens_per_expert.double() for s in stats])
    if not stats:  # a dense model
        load_LE = torch.zeros(0, 0, dtype=torch.float64)
    if ranks is not None:
        from ..parallel.ranks import clip_grad_norm, sync_gradients

        sync_gradients(model, ranks)
        both = ranks.sum(torch.stack([ce_sum, total_sum]).double()) / ranks.world
        ce_sum, total_sum = both[0].to(ce_sum.dtype), both[1]
        if load_LE.numel():
            load_LE = ranks.sum(load_LE)
    if not torch.isfinite(total_sum):
        raise FloatingPointError(f"loss became {float(total_sum / n)}")
    if grad_clip > 0 and ranks is not None:
        clip_grad_norm(model, grad_clip, ranks)
    elif grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    model.update_balancers()
    return StepResult(ce_sum / n, stats, load_LE)
