"""The embedded multi-domain corpus (real text, shipped inside the package).

The corpus lives in ``divmoe/data/corpus/``: ``corpus.jsonl.xz`` (one JSON object
per line, ``{"id", "domain", "split", "text"}``) and ``manifest.json`` (sources,
licences, sizes, checksums).  It is built by ``scripts/build_corpus.py``; see
``DATA.md`` at the repository root.  Nothing is downloaded at run time.
"""
from __future__ import annotations

import hashlib
import json
import lzma
from dataclasses import dataclass
from importlib import resources

__all__ = ["Document", "SPLITS", "domains", "load_corpus", "manifest"]

SPLITS = ("train", "val")
_CORPUS_FILE = "corpus.jsonl.xz"
_MANIFEST_FILE = "manifest.json"

_CACHE: dict = {}


@dataclass(frozen=True)
class Document:
    """One document of the corpus: a book chapter, a source file, a doc page."""

    id: str
    domain: str
    text: str


def _corpus_dir():
    return resources.files("divmoe.data").joinpath("corpus")


def manifest() -> dict:
    """The content of ``manifest.json`` (a fresh copy; safe to mutate)."""
    if "manifest" not in _CACHE:
        raw = _corpus_dir().joinpath(_MANIFEST_FILE).read_text(encoding="utf-8")
        _CACHE["manifest"] = json.loads(raw)
    return json.loads(json.dumps(_CACHE["manifest"]))


def domains() -> tuple[str, ...]:
    """Sorted names of the corpus domains."""
    if "manifest" not in _CACHE:
        manifest()
    return tuple(sorted(_CACHE["manifest"]["domains"]))


def _load_all() -> dict[str, list[Document]]:
    if "splits" in _CACHE:
        return _CACHE["splits"]
    compressed = _corpus_dir().joinpath(_CORPUS_FILE).read_bytes()
    if "manifest" not in _CACHE:
        manifest()
    expected = _CACHE["manifest"]["files"][_CORPUS_FILE]["sha256"]
    actual = hashlib.sha256(compressed).hexdigest()
    if actual != expected:
        raise RuntimeError(
            f"{_CORPUS_FILE}: sha256 {actual} does not match manifest ({expected}); "
            "the shipped corpus is damaged (rebuild it with scripts/build_corpus.py)"
        )
    out: dict[str, list[Document]] = {s: [] for s in SPLITS}
    for line in lzma.decompress(compressed).decode("utf-8").splitlines():
        if not line:
            continue
        rec = json.loads(line)
        out[rec["split"]].append(Document(id=rec["id"], domain=rec["domain"], text=rec["text"]))
    for docs in out.values():
        docs.sort(key=lambda d: (d.domain, d.id))
    _CACHE["splits"] = out
    return out


def load_corpus(split: str) -> list[Document]:
    """All documents of one split (``"train"`` or ``"val"``), sorted by (domain, id).

    Decompressed once per process and cached; each call returns a new list
    (the :class:`Document` objects are immutable and shared).
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; allowed values: {', '.join(SPLITS)}")
    return list(_load_all()[split])
