"""Figures of ``analysis.html``; each takes the ``layers`` list of analysis.json and returns a
matplotlib Figure (or None when there is nothing to draw). Agg backend, as in divmoe.report."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ..report.plots import _expert_ticks, _grid, _hide_unused, plt

__all__ = ["plot_layer_load", "plot_srp", "plot_sch", "plot_cka", "plot_vendi"]


def _panels(n: int, max_cols: int = 4, w: float = 3.4, h: float = 2.8):
    nrows, ncols = _grid(n, max_cols)
    fig, axes = plt.subplots(nrows, ncols, squeeze=False, layout="constrained",
                             figsize=(w * ncols + 0.8, h * nrows + 0.6))
    return fig, axes, ncols


def plot_layer_load(layers: Sequence[Mapping[str, Any]]) -> Any:
    """Per-layer bars of the fraction of routed slots each expert received (red line: 1/E)."""
    if not layers:
        return None
    fig, axes, ncols = _panels(len(layers))
    for k, lay in enumerate(layers):
        ax = axes.ravel()[k]
        load = np.asarray(lay["load"]["load"], dtype=float)
        E = load.size
        ax.bar(range(E), load, color="#4c72b0")
        ax.axhline(1.0 / E, color="red", lw=1)
        ax.set_title(f"{lay['name']} (MaxVio {lay['load']['max_vio']:.2f})", fontsize=9)
        _expert_ticks(ax, E, axis="x")  # experts run along x here; the shares set the y axis
        ax.set_xlabel("expert", fontsize=8)
        if k % ncols == 0:
            ax.set_ylabel("share of slots")
    _hide_unused(axes, len(layers))
    fig.suptitle("Expert load on the validation set (red: uniform 1/E)", fontsize=11)
    return fig


def plot_srp(layers: Sequence[Mapping[str, Any]], top_k: int) -> Any:
    """SRP (solid) and the best-k coverage (dashed) against segment length, one colour per layer."""
    if not layers:
        return None
    fig, axes = plt.subplots(1, 2, layout="constrained", figsize=(10, 3.6))
    colors = plt.get_cmap("tab10")
    for i, lay in enumerate(layers):
        c = colors(i % 10)
        for ax, key, style in ((axes[0], "srp", "-"), (axes[1], "srp_coverage_k", "--"),
                               (axes[1], "srp_coverage_2k", ":")):
            x, y = lay[key]["segment_lens"], lay[key]["values"]
            y = [np.nan if v is None else v for v in y]
            ax.plot(x, y, style, color=c, marker="o", ms=3,
                    label=lay["name"] if key != "srp_coverage_2k" else None)
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_xlabel("segment length m (tokens)")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("SRP (best F1 of a fixed set)")
    axes[0].set_title("Segment routing best performance", fontsize=10)
    axes[1].set_ylabel("share of slots covered")
    axes[1].set_title(f"Coverage by a segment's best {top_k} (dashed) / {2 * top_k} (dotted)",
                      fontsize=10)
    axes[0].legend(fontsize=7)
    return fig


def plot_sch(layers: Sequence[Mapping[str, Any]], top_k: int) -> Any:
    """SCH against cache size, one panel per layer, one curve per look-ahead segment length;
    dotted verticals at k and 2k."""
    if not layers:
        return None
    fig, axes, ncols = _panels(len(layers))
    cmap = plt.get_cmap("viridis")
    for k, lay in enumerate(layers):
        ax = axes.ravel()[k]
        sch = lay["sch"]
        cs = sch["cache_sizes"]
        n = len(sch["segment_lens"])
        for j, (m, vals) in enumerate(zip(sch["segment_lens"], sch["values"])):
            ax.plot(cs, [np.nan if v is None else v for v in vals], marker="o", ms=3,
                    color=cmap(j / max(n - 1, 1)), label=f"m={m}")
        for c, lab in ((top_k, "k"), (2 * top_k, "2k")):
            if c <= cs[-1]:
                ax.axvline(c, color="grey", ls=":", lw=1)
                ax.text(c, 0.02, lab, fontsize=7, ha="center", color="grey")
        ax.set_ylim(0, 1.02)
        ax.set_title(lay["name"], fontsize=9)
        ax.set_xlabel("cache size c (experts)", fontsize=8)
        ax.grid(alpha=0.3)
        if k % ncols == 0:
            ax.set_ylabel("SCH (hit rate)")
        if k == 0:
            ax.legend(fontsize=7)
    _hide_unused(axes, len(layers))
    fig.suptitle("Segment cache best hit rate vs cache size (look-ahead m tokens)", fontsize=11)
    return fig


def plot_cka(layers: Sequence[Mapping[str, Any]]) -> Any:
    """Linear CKA between experts' outputs on the probe tokens, one heatmap per layer."""
    mats = [(lay["name"], np.asarray(lay["redundancy"]["cka"], dtype=float))
            for lay in layers if "cka" in lay.get("redundancy", {})]
    if not mats:
        return None
    fig, axes, ncols = _panels(len(mats), w=3.2, h=3.0)
    im = None
    for k, (name, m) in enumerate(mats):
        ax = axes.ravel()[k]
        im = ax.imshow(m, vmin=0, vmax=1, cmap="magma", interpolation="nearest")
        ax.set_title(name, fontsize=9)
        _expert_ticks(ax, m.shape[0])
        ax.set_xticks(ax.get_yticks())
        ax.set_xlim(-0.5, m.shape[0] - 0.5)
        ax.set_ylim(m.shape[0] - 0.5, -0.5)
        ax.set_xlabel("expert", fontsize=8)
        if k % ncols == 0:
            ax.set_ylabel("expert")
        if m.shape[0] <= 12:
            for i in range(m.shape[0]):
                for j in range(m.shape[1]):
                    if math.isfinite(m[i, j]) and i != j:
                        ax.text(j, i, f"{m[i, j]:.2f}", ha="center", va="center", fontsize=6,
                                color="white" if m[i, j] < 0.6 else "black")
    _hide_unused(axes, len(mats))
    fig.colorbar(im, ax=axes.ravel()[: len(mats)].tolist(), shrink=0.8, label="linear CKA")
    fig.suptitle("Expert redundancy: linear CKA of expert outputs on shared probe tokens",
                 fontsize=11)
    return fig


def plot_vendi(layers: Sequence[Mapping[str, Any]], num_experts: int) -> Any:
    """Vendi score of the experts' outputs per layer (1 = all alike, E = all distinct)."""
    vals = [(lay["name"], lay.get("vendi")) for lay in layers]
    if not any(v is not None for _, v in vals):
        return None
    fig, ax = plt.subplots(layout="constrained", figsize=(max(4.0, 0.9 * len(vals) + 2), 3.2))
    heights = [np.nan if v is None else v for _, v in vals]
    ax.bar(range(len(vals)), heights, color="#55a868")
    ax.set_xticks(range(len(vals)))
    ax.set_xticklabels([n for n, _ in vals], rotation=30 if len(vals) > 6 else 0, fontsize=8)
    ax.set_xlabel("MoE layer")
    ax.set_ylabel("Vendi score (effective experts)")
    top = float(np.nanmax(heights))
    if num_experts <= 4 * top:  # the ceiling E fits without squashing the bars
        ax.axhline(num_experts, color="red", lw=1)
        ax.set_ylim(0, num_experts * 1.05)
        ax.set_title(f"Diversity of expert outputs (red: E = {num_experts})", fontsize=10)
    else:
        ax.set_ylim(0, top * 1.25)
        ax.set_title(f"Diversity of expert outputs (of at most E = {num_experts})", fontsize=10)
    return fig
