"""Small helpers shared by the routers."""

from __future__ import annotations

import torch
from torch import nn


def require_zero_bias(router: str, selection_bias_E: torch.Tensor | None) -> None:
    """Routers that cannot use a selection bias accept only an all-zero one."""
    if selection_bias_E is not None and bool((selection_bias_E != 0).any()):
        raise ValueError(f"router={router} cannot use selection_bias_E (loss-free balancing); "
                         f"got a non-zero bias. Use a router that supports it (topk, grouped, "
                         f"null_experts, hypersphere) or remove loss_free_bias from moe.balance")


def finish_weights(weights_TK: torch.Tensor, mask_TK: torch.Tensor | None, renormalize: bool,
                   scaling: float, dtype: torch.dtype) -> torch.Tensor:
    """Zero empty slots, optionally renormalise each token's weights to sum to 1, scale."""
    if mask_TK is not None:
        weights_TK = weights_TK.masked_fill(~mask_TK, 0.0)
    if renormalize:
        weights_TK = weights_TK / weights_TK.sum(dim=-1, keepdim=True).clamp_min(1e-20)
    return (weights_TK * scaling).to(dtype)


def jittered(x_TD: torch.Tensor, jitter: float, training: bool) -> torch.Tensor:
    """Multiplicative uniform input noise at train time (Switch Transformer)."""
    if training and jitter > 0:
        return x_TD * torch.empty_like(x_TD).uniform_(1.0 - jitter, 1.0 + jitter)
    return x_TD


class Gate(nn.Linear):
    """A bias-free linear gate computed in its own dtype: a float32 router inside a bf16 model
    (as DeepSeek-V3 and other HF checkpoints keep it) sees float32 input and gives float32
    logits, instead of failing on mixed dtypes."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.to(self.weight.dtype))


def linear_gate(d_model: int, num_outputs: int) -> Gate:
    """The router's gate, initialised so logits start at unit scale."""
    gate = Gate(d_model, num_outputs, bias=False)
    nn.init.normal_(gate.weight, std=d_model ** -0.5)
    return gate
