"""The attention KV cache of :class:`~divmoe.models.MoETransformer` for incremental decoding.

Each attention layer keeps the rotated keys and the values of every position seen so far in a
buffer preallocated to the model's context (``model.seq_len``), so a decoding step computes
attention for its new tokens only, against the cached past. ``model(tokens, cache=cache)``
appends the new positions and advances :attr:`KVCache.length`; without ``cache`` the model
computes exactly what it always did.
"""

from __future__ import annotations

import torch


class KVCache:
    """Keys and values [B, heads, max_len, head_dim] per attention layer, the first
    :attr:`length` positions filled."""

    def __init__(self, n_layers: int, batch: int, n_heads: int, head_dim: int, max_len: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        shape = (batch, n_heads, max_len, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.batch, self.max_len, self.length = batch, max_len, 0

    @classmethod
    def for_model(cls, model, batch: int) -> "KVCache":
        mc = model.config
        w = model.embed.weight
        return cls(mc.n_layers, batch, mc.n_heads, mc.d_model // mc.n_heads, mc.seq_len,
                   w.dtype, w.device)

    def check_step(self, batch: int, new: int) -> None:
        """Refuse a step that does not fit: another batch size, or past the context."""
        if batch != self.batch:
            raise ValueError(f"the KV cache holds {self.batch} sequences, got a batch of {batch}")
        if self.length + new > self.max_len:
            raise ValueError(f"{self.length} cached + {new} new tokens exceed the model's context "
                             f"model.seq_len={self.max_len}")

    def attend(self, layer: int, q_BNSH: torch.Tensor, k_BNSH: torch.Tensor,
               v_BNSH: torch.Tensor) -> torch.Tensor:
        """Store this step's keys/values of ``layer`` after the cached ones and return the
        causal attention of the new queries over all of them, [B, heads, S, head_dim]."""
        P, S = self.length, q_BNSH.shape[2]
        self.keys[layer][:, :, P:P + S] = k_BNSH
        self.values[layer][:, :, P:P + S] = v_BNSH
        k, v = self.keys[layer][:, :, :P + S], self.values[layer][:, :, :P + S]
        if P == 0:  # the prompt: the same causal call as a forward without a cache
            return torch.nn.functional.scaled_dot_product_attention(q_BNSH, k, v, is_causal=True)
        # SDPA's is_causal aligns the mask top-left; new query i sees the past and new keys ≤ i.
        mask_SL = (torch.arange(P + S, device=q_BNSH.device)[None, :]
                   <= P + torch.arange(S, device=q_BNSH.device)[:, None])
        return torch.nn.functional.scaled_dot_product_attention(
            q_BNSH, k, v, attn_mask=None if S == 1 else mask_SL)

    def advance(self, new: int) -> None:
        self.length += new
