"""Pruning experts: keep K of a layer's E experts, by routing frequency or by reconstruction.

Definitions implemented, per MoE layer:

* ``frequency`` (the baseline): keep the K experts chosen most often on calibration text.
* ``reconstruction`` (NAEE: Lu et al. 2024, "Not All Experts are Equal"): keep the subset S
  of K experts whose layer output is closest to the full layer's on the calibration inputs,
  ``min_S mean_t ||F(x_t) − F_S(x_t)||²``, where F_S routes with the router's rows of S only
  (top-k among them, renormalised as the layer is). Every subset is tried when there are at
  most :data:`EXHAUSTIVE_LIMIT` of them (E=8: at most 70); otherwise experts are removed
  greedily, each time the one whose removal raises the loss least.

The pruned layer is an ordinary top-k layer of K experts: the kept experts' weights, router
rows and selection bias. Dynamic skipping (``skip_ratio``) is the ``dynamic_skip`` plan
transform (:mod:`divmoe.balance.skip`), switched on in the pruned model's configuration.
"""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import torch

from ..config import ConfigError
from ..diagnostics.redundancy import probe_experts
from ..layer import MoE
from .calibrate import LayerCalibration
from .layer_edit import check_editable, rebuilt_moe
from .run_io import rewrite_moe_layers

METHODS = ("frequency", "reconstruction")
EXHAUSTIVE_LIMIT = 5000


def _routed_output(moe: MoE, logits_TE: torch.Tensor, y_ETD: torch.Tensor,
                   keep: list[int]) -> torch.Tensor:
    """The routed output of the layer restricted to experts ``keep`` (shared experts left
    out: pruning leaves them alone), from precomputed logits and expert outputs."""
    c, r = moe.config, moe.router
    logits_TS = logits_TE[:, keep].float()
    scores_TS = logits_TS.softmax(-1) if c.score_func == "softmax" else logits_TS.sigmoid()
    select_TS = scores_TS + moe.selection_bias_E[keep].float()
    ids_TK = select_TS.topk(min(r.top_k, len(keep)), dim=-1).indices
    w_TK = scores_TS.gather(1, ids_TK)
    if c.renormalize:
        w_TK = w_TK / w_TK.sum(-1, keepdim=True).clamp_min(1e-20)
    w_TK = w_TK * c.routed_scaling
    y_STD = y_ETD[keep].double()
    T = logits_TE.shape[0]
    picked_TKD = y_STD[ids_TK, torch.arange(T).unsqueeze(1)]
    return (w_TK.double().unsqueeze(-1) * picked_TKD).sum(1)


@torch.no_grad()
def reconstruction_subset(moe: MoE, x_TD: torch.Tensor, keep: int) -> tuple[list[int], float, str]:
    """(the K experts to keep, their mean squared reconstruction error, "exhaustive"|"greedy")."""
    E = moe.config.num_experts
    y_ETD = probe_experts(moe, x_TD)
    logits_TE = moe.router.gate(x_TD.to(moe.router.gate.weight.dtype))
    full_TD = _routed_output(moe, logits_TE, y_ETD, list(range(E)))

    def loss(subset) -> float:
        diff = _routed_output(moe, logits_TE, y_ETD, list(subset)) - full_TD
        return float(diff.square().sum(-1).mean())

    if math.comb(E, keep) <= EXHAUSTIVE_LIMIT:
        best = min(itertools.combinations(range(E), keep), key=lambda s: (loss(s), s))
        return list(best), loss(best), "exhaustive"
    current = list(range(E))
    while len(current) > keep:
        drop = min(current, key=lambda e: (loss([x for x in current if x != e]), e))
        current.remove(drop)
    return current, loss(current), "greedy"


@torch.no_grad()
def prune_moe(moe: MoE, calib: LayerCalibration, keep: int, method: str = "frequency",
              skip_ratio: float = 0.0) -> tuple[MoE, dict]:
    """``moe`` with only ``keep`` experts (chosen by ``method``) and, with ``skip_ratio`` > 0,
    dynamic skipping switched on. Returns the new layer and what was kept."""
    check_editable(moe, "prune")
    c = moe.config
    if c.router != "topk":
        raise ConfigError("prune: moe.router='merged_topk' (a merged model) is not supported; "
                          "prune the model before merging it")
    if method not in METHODS:
        raise ConfigError(f"--method {method!r} is not allowed: expected one of {', '.join(METHODS)}")
    if not c.top_k <= keep <= c.num_experts:
        raise ConfigError(f"--keep {keep} is not allowed: the layer has {c.num_experts} experts "
                          f"and routes each token to top_k={c.top_k}, so give {c.top_k} to "
                          f"{c.num_experts}")
    if not 0.0 <= skip_ratio < 1.0:
        raise ConfigError(f"--skip-ratio {skip_ratio} is not allowed: give 0 (off) up to but "
                          f"excluding 1")
    info: dict = {"method": method, "usage": calib.counts_E.tolist()}
    if method == "frequency":
        order = sorted(range(c.num_experts), key=lambda e: (-int(calib.counts_E[e]), e))
        kept = sorted(order[:keep])
    else:
        kept, err, search = reconstruction_subset(moe, calib.x_TD, keep)
        info.update(reconstruction_mse=err, search=search)
    changes = {}
    if skip_ratio > 0:
        changes = dict(skip_ratio=skip_ratio,
                       balance=[*[b for b in c.balance if b != "dynamic_skip"], "dynamic_skip"])
    new = rebuilt_moe(moe, moe.experts.w_in_EDH2[kept], moe.experts.w_out_EHD[kept],
                      moe.router.gate.weight[kept], moe.selection_bias_E[kept], **changes)
    info["kept"] = kept
    return new, info


def prune_run(run: str | Path, out: str | Path, keep: int, method: str = "frequency",
              skip_ratio: float = 0.0, calibration_sequences: int = 64, settings: list[str] = ()) -> dict:
    """``divmoe prune``: prune every MoE layer of a run's model and write a new run."""
    return rewrite_moe_layers(
        run, out, lambda moe, cal: prune_moe(moe, cal, keep, method, skip_ratio),
        {"transform": "prune", "keep": keep, "method": method, "skip_ratio": skip_ratio},
        calibration_sequences, settings, "prune")
