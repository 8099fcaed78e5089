"""A few optimizer steps of the small LM, shared by the tests that only need it to train."""

import torch


def train_steps(model, tokens, steps=2, lr=1e-2):
    """Runs ``steps`` AdamW steps on ``tokens`` [B, S+1]; returns (loss, stats) of each step."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    vocab = model.config.vocab_size
    out = []
    for _ in range(steps):
        logits, aux, stats = model(tokens[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, vocab),
                                                 tokens[:, 1:].reshape(-1))
        opt.zero_grad()
        (loss + aux).backward()
        opt.step()
        model.update_balancers()
        out.append((float(loss.detach()), stats))
    return out
