"""Byte-level tokenizer: one token per UTF-8 byte, vocabulary of 256.

With this tokenizer, bits per byte = (cross-entropy in nats per token) / ln 2.
"""
from __future__ import annotations

from typing import Iterable

import torch

__all__ = ["ByteTokenizer"]


class ByteTokenizer:
    """Maps text to its UTF-8 bytes and back."""

    vocab_size = 256

    def encode(self, text: str) -> list[int]:
        """UTF-8 bytes of ``text`` as a list of ints in [0, 255]."""
        return list(text.encode("utf-8"))

    def encode_tensor(self, text: str) -> torch.Tensor:
        """UTF-8 bytes of ``text`` as a 1-D ``torch.uint8`` tensor."""
        data = text.encode("utf-8")
        if not data:
            return torch.empty(0, dtype=torch.uint8)
        return torch.frombuffer(bytearray(data), dtype=torch.uint8)

    def decode(self, ids: Iterable[int] | torch.Tensor) -> str:
        """Text from byte ids; invalid UTF-8 sequences become U+FFFD."""
        if isinstance(ids, torch.Tensor):
            ids = ids.reshape(-1).tolist()
        try:
            data = bytes(int(i) for i in ids)
        except ValueError as exc:
            raise ValueError(f"byte ids must lie in [0, 255]: {exc}") from None
        return data.decode("utf-8", errors="replace")

    def __repr__(self) -> str:
        return "ByteTokenizer(vocab_size=256)"
