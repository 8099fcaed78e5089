"""Expert-diversity regularisers (training losses) and the expert-output Vendi probe.

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

Expert-output Vendi (evaluation only, see :func:`expert_output_vendi`): the E experts of a
layer are the items; expert e's feature vector is its output on a fixed probe set, centred
over the probe tokens and flattened, ``f_e = vec(Y_e − mean_p Y_e) ∈ R^{P·D}``; the Vendi
score of the cosine kernel of the f_e (linear CKA-like similarity of the experts' functions
on the probe) ranges from 1 (all experts compute the same function up to scale) to E. This
is the definition of :func:`divmoe.diagnostics.diversity.expert_output_vendi` (``divmoe
analyze``), so training-time and post-hoc numbers agree; here an expert whose output is
constant on the probe (nothing to normalise) counts as distinct instead of raising.
The training loop logs it per evaluation on a fixed probe (the first ⌈256 / seq_len⌉
validation windows of every domain): metrics keys ``expert_vendi`` (mean over MoE layers) and
``expert_vendi_by_layer``, computed from the hidden states entering each MoE layer (forward
pre-hooks during one extra eval-mode forward; nothing runs in the training step).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["DIVERSITY_REGULARIZERS", "probe_rows", "all_expert_outputs", "exclusivity",
           "output_divergence", "diversity_losses", "expert_output_vendi"]

_EPS = 1e-8


def probe_rows(num_tokens: int, probe_tokens: int, device=None) -> torch.Tensor:
    """Indices of the probe: ``min(probe_tokens, T)`` distinct tokens, uniformly at random."""
    if probe_tokens >= num_tokens:
        return torch.arange(num_tokens, device=device)
    return torch.randperm(num_tokens, device=device)[:probe_tokens]


def all_expert_outputs(experts, x_PD: torch.Tensor) -> torch.Tensor:
    """Every routed expert on every row: ``Y_EPD`` [E, P, D] (differentiable)."""
    n = len(experts.expert_sizes())
    return torch.stack([experts.expert(e, x_PD) for e in range(n)])


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


def diversity_losses(experts, x_TD: torch.Tensor, expert_ids_TK: torch.Tensor,
                     names, probe_tokens: int) -> dict[str, torch.Tensor]:
    """The unweighted regularisers ``names`` on one shared random probe of the layer input."""
    rows = probe_rows(x_TD.shape[0], probe_tokens, device=x_TD.device)
    y_EPD = all_expert_outputs(experts, x_TD[rows])
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


DIVERSITY_REGULARIZERS = ["divergence", "exclusivity"]


@torch.no_grad()
def expert_output_vendi(experts, x_PD: torch.Tensor) -> float:
    """Vendi score across experts of their centred, flattened outputs on the probe ``x_PD``."""
    from .vendi import vendi_from_features

    y_EPD = all_expert_outputs(experts, x_PD).float()
    f_EF = (y_EPD - y_EPD.mean(1, keepdim=True)).reshape(y_EPD.shape[0], -1)
    dead = f_EF.norm(dim=1) <= _EPS  # an expert with constant output: give it its own axis
    if bool(dead.any()):
        f_EF = torch.cat([f_EF, torch.zeros(f_EF.shape[0], int(dead.sum()))], dim=1)
        f_EF[dead.nonzero().squeeze(1), f_EF.shape[1] - int(dead.sum())
             + torch.arange(int(dead.sum()))] = 1.0
    return vendi_from_features(f_EF)
