"""Generate bytes from a trained divmoe model, with a KV cache, for any decoding method.

Steps of :func:`generate`:
  1. Check the settings and that prompt + new tokens fit the context (model.seq_len).
  2. Prefill: score the prompt (with one KV cache per pass of the method), keep the scores
     of the token after it.
  3. Repeat: choose the next token from the scores (greedy at temperature 0; else softmax of
     scores / T restricted to the top-p nucleus, drawn from a generator seeded with ``seed``),
     hand it to ``on_token``, and score it (one position, against the cache; or, with
     ``use_cache=False``, the whole context again, the reference the cache is tested against).

Routers that route a set of tokens jointly (expert_choice, sinkhorn, a capacity limit) see
only the new tokens of a step under the KV cache, and the whole context without it, so the
two differ for them; token-wise routers (topk and the rest) give the same tokens either way.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from .methods import Plain, new_caches, next_token_scores


@dataclass
class Generation:
    tokens: torch.Tensor                 # [B, P + N] prompt and continuation
    new_tokens: torch.Tensor             # [B, N]
    seconds: float                       # wall time of steps 2-3
    step_scores: list[torch.Tensor] = field(default_factory=list)  # N × [B, V] (keep_scores)

    @property
    def tokens_per_s(self) -> float:
        """New tokens (all sequences) per second."""
        return self.new_tokens.numel() / self.seconds if self.seconds > 0 else float("inf")


def check_sampling(temperature: float, top_p: float) -> None:
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature)
            and temperature >= 0):
        raise ValueError(f"temperature={temperature!r} is not allowed: expected a number >= 0 "
                         f"(0 = greedy)")
    if not (isinstance(top_p, (int, float)) and 0 < top_p <= 1):
        raise ValueError(f"top_p={top_p!r} is not allowed: expected a number in (0, 1] "
                         f"(1 = no nucleus cut)")


def choose_next(scores_BV: torch.Tensor, temperature: float, top_p: float,
                generator: torch.Generator | None) -> torch.Tensor:
    """The next token [B] from scores (log-probabilities or contrastive scores, −inf =
    excluded): argmax at temperature 0, else a draw from softmax(scores / T) within the
    smallest set of best tokens whose probability reaches ``top_p``."""
    if temperature == 0:
        return scores_BV.argmax(-1)
    probs_BV = (scores_BV.float() / temperature).softmax(-1)
    if top_p < 1:
        sorted_BV, order_BV = probs_BV.sort(-1, descending=True)
        before_BV = sorted_BV.cumsum(-1) - sorted_BV  # mass of the better tokens
        sorted_BV = sorted_BV.masked_fill(before_BV >= top_p, 0.0)  # the best always stays
        probs_BV = torch.zeros_like(probs_BV).scatter_(-1, order_BV, sorted_BV)
    return torch.multinomial(probs_BV, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(model, prompt_BS: torch.Tensor, max_new: int, *, temperature: float = 1.0,
             top_p: float = 1.0, seed: int = 0, method=None, use_cache: bool = True,
             on_token: Callable[[torch.Tensor], None] | None = None,
             keep_scores: bool = False) -> Generation:
    """Continue each prompt row of ``prompt_BS`` [B, P] (token ids) by ``max_new`` tokens with
    ``method`` (default :class:`~divmoe.inference.methods.Plain`; or SCMoE, RoE). ``on_token``
    gets each step's tokens [B] as they are chosen (streaming). Leaves ``model`` in eval mode."""
    method = method or Plain()
    check_sampling(temperature, top_p)
    if isinstance(max_new, bool) or not isinstance(max_new, int) or max_new < 0:
        raise ValueError(f"max_new={max_new!r} is not allowed: expected an int >= 0")
    if prompt_BS.dim() != 2 or prompt_BS.shape[1] == 0:
        raise ValueError(f"the prompt must be token ids [batch, length >= 1], got shape "
                         f"{tuple(prompt_BS.shape)}")
    context = model.config.seq_len
    P = prompt_BS.shape[1]
    if P > context:
        raise ValueError(f"the prompt is {P} tokens, longer than the model's context "
                         f"model.seq_len={context}")
    if P + max_new > context:
        raise ValueError(f"the prompt ({P} tokens) + max_new={max_new} exceed the model's "
                         f"context model.seq_len={context}: at most {context - P} new tokens")
    method.check(model)
    model.eval()
    device = model.embed.weight.device
    prompt_BS = prompt_BS.to(device)
    generator = torch.Generator(device=device).manual_seed(seed)
    caches = new_caches(method, model, prompt_BS.shape[0]) if use_cache else None

    t0 = time.perf_counter()
    tokens_BS = prompt_BS
    scores_BV = next_token_scores(method, model, prompt_BS, caches)[:, -1]
    new, kept = [], []
    for step in range(max_new):
        if keep_scores:
            kept.append(scores_BV)
        next_B = choose_next(scores_BV, temperature, top_p, generator)
        new.append(next_B)
        if on_token is not None:
            on_token(next_B)
        tokens_BS = torch.cat([tokens_BS, next_B[:, None]], dim=1)
        if step + 1 < max_new:
            fed = next_B[:, None] if use_cache else tokens_BS
            scores_BV = next_token_scores(method, model, fed, caches)[:, -1]
    seconds = time.perf_counter() - t0
    new_BN = torch.stack(new, 1) if new else prompt_BS.new_zeros((prompt_BS.shape[0], 0))
    return Generation(tokens_BS, new_BN, seconds, kept)
