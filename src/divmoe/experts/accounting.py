"""Activated-parameter accounting: the parameters each token actually touched.

A token touches the router, the shared experts, and each *distinct* real expert it was
routed to. Empty slots (expert id −1: null experts, dropped slots, routers that chose fewer
than K) touch nothing and count zero — null experts "do nothing and cost nothing". A token
routed twice to the same expert touches that expert's parameters once. Layouts with a base
shared by all experts (LoRA experts over a frozen MLP) pass ``base_params``: counted once per
distinct real expert of the token, because each LoRA expert runs the frozen base inside its
own nonlinearity (silu(x W + x A B)), so k experts compute it k times — counting it once
would make LoRA experts look k times cheaper per base than they run.
"""

from __future__ import annotations

from typing import Sequence

import torch


def activated_params_per_token(ids_TK: torch.Tensor, sizes_E: torch.Tensor, fixed_params: int = 0,
                               base_params: int = 0) -> torch.Tensor:
    """[T] int64: parameters each token touched (no checks, no host reads: the layer's form).

    ``ids_TK``: expert ids (−1 = empty slot); ``sizes_E``: int64 parameters per expert;
    ``fixed_params``: router + shared experts, touched by every token.
    """
    ids_sorted, _ = ids_TK.detach().sort(dim=-1)
    first = torch.ones_like(ids_sorted, dtype=torch.bool)
    first[:, 1:] = ids_sorted[:, 1:] != ids_sorted[:, :-1]          # count each expert once
    real = (ids_sorted >= 0) & first
    per_slot = torch.where(real, sizes_E[ids_sorted.clamp(min=0)], torch.zeros_like(ids_sorted))
    per_token_T = per_slot.sum(-1) + int(fixed_params)
    if base_params:
        per_token_T = per_token_T + int(base_params) * real.sum(-1).to(torch.int64)
    return per_token_T


def activated_params(plan, expert_sizes: Sequence[int] | torch.Tensor, shared_params: int = 0,
                     router_params: int = 0, base_params: int = 0
                     ) -> tuple[float, torch.Tensor]:
    """``(mean, per_token_T)``: activated parameters per token ([T] int64) and their mean.

    ``plan`` is a RoutingPlan or an ``expert_ids_TK`` tensor (−1 = empty slot); the ids are
    checked against the number of expert sizes.
    """
    ids_TK = plan if isinstance(plan, torch.Tensor) else plan.expert_ids_TK
    ids_TK = ids_TK.detach()
    if ids_TK.dim() == 1:
        ids_TK = ids_TK.unsqueeze(-1)
    sizes_E = torch.as_tensor(expert_sizes, dtype=torch.int64, device=ids_TK.device)
    E = sizes_E.numel()
    if ids_TK.numel() and (int(ids_TK.max()) >= E or int(ids_TK.min()) < -1):
        raise ValueError(f"expert ids must be in [-1, {E}) for {E} expert sizes, got "
                         f"[{int(ids_TK.min())}, {int(ids_TK.max())}]")
    per_token_T = activated_params_per_token(ids_TK, sizes_E, int(shared_params) + int(router_params),
                                             base_params)
    mean = float(per_token_T.double().mean()) if ids_TK.shape[0] else 0.0
    return mean, per_token_T
