"""A small decoder-only transformer LM whose MLPs are MoE layers (or dense SwiGLU).

Reads top to bottom: embeddings → N × (attention, MLP) blocks with pre-RMSNorm →
final norm → tied output projection → (with targets) the cross-entropy, computed here and
nowhere else. ``ModelConfig.moe=False`` gives the dense baseline
whose MLP width equals the MoE's active width (k routed + shared experts), so both
models spend the same active FLOPs per token.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import NamedTuple, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ConfigError, option
from ..experts import SwiGLU
from ..layer import MoE, MoEConfig, RoutingStats


@dataclass
class ModelConfig:
    vocab_size: int = option(256, min=2, help="vocabulary size (256 = bytes)")
    d_model: int = option(128, min=1, help="model width")
    n_layers: int = option(4, min=1, help="transformer blocks")
    n_heads: int = option(4, min=1, help="attention heads (must divide d_model)")
    seq_len: int = option(128, min=1, help="context length in tokens")
    moe: bool = option(True, help="MoE MLPs; false = dense baseline with equal active params")
    moe_every: int = option(1, min=1, help="every n-th block has an MoE MLP (the rest dense)")
    paired_init: bool = option(False, help="draw each embedding, attention, router and dense "
                                           "weight from a generator seeded by (torch seed, its "
                                           "name): variants that change the experts' shapes "
                                           "still start every other part from the same weights "
                                           "(paired studies)")

    def check(self, prefix: str = "") -> None:
        if self.d_model % self.n_heads:
            raise ConfigError(f"{prefix}n_heads={self.n_heads} is not allowed: must divide "
                              f"{prefix}d_model={self.d_model}")
        if (self.d_model // self.n_heads) % 2:
            raise ConfigError(f"{prefix}d_model/n_heads={self.d_model // self.n_heads} is not "
                              f"allowed: the head width must be even (rotary embeddings)")


class LMOutput(NamedTuple):
    logits: torch.Tensor            # [B, S, V]
    loss: Optional[torch.Tensor]    # mean next-token cross-entropy (nats, fp32); None without targets
    aux_loss: torch.Tensor          # sum of the MoE layers' balance losses (0-dim)
    stats: list[RoutingStats]       # one per MoE block


class Attention(nn.Module):
    def __init__(self, d_model: int, n_heads: int):
        super().__init__()
        self.n_heads = n_heads
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.proj = nn.Linear(d_model, d_model, bias=False)

    def forward(self, x_BSD: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                kv=None) -> torch.Tensor:
        """``kv``: (KVCache, layer index) to attend over cached positions as well."""
        B, S, D = x_BSD.shape
        q, k, v = self.qkv(x_BSD).view(B, S, 3, self.n_heads, D // self.n_heads).unbind(2)
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if kv is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            y = kv[0].attend(kv[1], q, k, v)
        return self.proj(y.transpose(1, 2).reshape(B, S, D))


def rope_tables(seq_len: int, head_dim: int, base: float = 10000.0):
    inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles_SH = torch.outer(torch.arange(seq_len, dtype=torch.float32), inv_freq)
    return angles_SH.cos(), angles_SH.sin()


def apply_rope(x_BSNH: torch.Tensor, cos_SH: torch.Tensor, sin_SH: torch.Tensor) -> torch.Tensor:
    S = x_BSNH.shape[1]
    cos, sin = cos_SH[:S, None, :], sin_SH[:S, None, :]
    x1, x2 = x_BSNH.float().chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).to(x_BSNH.dtype)


def dense_equivalent_hidden(c: MoEConfig) -> int:
    """Hidden width of the dense MLP doing a token's active MoE work: k routed experts (of
    mean width, for heterogeneous experts) plus the shared experts."""
    routed = sum(c.expert_widths) / len(c.expert_widths) if c.expert_widths else c.expert_hidden
    shared = c.shared_expert_hidden or c.num_shared_experts * c.expert_hidden
    return max(1, round(c.top_k * routed) + shared)


class Block(nn.Module):
    def __init__(self, mc: ModelConfig, moe_cfg: MoEConfig, use_moe: bool):
        super().__init__()
        self.norm1 = nn.RMSNorm(mc.d_model)
        self.attn = Attention(mc.d_model, mc.n_heads)
        self.norm2 = nn.RMSNorm(mc.d_model)
        if use_moe:
            self.mlp = MoE(mc.d_model, moe_cfg)
        else:
            self.mlp = SwiGLU(mc.d_model, dense_equivalent_hidden(moe_cfg))

    @property
    def is_moe(self) -> bool:
        return isinstance(self.mlp, MoE)

    def forward(self, x, rope, tokens, kv=None):
        x = x + self.attn(self.norm1(x), rope, kv)
        h = self.norm2(x)
        if self.is_moe:
            out = self.mlp(h, token_ids=tokens)
            return x + out.output, out.aux_loss, out.stats
        return x + self.mlp(h), None, None


def _named_generator(seed: int, name: str) -> torch.Generator:
    digest = hashlib.sha256(f"divmoe.init:{seed}:{name}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


class MoETransformer(nn.Module):
    def __init__(self, mc: ModelConfig, moe_cfg: MoEConfig):
        super().__init__()
        self.config, self.moe_config = mc, moe_cfg
        self.embed = nn.Embedding(mc.vocab_size, mc.d_model)
        self.blocks = nn.ModuleList(
            Block(mc, moe_cfg, use_moe=mc.moe and (i + 1) % mc.moe_every == 0)
            for i in range(mc.n_layers))
        self.norm = nn.RMSNorm(mc.d_model)
        cos, sin = rope_tables(mc.seq_len, mc.d_model // mc.n_heads)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        if mc.paired_init:
            seed = torch.initial_seed()
            for name, m in self.named_modules():
                if isinstance(m, (nn.Linear, nn.Embedding)):
                    nn.init.normal_(m.weight, std=0.02, generator=_named_generator(seed, name))
                elif type(m).__module__.startswith("divmoe.experts."):  # expert weights too
                    with torch.random.fork_rng(devices=[]):
                        torch.manual_seed(_named_generator(seed, name).initial_seed())
                        m.reset_parameters()
        else:
            self.apply(self._init)
        for name, p in self.named_parameters():  # GPT-2 style scaled residual projections
            if name.endswith(("proj.weight", "w_out.weight")):
                g = _named_generator(torch.initial_seed(), name) if mc.paired_init else None
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * mc.n_layers), generator=g)

    @staticmethod
    def _init(m):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)

    @property
    def moe_layers(self) -> list[int]:
        return [i for i, b in enumerate(self.blocks) if b.is_moe]

    def forward(self, tokens_BS: torch.Tensor, targets_BS: torch.Tensor | None = None,
                cache=None) -> LMOutput:
        """Logits for ``tokens_BS`` [B, S]; with ``targets_BS`` [B, S] also the mean
        cross-entropy (train on ``out.loss + out.aux_loss``). With ``cache`` (a
        :class:`divmoe.inference.KVCache`) the tokens continue the cached positions, and their
        keys and values are appended to it."""
        if tokens_BS.dim() != 2:
            raise ValueError(f"tokens must be [batch, seq], got shape {tuple(tokens_BS.shape)}")
        if tokens_BS.shape[1] > self.config.seq_len:
            raise ValueError(f"sequence length {tokens_BS.shape[1]} exceeds model.seq_len="
                             f"{self.config.seq_len}")
        rope = (self.rope_cos, self.rope_sin)
        if cache is not None:  # the new tokens sit at positions length, length + 1, ...
            cache.check_step(*tokens_BS.shape)
            rope = (self.rope_cos[cache.length:], self.rope_sin[cache.length:])
        x = self.embed(tokens_BS)
        aux = x.new_zeros(())
        stats: list[RoutingStats] = []
        for i, block in enumerate(self.blocks):
            x, block_aux, block_stats = block(x, rope, tokens_BS,
                                              None if cache is None else (cache, i))
            if block_stats is not None:
                aux = aux + block_aux
                stats.append(block_stats)
        if cache is not None:
            cache.advance(tokens_BS.shape[1])
        logits = F.linear(self.norm(x), self.embed.weight)
        loss = None
        if targets_BS is not None:
            if targets_BS.shape != tokens_BS.shape:
                raise ValueError(f"targets shape {tuple(targets_BS.shape)} must equal the tokens' "
                                 f"{tuple(tokens_BS.shape)}")
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(),
                                   targets_BS.reshape(-1))
        return LMOutput(logits, loss, aux, stats)

    def begin_step(self) -> None:
        """Start an optimizer step (before its first micro-batch): resets per-step balancer
        state, e.g. the global-batch aux-loss counts."""
        for b in self.blocks:
            if b.is_moe:
                b.mlp.begin_step()

    def count_step(self, inputs_BS: Sequence[torch.Tensor]) -> None:
        """The counting pass of ``moe.aux_loss_global_counts=counting_pass`` (after
        :meth:`begin_step`, before the step's first backward): route every micro-batch of the
        step without gradients so that each MoE layer's global-batch counts hold the whole
        step (:mod:`divmoe.balance.aux_scope`). A no-op when no layer asks for it. The
        random-number state is restored afterwards, so the step's own forwards draw the same
        numbers (jitter) as the pass did."""
        layers = [b.mlp for b in self.blocks if b.is_moe]
        if not any(m.balancer.counts_step_first for m in layers):
            return
        cuda = [torch.cuda.current_device()] if inputs_BS[0].is_cuda else []
        with torch.no_grad(), torch.random.fork_rng(devices=cuda):
            for m in layers:
                m.balancer.counting = True
            try:
                for tokens_BS in inputs_BS:
                    self(tokens_BS)
            finally:
                for m in layers:
                    m.balancer.end_counting()

    def update_balancers(self) -> None:
        """Advance every MoE layer's balancing controllers; call after each optimizer step."""
        for b in self.blocks:
            if b.is_moe:
                b.mlp.update_balancers()

    def shard_experts(self, group, placement: dict[int, list[list[int]]] | None = None) -> None:
        """Shard every MoE layer's experts over ``group`` (:meth:`divmoe.layer.MoE.shard_experts`);
        ``placement`` maps a block index to its experts per rank (default: contiguous)."""
        for i, b in enumerate(self.blocks):
            if b.is_moe:
                b.mlp.shard_experts(group, (placement or {}).get(i))

    def param_counts(self) -> dict:
        """Total parameters, and parameters active for one token."""
        total = sum(p.numel() for p in self.parameters())
        active = total
        for b in self.blocks:
            if b.is_moe:
                active -= sum(p.numel() for p in b.mlp.parameters())
                active += b.mlp.active_params_per_token()
        return {"params_total": total, "params_active": active}
