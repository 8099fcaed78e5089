"""Upcycling: a dense model becomes an MoE whose experts start from its MLPs.

Definitions implemented, per block of the dense model (MLP of hidden width H):

* Sparse upcycling (Komatsuzaki et al. 2023): every one of the E experts is a copy of the
  dense MLP; the router is new, initialised at random like any router of the model (so
  routing starts without preference); attention, norms and embeddings are copied. With
  ``renormalize=True`` the combine weights of a token sum to 1 and the upcycled model
  computes exactly the dense model's function at step 0.
* Granularity g (fine-grained upcycling): the dense hidden units are cut into g slices of
  H/g; expert e is slice e mod g. A token's output sums its k experts' outputs with weights
  summing to 1, times ``routed_scaling = g``, so choosing the g different slices with equal
  weight gives back the dense output (the scale is the dense MLP's).
* Drop-Upcycling (Nakamura et al. 2025), ``drop_ratio`` r: in each expert independently, a
  random r share of its hidden units is re-initialised — their gate and up columns and down
  rows drawn from a normal distribution with the mean and standard deviation of the dense
  matrix they came from — so experts start diverse instead of identical.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from ..config import ConfigError, validate
from ..layer import MoEConfig
from ..models import MoETransformer
from ..models.transformer import dense_equivalent_hidden
from ..train.config import RunConfig
from ..inference.run_loading import load_run
from .run_io import with_training_settings, write_run


def upcycled_config(cfg: RunConfig, experts: int, top_k: int, granularity: int = 1,
                    steps: int | None = None) -> RunConfig:
    """The run configuration of the upcycled model of a dense run ``cfg``."""
    if cfg.model.moe:
        raise ConfigError("upcycle needs a dense run (model.moe=false); this run is already an MoE "
                          "(merge or prune it instead)")
    H = dense_equivalent_hidden(cfg.moe)
    if granularity < 1 or H % granularity:
        raise ConfigError(f"--granularity {granularity} is not allowed: it must divide the dense "
                          f"MLP's hidden width {H}")
    if experts < 1 or experts % granularity:
        raise ConfigError(f"--experts {experts} is not allowed: it must be a positive multiple of "
                          f"--granularity {granularity} (each slice of the dense MLP is copied "
                          f"equally often)")
    if not 1 <= top_k <= experts:
        raise ConfigError(f"--top-k {top_k} is not allowed: give 1 to --experts {experts}")
    moe = dataclasses.replace(cfg.moe, num_experts=experts, top_k=top_k,
                              expert_hidden=H // granularity, expert_widths=None,
                              expert_layout="swiglu", router="topk", renormalize=True,
                              routed_scaling=float(granularity), num_shared_experts=0)
    train = cfg.train if steps is None else dataclasses.replace(cfg.train, steps=steps)
    return validate(dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, moe=True),
                                        moe=moe, train=train))


@torch.no_grad()
def upcycle_model(dense: MoETransformer, cfg: RunConfig, drop_ratio: float = 0.0,
                  seed: int = 0) -> MoETransformer:
    """The MoE of ``cfg`` (from :func:`upcycled_config`) initialised from ``dense``."""
    if not 0.0 <= drop_ratio <= 1.0:
        raise ConfigError(f"--drop-ratio {drop_ratio} is not allowed: give 0 (plain upcycling) "
                          f"to 1 (every unit re-initialised)")
    moe_cfg: MoEConfig = cfg.moe
    torch.manual_seed(seed)  # the new routers' initialisation
    model = MoETransformer(cfg.model, moe_cfg)
    gen = torch.Generator().manual_seed(seed)
    state = model.state_dict()
    dense_state = dense.state_dict()
    g = int(round(moe_cfg.routed_scaling))
    E, h = moe_cfg.num_experts, moe_cfg.expert_hidden
    for name in state:
        if name in dense_state:
            state[name] = dense_state[name]
    for i in model.moe_layers:
        w_gate_up = dense_state[f"blocks.{i}.mlp.w_in.weight"]    # [2H, d]: gate rows, up rows
        w_down = dense_state[f"blocks.{i}.mlp.w_out.weight"]      # [d, H]
        H = w_down.shape[1]
        gate_HD, up_HD, down_HD = w_gate_up[:H], w_gate_up[H:], w_down.T
        w_in, w_out = [], []
        for e in range(E):
            s = slice((e % g) * h, (e % g + 1) * h)
            parts = [gate_HD[s].clone(), up_HD[s].clone(), down_HD[s].clone()]
            n_drop = int(round(drop_ratio * h))
            if n_drop:
                units = torch.randperm(h, generator=gen)[:n_drop]
                for part, source in zip(parts, (gate_HD, up_HD, down_HD)):
                    part[units] = (torch.randn(n_drop, part.shape[1], generator=gen)
                                   * source.float().std() + source.float().mean()).to(part.dtype)
            gate, up, down = parts
            w_in.append(torch.cat([gate, up]).T)     # [d, 2h]
            w_out.append(down)                       # [h, d]
        state[f"blocks.{i}.mlp.experts.w_in_EDH2"] = torch.stack(w_in)
        state[f"blocks.{i}.mlp.experts.w_out_EHD"] = torch.stack(w_out)
    model.load_state_dict(state)
    return model.eval()


def upcycle_run(run: str | Path, out: str | Path, experts: int, top_k: int, granularity: int = 1,
                drop_ratio: float = 0.0, steps: int | None = None, settings: list[str] = ()) -> dict:
    """``divmoe upcycle``: write the upcycled MoE of a dense run as a new run (step 0), ready
    for ``divmoe train --out OUT --resume`` (``steps``: its train.steps, default the dense run's)."""
    source = load_run(run)
    cfg, dense = source.config, source.model
    new_cfg = with_training_settings(upcycled_config(cfg, experts, top_k, granularity, steps),
                                     settings)
    model = upcycle_model(dense, new_cfg, drop_ratio, seed=new_cfg.train.seed)
    info = {"transform": "upcycle", "source": str(Path(run).resolve()), "experts": experts,
            "top_k": top_k, "granularity": granularity, "drop_ratio": drop_ratio,
            "steps": new_cfg.train.steps}
    write_run(out, new_cfg, model, info, source.tokenizer)
    return info
