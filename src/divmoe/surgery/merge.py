"""Merging experts by routing statistics (MC-SMoE: Li et al. 2024, "Merge, Then Compress").

Definition implemented, per MoE layer with E experts merged into M:
  1. Dominant experts: the M most used on calibration text (usage = top-k slots chosen;
     ties → lower id).
  2. Groups: every other expert joins the dominant expert whose outputs are most alike on
     the calibration inputs, by linear CKA (the similarity ``divmoe analyze`` ranks merge
     candidates by, :func:`divmoe.diagnostics.redundancy.output_cka`; MC-SMoE compares
     router logits, an equally cheap proxy).
  3. Alignment: each member's hidden units are permuted to match the dominant expert's
     (weight matching: one linear assignment on the similarity of each unit's gate, up and
     down weights), since two MLPs can compute the same function with their units in any order.
  4. Merge: the group's aligned weights averaged, weighted by usage (equal weights when no
     member was used).
  5. Router: ``router_mode="remap"`` keeps every original row and sends its choices to its
     group's merged expert (router ``merged_topk``: every token reaches the expert its
     choice was merged into; merging identical experts changes nothing). ``"dominant"``
     keeps one row per merged expert, the dominant expert's (a plain top-k router of M rows,
     what a Hugging Face model with M experts can hold; tokens whose choice was merged away
     then pick among the dominant rows).
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..config import ConfigError
from ..diagnostics.redundancy import output_cka, probe_experts
from ..layer import MoE
from .calibrate import LayerCalibration
from .layer_edit import check_editable, rebuilt_moe
from .run_io import rewrite_moe_layers

ROUTER_MODES = ("remap", "dominant")


def group_experts(usage_E: torch.Tensor, similarity_EE: torch.Tensor, m: int) -> list[list[int]]:
    """Groups around the ``m`` most-used experts (dominant first in each group, groups in
    the dominant experts' id order); every other expert joins its most similar dominant one."""
    E = usage_E.shape[0]
    order = sorted(range(E), key=lambda e: (-float(usage_E[e]), e))
    dominant = sorted(order[:m])
    groups = {d: [d] for d in dominant}
    for e in sorted(order[m:]):
        best = max(dominant, key=lambda d: (float(similarity_EE[e, d]), -d))
        groups[best].append(e)
    return [groups[d] for d in dominant]


def unit_permutation(ref_in_DH2: torch.Tensor, ref_out_HD: torch.Tensor,
                     w_in_DH2: torch.Tensor, w_out_HD: torch.Tensor) -> torch.Tensor:
    """The permutation ``p`` of an expert's hidden units that best matches the reference's:
    unit ``p[h]`` of the expert plays the role of the reference's unit ``h`` (maximises the
    summed inner products of each unit's gate column, up column and down row)."""
    try:
        from scipy.optimize import linear_sum_assignment
    except ImportError:
        raise ImportError("merging with alignment needs scipy (pip install 'divmoe[surgery]'), "
                          "or merge without it (--no-align)") from None
    H = ref_out_HD.shape[0]

    def features(w_in, w_out):  # [H, 3·D]: everything that touches hidden unit h
        return torch.cat([w_in[:, :H].T, w_in[:, H:].T, w_out], dim=1).double()

    score_HH = features(ref_in_DH2, ref_out_HD) @ features(w_in_DH2, w_out_HD).T
    rows, cols = linear_sum_assignment(score_HH.cpu().numpy(), maximize=True)
    return torch.as_tensor(cols[rows.argsort()], dtype=torch.int64)


def _permuted(w_in_DH2: torch.Tensor, w_out_HD: torch.Tensor, p_H: torch.Tensor):
    H = w_out_HD.shape[0]
    p = p_H.to(w_in_DH2.device)
    return torch.cat([w_in_DH2[:, :H][:, p], w_in_DH2[:, H:][:, p]], dim=1), w_out_HD[p]


@torch.no_grad()
def merge_moe(moe: MoE, calib: LayerCalibration, experts: int, router_mode: str = "remap",
              align: bool = True) -> tuple[MoE, dict]:
    """``moe`` with its experts merged into ``experts`` (steps in the module docstring).
    Returns the new layer and what was done (groups, usage)."""
    check_editable(moe, "merge")
    c = moe.config
    E = c.num_experts
    if router_mode not in ROUTER_MODES:
        raise ConfigError(f"router_mode={router_mode!r}: expected one of {', '.join(ROUTER_MODES)}")
    if not 1 <= experts <= E:
        raise ConfigError(f"--experts-per-layer {experts} is not allowed: the layer has {E} "
                          f"experts, so give 1 to {E}")
    if router_mode == "dominant" and c.top_k > experts:
        raise ConfigError(f"--experts-per-layer {experts} is below moe.top_k={c.top_k}: with "
                          f"one router row per merged expert a token needs at least top_k "
                          f"experts (or keep the rows with router_mode='remap')")
    usage_E = calib.counts_E.double()
    similarity_EE = output_cka(probe_experts(moe, calib.x_TD))
    groups = group_experts(usage_E, similarity_EE, experts)
    w_in, w_out = moe.experts.w_in_EDH2, moe.experts.w_out_EHD
    merged_in, merged_out = [], []
    for members in groups:
        d = members[0]
        weights = usage_E[members]
        weights = weights / weights.sum() if weights.sum() > 0 else torch.full_like(weights, 1 / len(members))
        acc_in = torch.zeros_like(w_in[d], dtype=torch.float64)
        acc_out = torch.zeros_like(w_out[d], dtype=torch.float64)
        for e, a in zip(members, weights.tolist()):
            e_in, e_out = w_in[e], w_out[e]
            if align and e != d:
                e_in, e_out = _permuted(e_in, e_out, unit_permutation(w_in[d], w_out[d], e_in, e_out))
            acc_in += a * e_in.double()
            acc_out += a * e_out.double()
        merged_in.append(acc_in.to(w_in.dtype))
        merged_out.append(acc_out.to(w_out.dtype))
    expert_of = {e: g for g, members in enumerate(groups) for e in members}
    gate = moe.router.gate.weight
    bias_E = moe.selection_bias_E[[m[0] for m in groups]]
    if router_mode == "remap":
        # A merged model's rows already point at experts: compose with the new groups.
        old_rows = (moe.router.expert_of_row_R.tolist() if c.router == "merged_topk"
                    else list(range(E)))
        changes = dict(router="merged_topk", router_rows=len(old_rows))
        router_state = {"expert_of_row_R": torch.tensor([expert_of[r] for r in old_rows])}
        gate_RD = gate
    else:
        if c.router == "merged_topk":
            raise ConfigError("merge: router_mode='dominant' needs a plain top-k router; this "
                              "layer was merged with router_mode='remap' before")
        changes, gate_RD, router_state = {}, gate[[m[0] for m in groups]], None
    new = rebuilt_moe(moe, torch.stack(merged_in), torch.stack(merged_out), gate_RD, bias_E,
                      router_state, **changes)
    info = {"groups": groups, "usage": calib.counts_E.tolist(), "router_mode": router_mode,
            "aligned": align}
    return new, info


def merge_run(run: str | Path, out: str | Path, experts: int, router_mode: str = "remap",
              align: bool = True, calibration_sequences: int = 64, settings: list[str] = ()) -> dict:
    """``divmoe merge``: merge every MoE layer of a run's model to ``experts`` experts and
    write the result as a new run (:mod:`divmoe.surgery.run_io`). Returns surgery.json's dict."""
    return rewrite_moe_layers(
        run, out, lambda moe, cal: merge_moe(moe, cal, experts, router_mode, align),
        {"transform": "merge", "experts_per_layer": experts, "router_mode": router_mode,
         "aligned": align}, calibration_sequences, settings, "merge")
