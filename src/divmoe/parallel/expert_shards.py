"""Where an expert-parallel rank's expert weights sit in the full (single-process) layer.

A checkpoint holds the single-process state: every expert's weights under its global expert
id, whatever the world size that wrote it. A rank holds ``layout.select(ids)``, a new layout
of its experts only, whose parameters are named and shaped by the layout (stacked tensors,
width buckets, a replicated frozen base). Rather than ask each layout for the inverse of
``select``, :func:`shard_map` learns it: it runs ``select`` on a float64 copy of the full
layout whose every element holds its own position, and reads the positions back out of
the shard. That covers every layout, present and future, whose ``select`` copies values.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch


@dataclass
class ShardMap:
    """For every parameter of one rank's expert shard: the full layout's parameter it copies
    and the flat positions in it (``sources[name] = (full_name, index)``)."""
    sources: dict[str, tuple[str, torch.Tensor]]
    full_shapes: dict[str, torch.Size]

    def to_full(self, shard_tensors: dict[str, torch.Tensor],
                into: dict[str, torch.Tensor]) -> None:
        """Write a shard's tensors (keyed by shard parameter name) into full-layout tensors."""
        for name, t in shard_tensors.items():
            full_name, index = self.sources[name]
            into[full_name].view(-1)[index] = t.reshape(-1).to(into[full_name].dtype)

    def from_full(self, full_tensors: dict[str, torch.Tensor], shapes: dict[str, torch.Size],
                  only: str | None = None) -> dict[str, torch.Tensor]:
        """This shard's tensors (shaped by ``shapes``) read out of full-layout tensors
        (``only``: just that shard parameter)."""
        out = {}
        for name, (full_name, index) in self.sources.items():
            if only is None or name == only:
                out[name] = full_tensors[full_name].reshape(-1)[index].view(shapes[name]).clone()
        return out


@torch.no_grad()
def shard_map(full_layout: torch.nn.Module, expert_ids: list[int]) -> ShardMap:
    """The :class:`ShardMap` of ``full_layout.select(expert_ids)``."""
    probe = copy.deepcopy(full_layout).to(torch.float64)
    offsets, names, shapes = [], [], {}
    total = 0
    for name, p in probe.named_parameters():
        p.copy_(torch.arange(total, total + p.numel(), dtype=torch.float64).view(p.shape))
        offsets.append(total)
        names.append(name)
        shapes[name] = p.shape
        total += p.numel()
    if total >= 2 ** 53:
        raise ValueError(f"an expert layout of {total} parameters is too large to map by "
                         f"float64 positions")
    starts = torch.tensor(offsets, dtype=torch.int64)
    with torch.random.fork_rng(devices=[]):  # select builds modules; leave the RNG as it was
        shard = probe.select(list(expert_ids))
    sources = {}
    for name, p in shard.named_parameters():
        pos = p.detach().reshape(-1).to(torch.int64)
        which = torch.searchsorted(starts, pos, right=True) - 1
        if pos.numel() and not bool((which == which[0]).all()):
            raise ValueError(f"{type(full_layout).__name__}.select: shard parameter {name!r} "
                             f"mixes several parameters of the full layout; it cannot be "
                             f"mapped back")
        src = int(which[0]) if pos.numel() else 0
        sources[name] = (names[src], pos - offsets[src])
    return ShardMap(sources, shapes)


def _sharded_layers(model: torch.nn.Module):
    from ..layer import MoE

    return [(prefix, m) for prefix, m in model.named_modules()
            if isinstance(m, MoE) and m.shard is not None]


def _full_name(prefix: str, m, shard_name: str) -> str:
    return f"{prefix}.experts.{m.shard.sources[shard_name][0]}"


def _gather_to_writer(obj, ranks):
    import torch.distributed as dist

    out = [None] * ranks.world if ranks.is_writer else None
    dist.gather_object(obj, out, dst=0)
    return out


def full_model_state(model: torch.nn.Module, ranks) -> dict[str, torch.Tensor] | None:
    """The single-process state dict of a model whose experts are sharded over ``ranks``
    (every expert under its global id), on the writer; None on the other ranks. Every rank
    must call it."""
    layers = _sharded_layers(model)
    local = {prefix: {n: p.detach().cpu() for n, p in m.experts.named_parameters()}
             for prefix, m in layers}
    maps = {prefix: m.shard for prefix, m in layers}
    gathered = _gather_to_writer((local, maps), ranks)
    if not ranks.is_writer:
        return None
    state = {k: v for k, v in model.state_dict().items()
             if not any(k.startswith(f"{prefix}.experts.") for prefix, _ in layers)}
    for prefix, m in layers:
        dtype = next(iter(local[prefix].values())).dtype
        full = {n: torch.zeros(shape, dtype=dtype) for n, shape in m.shard.full_shapes.items()}
        for rank_local, rank_maps in gathered:
            rank_maps[prefix].to_full(rank_local[prefix], full)
        state.update({f"{prefix}.experts.{n}": t for n, t in full.items()})
    return state


def named_optimizer_state(optimizer: torch.optim.Optimizer, names: list[str]) -> dict[str, dict]:
    """The optimizer's per-parameter state keyed by parameter name (``names``: the parameters
    in the optimizer's order)."""
    sd = optimizer.state_dict()
    return {names[i]: s for i, s in sd["state"].items()}


def optimizer_state_from_named(named: dict[str, dict], optimizer: torch.optim.Optimizer,
                               names_by_group: list[list[str]]) -> dict:
    """An optimizer state dict for parameters named ``names_by_group`` (one list per param
    group, in order), the hyperparameters taken from ``optimizer``'s groups."""
    groups, state, i = [], {}, 0
    for hyper, names in zip(optimizer.state_dict()["param_groups"], names_by_group):
        ids = list(range(i, i + len(names)))
        groups.append({**hyper, "params": ids})
        state.update({j: named[n] for j, n in zip(ids, names) if n in named})
        i += len(names)
    return {"state": state, "param_groups": groups}


def full_optimizer_named(model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                         names: list[str], ranks) -> dict[str, dict] | None:
    """:func:`named_optimizer_state` of the single-process model (expert states under their
    full parameter's name), on the writer; None elsewhere. Every rank must call it."""
    named = named_optimizer_state(optimizer, names)
    layers = _sharded_layers(model)
    expert = {}
    for prefix, m in layers:
        for n, _ in m.experts.named_parameters():
            key = f"{prefix}.experts.{n}"
            if key in named:
                expert[key] = (prefix, n, {k: (v.cpu() if torch.is_tensor(v) else v)
                                           for k, v in named.pop(key).items()})
    gathered = _gather_to_writer((expert, {p: m.shard for p, m in layers}), ranks)
    if not ranks.is_writer:
        return None
    full: dict[str, dict] = {}
    for rank_expert, rank_maps in gathered:
        for _, (prefix, n, st) in rank_expert.items():
            shard = rank_maps[prefix]
            full_name, _ = shard.sources[n]
            entry = full.setdefault(f"{prefix}.experts.{full_name}", {})
            for k, v in st.items():
                if torch.is_tensor(v) and v.dim() > 0:
                    if k not in entry:
                        entry[k] = torch.zeros(shard.full_shapes[full_name], dtype=v.dtype)
                    shard.to_full({n: v}, {full_name: entry[k]})
                else:
                    entry[k] = v
    named.update(full)
    return named


def shard_optimizer_named(model: torch.nn.Module, full_named: dict[str, dict]) -> dict[str, dict]:
    """The inverse of :func:`full_optimizer_named` for this rank: expert states cut to the
    rank's shard, under the shard's parameter names."""
    out = dict(full_named)
    for prefix, m in _sharded_layers(model):
        shapes = {n: p.shape for n, p in m.experts.named_parameters()}
        for full_name in m.shard.full_shapes:
            out.pop(f"{prefix}.experts.{full_name}", None)
        for n, (full_name, _) in m.shard.sources.items():
            src = full_named.get(f"{prefix}.experts.{full_name}")
            if src is None:
                continue
            out[f"{prefix}.experts.{n}"] = {
                k: (m.shard.from_full({full_name: v}, {n: shapes[n]}, only=n)[n]
                    if torch.is_tensor(v) and v.dim() > 0 else v)
                for k, v in src.items()}
    return out
