"""Domain mixtures over the byte-level corpus: weights, a deterministic sampler,
fixed validation windows and unigram entropies.
"""
from __future__ import annotations

import hashlib
import math
from collections import defaultdict
from typing import Mapping

import torch

from .corpus import Document

BATCH_DOMAINS = ("mixed", "single")

__all__ = ["BATCH_DOMAINS", "DOC_SEPARATOR", "mixture_weights", "MixtureSampler", "validation_set", "unigram_entropy_bits"]

#: inserted between consecutive documents of a domain's byte stream
DOC_SEPARATOR = "\n\n"


def _domain_streams(docs: list[Document]) -> dict[str, bytes]:
    """{domain: UTF-8 bytes of its documents (sorted by id) joined by DOC_SEPARATOR}, sorted by domain."""
    by_domain: dict[str, list[Document]] = defaultdict(list)
    for d in docs:
        by_domain[d.domain].append(d)
    return {
        dom: DOC_SEPARATOR.join(d.text for d in sorted(by_domain[dom], key=lambda d: d.id)).encode("utf-8")
        for dom in sorted(by_domain)
    }


def _as_tensor(data: bytes) -> torch.Tensor:
    if not data:
        return torch.empty(0, dtype=torch.uint8)
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def _encode(data: bytes, tokenizer) -> torch.Tensor:
    """Token ids of a UTF-8 stream: its bytes (uint8) without a tokenizer or with bytes, else
    the tokenizer's ids (int32: a corpus of BPE ids in int64 would double the memory)."""
    if tokenizer is None or tokenizer.name == "bytes":
        return _as_tensor(data)
    return tokenizer.encode_tensor(data.decode("utf-8", errors="ignore")).to(torch.int32)


def mixture_weights(
    sizes: Mapping[str, int],
    temperature: float = 1.0,
    weights: Mapping[str, float] | None = None,
) -> dict[str, float]:
    """Sampling probability of each domain (keys sorted, values sum to 1).

    By default ``p_d ∝ size_d ** (1 / temperature)``: ``temperature=1`` samples
    in proportion to size, larger temperatures flatten towards uniform, smaller
    ones sharpen towards the largest domain.  Explicit ``weights`` (any
    non-negative numbers, normalised here; domains left out get 0) override the
    size-based rule and ``temperature`` is then not used.
    """
    if not sizes:
        raise ValueError("sizes is empty: need at least one domain")
    if not isinstance(temperature, (int, float)) or not math.isfinite(temperature) or temperature <= 0:
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    names = sorted(sizes)
    for name in names:
        if sizes[name] < 0:
            raise ValueError(f"size of domain {name!r} is negative ({sizes[name]})")
    if weights is not None:
        unknown = sorted(set(weights) - set(names))
        if unknown:
            raise ValueError(f"unknown domain name(s) in weights: {unknown}; known domains: {names}")
        for name, w in weights.items():
            if not math.isfinite(float(w)) or w < 0:
                raise ValueError(f"weight of domain {name!r} must be finite and >= 0, got {w!r}")
        raw = [float(weights.get(n, 0.0)) for n in names]
        if sum(raw) <= 0:
            raise ValueError("weights sum to zero: at least one domain needs a positive weight")
    else:
        biggest = max(sizes.values())
        if biggest <= 0:
            raise ValueError("all domain sizes are zero")
        # (size / max) ** (1/T) avoids overflow for small temperatures
        raw = [(sizes[n] / biggest) ** (1.0 / temperature) if sizes[n] > 0 else 0.0 for n in names]
    total = sum(raw)
    return {n: r / total for n, r in zip(names, raw)}


def _step_seed(seed: int, step: int) -> int:
    digest = hashlib.sha256(f"divmoe.MixtureSampler:{int(seed)}:{int(step)}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


class MixtureSampler:
    """Random training windows drawn from a mixture of domains.

    Each domain's documents (sorted by id) are encoded to UTF-8 and joined with
    :data:`DOC_SEPARATOR` into one byte stream.  :meth:`batch` is a pure
    function of ``(seed, step, batch_size)``: a ``torch.Generator`` seeded from
    ``(seed, step)`` picks, for every row, a domain by the mixture weights and
    then a uniformly random window start in that domain's stream.  A resumed
    run therefore sees exactly the same batches as an uninterrupted one.

    ``batch_domains="single"``: the batch draws one domain by the mixture weights and all its
    rows come from it (domain-homogeneous micro-batches: the setting where global-batch
    balancing differs from micro-batch balancing, Qiu et al. 2025); the mixture then holds
    over batches instead of rows.

    ``tokenizer`` (default bytes): windows are ``seq_len + 1`` of its tokens, and a domain's size
    (for the weights by size) is its number of tokens.
    """

    def __init__(
        self,
        docs: list[Document],
        seq_len: int,
        seed: int,
        weights: Mapping[str, float] | None = None,
        temperature: float = 1.0,
        batch_domains: str = "mixed",
        tokenizer=None,
    ):
        if int(seq_len) != seq_len or seq_len < 1:
            raise ValueError(f"seq_len must be a positive integer, got {seq_len!r}")
        if batch_domains not in BATCH_DOMAINS:
            raise ValueError(f"batch_domains={batch_domains!r}: expected one of "
                             f"{', '.join(BATCH_DOMAINS)}")
        self.batch_domains = batch_domains
        self.seq_len = int(seq_len)
        self.seed = int(seed)
        streams = {d: _encode(b, tokenizer) for d, b in _domain_streams(docs).items()}
        if not streams:
            raise ValueError("MixtureSampler needs at least one document")
        self.domain_names: tuple[str, ...] = tuple(streams)
        self.stream_sizes: dict[str, int] = {d: len(b) for d, b in streams.items()}
        self.weights: dict[str, float] = mixture_weights(self.stream_sizes, temperature=temperature, weights=weights)
        self.probs = torch.tensor([self.weights[d] for d in self.domain_names], dtype=torch.float64)
        self._check_lengths()
        self._data = torch.cat([streams[d] for d in self.domain_names])
        sizes = torch.tensor([self.stream_sizes[d] for d in self.domain_names], dtype=torch.int64)
        self._offsets = torch.cumsum(sizes, 0) - sizes
        # number of valid window starts per domain (0 for domains never sampled and too short)
        self._n_starts = (sizes - self.seq_len).clamp_min(0)
        self._window = torch.arange(self.seq_len + 1, dtype=torch.int64)

    def _check_lengths(self) -> None:
        for d in self.domain_names:
            if self.weights[d] > 0 and self.stream_sizes[d] < self.seq_len + 1:
                raise ValueError(
                    f"domain {d!r} has {self.stream_sizes[d]} tokens, fewer than seq_len + 1 = {self.seq_len + 1}"
                )

    def set_weights(self, weights: Mapping[str, float]) -> None:
        """Replace the mixture (dynamic mixing); later :meth:`batch` calls sample from it."""
        self.weights = mixture_weights(self.stream_sizes, weights=weights)
        self._check_lengths()
        self.probs = torch.tensor([self.weights[d] for d in self.domain_names], dtype=torch.float64)

    def probe_windows(self, per_domain: int) -> dict[str, torch.Tensor]:
        """Fixed input windows ``{domain: [n, seq_len]}``: ``per_domain`` starts evenly spaced
        through each domain's stream (fewer when the stream is short). Deterministic."""
        out = {}
        for i, d in enumerate(self.domain_names):
            n = int(self._n_starts[i])
            if n < 1:
                continue
            starts = torch.linspace(0, n - 1, min(per_domain, n)).long() + self._offsets[i]
            out[d] = self._data[starts.unsqueeze(1) + self._window[:-1]].long()
        return out

    @property
    def num_domains(self) -> int:
        return len(self.domain_names)

    def batch(self, step: int, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(tokens [batch_size, seq_len + 1] int64, domain_ids [batch_size] int64)``.

        ``tokens[:, :-1]`` are inputs and ``tokens[:, 1:]`` next-byte targets;
        ``domain_ids`` index :attr:`domain_names`.
        """
        if int(batch_size) != batch_size or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        if int(step) != step or step < 0:
            raise ValueError(f"step must be a non-negative integer, got {step!r}")
        g = torch.Generator(device="cpu")
        g.manual_seed(_step_seed(self.seed, step))
        if self.batch_domains == "single":
            domain_ids = torch.multinomial(self.probs, 1, generator=g).expand(int(batch_size))
        else:
            domain_ids = torch.multinomial(self.probs, int(batch_size), replacement=True,
                                           generator=g)
        u = torch.rand(int(batch_size), generator=g, dtype=torch.float64)
        n = self._n_starts[domain_ids]
        starts = torch.minimum((u * n).long(), n - 1)
        idx = (self._offsets[domain_ids] + starts).unsqueeze(1) + self._window
        return self._data[idx].long(), domain_ids.long()

    def __repr__(self) -> str:
        w = ", ".join(f"{d}={self.weights[d]:.3f}" for d in self.domain_names)
        return f"MixtureSampler(seq_len={self.seq_len}, seed={self.seed}, weights={{{w}}})"


def validation_set(docs: list[Document], seq_len: int, max_bytes_per_domain: int,
                   tokenizer=None) -> dict[str, torch.Tensor]:
    """Fixed evaluation windows per domain: ``{domain: LongTensor [N, seq_len + 1]}``.

    Each domain's stream (documents sorted by id, joined by
    :data:`DOC_SEPARATOR`) is truncated to ``max_bytes_per_domain`` bytes, encoded with
    ``tokenizer`` (default bytes) and cut into consecutive windows with stride ``seq_len``:
    window ``i`` covers tokens ``[i*seq_len, (i+1)*seq_len]``, so the predicted targets
    (``w[:, 1:]``) do not overlap and every token after the first is scored exactly once.
    Deterministic.
    """
    if int(seq_len) != seq_len or seq_len < 1:
        raise ValueError(f"seq_len must be a positive integer, got {seq_len!r}")
    if max_bytes_per_domain < seq_len + 1:
        raise ValueError(f"max_bytes_per_domain ({max_bytes_per_domain}) must be >= seq_len + 1 ({seq_len + 1})")
    out = {}
    for dom, data in _domain_streams(docs).items():
        stream = _encode(data[: int(max_bytes_per_domain)], tokenizer)
        n = (stream.numel() - 1) // seq_len
        if n < 1:
            raise ValueError(f"domain {dom!r} has only {stream.numel()} tokens in its first "
                             f"{max_bytes_per_domain} bytes, fewer than seq_len + 1 = {seq_len + 1}")
        idx = torch.arange(n, dtype=torch.int64).unsqueeze(1) * seq_len + torch.arange(seq_len + 1)
        out[dom] = stream[idx].long()
    return out


def _entropy_bits(counts: torch.Tensor) -> float:
    total = counts.sum()
    if total == 0:
        return 0.0
    p = counts[counts > 0].double() / total
    return float(-(p * torch.log2(p)).sum())


def unigram_entropy_bits(docs: list[Document]) -> dict[str, float]:
    """Byte-unigram entropy in bits per byte, per domain and pooled under ``"all"``.

    A context-free baseline: a model that beats it in bits-per-byte has learned
    more than byte frequencies.  Estimated on the given documents (plug-in estimate).
    """
    texts: dict[str, list[str]] = defaultdict(list)
    for d in docs:
        texts[d.domain].append(d.text)
    counts = {
        dom: torch.bincount(_as_tensor("".join(texts[dom]).encode("utf-8")).long(), minlength=256)
        for dom in sorted(texts)
    }
    if not counts:
        raise ValueError("unigram_entropy_bits needs at least one document")
    out = {dom: _entropy_bits(counts[dom]) for dom in sorted(counts)}
    out["all"] = _entropy_bits(torch.stack(list(counts.values())).sum(0))
    return out
