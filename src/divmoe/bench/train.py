"""``divmoe bench --train``: training tokens/s of the default MoE model vs its dense twin.

Both models are ``divmoe.models.MoETransformer`` built from the default ``RunConfig`` (overridable
with ``--set``), one with ``model.moe=true`` and one with ``model.moe=false`` (the dense model's MLP
width equals the MoE's active width, so both have the same active parameters per token). Each
step is exactly a training step of ``divmoe train`` (:func:`divmoe.train.train_step`, one
micro-batch of ``batch_size`` sequences of ``seq_len`` random byte tokens). Steps of the two
models alternate (moe, dense, moe, dense, ...) after warm-up; tokens/s is tokens per step
divided by the median step time. ``device``: where both train (``--device``; on CUDA the step
is bracketed by synchronisations).
"""

from __future__ import annotations

import statistics
import time

import torch

from ..models import MoETransformer
from ..train.step import train_step


def model_shape(cfg, overrides: list[str]) -> dict:
    """What a training benchmark's JSON says about the model it stepped."""
    return {"overrides": list(overrides), "batch_size": cfg.train.batch_size,
            "seq_len": cfg.model.seq_len, "d_model": cfg.model.d_model,
            "n_layers": cfg.model.n_layers, "num_experts": cfg.moe.num_experts,
            "top_k": cfg.moe.top_k, "expert_hidden": cfg.moe.expert_hidden}


def random_batches(cfg, seed: int, n: int = 4) -> list[torch.Tensor]:
    """``n`` global batches [batch_size, seq_len + 1] of random byte tokens (seeded)."""
    B, S, V = cfg.train.batch_size, cfg.model.seq_len, cfg.model.vocab_size
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, V, (B, S + 1), generator=g) for _ in range(n)]


def timed_step(model, optimizer, tokens, grad_clip: float) -> float:
    """Seconds of one ``divmoe train`` step (:func:`divmoe.train.train_step`) on one batch."""
    cuda = tokens.is_cuda
    if cuda:
        torch.cuda.synchronize(tokens.device)
    t0 = time.perf_counter()
    train_step(model, optimizer, [tokens], grad_clip)
    if cuda:
        torch.cuda.synchronize(tokens.device)
    return time.perf_counter() - t0


def bench_train(overrides: list[str], steps: int, warmup: int, seed: int, log,
                device: torch.device = torch.device("cpu")) -> dict:
    from ..train import load_config
    from ..train.loop import build_optimizer

    cfg = load_config(None, list(overrides))
    models = {}
    for name, moe in (("moe", True), ("dense", False)):
        cfg.model.moe = moe
        torch.manual_seed(seed)
        model = MoETransformer(cfg.model, cfg.moe).to(device)
        model.train()
        models[name] = (model, build_optimizer(model, cfg))
    cfg.model.moe = True
    B, S = cfg.train.batch_size, cfg.model.seq_len
    batches = [b.to(device) for b in random_batches(cfg, seed)]
    times = {n: [] for n in models}
    for i in range(warmup + steps):
        for name, (model, opt) in models.items():  # interleaved
            dt = timed_step(model, opt, batches[i % len(batches)], cfg.train.grad_clip)
            if i >= warmup:
                times[name].append(dt)
        if i >= warmup:
            log(f"  [train] step {i - warmup + 1}/{steps}: "
                + ", ".join(f"{n}={t[-1] * 1e3:.0f}ms" for n, t in times.items()))
    tokens = B * S
    out = {"config": {**model_shape(cfg, overrides), "device": str(device),
                      "dispatch": cfg.moe.dispatch, "balance": list(cfg.moe.balance)},
           "steps": steps, "warmup": warmup, "tokens_per_step": tokens, "models": {}}
    for name, (model, _) in models.items():
        med = statistics.median(times[name])
        out["models"][name] = {"step_ms": [t * 1e3 for t in times[name]], "median_step_ms": med * 1e3,
                               "tokens_per_s": tokens / med, **model.param_counts()}
    out["moe_over_dense_tokens_per_s"] = (out["models"]["moe"]["tokens_per_s"]
                                          / out["models"]["dense"]["tokens_per_s"])
    return out
