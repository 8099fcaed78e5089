"""Figures for the run report.

Every public function takes plain Python data (rows of ``metrics.jsonl``,
the contents of ``routing.json``...) and returns a :class:`matplotlib.figure.Figure`,
or ``None`` when the data needed for that figure is absent (e.g. expert load
for a dense model).  Nothing is shown on screen: the Agg backend is forced.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.colors import TwoSlopeNorm  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

__all__ = [
    "plot_losses",
    "plot_bpb",
    "plot_expert_load",
    "plot_routing",
    "plot_max_vio",
]

_MARKER_MAX_POINTS = 40  # draw point markers when a curve has at most this many points


# ----------------------------------------------------------------------------- helpers
def _num(x: Any) -> float:
    """Best-effort float; None / non-numbers become NaN."""
    if isinstance(x, bool) or x is None:
        return math.nan
    try:
        return float(x)
    except (TypeError, ValueError):
        return math.nan


def _series(rows: Sequence[Mapping[str, Any]], key: str) -> tuple[np.ndarray, np.ndarray]:
    """(steps, values) for rows where ``key`` holds a finite-or-NaN number."""
    steps, vals = [], []
    for i, r in enumerate(rows):
        if key not in r or r[key] is None:
            continue
        steps.append(_num(r.get("step", i)))
        vals.append(_num(r[key]))
    return np.asarray(steps, dtype=float), np.asarray(vals, dtype=float)


def _label(text: Any) -> str:
    """Make user text (domain names) safe as a matplotlib label: no mathtext, and
    not starting with '_' (which legends silently drop)."""
    t = str(text).replace("$", r"\$")
    return " " + t if t.startswith("_") else t


def _has_finite(a: np.ndarray) -> bool:
    return a.size > 0 and bool(np.isfinite(a).any())


def _marker(n: int) -> str | None:
    return "o" if n <= _MARKER_MAX_POINTS else None


def _step_ticks(ax, steps: Sequence[float], max_ticks: int = 8) -> None:
    """Label column indices of an image with their training step."""
    n = len(steps)
    if n == 0:
        return
    stride = max(1, math.ceil(n / max_ticks))
    idx = list(range(0, n, stride))
    ax.set_xticks(idx)
    ax.set_xticklabels([_fmt_step(steps[i]) for i in idx], rotation=0)


def _fmt_step(s: float) -> str:
    if not math.isfinite(s):
        return "?"
    s = int(s)
    if abs(s) >= 10_000 and s % 1000 == 0:
        return f"{s // 1000}k"
    return str(s)


def _expert_ticks(ax, n_experts: int, max_ticks: int = 16, axis: str = "y") -> None:
    """Integer ticks on the axis that indexes experts (``y`` in heatmaps, ``x`` in bar charts)."""
    stride = max(1, math.ceil(n_experts / max_ticks))
    (ax.set_yticks if axis == "y" else ax.set_xticks)(range(0, n_experts, stride))


def _domain_order(rows: Sequence[Mapping[str, Any]], extra: Sequence[str] = ()) -> list[str]:
    seen: dict[str, None] = {}
    for d in extra:
        seen.setdefault(str(d), None)
    for r in rows:
        by_dom = r.get("val_bpb_by_domain")
        if isinstance(by_dom, Mapping):
            for d in by_dom:
                seen.setdefault(str(d), None)
    return list(seen)


def _layer_names(n: int, layers: Sequence[Any] | None) -> list[str]:
    if layers is not None and len(layers) == n:  # block indices, or names already ("layer 3")
        return [x if isinstance(x, str) else f"layer {x}" for x in layers]
    return [f"MoE layer #{i}" for i in range(n)]


def _grid(n_panels: int, max_cols: int) -> tuple[int, int]:
    """Balanced grid: as few rows as max_cols allows, then as few columns as those rows need."""
    max_cols = max(1, min(n_panels, max_cols))
    nrows = math.ceil(n_panels / max_cols)
    ncols = math.ceil(n_panels / nrows)
    return nrows, ncols


def _step_edges(steps: Sequence[float]) -> np.ndarray | None:
    """Cell edges on the step axis for strictly increasing steps, else None."""
    x = np.asarray(steps, dtype=float)
    if x.size == 0 or not np.isfinite(x).all() or (x.size > 1 and np.any(np.diff(x) <= 0)):
        return None
    if x.size == 1:
        half = max(abs(x[0]) * 0.05, 0.5)
        return np.array([x[0] - half, x[0] + half])
    mid = (x[:-1] + x[1:]) / 2
    return np.concatenate([[x[0] - (mid[0] - x[0])], mid, [x[-1] + (x[-1] - mid[-1])]])


def _hide_unused(axes: np.ndarray, used: int) -> None:
    for ax in axes.ravel()[used:]:
        ax.set_visible(False)


# ----------------------------------------------------------------------------- figures
def plot_losses(rows: Sequence[Mapping[str, Any]]) -> Figure | None:
    """Train and validation loss (nats/token) against step."""
    s_tr, v_tr = _series(rows, "train_loss")
    s_va, v_va = _series(rows, "val_loss")
    if not (_has_finite(v_tr) or _has_finite(v_va)):
        return None
    fig, ax = plt.subplots(figsize=(7.5, 3.6), layout="constrained")
    if _has_finite(v_tr):
        ax.plot(s_tr, v_tr, label="train loss (mean since previous eval)",
                color="tab:blue", marker=_marker(len(s_tr)), ms=3, lw=1.5)
    if _has_finite(v_va):
        ax.plot(s_va, v_va, label="validation loss", color="tab:orange",
                marker=_marker(len(s_va)), ms=3, lw=1.5)
    ax.set_xlabel("training step")
    ax.set_ylabel("loss (nats / token)")
    ax.set_title("Loss")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="upper right", fontsize=9)
    return fig


def plot_mix_weights(rows: Sequence[Mapping[str, Any]]) -> Figure | None:
    """Sampling weight of each domain against step; None unless the weights changed
    during the run (``data.mixing=dynamic``)."""
    pts = [(r["step"], r["mix_weights"]) for r in rows
           if isinstance(r.get("mix_weights"), Mapping) and r.get("step") is not None]
    if len(pts) < 2:
        return None
    doms = sorted({d for _, w in pts for d in w})
    W = np.array([[_num(w.get(d)) for d in doms] for _, w in pts], dtype=float)
    if not np.isfinite(W).all() or np.ptp(W, axis=0).max() <= 1e-9:
        return None
    steps = [s for s, _ in pts]
    fig, ax = plt.subplots(figsize=(7.5, 3.6), layout="constrained")
    for i, d in enumerate(doms):
        ax.plot(steps, W[:, i], label=_label(d), marker=_marker(len(steps)), ms=3, lw=1.5)
    ax.set_xlabel("training step")
    ax.set_ylabel("sampling weight")
    ax.set_title("Domain mixture weights (in force after each step)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    return fig


def plot_bpb(rows: Sequence[Mapping[str, Any]],
             unigram_bpb: Mapping[str, Any] | None = None,
             domains: Sequence[str] = ()) -> Figure | None:
    """Validation bits/byte overall and per domain against step.

    ``unigram_bpb`` (domain -> bits/byte, plus ``"all"``) is drawn as dashed
    horizontal lines in the colour of the matching curve.
    """
    unigram_bpb = dict(unigram_bpb or {})
    s_all, v_all = _series(rows, "val_bpb")
    doms = _domain_order(rows, domains)
    curves: list[tuple[str, np.ndarray, np.ndarray]] = []
    for d in doms:
        st, vs = [], []
        for i, r in enumerate(rows):
            by_dom = r.get("val_bpb_by_domain")
            if isinstance(by_dom, Mapping) and d in by_dom and by_dom[d] is not None:
                st.append(_num(r.get("step", i)))
                vs.append(_num(by_dom[d]))
        curves.append((d, np.asarray(st, float), np.asarray(vs, float)))
    if not _has_finite(v_all) and not any(_has_finite(v) for _, _, v in curves):
        return None

    fig, ax = plt.subplots(figsize=(7.5, 4.0), layout="constrained")
    cmap = plt.get_cmap("tab10")
    handles_note = False
    if _has_finite(v_all):
        ax.plot(s_all, v_all, color="black", lw=2.2, label="all domains",
                marker=_marker(len(s_all)), ms=3)
    u_all = _num(unigram_bpb.get("all"))
    if math.isfinite(u_all):
        ax.axhline(u_all, color="black", ls="--", lw=1.2, alpha=0.8)
        handles_note = True
    for k, (d, st, vs) in enumerate(curves):
        color = cmap(k % 10)
        if _has_finite(vs):
            ax.plot(st, vs, color=color, lw=1.4, label=_label(d), marker=_marker(len(st)), ms=2.5)
        u = _num(unigram_bpb.get(d))
        if math.isfinite(u):
            ax.axhline(u, color=color, ls="--", lw=1.0, alpha=0.8)
            handles_note = True
    if handles_note:
        ax.plot([], [], color="grey", ls="--", lw=1.0, label="unigram entropy (dashed)")
    ax.set_xlabel("training step")
    ax.set_ylabel("validation bits / byte")
    ax.set_title("Validation bits per byte (lower is better)")
    ax.grid(True, alpha=0.3)
    n_entries = len(curves) + 2
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8,
              ncols=1 if n_entries <= 14 else 2, frameon=False)
    return fig


def _load_matrices(rows: Sequence[Mapping[str, Any]]) -> tuple[list[float], list[np.ndarray]] | None:
    """Per MoE layer an (E, T) array of load fractions; NaN where a row lacks data."""
    load_rows = [(i, r) for i, r in enumerate(rows) if isinstance(r.get("expert_load"), list)]
    if not load_rows:
        return None
    n_layers = max(len(r["expert_load"]) for _, r in load_rows)
    n_exp = [0] * n_layers
    for _, r in load_rows:
        for li, lay in enumerate(r["expert_load"]):
            if isinstance(lay, list):
                n_exp[li] = max(n_exp[li], len(lay))
    steps = [_num(r.get("step", i)) for i, r in load_rows]
    mats = []
    for li in range(n_layers):
        m = np.full((n_exp[li], len(load_rows)), np.nan)
        for t, (_, r) in enumerate(load_rows):
            lay = r["expert_load"][li] if li < len(r["expert_load"]) else None
            if isinstance(lay, list):
                m[: len(lay), t] = [_num(x) for x in lay]
        mats.append(m)
    if not any(m.size and np.isfinite(m).any() for m in mats):
        return None
    return steps, mats


def plot_expert_load(rows: Sequence[Mapping[str, Any]],
                     layers: Sequence[Any] | None = None) -> Figure | None:
    """Heatmap per MoE layer: x = evaluation step, y = expert, colour = load fraction.

    The colour scale diverges around the uniform load 1/E (white), so red cells
    are overloaded experts and blue cells under-used ones.
    """
    got = _load_matrices(rows)
    if got is None:
        return None
    steps, mats = got
    n = len(mats)
    names = _layer_names(n, layers)
    n_exp = max(m.shape[0] for m in mats)
    uniform = 1.0 / max(n_exp, 1)
    finite_max = max(float(np.nanmax(m)) for m in mats if m.size and np.isfinite(m).any())
    vmax = max(finite_max, 2.0 * uniform)  # always > uniform, so the norm is valid
    if uniform < 1.0:
        vmax = min(vmax, 1.0)
    norm = TwoSlopeNorm(vmin=0.0, vcenter=uniform, vmax=vmax)
    cmap = plt.get_cmap("RdBu_r").with_extremes(bad="#dddddd")

    nrows, ncols = _grid(n, 2 if n <= 4 else 3)
    panel_h = min(max(2.3, 0.05 * n_exp + 1.4), 4.5)
    panel_w = 5.2 if ncols <= 2 else 4.4
    fig, axes = plt.subplots(nrows, ncols, squeeze=False, layout="constrained",
                             figsize=(panel_w * ncols + 1.0, panel_h * nrows + 0.6))
    edges = _step_edges(steps)
    even = edges is not None and bool(np.allclose(np.diff(edges), np.diff(edges)[0], rtol=1e-6))
    im = None
    for k, (m, name) in enumerate(zip(mats, names)):
        ax = axes.ravel()[k]
        if edges is not None and even:  # x axis in real training steps; imshow is fast
            im = ax.imshow(m, aspect="auto", interpolation="nearest", cmap=cmap, norm=norm,
                           origin="lower", extent=(edges[0], edges[-1], -0.5, m.shape[0] - 0.5))
        elif edges is not None:  # uneven eval spacing: one cell per eval, true widths
            y_edges = np.arange(m.shape[0] + 1) - 0.5
            im = ax.pcolormesh(edges, y_edges, np.ma.masked_invalid(m), cmap=cmap, norm=norm)
            ax.set_xlim(edges[0], edges[-1])
            ax.set_ylim(y_edges[0], y_edges[-1])
        else:  # steps repeat or go backwards (resumed run): fall back to eval index
            im = ax.imshow(m, aspect="auto", interpolation="nearest", cmap=cmap, norm=norm,
                           origin="lower")
            _step_ticks(ax, steps)
        ax.set_title(name, fontsize=10)
        _expert_ticks(ax, m.shape[0])
        ax.set_ylabel("expert")
        if k + ncols >= n:  # bottom panel of its column
            ax.set_xlabel("training step (one column per evaluation)")
    _hide_unused(axes, n)
    cb = fig.colorbar(im, ax=axes.ravel()[:n].tolist(), shrink=max(0.4, 0.9 / math.sqrt(nrows)),
                      aspect=20 if nrows == 1 else 30)
    cb.set_label("fraction of routed token-slots")
    cb.ax.axhline(uniform, color="black", lw=1.2)
    fig.suptitle(f"Expert load over training (uniform = 1/E = {uniform:.3g}, white)",
                 fontsize=11)
    return fig


def routing_fractions(counts: Any) -> np.ndarray:
    """Normalise an (E, D) count matrix so each domain column sums to 1 (NaN if empty)."""
    c = np.asarray(counts, dtype=float)
    tot = c.sum(axis=0, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(tot > 0, c / np.where(tot > 0, tot, 1.0), np.nan)


def plot_routing(routing: Mapping[str, Any]) -> Figure | None:
    """Expert x domain routing matrix of the final model, one panel per MoE layer.

    Each domain column is normalised to the fraction of that domain's token-slots
    that went to each expert; uniform routing gives 1/E everywhere.
    """
    counts = routing.get("counts")
    domains = [str(d) for d in routing.get("domains") or []]
    if not isinstance(counts, list) or not counts:
        return None
    mats = []
    for lay in counts:
        m = np.asarray(lay, dtype=float)
        if m.ndim != 2:
            raise ValueError(f"routing counts: expected [E][D] per layer, got shape {m.shape}")
        if domains and m.shape[1] != len(domains):
            raise ValueError(
                f"routing counts have {m.shape[1]} domain columns but {len(domains)} domain names"
            )
        mats.append(routing_fractions(m))
    n = len(mats)
    if not domains:
        domains = [f"domain {j}" for j in range(mats[0].shape[1])]
    names = _layer_names(n, routing.get("layers"))
    n_exp = max(m.shape[0] for m in mats)
    n_dom = len(domains)
    uniform = 1.0 / max(n_exp, 1)
    finite = [float(np.nanmax(m)) for m in mats if m.size and np.isfinite(m).any()]
    vmax = max(finite + [2 * uniform])
    vmax = min(vmax, 1.0)
    cmap = plt.get_cmap("viridis").with_extremes(bad="#dddddd")
    annotate = n_exp * n_dom <= 96

    panel_w = max(2.4, (0.55 if annotate else 0.35) * n_dom + 1.2)
    max_cols = max(1, min(4, int(16 // panel_w)))
    nrows, ncols = _grid(n, max_cols)
    panel_h = (min(max(2.2, 0.28 * n_exp + 1.4), 6.0) if annotate
               else min(max(2.2, 0.08 * n_exp + 1.4), 6.0))
    fig, axes = plt.subplots(nrows, ncols, squeeze=False, layout="constrained",
                             figsize=(panel_w * ncols + 1.2, panel_h * nrows + 0.6))
    im = None
    for k, (m, name) in enumerate(zip(mats, names)):
        ax = axes.ravel()[k]
        im = ax.imshow(m, aspect="auto", interpolation="nearest", cmap=cmap,
                       vmin=0.0, vmax=vmax)
        ax.set_title(name, fontsize=10)
        ax.set_xticks(range(n_dom))
        ax.set_xticklabels([_label(d) for d in domains], rotation=45 if n_dom > 3 or max(map(len, domains)) > 8 else 0,
                           ha="right" if n_dom > 3 or max(map(len, domains)) > 8 else "center",
                           fontsize=8)
        _expert_ticks(ax, m.shape[0], max_ticks=32 if annotate else 16)
        if k % ncols == 0:
            ax.set_ylabel("expert")
        if annotate:
            for e in range(m.shape[0]):
                for d in range(m.shape[1]):
                    v = m[e, d]
                    if not math.isfinite(v):
                        continue
                    ax.text(d, e, f"{v:.2f}", ha="center", va="center", fontsize=7,
                            color="black" if v > 0.6 * vmax else "white")
    _hide_unused(axes, n)
    cb = fig.colorbar(im, ax=axes.ravel()[:n].tolist(), shrink=min(0.9, 0.45 + 0.25 / nrows),
                      aspect=25)
    cb.set_label("fraction of the domain's token-slots")
    cb.ax.axhline(uniform, color="red", lw=1.2)
    fig.suptitle(f"Final routing: expert × domain (each column sums to 1; uniform = 1/E = {uniform:.3g})",
                 fontsize=11)
    return fig


def plot_max_vio(rows: Sequence[Mapping[str, Any]],
                 layers: Sequence[Any] | None = None) -> Figure | None:
    """MaxVio (max expert load / mean load - 1) against step: the mean over MoE
    layers in bold, each layer as a thin line when ``max_vio_by_layer`` is logged."""
    s, v = _series(rows, "max_vio")
    per_layer = [(i, r) for i, r in enumerate(rows) if isinstance(r.get("max_vio_by_layer"), list)]
    n_layers = max((len(r["max_vio_by_layer"]) for _, r in per_layer), default=0)
    if not _has_finite(v) and n_layers == 0:
        return None
    fig, ax = plt.subplots(figsize=(7.5, 3.4), layout="constrained")
    names = _layer_names(n_layers, layers)
    cmap = plt.get_cmap("viridis")
    for li in range(n_layers):
        st, vs = [], []
        for i, r in per_layer:
            lst = r["max_vio_by_layer"]
            if li < len(lst):
                st.append(_num(r.get("step", i)))
                vs.append(_num(lst[li]))
        ax.plot(st, vs, lw=0.9, alpha=0.6, color=cmap(li / max(n_layers - 1, 1) * 0.9),
                label=names[li] if n_layers <= 8 else None)
    if _has_finite(v):
        ax.plot(s, v, color="black", lw=2.2, marker=_marker(len(s)), ms=3,
                label="mean over MoE layers")
    ax.axhline(0.0, color="grey", lw=0.8, ls=":")
    ax.set_xlabel("training step")
    ax.set_ylabel("MaxVio")
    ax.set_title("Load imbalance: MaxVio (0 = perfectly balanced)")
    ax.set_ylim(bottom=0.0)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    return fig
