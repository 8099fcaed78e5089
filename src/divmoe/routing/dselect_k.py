"""DSelect-k gate (Hazimeh et al., 2021, "DSelect-k: Differentiable Selection in the Mixture
of Experts with Applications to Multi-Task Learning"), per-example version.

Definition implemented: E experts get binary codes of m = ceil(log2 E) bits. The gate has k
selectors; selector i produces m logits z_i(x) (a linear map of x) and puts weight
r_i(e) = Π_b [S(z_ib) if bit b of e is 1 else 1 − S(z_ib)] on expert e, where S is the
smooth step S(t) = 0 for t ≤ −γ/2, 1 for t ≥ γ/2, and −2t³/γ³ + 3t/(2γ) + 1/2 in between
(γ = ``dselect_gamma``). The selectors are mixed by α(x) = softmax over the k selectors:
w_e = Σ_i α_i r_i(e). When E is not a power of two, code c ≥ E is folded onto expert c − E
(a choice of this implementation: every selector stays a distribution over the E experts
and a saturated selector is one-hot on a real expert; experts 0..2^m − E − 1 own two codes).
Once every S saturates (z outside ±γ/2) each selector is one-hot, so at most k experts get
weight; before that the gate is dense, exactly as in the paper.

The plan lists each token's experts with non-zero weight (best first), padded with −1 to
K = the largest count of any token (up to E while the gate is still dense).
``probs_TE`` = w (rows sum to 1); ``logits_TE`` = log w, so z-loss is 0 for this gate.
Not implemented: the paper's entropy regulariser that speeds up sparsification.
The selection bias must be zero.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ._common import finish_weights, jittered, require_zero_bias
from .plan import RoutingPlan
from .router import Router


def smooth_step(t: torch.Tensor, gamma: float) -> torch.Tensor:
    """Cubic smooth step: 0 below −γ/2, 1 above γ/2, C¹ in between."""
    inner = -2.0 / gamma ** 3 * t ** 3 + 1.5 / gamma * t + 0.5
    return torch.where(t <= -gamma / 2, torch.zeros_like(t),
                       torch.where(t >= gamma / 2, torch.ones_like(t), inner))


class DSelectKRouter(Router):
    settings = ("top_k", "dselect_gamma", "routed_scaling", "jitter")

    def __init__(self, d_model: int, cfg):
        super().__init__()
        self.num_experts, self.top_k, self.gamma = cfg.num_experts, cfg.top_k, cfg.dselect_gamma
        self.routed_scaling, self.jitter = cfg.routed_scaling, cfg.jitter
        self.num_bits = max(1, math.ceil(math.log2(cfg.num_experts)))
        self.selector_logits = nn.Linear(d_model, cfg.top_k * self.num_bits, bias=True)
        self.selector_weights = nn.Linear(d_model, cfg.top_k, bias=True)
        nn.init.uniform_(self.selector_logits.weight, -self.gamma / 100, self.gamma / 100)
        nn.init.uniform_(self.selector_logits.bias, -self.gamma / 100, self.gamma / 100)
        # codes_CM[c, b] = bit b of code c (C = 2^m codes); expert_of_code_C folds c ≥ E.
        C = 2 ** self.num_bits
        codes = (torch.arange(C).unsqueeze(-1) >> torch.arange(self.num_bits)) & 1
        self.register_buffer("codes_CM", codes.float(), persistent=False)
        expert_of_code = torch.arange(C) % cfg.num_experts
        self.register_buffer("expert_of_code_C", expert_of_code, persistent=False)

    def forward(self, x_TD: torch.Tensor, selection_bias_E: torch.Tensor | None = None,
                token_ids_T: torch.Tensor | None = None, seq_len: int | None = None
                ) -> RoutingPlan:
        require_zero_bias("dselect_k", selection_bias_E)
        T, E, k, m = x_TD.shape[0], self.num_experts, self.top_k, self.num_bits
        x_TD = jittered(x_TD, self.jitter, self.training)
        s_TkM = smooth_step(self.selector_logits(x_TD).float().view(T, k, m), self.gamma)
        # r_TkC[t, i, c] = Π_b (s if bit b of c else 1 − s): a distribution over the codes.
        codes_CM = self.codes_CM.to(s_TkM.dtype)
        factors_TkCM = s_TkM.unsqueeze(2) * codes_CM + (1 - s_TkM.unsqueeze(2)) * (1 - codes_CM)
        r_TkC = factors_TkCM.prod(dim=-1)
        r_TkE = r_TkC.new_zeros(T, k, E).index_add(2, self.expert_of_code_C, r_TkC)
        alpha_Tk = self.selector_weights(x_TD).float().softmax(dim=-1)
        probs_TE = (alpha_Tk.unsqueeze(-1) * r_TkE).sum(dim=1)

        active_TE = probs_TE.detach() > 0
        K = max(1, int(active_TE.sum(dim=1).max())) if T else 1
        expert_ids_TK = probs_TE.detach().topk(min(K, E), dim=-1).indices
        filled_TK = active_TE.gather(1, expert_ids_TK)
        weights_TK = finish_weights(probs_TE.gather(1, expert_ids_TK), filled_TK, False,
                                    self.routed_scaling, x_TD.dtype)
        expert_ids_TK = expert_ids_TK.masked_fill(~filled_TK, -1)
        logits_TE = probs_TE.clamp_min(1e-20).log()
        return RoutingPlan(expert_ids_TK, weights_TK, probs_TE, logits_TE)
