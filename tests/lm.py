"""A few optimizer steps of the small LM, shared by the tests that only need it to train."""

import torch

from divmoe.train import train_step


def train_steps(model, tokens, steps=2, lr=1e-2):
    """Runs ``steps`` AdamW steps of :func:`divmoe.train.train_step` on ``tokens`` [B, S+1];
    returns (loss, stats) of each step."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    out = []
    for _ in range(steps):
        result = train_step(model, opt, [tokens])
        out.append((float(result.loss), result.stats))
    return out
