"""Score a decoding method on validation windows: bits per byte and greedy next-byte accuracy
per domain.

Bits per byte are computed exactly as ``divmoe train`` evaluates (every target byte of every
window, nats / ln 2), so the plain method reproduces a run's ``val_bpb_by_domain``. Greedy
accuracy is the share of target bytes that are the method's top-scoring byte; it is the only
score given for methods whose scores are not calibrated log-probabilities (SCMoE).
"""

from __future__ import annotations

import math

import torch

from .methods import Plain, next_token_scores

LN2 = math.log(2.0)


@torch.no_grad()
def score_validation(model, val: dict[str, torch.Tensor], batch_size: int = 32,
                     method=None) -> dict:
    """``{"bpb": ..., "bpb_by_domain": {...}, "accuracy": ..., "accuracy_by_domain": {...},
    "tokens": N}`` for ``method`` (default :class:`Plain`) on ``val`` (domain → windows
    [N, seq_len + 1]); the bpb entries are None when the method is not calibrated."""
    method = method or Plain()
    method.check(model)
    model.eval()
    nll, correct, count = {}, {}, {}
    for d in sorted(val):
        nll[d] = correct[d] = count[d] = 0
        for chunk in val[d].split(batch_size):
            inputs, targets = chunk[:, :-1], chunk[:, 1:]
            scores_BSV = next_token_scores(method, model, inputs)
            correct[d] += int((scores_BSV.argmax(-1) == targets).sum())
            count[d] += targets.numel()
            if method.calibrated:
                nll[d] -= float(scores_BSV.gather(-1, targets.unsqueeze(-1)).double().sum())
    total = sum(count.values())
    row = {"method": method.describe(), "tokens": total,
           "accuracy": sum(correct.values()) / total,
           "accuracy_by_domain": {d: correct[d] / count[d] for d in count},
           "bpb": None, "bpb_by_domain": None}
    if method.calibrated:
        row.update(bpb=sum(nll.values()) / total / LN2,
                   bpb_by_domain={d: nll[d] / count[d] / LN2 for d in count})
    return row
