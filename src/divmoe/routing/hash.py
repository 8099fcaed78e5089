"""Hash routing (Roller et al., 2021, "Hash Layers For Large Sparse Models"; the hash-router
baseline of LocMoE).

Definition implemented: a fixed, parameter-free hash of the token id chooses the experts.
For top_k > 1 each token takes the k experts with the smallest keys h(id, e), a fixed
pseudo-random ranking of the experts per id, so the k experts are distinct and, over
uniformly distributed ids, every expert is equally likely (Roller et al.'s "random hash";
their multi-hash variant also gives each of the k slots its own hash). Combine weights are
1 / k. The hash uses only int64 arithmetic modulo the prime 2^31 − 1, so it is identical
across runs, devices and processes. ``probs_TE`` puts 1/k on the chosen experts;
``logits_TE`` is all zeros (no parameters: balancing losses are constants).

Needs ``token_ids_T``; the selection bias must be zero.
"""

from __future__ import annotations

import torch

from ._common import require_zero_bias
from .plan import RoutingPlan
from .router import Router

_P = 2_147_483_647  # 2^31 − 1


def hash_keys(token_ids_T: torch.Tensor, num_experts: int) -> torch.Tensor:
    """keys_TE: a fixed pseudo-random integer in [0, 2^31 − 1) per (token id, expert)."""
    ids_T1 = token_ids_T.to(torch.int64).remainder(_P).unsqueeze(-1)
    e_1E = torch.arange(num_experts, dtype=torch.int64, device=token_ids_T.device).unsqueeze(0)
    h = (ids_T1 * 1_103_515_245 + e_1E * 40_503 + 12_345).remainder(_P)
    for a, b in ((48_271, 11), (69_621, 7)):  # two rounds of multiply-mod and xor-shift
        h = (h * a + b).remainder(_P)
        h = h ^ (h >> 13)
    return h


class HashRouter(Router):
    settings = ("top_k",)

    def __init__(self, d_model: int, cfg):
        super().__init__()
        self.num_experts, self.top_k = cfg.num_experts, cfg.top_k

    def forward(self, x_TD: torch.Tensor, selection_bias_E: torch.Tensor | None = None,
                token_ids_T: torch.Tensor | None = None, seq_len: int | None = None
                ) -> RoutingPlan:
        require_zero_bias("hash", selection_bias_E)
        if token_ids_T is None:
            raise ValueError("router=hash needs token ids: call MoE(x, token_ids=...) "
                             "(shape x.shape[:-1])")
        T, E, K = x_TD.shape[0], self.num_experts, self.top_k
        if tuple(token_ids_T.shape) != (T,):
            raise ValueError(f"token_ids_T must have shape ({T},), got {tuple(token_ids_T.shape)}")
        if token_ids_T.is_floating_point():
            raise ValueError(f"token_ids_T must be integer, got {token_ids_T.dtype}")
        keys_TE = hash_keys(token_ids_T.to(x_TD.device), E)
        expert_ids_TK = (-keys_TE).topk(K, dim=-1).indices  # the k smallest keys
        weights_TK = x_TD.new_full((T, K), 1.0 / K)
        probs_TE = torch.zeros(T, E, device=x_TD.device).scatter_(1, expert_ids_TK, 1.0 / K)
        logits_TE = torch.zeros(T, E, device=x_TD.device)
        return RoutingPlan(expert_ids_TK, weights_TK, probs_TE, logits_TE)
