"""Sinkhorn-balanced routing (BASE layers, Lewis et al., 2021, and S-BASE, Clark et al., 2022,
"Unified Scaling Laws for Routed Language Models").

Definition implemented (S-BASE style): Π = exp(logits_TE), rescaled by Sinkhorn–Knopp
iterations in the log domain towards the transport polytope with row sums 1 (each token
one unit of mass) and column sums T / E (each expert an equal share): per iteration the
columns are normalised, then the rows. Iteration stops after ``sinkhorn_iters`` or as soon
as every column sum is within relative tolerance ``sinkhorn_tol`` of T / E. Each token then
takes the top-k experts of the balanced Π (no gradient through selection; Π is computed
from detached logits). Combine weights are the softmax probabilities of the chosen experts
(renormalised when ``renormalize``), so the gate learns through them.

The balancing uses every token of the batch, so in a causal LM a token's routing depends
on the other tokens (BASE balances at training time; this router balances always). A
selection bias would fight the balancing, so only a zero bias is accepted.

Causal rule (:func:`~divmoe.routing.router.causal_routing`, for evaluation): each token
takes the top-k of its own logits, weighted as above — BASE layers' test-time rule (greedy
assignment to the best expert, no balancing).

Under expert parallelism each rank balances its own tokens (column sums T_rank / E), not the
whole batch (``divmoe.parallel.TOKEN_SETS``).
"""

from __future__ import annotations

import math

import torch

from ._common import finish_weights, jittered, linear_gate, require_zero_bias
from .plan import RoutingPlan
from .router import Router


@torch.no_grad()
def sinkhorn_log(logits_TE: torch.Tensor, iters: int, tol: float) -> tuple[torch.Tensor, int]:
    """Balanced log-plan log Π_TE (rows sum to 1, columns to T/E) and the iterations used."""
    T, E = logits_TE.shape
    log_pi_TE = logits_TE.double()
    log_col_target = math.log(T / E)
    used = 0
    for used in range(1, iters + 1):
        log_pi_TE = log_pi_TE - torch.logsumexp(log_pi_TE, dim=0, keepdim=True) + log_col_target
        log_pi_TE = log_pi_TE - torch.logsumexp(log_pi_TE, dim=1, keepdim=True)
        col_E = torch.logsumexp(log_pi_TE, dim=0).exp()
        if float((col_E / (T / E) - 1.0).abs().max()) <= tol:
            break
    return log_pi_TE, used


class SinkhornRouter(Router):
    settings = ("top_k", "sinkhorn_iters", "sinkhorn_tol", "renormalize", "routed_scaling",
                "jitter")
    batch_dependent = True

    def __init__(self, d_model: int, cfg):
        super().__init__()
        self.num_experts, self.top_k = cfg.num_experts, cfg.top_k
        self.iters, self.tol = cfg.sinkhorn_iters, cfg.sinkhorn_tol
        self.renormalize, self.routed_scaling, self.jitter = \
            cfg.renormalize, cfg.routed_scaling, cfg.jitter
        self.gate = linear_gate(d_model, cfg.num_experts)

    def forward(self, x_TD: torch.Tensor, selection_bias_E: torch.Tensor | None = None,
                token_ids_T: torch.Tensor | None = None, seq_len: int | None = None
                ) -> RoutingPlan:
        require_zero_bias("sinkhorn", selection_bias_E)
        logits_TE = self.gate(jittered(x_TD, self.jitter, self.training))
        probs_TE = logits_TE.float().softmax(dim=-1)
        if x_TD.shape[0] == 0:
            expert_ids_TK = torch.zeros(0, self.top_k, dtype=torch.long, device=x_TD.device)
        elif self.route_causally:
            expert_ids_TK = logits_TE.detach().topk(self.top_k, dim=-1).indices
        else:
            log_pi_TE, _ = sinkhorn_log(logits_TE.detach(), self.iters, self.tol)
            expert_ids_TK = log_pi_TE.topk(self.top_k, dim=-1).indices
        weights_TK = finish_weights(probs_TE.gather(1, expert_ids_TK), None, self.renormalize,
                                    self.routed_scaling, x_TD.dtype)
        return RoutingPlan(expert_ids_TK, weights_TK, probs_TE, logits_TE)
