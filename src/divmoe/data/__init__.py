"""Embedded multi-domain corpus and its data API (byte-level).

See ``DATA.md`` at the repository root for sources and licences.
"""
from .corpus import Document, domains, load_corpus, manifest
from .mixture import MixtureSampler, mixture_weights, unigram_entropy_bits, validation_set
from .tokenizer import ByteTokenizer
from .user_corpus import CorpusError, load_splits, load_user_corpus

__all__ = [
    "ByteTokenizer",
    "CorpusError",
    "Document",
    "MixtureSampler",
    "domains",
    "load_corpus",
    "load_splits",
    "load_user_corpus",
    "manifest",
    "mixture_weights",
    "unigram_entropy_bits",
    "validation_set",
]
