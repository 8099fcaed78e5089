"""How next-token scores are made from one or more passes of the model.

A decoding method names its passes (each a routing: the router's own, or a
:mod:`~divmoe.inference.rerouting` pick, and how many replicas of the batch it runs) and how
their logits combine into next-token scores [B, S, V]. :func:`next_token_scores` runs them,
with one KV cache per pass when decoding incrementally; generation and validation scoring
both go through it. ``calibrated`` says whether the scores are log-probabilities (so bits per
byte mean something) or only a ranking (contrastive scores).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from .kv_cache import KVCache
from .rerouting import Pick, rerouted


@dataclass(frozen=True)
class Pass:
    pick: Pick | None = None   # None: the router's own routing
    replicas: int = 1          # the batch is run this many times side by side


class Plain:
    """The model as trained (with whatever routing settings it was loaded with)."""

    calibrated = True

    def check(self, model) -> None:
        pass

    def passes(self) -> list[Pass]:
        return [Pass()]

    def combine(self, logits: list[torch.Tensor]) -> torch.Tensor:
        return logits[0].float().log_softmax(-1)

    def describe(self) -> str:
        return "plain"


def new_caches(method, model, batch: int) -> list[KVCache]:
    """One empty KV cache per pass of ``method`` for ``batch`` sequences."""
    return [KVCache.for_model(model, batch * p.replicas) for p in method.passes()]


@torch.no_grad()
def next_token_scores(method, model, tokens_BS: torch.Tensor,
                      caches: list[KVCache] | None = None) -> torch.Tensor:
    """Scores [B, S, V] of the token after each position of ``tokens_BS``; with ``caches``
    (from :func:`new_caches`) the tokens continue what the caches hold."""
    logits = []
    for i, p in enumerate(method.passes()):
        x_BS = tokens_BS.repeat(p.replicas, 1) if p.replicas > 1 else tokens_BS
        routing = rerouted(model, p.pick) if p.pick is not None else contextlib.nullcontext()
        with routing:
            logits.append(model(x_BS, cache=None if caches is None else caches[i]).logits)
    return method.combine(logits)
