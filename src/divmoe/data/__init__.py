"""Embedded multi-domain corpus and its data API (byte-level).

See ``DATA.md`` at the repository root for sources and licences.
"""
from .corpus import Document, domains, load_corpus, manifest
from .mixture import MixtureSampler, mixture_weights, unigram_entropy_bits, validation_set
from .tokenizer import ByteTokenizer

__all__ = [
    "ByteTokenizer",
    "Document",
    "MixtureSampler",
    "domains",
    "load_corpus",
    "manifest",
    "mixture_weights",
    "unigram_entropy_bits",
    "validation_set",
]
