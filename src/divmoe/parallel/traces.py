"""Routing traces for expert placement: how many tokens each expert of each MoE layer gets,
and how a token's experts in one layer relate to its experts in the next.

A token's *home* at layer l is its first routed slot (the router's first choice: for top-k
routers the highest selection score), the expert whose rank would hold the token's hidden
state if tokens followed their experts (:mod:`divmoe.parallel.placement` states that traffic
model). The trace holds, for L MoE layers of E experts:

- ``load_LE[l, e]``: routed slots of expert e at layer l;
- ``next_PEE[l, i, j]``: tokens whose home at layer l is i, counted once for every slot at
  layer l+1 that chose j (rows sum to the slots at l+1 of tokens homed at i);
- ``within_LEE[l, i, j]``: tokens whose home at layer l is i, counted once for each of their
  other slots at layer l that chose j (empty for top-1).

Empty slots (−1) count nowhere; a token with no expert at a layer has no home there.
Sources: ``divmoe analyze`` writes the trace into ``analysis.json`` (``placement_trace``),
:func:`route_run` routes a run's validation data through its checkpoint, and
:meth:`RoutingTrace.save` writes a stand-alone ``trace.json``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..files import atomic_write_text

FORMAT = "divmoe.routing_trace/1"


class TraceError(ValueError):
    """A routing trace (or what should hold one) that cannot be used."""


@dataclass
class RoutingTrace:
    layers: list[int]          # block index of each MoE layer (keys of a placement)
    num_experts: int
    top_k: int
    d_model: int               # width of the rows the all-to-all moves
    tokens: int                # tokens routed (each through every layer)
    load_LE: np.ndarray
    next_PEE: np.ndarray
    within_LEE: np.ndarray

    @classmethod
    def from_expert_ids(cls, ids_by_layer: list[torch.Tensor], layers: list[int],
                        d_model: int, num_experts: int) -> "RoutingTrace":
        """The trace of ``ids_by_layer[l]`` [T, K] (the same T tokens in every layer)."""
        E = num_experts
        if not ids_by_layer:
            raise TraceError("a routing trace needs at least one MoE layer")
        T, K = ids_by_layer[0].shape
        ids = [i.long().cpu() for i in ids_by_layer]
        if any(i.shape != (T, K) for i in ids):
            raise TraceError(f"every layer must route the same tokens; got shapes "
                             f"{[tuple(i.shape) for i in ids]}")
        homes, home_slots = [], []
        for ids_TK in ids:
            valid = ids_TK >= 0
            slot = torch.where(valid.any(1), valid.int().argmax(1), -1)
            home_slots.append(slot)
            first = ids_TK.gather(1, slot.clamp_min(0)[:, None])[:, 0]
            homes.append(torch.where(slot >= 0, first, -1))

        def pair_counts(home_T, ids_TK, keep_TK):
            ok = keep_TK & (ids_TK >= 0) & (home_T[:, None] >= 0)
            flat = (home_T[:, None] * E + ids_TK)[ok]
            return torch.bincount(flat, minlength=E * E).view(E, E).numpy()

        load = np.stack([torch.bincount(i[i >= 0], minlength=E).numpy() for i in ids])
        nxt = [pair_counts(homes[l], ids[l + 1], torch.ones_like(ids[l + 1], dtype=torch.bool))
               for l in range(len(ids) - 1)]
        within = [pair_counts(homes[l], ids[l],
                              torch.arange(K)[None, :] != home_slots[l][:, None])
                  for l in range(len(ids))]
        return cls(list(layers), E, K, d_model, T, load.astype(np.float64),
                   np.array(nxt, dtype=np.float64).reshape(len(ids) - 1, E, E),
                   np.array(within, dtype=np.float64))

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def to_json(self) -> dict:
        return {"format": FORMAT, "layers": self.layers, "num_experts": self.num_experts,
                "top_k": self.top_k, "d_model": self.d_model, "tokens": self.tokens,
                "load": self.load_LE.tolist(), "next": self.next_PEE.tolist(),
                "within": self.within_LEE.tolist()}

    @classmethod
    def from_json(cls, obj, where: str) -> "RoutingTrace":
        if not isinstance(obj, dict) or obj.get("format") != FORMAT:
            raise TraceError(f"{where}: not a routing trace (expected a JSON object with "
                             f"\"format\": \"{FORMAT}\")")
        try:
            E, L = int(obj["num_experts"]), len(obj["layers"])
            trace = cls([int(b) for b in obj["layers"]], E, int(obj["top_k"]),
                        int(obj["d_model"]), int(obj["tokens"]),
                        np.asarray(obj["load"], dtype=np.float64),
                        np.asarray(obj["next"], dtype=np.float64).reshape(max(L - 1, 0), E, E),
                        np.asarray(obj["within"], dtype=np.float64))
        except (KeyError, TypeError, ValueError) as exc:
            raise TraceError(f"{where}: malformed routing trace ({type(exc).__name__}: "
                             f"{exc})") from None
        if trace.load_LE.shape != (L, E) or trace.within_LEE.shape != (L, E, E):
            raise TraceError(f"{where}: load must be [{L}, {E}] and within [{L}, {E}, {E}] "
                             f"for {L} layers of {E} experts")
        for name in ("load_LE", "next_PEE", "within_LEE"):
            a = getattr(trace, name)
            if not np.isfinite(a).all() or (a < 0).any():
                raise TraceError(f"{where}: {name.split('_')[0]} counts must be finite and "
                                 f">= 0")
        return trace

    def save(self, path: str | Path) -> None:
        atomic_write_text(path, json.dumps(self.to_json()))


def route_run(path: str | Path, max_bytes: int = 32768, batch_size: int = 16) -> RoutingTrace:
    """The trace of a divmoe run's (or a Hugging Face MoE folder's) validation data routed
    through its model, as ``divmoe analyze`` routes it."""
    from ..analyze.core import route_validation
    from ..analyze.source import load_source

    src = load_source(path)
    routed = route_validation(src, max_bytes=max_bytes, batch_size=batch_size,
                              probe_tokens=0, progress=False)
    return trace_of(src, routed.ids_by_layer())


def trace_of(src, ids_by_layer: list[torch.Tensor]) -> RoutingTrace:
    """The trace of an analysis source's recorded routing (``ids_by_layer[l]`` [T, K])."""
    layers = src.model.moe_layers if src.kind == "divmoe" else list(range(len(src.moes)))
    return RoutingTrace.from_expert_ids(ids_by_layer, layers, src.moes[0].d_model,
                                        int(src.info["num_experts"]))


def load_trace(path: str | Path) -> RoutingTrace:
    """A trace from ``trace.json``, an ``analysis.json`` (or its folder), or a run folder
    (routed now: :func:`route_run`)."""
    path = Path(path)
    if not path.exists():
        raise TraceError(f"{path} does not exist")
    if path.is_dir() and (path / "analysis.json").is_file():
        path = path / "analysis.json"
    if path.is_dir():
        return route_run(path)
    try:
        obj = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise TraceError(f"{path}: not a readable JSON file ({exc})") from None
    if isinstance(obj, dict) and "layers" in obj and "summary" in obj:  # an analysis.json
        if "placement_trace" not in obj:
            raise TraceError(f"{path} was written by an older divmoe analyze without the "
                             f"placement trace; run divmoe analyze again, or give the run folder")
        obj = obj["placement_trace"]
    return RoutingTrace.from_json(obj, str(path))
