"""Score a decoding method on validation windows: bits per byte and greedy next-token accuracy
per domain.

Bits per byte are computed exactly as ``divmoe train`` evaluates (every target token of every
window, Σ nats / ln 2 / Σ bytes the targets stand for, ``token_bytes``), so the plain method
reproduces a run's ``val_bpb_by_domain`` whatever its tokenizer. Greedy accuracy is the share
of target tokens (bytes for a byte-level run) that are the method's top-scoring token; it is
the only score given for methods whose scores are not calibrated log-probabilities (SCMoE).
"""

from __future__ import annotations

import math

import torch

from .methods import Plain, next_token_scores

LN2 = math.log(2.0)


@torch.no_grad()
def score_validation(model, val: dict[str, torch.Tensor], batch_size: int = 32,
                     method=None, token_bytes: torch.Tensor | None = None) -> dict:
    """``{"bpb": ..., "bpb_by_domain": {...}, "accuracy": ..., "accuracy_by_domain": {...},
    "tokens": N, "bytes": M}`` for ``method`` (default :class:`Plain`) on ``val`` (domain →
    windows [N, seq_len + 1]); ``token_bytes`` [V] is the bytes each token id stands for (the
    run tokenizer's; None: one byte per token). The bpb entries are None when the method is
    not calibrated."""
    method = method or Plain()
    method.check(model)
    model.eval()
    nll, correct, count, nbytes = {}, {}, {}, {}
    for d in sorted(val):
        nll[d] = correct[d] = count[d] = nbytes[d] = 0
        for chunk in val[d].split(batch_size):
            inputs, targets = chunk[:, :-1], chunk[:, 1:]
            scores_BSV = next_token_scores(method, model, inputs)
            correct[d] += int((scores_BSV.argmax(-1) == targets).sum())
            count[d] += targets.numel()
            nbytes[d] += targets.numel() if token_bytes is None else int(token_bytes[targets].sum())
            if method.calibrated:
                nll[d] -= float(scores_BSV.gather(-1, targets.unsqueeze(-1)).double().sum())
    total = sum(count.values())
    row = {"method": method.describe(), "tokens": total, "bytes": sum(nbytes.values()),
           "accuracy": sum(correct.values()) / total,
           "accuracy_by_domain": {d: correct[d] / count[d] for d in count},
           "bpb": None, "bpb_by_domain": None}
    if method.calibrated:
        row.update(bpb=sum(nll.values()) / sum(nbytes.values()) / LN2,
                   bpb_by_domain={d: nll[d] / nbytes[d] / LN2 for d in count})
    return row
