"""Tokenizers: bytes (one token per UTF-8 byte, the default) and a byte-level BPE trained on the
training split (``data.tokenizer=bpe``).

Both map every token id to the bytes it stands for (``bytes_of``, ``token_bytes``), so bits per
byte stay exact whatever the tokenizer: bpb = (Σ nats over the target tokens) / ln 2 / (Σ bytes
those tokens stand for). With bytes that is nats per token / ln 2.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Iterable

import torch

from ..files import atomic_write_text

__all__ = ["BPETokenizer", "ByteTokenizer", "TOKENIZERS", "TOKENIZER_FILE", "run_tokenizer"]

TOKENIZERS = ("bytes", "bpe")
_ENCODED: dict[tuple[str, bytes], torch.Tensor] = {}
#: a run folder's BPE (written when the run starts, read on resume and by inference)
TOKENIZER_FILE = "tokenizer.json"


def _ids_list(ids: Iterable[int] | torch.Tensor) -> list[int]:
    return ids.reshape(-1).tolist() if isinstance(ids, torch.Tensor) else [int(i) for i in ids]


class ByteTokenizer:
    """Maps text to its UTF-8 bytes and back."""

    vocab_size = 256
    name = "bytes"

    def encode(self, text: str) -> list[int]:
        """UTF-8 bytes of ``text`` as a list of ints in [0, 255]."""
        return list(text.encode("utf-8"))

    def encode_tensor(self, text: str) -> torch.Tensor:
        """UTF-8 bytes of ``text`` as a 1-D ``torch.uint8`` tensor."""
        data = text.encode("utf-8")
        if not data:
            return torch.empty(0, dtype=torch.uint8)
        return torch.frombuffer(bytearray(data), dtype=torch.uint8)

    def bytes_of(self, ids: Iterable[int] | torch.Tensor) -> bytes:
        try:
            return bytes(_ids_list(ids))
        except ValueError as exc:
            raise ValueError(f"byte ids must lie in [0, 255]: {exc}") from None

    def decode(self, ids: Iterable[int] | torch.Tensor) -> str:
        """Text from byte ids; invalid UTF-8 sequences become U+FFFD."""
        return self.bytes_of(ids).decode("utf-8", errors="replace")

    @property
    def token_bytes(self) -> torch.Tensor:
        """Bytes each token id stands for, ``[vocab_size]`` int64 (all ones)."""
        return torch.ones(256, dtype=torch.int64)

    def __repr__(self) -> str:
        return "ByteTokenizer(vocab_size=256)"


def _byte_chars() -> dict[str, int]:
    """The byte-level alphabet of GPT-2's BPE (what ``tokenizers``' ByteLevel pre-tokenizer
    writes): printable Latin-1 bytes stand for themselves, the other 68 bytes for the code
    points from 256 up, in byte order. Returns {char: byte}."""
    keep = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


class BPETokenizer:
    """A byte-level BPE (Hugging Face ``tokenizers``): the 256 bytes plus merges learned on the
    training text. Every text encodes and decodes back exactly, and every id stands for a fixed
    byte string, so ``token_bytes`` gives the exact bytes behind any target."""

    name = "bpe"

    def __init__(self, tokenizer):
        self._tok = tokenizer
        self.fingerprint = hashlib.sha256(tokenizer.to_str(pretty=False).encode()).hexdigest()
        chars = _byte_chars()
        vocab = tokenizer.get_vocab()
        self.vocab_size = len(vocab)
        self._bytes: list[bytes] = [b""] * self.vocab_size
        for piece, i in vocab.items():
            self._bytes[i] = bytes(chars[c] for c in piece)
        if any(not b for b in self._bytes):
            raise ValueError("the BPE's ids are not contiguous from 0 or a token is empty: not a "
                             "divmoe byte-level BPE")
        self._lengths = torch.tensor([len(b) for b in self._bytes], dtype=torch.int64)

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int) -> "BPETokenizer":
        """Learn ``vocab_size − 256`` merges on ``texts`` (fewer when the text runs out of
        pairs seen twice). Deterministic for the same texts."""
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
        if int(vocab_size) != vocab_size or vocab_size < 257:
            raise ValueError(f"BPE vocab_size must be an integer > 256 (the bytes plus at least "
                             f"one merge), got {vocab_size!r}")
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=int(vocab_size), min_frequency=2,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                      special_tokens=[], show_progress=False)
        tok.train_from_iterator(list(texts), trainer)
        return cls(tok)

    @classmethod
    def load(cls, path: str | Path) -> "BPETokenizer":
        from tokenizers import Tokenizer
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer file {str(path)!r} does not exist")
        try:
            return cls(Tokenizer.from_file(str(path)))
        except Exception as exc:  # the Rust side raises plain Exceptions
            raise ValueError(f"{path} is not a tokenizer file `tokenizers` can read: {exc}") from None

    def save(self, path: str | Path) -> None:
        atomic_write_text(Path(path), self._tok.to_str(pretty=False))

    def encode_tensor(self, text: str) -> torch.Tensor:
        """Token ids of ``text``, 1-D int64. A corpus stream takes seconds to encode, so the
        last few encodings are kept (a study's worker trains many runs on the same text)."""
        key = (self.fingerprint, hashlib.sha256(text.encode("utf-8", "surrogatepass")).digest())
        ids = _ENCODED.get(key)
        if ids is None:
            ids = torch.tensor(self._tok.encode(text).ids, dtype=torch.int64)
            if len(_ENCODED) >= 32:
                _ENCODED.pop(next(iter(_ENCODED)))
            _ENCODED[key] = ids
        return ids.clone()

    def encode(self, text: str) -> list[int]:
        return list(self._tok.encode(text).ids)

    def bytes_of(self, ids: Iterable[int] | torch.Tensor) -> bytes:
        ids = _ids_list(ids)
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"token id {bad[0]} is outside the BPE's vocabulary [0, "
                             f"{self.vocab_size})")
        return b"".join(self._bytes[i] for i in ids)

    def decode(self, ids: Iterable[int] | torch.Tensor) -> str:
        return self.bytes_of(ids).decode("utf-8", errors="replace")

    @property
    def token_bytes(self) -> torch.Tensor:
        """Bytes each token id stands for, ``[vocab_size]`` int64."""
        return self._lengths

    def __repr__(self) -> str:
        return f"BPETokenizer(vocab_size={self.vocab_size})"


def run_tokenizer(run_dir: str | Path, data_cfg, train_texts: Iterable[str] | None = None,
                  write: bool = True):
    """The tokenizer of a run: bytes, or the BPE in ``run_dir/tokenizer.json``. A new BPE run
    (no file yet) learns ``data.bpe_vocab`` tokens on ``train_texts`` and, with ``write``, saves
    them there, so a resumed run and inference read the very same merges."""
    if data_cfg.tokenizer == "bytes":
        return ByteTokenizer()
    path = Path(run_dir) / TOKENIZER_FILE
    if path.is_file():
        return BPETokenizer.load(path)
    if train_texts is None:
        raise FileNotFoundError(f"{run_dir} was trained with data.tokenizer=bpe but has no "
                                f"{TOKENIZER_FILE}: it cannot be decoded without its merges")
    tok = BPETokenizer.train(train_texts, data_cfg.bpe_vocab)
    if write:
        tok.save(path)
    return tok

