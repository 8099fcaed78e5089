"""The user's own corpus (``data.corpus=PATH``): documents with domain labels, split
deterministically into train and validation.

PATH is one of three layouts:

* a folder with one subfolder per domain: every regular file below ``PATH/<domain>/``
  (recursively, hidden files skipped) is one document of that domain;
* a ``.yaml`` / ``.yml`` file mapping each domain to a file glob (relative globs are taken
  from the YAML file's folder; ``**`` recurses): every matched regular file is a document;
* a ``.jsonl`` file, one JSON object per line with string fields ``text`` and ``domain``
  (an optional ``id``; otherwise the line number names the document).

Split (per domain, by document, as for the embedded corpus): documents are ordered by
``sha256("split:" + id)`` and taken into validation until it holds
``val_fraction`` of the domain's bytes (at least one document); the rest is train.
Every failure is a :class:`CorpusError` naming the path, the domain and what is allowed.
"""
from __future__ import annotations

import glob
import hashlib
import json
from collections import defaultdict
from pathlib import Path

from .corpus import Document

__all__ = ["CorpusError", "load_splits", "load_user_corpus", "split_documents"]

YAML_SUFFIXES = (".yaml", ".yml")


class CorpusError(ValueError):
    """The user's corpus cannot be used as given."""


def _decode(raw: bytes, where: str) -> str:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CorpusError(f"data.corpus: {where} is not UTF-8 text (byte 0x{raw[exc.start]:02x} at "
                          f"offset {exc.start}); convert it to UTF-8 or remove it") from None
    return text.replace("\r\n", "\n").replace("\r", "\n")


def _file_docs(domain: str, files: list[Path], root: Path) -> list[Document]:
    docs = []
    for path in sorted(files):
        text = _decode(path.read_bytes(), str(path))
        if text.strip():
            rel = path.relative_to(root) if path.is_relative_to(root) else path
            docs.append(Document(f"{domain}/{rel.as_posix()}", domain, text))
    return docs


def _from_folder(path: Path) -> dict[str, list[Document]]:
    subdirs = sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not subdirs:
        raise CorpusError(f"data.corpus: folder {str(path)!r} has no subfolders; it needs one "
                          f"subfolder per domain (e.g. {path}/code/, {path}/prose/), or give a "
                          f".jsonl file or a .yaml file of domain: glob")
    out = {}
    for sub in subdirs:
        files = [p for p in sub.rglob("*") if p.is_file()
                 and not any(part.startswith(".") for part in p.relative_to(sub).parts)]
        out[sub.name] = _file_docs(sub.name, files, sub)
    return out


def _from_globs(path: Path) -> dict[str, list[Document]]:
    import yaml

    try:
        spec = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise CorpusError(f"data.corpus: {str(path)!r} is not readable YAML: {exc}") from None
    if not isinstance(spec, dict) or not spec or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in spec.items()):
        raise CorpusError(f"data.corpus: {str(path)!r} must map each domain name to one file glob "
                          f"(e.g. 'code: src/**/*.py')")
    out = {}
    for domain, pattern in spec.items():
        full = pattern if Path(pattern).is_absolute() else str(path.resolve().parent / pattern)
        files = [Path(p) for p in glob.glob(full, recursive=True) if Path(p).is_file()]
        if not files:
            raise CorpusError(f"data.corpus: domain {domain!r} is empty: the glob {pattern!r} "
                              f"matches no files (looked for {full})")
        out[domain] = _file_docs(domain, files, path.resolve().parent)
    return out


def _from_jsonl(path: Path) -> dict[str, list[Document]]:
    out: dict[str, list[Document]] = defaultdict(list)
    raw = path.read_bytes()
    for no, line in enumerate(_decode(raw, str(path)).split("\n"), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as exc:
            raise CorpusError(f"data.corpus: {path}:{no} is not valid JSON ({exc.msg})") from None
        if not isinstance(rec, dict) or not isinstance(rec.get("text"), str) \
                or not isinstance(rec.get("domain"), str) or not rec["domain"]:
            raise CorpusError(f"data.corpus: {path}:{no} needs string fields 'text' and 'domain' "
                              f"(non-empty domain)")
        domain = rec["domain"]
        doc_id = f"{domain}/{rec['id']}" if "id" in rec else f"{domain}/line{no:07d}"
        text = rec["text"].replace("\r\n", "\n").replace("\r", "\n")
        if text.strip():
            out[domain].append(Document(doc_id, domain, text))
        else:
            out.setdefault(domain, [])
    if not out:
        raise CorpusError(f"data.corpus: {path} holds no records")
    return dict(out)


def split_documents(docs: list[Document], val_fraction: float) -> tuple[list[Document], list[Document]]:
    """(train, val) of one domain's documents: validation takes documents in
    ``sha256("split:" + id)`` order until it holds ``val_fraction`` of the bytes (≥ 1 doc)."""
    total = sum(len(d.text.encode("utf-8")) for d in docs)
    order = sorted(docs, key=lambda d: hashlib.sha256(b"split:" + d.id.encode()).hexdigest())
    val, vbytes = [], 0
    for doc in order:
        if val and vbytes >= val_fraction * total:
            break
        val.append(doc)
        vbytes += len(doc.text.encode("utf-8"))
    chosen = {d.id for d in val}
    return [d for d in docs if d.id not in chosen], val


def load_user_corpus(path: str | Path, seq_len: int, val_fraction: float = 0.05) -> dict[str, list[Document]]:
    """``{"train": [...], "val": [...]}`` of the corpus at ``path``, each sorted by (domain, id).

    Steps: read the layout (folder / YAML globs / JSONL), reject empty domains, split each
    domain, and reject a domain whose train or validation part is shorter than one window
    (``seq_len + 1`` bytes).
    """
    path = Path(path)
    if not path.exists():
        raise CorpusError(f"data.corpus: {str(path)!r} does not exist; give a folder with one "
                          f"subfolder per domain, a .yaml file of domain: glob, or a .jsonl file "
                          f"with 'text' and 'domain' fields")
    if path.is_dir():
        by_domain = _from_folder(path)
    elif path.suffix in YAML_SUFFIXES:
        by_domain = _from_globs(path)
    elif path.suffix == ".jsonl":
        by_domain = _from_jsonl(path)
    else:
        raise CorpusError(f"data.corpus: {str(path)!r} is a {path.suffix or 'suffix-less'} file; "
                          f"allowed: a folder, a .yaml/.yml file of domain: glob, or a .jsonl file")
    need = seq_len + 1
    out = {"train": [], "val": []}
    empty = [d for d in sorted(by_domain) if not by_domain[d]]
    if empty:
        raise CorpusError(f"data.corpus: domain {empty[0]!r} is empty (no non-empty documents)")
    for domain in sorted(by_domain):
        docs = sorted(by_domain[domain], key=lambda d: d.id)
        ids = [d.id for d in docs]
        if len(set(ids)) != len(ids):
            dup = next(i for i in ids if ids.count(i) > 1)
            raise CorpusError(f"data.corpus: document id {dup!r} occurs twice in domain {domain!r}")
        train, val = split_documents(docs, val_fraction)
        sizes = {s: sum(len(d.text.encode("utf-8")) for d in part) for s, part in
                 (("train", train), ("val", val))}
        if sizes["train"] < need or sizes["val"] < need:
            total = sum(sizes.values())
            raise CorpusError(
                f"data.corpus: domain {domain!r} is too small for its validation share: {total} "
                f"bytes in {len(docs)} document(s) split into {sizes['train']} train / "
                f"{sizes['val']} validation bytes; each part needs at least seq_len + 1 = {need} "
                f"bytes (add documents, or change data.val_fraction={val_fraction})")
        out["train"] += train
        out["val"] += val
    return out


def load_splits(corpus: str | Path | None, seq_len: int,
                val_fraction: float = 0.05) -> tuple[list[Document], list[Document]]:
    """(train, val) documents: the embedded corpus when ``corpus`` is None, else the user's."""
    if corpus is None:
        from .corpus import load_corpus

        return load_corpus("train"), load_corpus("val")
    splits = load_user_corpus(corpus, seq_len, val_fraction)
    return splits["train"], splits["val"]
