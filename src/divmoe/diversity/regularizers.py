"""Expert-diversity regularisers: training losses on the experts' outputs.

Both regularisers are computed on a *probe* of P tokens drawn uniformly at random (without
replacement, from the global torch RNG, so checkpointed runs resume exactly) from the
layer's input, ``P = min(moe.diversity_probe_tokens, T)``. Every routed expert is run on
every probe token — ``Y_EPD = [expert_e(x_p)]`` — which costs E·P extra expert rows per
layer and forward (64·8 = 512 rows against T·k = 4096 routed rows at the default run size)
and lets the penalty compare experts *on the same inputs*. The probe is drawn only when a
regulariser is switched on and the layer is training; off (the default), nothing runs.

Definitions implemented
-----------------------
* ``exclusivity`` — MMoEEx (Aoki et al. 2021, "Heterogeneous Multi-task Learning with
  Expert Diversity") "induce[s] more diversity among experts" with an *exclusivity mask* on
  the task→expert gates. That mask is a multi-task construction (experts reserved for one
  task); a single-task LM has no tasks to reserve experts for, so it is not implemented.
  What is implemented is the output-orthogonality reading of the same goal:

      L_excl = mean_{p} mean_{i≠j} cos(y_i(x_p), y_j(x_p))²

  the mean squared off-diagonal cosine similarity between the E experts' outputs on the
  same probe token. 1 when all experts compute the same function (direction), 0 when their
  outputs are mutually orthogonal on every probe token. Range [0, 1]; minimise.
* ``divergence`` — maximise the Jensen–Shannon divergence between the *output
  distributions* of the experts a token is routed to. An expert's output y ∈ R^D is turned
  into a distribution over the D features by ``softmax(y)`` (a categorical over feature
  coordinates; the reading of "output distribution" for a regression-valued expert). For
  each probe token with ≥ 2 distinct routed experts (after capacity / drops; null and
  empty slots excluded) and each unordered pair (i, j) of them:

      L_div = − mean_{(p, i, j)} JS(softmax(y_i(x_p)) ‖ softmax(y_j(x_p)))   (nats)

  JS ∈ [0, ln 2], so L_div ∈ [−ln 2, 0]: 0 (the maximal penalty) when the routed experts
  agree, −ln 2 when their output distributions have disjoint support. Probe tokens with
  fewer than two routed experts contribute nothing; with none such, the loss is 0.
  Unweighted (not by router weight), so the penalty acts on the experts, not the router.

The expert-output Vendi score that ``divmoe train`` logs and ``divmoe analyze`` reports is
one function, :func:`divmoe.diagnostics.diversity.expert_output_vendi`, over the same expert
probe (:func:`divmoe.experts.every_expert`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..experts.layout import every_expert

__all__ = ["DIVERSITY_REGULARIZERS", "DiversityRegularizers", "probe_rows", "exclusivity",
           "output_divergence", "diversity_losses"]

_EPS = 1e-8


def probe_rows(num_tokens: int, probe_tokens: int, device=None) -> torch.Tensor:
    """Indices of the probe: ``min(probe_tokens, T)`` distinct tokens, uniformly at random."""
    if probe_tokens >= num_tokens:
        return torch.arange(num_tokens, device=device)
    return torch.randperm(num_tokens, device=device)[:probe_tokens]


def exclusivity(y_EPD: torch.Tensor) -> torch.Tensor:
    """Mean squared off-diagonal cosine similarity between experts' outputs on the same rows."""
    E = y_EPD.shape[0]
    if E < 2 or y_EPD.shape[1] == 0:
        return y_EPD.new_zeros((), dtype=torch.float32)
    u_PED = F.normalize(y_EPD.float(), dim=-1, eps=_EPS).transpose(0, 1)
    cos_PEE = u_PED @ u_PED.transpose(1, 2)
    off = ~torch.eye(E, dtype=torch.bool, device=y_EPD.device)
    return cos_PEE[:, off].square().mean()


def output_divergence(y_EPD: torch.Tensor, expert_ids_PK: torch.Tensor) -> torch.Tensor:
    """− mean pairwise JS (nats) between softmax(output) of the experts each row is routed to.

    ``expert_ids_PK`` holds each probe row's routed experts (−1 = empty/null slot).
    """
    E, P, _ = y_EPD.shape
    logp_EPD = F.log_softmax(y_EPD.float(), dim=-1)
    K = expert_ids_PK.shape[1]
    js_terms = []
    for a in range(K):
        for b in range(a + 1, K):
            ia, ib = expert_ids_PK[:, a], expert_ids_PK[:, b]
            ok = (ia >= 0) & (ib >= 0) & (ia != ib)
            if not bool(ok.any()):
                continue
            rows = ok.nonzero().squeeze(1)
            lp = logp_EPD[ia[rows], rows]      # [n, D]
            lq = logp_EPD[ib[rows], rows]
            lm = torch.logaddexp(lp, lq) - torch.log(torch.tensor(2.0))
            js = 0.5 * ((lp.exp() * (lp - lm)).sum(-1) + (lq.exp() * (lq - lm)).sum(-1))
            js_terms.append(js)
    if not js_terms:
        return y_EPD.new_zeros((), dtype=torch.float32)
    return -torch.cat(js_terms).mean()


# name → the MoEConfig field that weights it (explicit, not derived from the name).
DIVERSITY_REGULARIZERS = {"divergence": "divergence_weight", "exclusivity": "exclusivity_weight"}


def diversity_losses(experts, x_TD: torch.Tensor, expert_ids_TK: torch.Tensor,
                     names, probe_tokens: int) -> dict[str, torch.Tensor]:
    """The unweighted regularisers ``names`` on one shared random probe of the layer input."""
    rows = probe_rows(x_TD.shape[0], probe_tokens, device=x_TD.device)
    y_EPD = every_expert(experts, x_TD[rows])
    out = {}
    for name in names:
        if name == "exclusivity":
            out[name] = exclusivity(y_EPD)
        elif name == "divergence":
            out[name] = output_divergence(y_EPD, expert_ids_TK[rows])
        else:
            raise ValueError(f"unknown diversity regulariser {name!r}; allowed: "
                             f"{', '.join(DIVERSITY_REGULARIZERS)}")
    return out


class DiversityRegularizers:
    """The regularisers of ``moe.diversity``, weighted, as the layer's loss step runs them:
    training forwards only (with tokens); evaluation adds nothing."""

    def __init__(self, cfg):
        self.weights = {name: float(getattr(cfg, DIVERSITY_REGULARIZERS[name]))
                        for name in cfg.diversity}
        self.probe_tokens = cfg.diversity_probe_tokens

    def __call__(self, experts, x_TD: torch.Tensor, plan, training: bool
                 ) -> tuple[torch.Tensor | float, dict]:
        if not (self.weights and training and plan.num_tokens):
            return 0.0, {}
        values = diversity_losses(experts, x_TD, plan.expert_ids_TK, self.weights,
                                  self.probe_tokens)
        aux = sum(self.weights[n] * v for n, v in values.items())
        return aux, {n: v.detach() for n, v in values.items()}
